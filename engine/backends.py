"""UNet backends behind one call signature, chosen by name.

A backend turns a loaded UNet into ``unet_fn(sample, timesteps, encoder_hidden_states) -> output``
with per-row timesteps. ``torch`` runs eager PyTorch on any device.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from diffusers import UNet2DConditionModel


class UNetFn(Protocol):
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> torch.Tensor: ...


def torch_unet(unet: UNet2DConditionModel) -> UNetFn:
    def run(sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    return run


BACKENDS: dict[str, Callable[[UNet2DConditionModel], UNetFn]] = {"torch": torch_unet}


def make_unet_fn(unet: UNet2DConditionModel, backend: str = "torch") -> UNetFn:
    if backend not in BACKENDS:
        raise ValueError(f"unet backend {backend!r} is not available here; available: {sorted(BACKENDS)}")
    return BACKENDS[backend](unet)
