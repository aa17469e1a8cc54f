"""The device-side state of every stream that shares one shape, stacked: slot ``s`` holds stream ``s``.

A stream's latent buffer, noise, stock noise, per-step coefficients, timesteps, prompt
embeddings and guidance scalars live in rows of a few fixed tensors, allocated once. One
call over ``k`` streams gathers their slots by index, computes, and scatters the new buffer
and stock noise back (:mod:`engine.step`). Because the tensors never move, a call captured as
a CUDA graph (:mod:`engine.graphs`) stays valid whichever streams it serves: only the index
tensor changes between replays.

Tensors are ``(capacity, rows, …)``: ``rows = n·f`` step-major rows per stream for the
per-row state, and the UNet's row layout (``unet_rows``, see :meth:`StreamConfig.unet_batch_size`)
for timesteps and prompt embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.components import Components
from engine.config import StreamConfig

MATH_DTYPE = torch.float32  # scheduler math: fp16 would lose the division by alpha (0.07 at t = 999)

#: per-row state (``n·f`` rows), in float32
ROW_FIELDS = ("noise", "stock", "alpha", "beta", "c_skip", "c_out")
#: per-stream scalars, in float32
SCALAR_FIELDS = ("guidance", "delta", "add_noise")


@dataclass(frozen=True)
class StreamShape:
    """What every stream in one set of slots shares: it fixes every tensor's shape."""

    steps: int
    frames: int
    cfg_type: str
    height: int
    width: int

    @classmethod
    def of(cls, config: StreamConfig) -> "StreamShape":
        return cls(config.denoising_steps, config.frame_buffer_size, config.cfg_type, config.height, config.width)

    @property
    def rows(self) -> int:
        """``n·f``: a stream's rows, one per step and frame slot."""
        return self.steps * self.frames

    @property
    def unet_rows(self) -> int:
        """Rows a stream adds to a UNet call: ``n·f``, doubled for ``full``, plus ``f`` for ``initialize``."""
        return {"full": 2 * self.rows, "initialize": self.rows + self.frames}.get(self.cfg_type, self.rows)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


@dataclass(frozen=True)
class Gathered:
    """The slots of one call's streams, each tensor ``(k, …)`` (copies: the call may scatter over them)."""

    buffer: torch.Tensor
    noise: torch.Tensor
    stock: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    guidance: torch.Tensor
    delta: torch.Tensor
    add_noise: torch.Tensor


class StreamSlots:
    """Fixed storage for up to ``capacity`` streams of one :class:`StreamShape` on one device."""

    def __init__(self, components: Components, shape: StreamShape, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be at least 1")
        self.shape, self.capacity = shape, capacity
        self.device, self.dtype = components.device, components.dtype
        latent = (components.latent_channels, *shape.latent_size)
        text = (components.tokenizer.model_max_length, int(components.text_encoder.config.hidden_size))
        f32 = dict(device=self.device, dtype=MATH_DTYPE)
        self.buffer = torch.zeros(capacity, shape.rows - shape.frames, *latent, **f32)
        self.noise = torch.zeros(capacity, shape.rows, *latent, **f32)
        self.stock = torch.zeros(capacity, shape.rows, *latent, **f32)
        for name in ("alpha", "beta", "c_skip", "c_out"):
            setattr(self, name, torch.ones(capacity, shape.rows, 1, 1, 1, **f32))
        self.timesteps = torch.zeros(capacity, shape.unet_rows, device=self.device, dtype=torch.long)
        self.embeds = torch.zeros(capacity, shape.unet_rows, *text, device=self.device, dtype=self.dtype)
        for name in SCALAR_FIELDS:
            setattr(self, name, torch.zeros(capacity, 1, 1, 1, 1, **f32))
        self._free = list(range(capacity))

    @classmethod
    def for_config(cls, components: Components, config: StreamConfig, capacity: int = 1) -> "StreamSlots":
        return cls(components, StreamShape.of(config), capacity)

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def acquire(self) -> int:
        """A free slot (its contents are whatever was there: the stream writes all of it)."""
        if not self._free:
            raise RuntimeError(f"all {self.capacity} stream slots are in use")
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if slot not in self._free:
            self._free.append(slot)
            self._free.sort()

    def write(self, slot: int, **values: torch.Tensor | float) -> None:
        """Set fields of one slot (between calls: a new stream, a parameter update, a reset)."""
        for name, value in values.items():
            target = getattr(self, name)[slot]
            if isinstance(value, torch.Tensor):
                target.copy_(value.reshape(target.shape))
            else:
                target.fill_(value)

    def gather(self, index: torch.Tensor) -> Gathered:
        """The state of the streams in slots ``index`` (a ``(k,)`` long tensor on the device)."""
        fields = ("buffer", *ROW_FIELDS, "timesteps", "embeds", *SCALAR_FIELDS)
        return Gathered(**{name: getattr(self, name).index_select(0, index) for name in fields})

    def scatter(self, index: torch.Tensor, buffer: torch.Tensor, stock: torch.Tensor) -> None:
        """Store a call's results: the moved-on latent buffer and stock noise of slots ``index``."""
        self.buffer.index_copy_(0, index, buffer)
        self.stock.index_copy_(0, index, stock)
