"""VAE encode/decode for both the tiny (TAESD) and the full (KL) autoencoders."""

from __future__ import annotations

import torch

from engine.components import Vae


def encode_latents(vae: Vae, images: torch.Tensor) -> torch.Tensor:
    """``images`` in [-1, 1] → scaled latents. The KL VAE gives its mean (deterministic)."""
    encoded = vae.encode(_in_vae_dtype(vae, images))
    latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()
    return latents * vae.config.scaling_factor


def decode_latents(vae: Vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images in [-1, 1] (not yet clamped)."""
    return vae.decode(_in_vae_dtype(vae, latents) / vae.config.scaling_factor).sample


def _in_vae_dtype(vae: Vae, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the VAE's own dtype (a KL VAE stays fp32 in an fp16 model: see ``force_upcast``)."""
    dtype = getattr(vae, "dtype", None)
    return tensor if not isinstance(dtype, torch.dtype) or tensor.dtype == dtype else tensor.to(dtype)
