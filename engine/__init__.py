"""diffcam's engine: models, the stream-batch denoiser, RCFG and the similarity filter.

Follow a frame: :mod:`engine.image` (preprocess) → :mod:`engine.similarity` (skip?) →
:mod:`engine.vae` (encode) → :mod:`engine.stream` (one UNet call over the stream batch,
scheduler math from :mod:`engine.schedule`) → :mod:`engine.vae` (decode) → :mod:`engine.image`.
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
