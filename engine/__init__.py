"""diffcam's engine: models, the stream-batch denoiser, RCFG and the similarity filter.

Follow a frame: :mod:`engine.stream` (one stream: the similarity filter from
:mod:`engine.similarity`, its state in a slot of :mod:`engine.slots`) → :mod:`engine.graphs`
(the call runner: frames into static buffers via :mod:`engine.image`, a CUDA graph per call
size) → :mod:`engine.step` (the call itself: VAE encode, one UNet call over the stream batch
of every stream, RCFG and the scheduler math from :mod:`engine.schedule`, VAE decode, uint8).
The runtime (:mod:`engine.runtime`, :mod:`engine.worker`) runs all of it on the device's one
owner thread.
"""

from engine.components import Components
from engine.config import StreamConfig, strength_to_t_index_list
from engine.models import DEFAULT_MODEL, ModelSpec, ModelUnavailableError, load_components
from engine.stream import StreamDiffusion

__all__ = [
    "DEFAULT_MODEL",
    "Components",
    "ModelSpec",
    "ModelUnavailableError",
    "StreamConfig",
    "StreamDiffusion",
    "load_components",
    "strength_to_t_index_list",
]
