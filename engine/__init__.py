"""diffcam's engine: models, the stream-batch denoiser, RCFG and the similarity filter.

Follow a frame: :mod:`engine.stream` (one stream: the similarity filter from
:mod:`engine.similarity`, its state in a slot of :mod:`engine.slots`) → :mod:`engine.graphs`
(the call runner: frames into static buffers via :mod:`engine.image`, a CUDA graph per call
size) → :mod:`engine.step` (the call itself: VAE encode, one UNet call over the stream batch
of every stream, RCFG and the scheduler math from :mod:`engine.schedule`, VAE decode, uint8).
The runtime (:mod:`engine.runtime`, :mod:`engine.worker`) runs all of it on the device's one
owner thread.

The names below load on first use (torch and diffusers take seconds to import): a command's
``--help``, or a module that needs only :mod:`engine.config`, does not pay for them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_MODEL": "engine.names",
    "Components": "engine.components",
    "ModelSpec": "engine.models",
    "ModelUnavailableError": "engine.models",
    "StreamConfig": "engine.config",
    "StreamDiffusion": "engine.stream",
    "load_components": "engine.models",
    "strength_to_t_index_list": "engine.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
