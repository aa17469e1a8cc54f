"""The loaded model parts a stream needs, however they were obtained (hub, folder, file, preset)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

Vae = AutoencoderKL | AutoencoderTiny
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Components:
    """A UNet, a VAE, a text encoder with its tokenizer, and an LCM scheduler, on one device."""

    name: str
    unet: UNet2DConditionModel
    vae: Vae
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: LCMScheduler
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        prediction = self.prediction_type
        if prediction not in SUPPORTED_PREDICTION_TYPES:
            raise ValueError(
                f"model {self.name!r} predicts {prediction!r}; diffcam supports {list(SUPPORTED_PREDICTION_TYPES)}"
            )
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        if self.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(dtype=torch.float32)  # SD's KL VAE overflows in fp16: it asks to run in fp32

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def family(self) -> str:
        """``sd1`` (CLIP ViT-L, 768-wide text states) or ``sd2`` (OpenCLIP ViT-H, 1024), or ``custom``."""
        return {768: "sd1", 1024: "sd2"}.get(int(self.text_encoder.config.hidden_size), "custom")
