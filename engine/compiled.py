"""The ``compile`` backend: the UNet and the VAE through ``torch.compile``.

Inductor fuses the UNet's elementwise work into generated kernels (C++ on the CPU, Triton on
GPUs); on a GPU ``reduce-overhead`` also replays each shape as a CUDA graph, which is where
the stream batch's many small kernels win most. Every shape the worker can send (1 to
``sessions`` streams per call) compiles when the backend starts (:func:`warm_up`), so a user
joining never freezes the others' streams.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_only

from engine.backends import BackendOptions, UNetFn, torch_unet
from engine.components import Components, Vae
from engine.config import StreamConfig
from engine.vae import decode_latents, encode_latents


class CompiledVae(torch.nn.Module):
    """A VAE whose ``encode``/``decode`` are compiled; ``config`` is the original's."""

    def __init__(self, vae: Vae, mode: str | None) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.encode = _compiled(vae.encode, mode)
        self.decode = _compiled(vae.decode, mode)


def _compiled(function: Callable[..., Any], mode: str | None) -> Callable[..., Any]:
    """``function`` compiled; with CUDA graphs, every call is a step of its own with outputs of its own.

    CUDA graph trees reuse a graph's output memory on its next replay. The engine sometimes keeps
    one call's outputs past the next call: when a shared call fails, it retries each stream
    alone and only then uses the results. So each call starts a new step and returns copies.
    A copy of the prediction or the pictures costs little beside the UNet.

    Shapes are static at first. The first new shape (another number of sessions per call)
    recompiles with a dynamic batch, and later ones reuse that. Each new shape still records a
    CUDA graph on its first call, so that frame is slow.
    """
    compiled = torch.compile(function, mode=mode)
    if mode != "reduce-overhead":
        return compiled

    def call(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(torch.Tensor, torch.Tensor.clone, compiled(*args, **kwargs))

    return call


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs on GPUs; the default (kernel fusion) elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


def prepare_compiled(components: Components, config: StreamConfig,
                     options: BackendOptions) -> tuple[Components, UNetFn]:
    mode = compile_mode(components.device)
    compiled = replace(components, vae=CompiledVae(components.vae, mode))
    unet = torch_unet(_compiled(components.unet, mode))  # type: ignore[arg-type]
    warm_up(compiled, unet, config, options)
    return compiled, unet


@torch.inference_mode()
def warm_up(components: Components, unet: UNetFn, config: StreamConfig, options: BackendOptions) -> None:
    """Compile now every shape the runtime will send, 1 to ``options.sessions`` streams per call.

    Otherwise the first call of each new shape compiles inside the worker, and every live
    stream freezes for that long when a second user joins.
    """
    from engine.stream import StreamDiffusion  # noqa: PLC0415 - the stream imports the backends

    probe = StreamDiffusion(components, config, unet=unet)
    height, width = config.latent_size
    rows = config.unet_batch_size
    for sessions in range(1, options.sessions + 1):
        options.progress(f"compiling for {sessions} stream(s) per call (torch.compile, once per shape)")
        images = torch.zeros(sessions * config.frame_buffer_size, 3, config.height, config.width,
                             device=components.device, dtype=components.dtype)
        latents = encode_latents(components.vae, images)
        sample = torch.zeros(sessions * rows, components.latent_channels, height, width,
                             device=components.device, dtype=components.dtype)
        unet(sample, probe._unet_timesteps.repeat(sessions), probe._unet_embeds.repeat(sessions, 1, 1))
        decode_latents(components.vae, latents)


def compile_missing(device: torch.device) -> str | None:
    """Inductor needs a C++ compiler for CPU kernels and Triton for GPU ones."""
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "a C++ compiler for torch.compile's CPU kernels (apt-get install g++)"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton for torch.compile's GPU kernels (it comes with the CUDA build of torch)"
    return None
