"""Backends: one UNet call signature and one VAE interface, whatever runs them, chosen by name.

A backend takes loaded :class:`Components` and the stream configuration and returns the
components to run with (a backend may replace the VAE) and ``unet_fn(sample, timesteps,
encoder_hidden_states) -> prediction`` with per-row timesteps:

- ``torch``: eager PyTorch, any device;
- ``compile``: ``torch.compile`` (inductor kernels; CUDA graphs on GPUs), see :mod:`engine.compiled`;
- ``trt``: TensorRT engines built and cached by :mod:`trt_build.pipeline`;
- ``auto``: ``compile`` on CUDA when Triton is there, ``torch`` elsewhere (:func:`resolve_backend`).

On CUDA the torch modules run in ``channels_last`` (cuDNN's fast convolution layout) and
diffusers' attention is PyTorch's fused SDPA. The engine captures each call as a CUDA graph
of its own (:mod:`engine.graphs`), so no backend records graphs itself.

Like uvicorn's protocol registry, entries are import paths resolved on use, so a backend whose
packages are absent costs nothing until asked for, and then says what to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from diffusers import UNet2DConditionModel

from engine.components import Components
from engine.config import StreamConfig
from engine.names import BACKEND_CHOICES


class UNetFn(Protocol):
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BackendOptions:
    """What a backend may need beyond the components: how many streams share a UNet call
    (the shapes to build for), the model's name and LoRA (engine cache keys), progress lines,
    and whether it may free the torch modules it replaces."""

    sessions: int = 1
    model: str = ""
    lora: str | None = None
    progress: Callable[[str], None] = field(default=lambda stage: None, compare=False)
    #: free the GPU memory of torch modules the backend replaces (off where they are still used)
    release: bool = True
    #: the engine captures each whole call as a CUDA graph: parts must not capture graphs of their own
    call_graphs: bool = False


Prepare = Callable[[Components, StreamConfig, BackendOptions], tuple[Components, UNetFn]]

#: name -> "module:function" preparing it, and "module:function" saying what it lacks (or None)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("engine.backends:prepare_torch", "engine.backends:torch_missing"),
    "compile": ("engine.compiled:prepare_compiled", "engine.compiled:compile_missing"),
    "trt": ("trt_build.pipeline:prepare_trt", "trt_build.pipeline:trt_missing"),
}


assert BACKEND_CHOICES == ("auto", *BACKENDS), "engine.names.BACKEND_CHOICES must name every backend"


def resolve_backend(name: str, device: torch.device) -> str:
    """``name``, with ``auto`` made concrete: ``compile`` on a CUDA device that can run it, else ``torch``."""
    if name != "auto":
        return name
    if device.type == "cuda" and backend_missing("compile", device) is None:
        return "compile"
    return "torch"


def use_fast_layouts(components: Components) -> None:
    """On CUDA, the UNet and VAE in ``channels_last`` (a no-op elsewhere, where it does not pay)."""
    if components.device.type == "cuda":
        for module in (components.unet, components.vae):
            module.to(memory_format=torch.channels_last)


def torch_unet(unet: UNet2DConditionModel) -> UNetFn:
    def run(sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    return run


def prepare_torch(components: Components, config: StreamConfig, options: BackendOptions) -> tuple[Components, UNetFn]:
    use_fast_layouts(components)
    return components, torch_unet(components.unet)


def torch_missing(device: torch.device) -> str | None:
    return None


def backend_missing(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``; otherwise what is missing and how to get it."""
    return _resolve(resolve_backend(name, device), 1)(device)


def prepare_backend(name: str, components: Components, config: StreamConfig,
                    options: BackendOptions = BackendOptions()) -> tuple[Components, UNetFn]:
    """``components`` ready for backend ``name`` (or ``auto``), and its UNet function.

    May take minutes (building engines). Compiled backends compile each shape on its first
    call: the engine's call runner warms every size up before streams start.
    """
    name = resolve_backend(name, components.device)
    missing = backend_missing(name, components.device)
    if missing is not None:
        raise RuntimeError(f"the {name} backend needs {missing}")
    return _resolve(name, 0)(components, config, options)


def _resolve(name: str, which: int) -> Callable:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; available: {sorted(BACKENDS)}")
    module, function = BACKENDS[name][which].split(":")
    return getattr(importlib.import_module(module), function)
