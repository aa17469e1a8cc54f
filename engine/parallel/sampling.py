"""Multi-step txt2img and img2img on one device: the loop AsyncDiff parallelises, and its reference.

A :class:`Sampling` holds what one generation fixes before its first step (scheduler and
timesteps, the text rows, the first latent); :func:`generate` is the plain loop, one UNet call
per step. The AsyncDiff ranks build the same :class:`Sampling` from the same request, so their
noise, timesteps and scheduler arithmetic are the reference's, operation for operation.

Classifier-free guidance puts the negative and the positive prompt in one batch of two rows
(``guidance_scale > 1``, as diffusers does); the scheduler is DDIM (SD 2.1's own) or Euler,
configured from the model's scheduler config. Noise comes from a CPU generator seeded with
``seed``, so it is the same on every device and every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from engine.components import Components
from engine.image import postprocess, preprocess
from engine.names import SCHEDULER_NAMES
from engine.prompts import PromptEncoder
from engine.vae import decode_latents, encode_latents

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES, "engine.names.SCHEDULER_NAMES must name every scheduler"
MAX_STEPS = 1000


@dataclass(frozen=True)
class GenerationRequest:
    """One picture: txt2img, or img2img when ``image`` (uint8 H×W×3 RGB) is given."""

    prompt: str = "a kitten sitting by a door"
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    seed: int = 0
    scheduler: str = "ddim"
    image: np.ndarray | None = None
    strength: float = 0.75

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps={self.steps} must be between 1 and {MAX_STEPS}")
        for name in ("width", "height"):
            side = getattr(self, name)
            if side < 8 or side % 8:
                raise ValueError(f"{name}={side} must be a positive multiple of 8 (the VAE's factor)")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r} is not one of {sorted(SCHEDULERS)}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 0 (<= 1 turns guidance off)")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength={self.strength} must be in (0, 1]")
        if self.image is not None and (self.image.ndim != 3 or self.image.shape[2] != 3
                                       or self.image.dtype != np.uint8):
            raise ValueError(f"image must be uint8 H×W×3 RGB, got {self.image.dtype} {self.image.shape}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        """Rows in each UNet call: two with guidance (negative, positive), else one."""
        return 2 if self.guided else 1


class Sampling:
    """A generation's fixed parts on ``components``' device: timesteps, text rows, first latent."""

    def __init__(self, components: Components, request: GenerationRequest) -> None:
        self.components = components
        self.request = request
        self.scheduler = make_scheduler(components, request.scheduler)
        self.scheduler.set_timesteps(request.steps, device=components.device)
        self.timesteps = self._timesteps()
        self.text = self._text_rows()
        self.latent = self._first_latent()

    def __len__(self) -> int:
        return len(self.timesteps)

    def model_input(self, latent: torch.Tensor, index: int) -> torch.Tensor:
        """The UNet's sample at step ``index``: the scheduler's scaling, one row per guidance row."""
        scaled = self.scheduler.scale_model_input(latent, self.timesteps[index])
        return scaled.expand(self.request.rows, -1, -1, -1)

    def guide(self, prediction: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over the (negative, positive) rows; identity without guidance."""
        if not self.request.guided:
            return prediction
        negative, positive = prediction.chunk(2)
        return negative + self.request.guidance_scale * (positive - negative)

    def step(self, latent: torch.Tensor, prediction: torch.Tensor, index: int) -> torch.Tensor:
        """The latent after step ``index``, from the UNet's raw (unguided) prediction at that step."""
        return self.scheduler.step(self.guide(prediction), self.timesteps[index], latent).prev_sample

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """The picture, uint8 H×W×3."""
        return postprocess(decode_latents(self.components.vae, latent), "np")[0]

    def _timesteps(self) -> torch.Tensor:
        timesteps = self.scheduler.timesteps
        if self.request.image is None:
            return timesteps
        # diffusers' img2img: skip the first (1 - strength) of the schedule
        start = self.request.steps - min(int(self.request.steps * self.request.strength), self.request.steps)
        if start >= len(timesteps):
            raise ValueError(f"strength={self.request.strength} with steps={self.request.steps} leaves no step; "
                             "raise either")
        if hasattr(self.scheduler, "set_begin_index"):  # Euler keeps a step index; DDIM does not
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return timesteps[start * self.scheduler.order:]

    @torch.inference_mode()
    def _text_rows(self) -> torch.Tensor:
        encoder = PromptEncoder(self.components.tokenizer, self.components.text_encoder)
        prompts = [self.request.negative_prompt, self.request.prompt] if self.request.guided else [self.request.prompt]
        return torch.cat(encoder.encode_all(prompts)).to(self.components.dtype)

    @torch.inference_mode()
    def _first_latent(self) -> torch.Tensor:
        c, request = self.components, self.request
        shape = (1, c.latent_channels, request.height // 8, request.width // 8)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed))
        noise = noise.to(device=c.device, dtype=c.dtype)
        if request.image is None:
            return noise * self.scheduler.init_noise_sigma
        pixels = preprocess([request.image], request.height, request.width, c.device, c.dtype)
        return self.scheduler.add_noise(encode_latents(c.vae, pixels), noise, self.timesteps[:1])


def make_scheduler(components: Components, name: str) -> DDIMScheduler | EulerDiscreteScheduler:
    """A fresh ``name`` scheduler from the model's own scheduler config (its betas, prediction type)."""
    return SCHEDULERS[name].from_config(components.scheduler.config)


@torch.inference_mode()
def generate(components: Components, request: GenerationRequest,
             progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The one-device reference: the same loop with the whole UNet at every step."""
    sampling = Sampling(components, request)
    return sampling.decode(denoise(sampling, progress))


@torch.inference_mode()
def denoise(sampling: Sampling, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The final latent: one call of the UNet's own forward per step."""
    unet, latent = sampling.components.unet, sampling.latent
    for index, timestep in enumerate(sampling.timesteps):
        prediction = unet(sampling.model_input(latent, index), timestep, sampling.text).sample
        latent = sampling.step(latent, prediction, index)
        if progress:
            progress(index)
    return latent
