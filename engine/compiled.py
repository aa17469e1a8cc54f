"""The ``compile`` backend: the UNet and the VAE through ``torch.compile``.

Inductor fuses the UNet's elementwise work into generated kernels (C++ on the CPU, Triton on
GPUs); on a GPU ``reduce-overhead`` also replays each shape as a CUDA graph, which is where
the stream batch's many small kernels win most. Shapes are compiled as they come (a new
number of sessions per call compiles once more); the first frame of each shape pays for it.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import torch

from engine.backends import BackendOptions, UNetFn, torch_unet
from engine.components import Components, Vae
from engine.config import StreamConfig


class CompiledVae(torch.nn.Module):
    """A VAE whose ``encode``/``decode`` are compiled; ``config`` is the original's."""

    def __init__(self, vae: Vae, mode: str | None) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.encode = torch.compile(vae.encode, mode=mode, dynamic=False)
        self.decode = torch.compile(vae.decode, mode=mode, dynamic=False)


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs on GPUs; the default (kernel fusion) elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


def prepare_compiled(components: Components, config: StreamConfig,
                     options: BackendOptions) -> tuple[Components, UNetFn]:
    mode = compile_mode(components.device)
    options.progress("compiling with torch.compile (each new shape compiles on its first frame)")
    unet = torch.compile(components.unet, mode=mode, dynamic=False)
    return replace(components, vae=CompiledVae(components.vae, mode)), torch_unet(unet)  # type: ignore[arg-type]


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
