"""A model that does (almost) no work, for measuring everything around the model.

Its VAE averages 8×8 blocks into the latent and blows them back up; its UNet predicts zero
noise. With the last timestep (``t_index_list=(49,)``) the output is the input at 1/8
resolution in 8-pixel blocks: the frame path (decode, plumbing, encode) runs for real, the
model costs nothing, so fps through the app is the transport ceiling.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import LCMScheduler

from engine.components import Components
from engine.presets import build_preset


class NullVae(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        pooled = F.avg_pool2d(images, 8)
        return SimpleNamespace(latents=torch.cat([pooled, torch.zeros_like(pooled[:, :1])], dim=1))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=F.interpolate(latents[:, :3], scale_factor=8, mode="nearest"))


class NullUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=4)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states=None, return_dict: bool = True):
        return (torch.zeros_like(sample),)


def build_null(device: str | torch.device = "cpu") -> Components:
    tiny = build_preset("tiny", device=device)
    return Components(name="null", unet=NullUNet(), vae=NullVae(), text_encoder=tiny.text_encoder,
                      tokenizer=tiny.tokenizer, scheduler=LCMScheduler.from_config(tiny.scheduler.config),
                      device=torch.device(device), dtype=torch.float32)
