"""The shapes an engine must accept: batch and resolution ranges, and the tensor shapes they imply.

A TensorRT engine is built for an optimization profile: for every input, the smallest,
the typical and the largest shape it will see. diffcam's shapes follow from the stream
configuration. The UNet sees ``r`` rows per session per call (``n·f``, doubled for ``full``
guidance, plus ``f`` for ``initialize``: :attr:`engine.config.StreamConfig.unet_batch_size`),
and the runtime puts up to ``sessions`` sessions in one call, so its batch ranges over
``1..r·sessions`` with ``r`` as the optimum (one user). The VAE sees one frame per session.
Resolution is fixed at the configured size unless a range is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import StreamConfig

LATENT_SCALE = 8  # pixels per latent cell in every Stable Diffusion VAE
TEXT_TOKENS = 77  # CLIP's context length
MAX_BATCH = 256
MAX_SIDE = 2048

Shape = tuple[int, ...]
#: per input tensor: its (min, opt, max) shapes
ShapeTriple = tuple[Shape, Shape, Shape]


@dataclass(frozen=True)
class Range:
    """An inclusive ``min..max`` range with the value TensorRT should tune for (``opt``)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and v >= 1 for v in (self.min, self.opt, self.max)):
            raise ValueError(f"a shape range needs positive integers, got {self}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"a shape range needs min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    @classmethod
    def fixed(cls, value: int) -> Range:
        return cls(value, value, value)

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def scaled(self, factor: int) -> Range:
        """Every bound multiplied by ``factor``."""
        return Range(self.min * factor, self.opt * factor, self.max * factor)

    def divided(self, divisor: int) -> Range:
        """Every bound divided by ``divisor`` (pixels to latent cells); they must divide exactly."""
        return Range(self.min // divisor, self.opt // divisor, self.max // divisor)

    def __str__(self) -> str:
        return str(self.min) if self.is_static else f"{self.min}..{self.max} (opt {self.opt})"


@dataclass(frozen=True)
class ShapeProfile:
    """UNet rows per call, VAE frames per call, and the output size in pixels."""

    unet_batch: Range
    vae_batch: Range
    height: Range
    width: Range

    def __post_init__(self) -> None:
        for name in ("unet_batch", "vae_batch"):
            if getattr(self, name).max > MAX_BATCH:
                raise ValueError(f"{name} max {getattr(self, name).max} is too large; allowed: at most {MAX_BATCH}")
        for name in ("height", "width"):
            side: Range = getattr(self, name)
            if side.max > MAX_SIDE:
                raise ValueError(f"{name} max {side.max} px is too large; allowed: at most {MAX_SIDE}")
            if any(v % LATENT_SCALE for v in (side.min, side.opt, side.max)):
                raise ValueError(f"{name} {side} px: every bound must be a multiple of {LATENT_SCALE}")

    @classmethod
    def for_stream(cls, config: StreamConfig, sessions: int = 1, *, height: Range | None = None,
                   width: Range | None = None) -> ShapeProfile:
        """The profile for streams configured as ``config``, up to ``sessions`` of them per call."""
        if not isinstance(sessions, int) or not 1 <= sessions <= MAX_BATCH:
            raise ValueError(f"sessions={sessions!r} is out of range; allowed: [1, {MAX_BATCH}]")
        rows = config.unet_batch_size
        frames = config.frame_buffer_size
        return cls(unet_batch=Range(1, rows, rows * sessions), vae_batch=Range(1, frames, frames * sessions),
                   height=height or Range.fixed(config.height), width=width or Range.fixed(config.width))

    @property
    def is_static(self) -> bool:
        return all(r.is_static for r in (self.unet_batch, self.vae_batch, self.height, self.width))

    def check_divisible(self, multiple: int) -> None:
        """Refuse sizes the UNet cannot take: its down/up-sampling needs pixels divisible by ``multiple``."""
        for name in ("height", "width"):
            side: Range = getattr(self, name)
            if any(v % multiple for v in (side.min, side.opt, side.max)):
                raise ValueError(f"{name} {side} px: this model needs every bound to be a multiple of {multiple}")

    def unet_shapes(self, latent_channels: int, text_width: int) -> dict[str, ShapeTriple]:
        batch, h, w = self.unet_batch, self.height.divided(LATENT_SCALE), self.width.divided(LATENT_SCALE)
        return {
            "sample": _triple(batch, latent_channels, h, w),
            "timestep": _triple(batch),
            "encoder_hidden_states": _triple(batch, TEXT_TOKENS, text_width),
        }

    def vae_encoder_shapes(self) -> dict[str, ShapeTriple]:
        return {"images": _triple(self.vae_batch, 3, self.height, self.width)}

    def vae_decoder_shapes(self, latent_channels: int) -> dict[str, ShapeTriple]:
        h, w = self.height.divided(LATENT_SCALE), self.width.divided(LATENT_SCALE)
        return {"latents": _triple(self.vae_batch, latent_channels, h, w)}

    def describe(self) -> str:
        return (f"UNet batch {self.unet_batch}, VAE batch {self.vae_batch}, "
                f"{self.width}x{self.height} px")


def _triple(*dims: Range | int) -> ShapeTriple:
    ranges = [d if isinstance(d, Range) else Range.fixed(d) for d in dims]
    return (tuple(r.min for r in ranges), tuple(r.opt for r in ranges), tuple(r.max for r in ranges))
