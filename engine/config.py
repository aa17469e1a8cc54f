"""Stream configuration: one frozen dataclass, validated once, with messages that say what to do.

The shape-defining fields (``t_index_list`` length, ``frame_buffer_size``, ``width``, ``height``,
``cfg_type``) are fixed for the life of a stream; everything else can change on the fly
through :meth:`engine.stream.StreamDiffusion.update`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Sequence, Union

CfgType = Literal["none", "full", "self", "initialize"]
Mode = Literal["img2img", "txt2img"]
#: A prompt, or a blend of ``(prompt, weight)`` pairs (see :func:`engine.prompts.blend_embeddings`).
Prompt = Union[str, tuple[tuple[str, float], ...]]

CFG_TYPES: tuple[str, ...] = ("none", "full", "self", "initialize")
MODES: tuple[str, ...] = ("img2img", "txt2img")

#: Fields that change the UNet batch or the latent shape; changing them means a new stream.
SHAPE_FIELDS: frozenset[str] = frozenset(
    {"frame_buffer_size", "width", "height", "cfg_type", "mode", "num_inference_steps"}
)

MAX_SEED = 2**63 - 1
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_FRAME_BUFFER = 16
MAX_GUIDANCE = 30.0
MAX_DELTA = 10.0
MAX_SKIP_FRAMES = 1000
#: CLIP reads 77 tokens; past a few hundred words a prompt only costs encoding time
MAX_PROMPT_CHARS = 2000
#: prompts in one blend: each is a text-encoder pass
MAX_BLEND_PROMPTS = 8


@dataclass(frozen=True)
class StreamConfig:
    """How one stream denoises. Defaults reproduce StreamDiffusion's sd-turbo img2img set-up."""

    t_index_list: tuple[int, ...] = (32, 45)
    num_inference_steps: int = 50
    frame_buffer_size: int = 1
    width: int = 512
    height: int = 512
    mode: Mode = "img2img"
    cfg_type: CfgType = "self"
    guidance_scale: float = 1.0
    delta: float = 1.0
    seed: int = 2
    do_add_noise: bool = True
    prompt: Prompt = ""
    negative_prompt: str = ""
    similarity_filter: bool = False
    similarity_threshold: float = 0.98
    max_skip_frames: int = 10

    def __post_init__(self) -> None:
        # Accept any sequence for t_index_list (lists from JSON, numpy ints) but store a tuple.
        object.__setattr__(self, "t_index_list", _as_indices(self.t_index_list))
        object.__setattr__(self, "prompt", _normalize_prompt(self.prompt))
        validate(self)

    @property
    def denoising_steps(self) -> int:
        """``n``: how many denoising steps each frame goes through."""
        return len(self.t_index_list)

    @property
    def unet_batch_size(self) -> int:
        """Rows one stream adds to a UNet call: ``n·f``, doubled for ``full``, plus ``f`` for ``initialize``."""
        rows = self.denoising_steps * self.frame_buffer_size
        return {"full": 2 * rows, "initialize": rows + self.frame_buffer_size}.get(self.cfg_type, rows)

    @property
    def latent_size(self) -> tuple[int, int]:
        """``(height, width)`` of the latent (the VAE downsamples by 8)."""
        return self.height // 8, self.width // 8

    def with_updates(self, **changes: Any) -> "StreamConfig":
        """A validated copy with ``changes`` applied; unknown names raise ``ValueError``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown stream parameter(s) {unknown}; known: {sorted(known)}")
        return replace(self, **changes)


def validate(config: StreamConfig) -> None:
    """Raise ``ValueError`` naming the field, the value and what is allowed."""
    _check_int_range("num_inference_steps", config.num_inference_steps, 1, 1000)
    _check_t_index_list(config.t_index_list, config.num_inference_steps)
    _check_int_range("frame_buffer_size", config.frame_buffer_size, 1, MAX_FRAME_BUFFER)
    for name in ("width", "height"):
        value = getattr(config, name)
        _check_int_range(name, value, MIN_SIZE, MAX_SIZE)
        if value % 8:
            raise ValueError(f"{name}={value} must be a multiple of 8 (the VAE downsamples by 8)")
    _check_choice("mode", config.mode, MODES)
    _check_choice("cfg_type", config.cfg_type, CFG_TYPES)
    _check_float_range("guidance_scale", config.guidance_scale, 0.0, MAX_GUIDANCE)
    _check_float_range("delta", config.delta, 0.0, MAX_DELTA)
    _check_int_range("seed", config.seed, 0, MAX_SEED)
    _check_float_range("similarity_threshold", config.similarity_threshold, 0.0, 1.0)
    _check_int_range("max_skip_frames", config.max_skip_frames, 0, MAX_SKIP_FRAMES)
    for name in ("similarity_filter", "do_add_noise"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name}={_brief(getattr(config, name))} must be true or false")
    if not isinstance(config.negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string, got {type(config.negative_prompt).__name__}")
    _check_text("negative_prompt", config.negative_prompt)


def updated_config(config: StreamConfig, changes: dict[str, Any]) -> StreamConfig:
    """``config`` with ``changes`` applied mid-stream, or ``ValueError`` and nothing changed.

    ``strength`` is accepted in place of ``t_index_list``. Shape-defining fields, and the number
    of steps, cannot change mid-stream: they need a new stream.
    """
    changes = dict(changes)
    if "strength" in changes:
        if "t_index_list" in changes:
            raise ValueError("give strength or t_index_list, not both")
        changes["t_index_list"] = strength_to_t_index_list(
            changes.pop("strength"), config.denoising_steps, config.num_inference_steps)
    new = config.with_updates(**changes)
    fixed = sorted(name for name in SHAPE_FIELDS if getattr(new, name) != getattr(config, name))
    if new.denoising_steps != config.denoising_steps:
        fixed.append(f"len(t_index_list) ({config.denoising_steps} → {new.denoising_steps})")
    if fixed:
        raise ValueError(f"{', '.join(fixed)} set the batch shape; open a new stream to change them")
    return new


def strength_to_t_index_list(strength: float, steps: int, num_inference_steps: int = 50) -> tuple[int, ...]:
    """Map a user-facing ``strength`` in [0, 1] to ``steps`` ascending indices into the schedule.

    The first index is ``round((1 - strength) * (N - steps))`` with ``N = num_inference_steps``;
    the rest are spread evenly from there to the end of the schedule. So ``strength = 1`` starts
    at the noisiest timestep (full re-imagination: ``0, 12, 25, 38`` for 4 of 50) and
    ``strength = 0`` uses the last, least noisy ones (``46, 47, 48, 49``: the input, lightly
    touched). Indices are always strictly increasing and inside ``[0, N)``.
    """
    _check_float_range("strength", strength, 0.0, 1.0)
    _check_int_range("steps", steps, 1, num_inference_steps)
    first = round((1.0 - strength) * (num_inference_steps - steps))
    span = num_inference_steps - first
    return tuple(first + round(k * span / steps) for k in range(steps))


def parse_t_index_list(text: str) -> tuple[int, ...]:
    """Parse ``"0,16,32,45"`` (the CLI form) into a tuple, with a clear error."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"t_index_list={text!r} must be comma-separated integers, e.g. 0,16,32,45") from None


def _as_indices(value: Any) -> tuple[int, ...]:
    """``t_index_list`` as a tuple of ints; anything else (floats, bools, None) is a ValueError."""
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"t_index_list={_brief(value)} must be a list of integers, e.g. (32, 45)") from None
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items):
        raise ValueError(f"t_index_list={_brief(value)} must hold integers only, e.g. (32, 45)")
    return tuple(int(i) for i in items)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except (OverflowError, TypeError):
        return False


def _normalize_prompt(prompt: Any) -> Prompt:
    """A string stays; a list or tuple of ``(prompt, weight)`` pairs becomes a checked tuple."""
    if isinstance(prompt, str):
        _check_text("prompt", prompt)
        return prompt
    shape_error = ValueError(f"prompt={_brief(prompt)} must be a string or a list of [prompt, weight] pairs")
    if not isinstance(prompt, (list, tuple)):
        raise shape_error
    if not prompt:
        raise ValueError("prompt=[] must be a string or a non-empty list of [prompt, weight] pairs")
    if len(prompt) > MAX_BLEND_PROMPTS:
        raise ValueError(f"a prompt blend of {len(prompt)} prompts is too large; at most {MAX_BLEND_PROMPTS}")
    if any(not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str)
           or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float)) for pair in prompt):
        raise shape_error
    try:
        pairs = tuple((text, float(weight)) for text, weight in prompt)
    except OverflowError:
        raise shape_error from None
    for text, _ in pairs:
        _check_text("prompt", text)
    weights = [w for _, w in pairs]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"prompt weights {weights} must be finite, >= 0, and not all 0")
    return pairs


def _check_text(name: str, text: str) -> None:
    """Text the tokenizer can take: valid Unicode (no lone surrogates), of a length CLIP can use."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text)} characters long; at most {MAX_PROMPT_CHARS} "
                         "(the text encoder reads only its first 77 tokens)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None


def _brief(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut short: error messages must not echo unbounded input."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit
        return f"an integer of about {value.bit_length() * 3 // 10} digits"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _check_t_index_list(indices: Sequence[int], num_inference_steps: int) -> None:
    if not indices:
        raise ValueError("t_index_list is empty; give at least one index, e.g. (32, 45)")
    bad = [i for i in indices if not 0 <= i < num_inference_steps]
    if bad:
        raise ValueError(
            f"t_index_list={_brief(tuple(indices))} has {_brief(bad)} outside [0, {num_inference_steps - 1}] "
            f"(num_inference_steps={num_inference_steps})"
        )
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(f"t_index_list={_brief(tuple(indices))} must be strictly increasing (noisy to clean)")


def _check_int_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={_brief(value)} must be an integer in [{low}, {high}]")
    if not low <= value <= high:
        raise ValueError(f"{name}={_brief(value)} is out of range; allowed: [{low}, {high}]")


def _check_float_range(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"{name}={_brief(value)} must be a finite number in [{low}, {high}]")
    if not low <= value <= high:
        raise ValueError(f"{name}={_brief(value)} is out of range; allowed: [{low}, {high}]")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={_brief(value)} is not one of {list(allowed)}")


__all__ = [
    "CFG_TYPES",
    "MODES",
    "SHAPE_FIELDS",
    "CfgType",
    "Mode",
    "Prompt",
    "StreamConfig",
    "parse_t_index_list",
    "strength_to_t_index_list",
    "updated_config",
    "validate",
]
