"""The ``compile`` backend: the UNet and the VAE through ``torch.compile``.

Inductor fuses the UNet's elementwise work into generated kernels (C++ on the CPU, Triton on
GPUs). It records no CUDA graphs of its own: the engine captures each whole call as a graph
on the device's worker (:mod:`engine.graphs`), and inductor's graph trees only work on the
main thread. So kernel fusion and graphs add up. Every call size compiles when the engine
starts (:meth:`engine.graphs.CallRunner.warm_up` / ``capture``), so a user joining never
freezes the others' streams.

Inductor keeps what it compiled on disk (FX graph and autotuning caches), by default under
``~/.cache/diffcam/inductor`` rather than ``/tmp``: the second start of the same model and
shape skips most of the compiling.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch._dynamo
import torch._inductor.config

from engine.backends import BackendOptions, UNetFn, torch_unet, use_fast_layouts
from engine.components import Components, Vae
from engine.config import StreamConfig

class CompiledVae(torch.nn.Module):
    """A VAE whose ``encode``/``decode`` are compiled; ``config`` is the original's."""

    def __init__(self, vae: Vae) -> None:
        super().__init__()
        self.vae = vae
        self.config = vae.config
        self.dtype = getattr(vae, "dtype", None)
        self.encode = batch_dynamic(torch.compile(vae.encode))
        self.decode = batch_dynamic(torch.compile(vae.decode))


def batch_dynamic(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled``, told that the batch dimension of its tensor arguments varies.

    The engine calls with 1 to ``sessions`` streams. Left to itself, dynamo compiles the first
    size statically, recompiles for the second, and again for a batch of 1: three compiles of
    the UNet at start-up. Marked dynamic from the first call, every size above 1 shares one
    graph (a batch of 1 still gets its own).
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] > 1:
                torch._dynamo.mark_dynamic(value, 0)
        return compiled(*args, **kwargs)

    return call


def keep_compile_caches() -> Path:
    """Where inductor caches its kernels: ``TORCHINDUCTOR_CACHE_DIR``, else a folder that outlives reboots."""
    folder = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                   str(Path.home() / ".cache" / "diffcam" / "inductor"))
    torch._inductor.config.fx_graph_cache = True
    return Path(folder)


def prepare_compiled(components: Components, config: StreamConfig,
                     options: BackendOptions) -> tuple[Components, UNetFn]:
    """Compiled modules; the default mode (fused kernels, no autotuning: a start in minutes, not tens of them)."""
    options.progress(f"torch.compile: kernels compile on the first call of each size, cached in "
                     f"{keep_compile_caches()}")
    use_fast_layouts(components)
    compiled = replace(components, vae=CompiledVae(components.vae))
    return compiled, torch_unet(batch_dynamic(torch.compile(components.unet)))  # type: ignore[arg-type]


def compile_missing(device: torch.device) -> str | None:
    """Inductor needs a C++ compiler for CPU kernels and Triton for GPU ones."""
    if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "a C++ compiler for torch.compile's CPU kernels (apt-get install g++)"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton for torch.compile's GPU kernels (it comes with the CUDA build of torch)"
        if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            return "a C compiler for Triton's kernel launchers (apt-get install gcc, or set CC)"
    return None
