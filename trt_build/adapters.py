"""Exported parts back in the engine's shapes: a UNet function and a VAE, whatever runs the graphs.

A *runner* takes a dict of named input tensors and returns a dict of named outputs, with the
names :mod:`trt_build.export` gave the graph. :class:`trt_build.runtime.TrtEngine` is one
(TensorRT on a GPU); an onnxruntime session wrapped the same way is another (the tests use it
to prove the exported contract drives the real stream on a CPU).

:class:`EngineUNet` is an :class:`engine.backends.UNetFn`; :class:`EngineVae` looks like a
diffusers VAE to :func:`engine.vae.encode_latents` / :func:`engine.vae.decode_latents`. The
exported VAE graphs already apply the scaling factor, so the adapter's own is 1.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class EngineUNet:
    """The exported UNet as a :class:`engine.backends.UNetFn` (one float32 timestep per row)."""

    def __init__(self, run: Runner) -> None:
        self.run = run

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        inputs = {"sample": sample, "timestep": timesteps.float(), "encoder_hidden_states": encoder_hidden_states}
        return self.run(inputs)["latent"].to(sample.dtype)


class EngineVae(torch.nn.Module):
    """The exported VAE encoder and decoder, shaped like a diffusers VAE (scaling already inside)."""

    def __init__(self, encode: Runner, decode: Runner, dtype: torch.dtype) -> None:
        super().__init__()
        self._encode, self._decode, self.dtype = encode, decode, dtype
        self.config = SimpleNamespace(scaling_factor=1.0)

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latents=self._encode({"images": images})["latents"].to(self.dtype))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self._decode({"latents": latents})["images"].to(self.dtype))
