"""One live stream (StreamDiffusion, arXiv 2312.12491): its slot of device state, its prompts and its filter.

The math of a call is :func:`engine.step.stream_step`; a stream's device state (latent
buffer, noise, stock noise, coefficients, prompt embeddings) is a slot of
:class:`engine.slots.StreamSlots`. Alone, a stream owns slots of its own and runs its calls
through a :class:`engine.graphs.CallRunner`; in the runtime, the streams of a device share
one set of slots and one runner, and a call serves several of them at once
(:mod:`engine.batch`).

A frame comes out ``n - 1`` calls after it went in; until the pipeline is full a call
returns ``None``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from engine.backends import UNetFn
from engine.components import Components
from engine.config import StreamConfig, updated_config
from engine.graphs import CallResult, CallRunner
from engine.image import Frame, FrameKind, frame_kind
from engine.prompts import PromptEncoder
from engine.schedule import step_schedule
from engine.similarity import SimilarityFilter
from engine.slots import MATH_DTYPE, StreamShape, StreamSlots
from engine.step import layout, step_models


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or inf for this stream's frame.

    ``advanced``: the stream took the frame in all the same (only the picture was lost);
    otherwise its state was lost and it was reset. ``output_due``: a frame left the pipeline
    on this call, and this error stands for it.
    """

    def __init__(self, message: str, *, advanced: bool = False, output_due: bool = False) -> None:
        super().__init__(message)
        self.advanced, self.output_due = advanced, output_due


class StreamDiffusion:
    """One live stream. ``runner`` (its slots) and ``prompts``: shared ones (the runtime's); by default its own."""

    def __init__(self, components: Components, config: StreamConfig = StreamConfig(),
                 unet: UNetFn | None = None, *, runner: CallRunner | None = None,
                 prompts: PromptEncoder | None = None) -> None:
        self.components = components
        self.config = config
        self.device = components.device
        self.dtype = components.dtype
        if runner is None:
            slots = StreamSlots.for_config(components, config)
            runner = CallRunner(step_models(components, unet), slots, 1, encode=config.mode == "img2img")
        elif runner.slots.shape != StreamShape.of(config) or runner.encode != (config.mode == "img2img"):
            raise ValueError(f"this stream ({config.mode}, {StreamShape.of(config)}) does not fit its runner "
                             f"({'img2img' if runner.encode else 'txt2img'}, {runner.slots.shape})")
        self.runner, self.slots = runner, runner.slots
        self.prompts = prompts or PromptEncoder(components.tokenizer, components.text_encoder)
        self.filter = SimilarityFilter(config.similarity_threshold, config.max_skip_frames, config.seed)
        self.calls = 0
        self._last_outputs: list[Frame] | None = None
        state = {**self._schedule_state(config), **self._noise_state(config), **self._prompt_state(config)}
        self.slot = self.slots.acquire()
        self.slots.write(self.slot, buffer=0.0, **state, **self._scalars(config))

    # ----------------------------------------------------------------- public API

    @property
    def steps(self) -> int:
        return self.config.denoising_steps

    @property
    def frames(self) -> int:
        return self.config.frame_buffer_size

    @property
    def unet_batch_size(self) -> int:
        """Rows per UNet call: ``n·f``, doubled for ``full``, plus ``f`` for ``initialize``."""
        return self.config.unet_batch_size

    @property
    def warming_up(self) -> bool:
        """True until the first frame has travelled through every step."""
        return self.calls < self.steps - 1

    @property
    def noise(self) -> torch.Tensor:
        """The stream's fixed noise, ``n·f`` rows: row ``i·f + j`` noises slot ``j`` at step ``i``."""
        return self.slots.noise[self.slot]

    @property
    def stock_noise(self) -> torch.Tensor:
        """RCFG's stock noise ``s``, one row per batch row (used by ``self`` and ``initialize``)."""
        return self.slots.stock[self.slot]

    @property
    def latent_buffer(self) -> torch.Tensor:
        """The ``(n-1)·f`` rows in flight, already noised to steps 1..n-1."""
        return self.slots.buffer[self.slot]

    @property
    def last_outputs(self) -> list[Frame] | None:
        return self._last_outputs

    def __call__(self, frame: Frame) -> Frame | None:
        """img2img for ``frame_buffer_size = 1``: one frame in, the frame of ``n - 1`` calls ago out."""
        if self.frames != 1:
            raise ValueError(f"frame_buffer_size={self.frames}: pass a list of {self.frames} frames to img2img()")
        outputs = self.img2img([frame])
        return None if outputs is None else outputs[0]

    @torch.inference_mode()
    def img2img(self, frames: Sequence[Frame]) -> list[Frame] | None:
        """Process ``frame_buffer_size`` frames; return as many finished ones, or ``None`` while warming up.

        A frame the similarity filter skips re-emits the last outputs without running the model.
        """
        self._check_mode("img2img")
        if len(frames) != self.frames:
            raise ValueError(f"img2img needs exactly frame_buffer_size={self.frames} frames, got {len(frames)}")
        fitted = self.screen(frames)
        if fitted is None:
            return self.last_outputs
        return self.accept(self.runner.run([self.slot], fitted), 0, frame_kind(frames[0]))

    @torch.inference_mode()
    def txt2img(self, output: FrameKind = "np") -> list[Frame] | None:
        """Generate ``frame_buffer_size`` frames from the stream's fixed noise and the prompt."""
        self._check_mode("txt2img")
        return self.accept(self.runner.run([self.slot], None), 0, output)

    def screen(self, frames: Sequence[Frame]) -> list[Frame | torch.Tensor] | None:
        """The frames to run, or None when the similarity filter (if on) skips them.

        With the filter on, frames are fitted here to compare them; the call reuses that work.
        """
        if not self.config.similarity_filter:
            return list(frames)
        fitted = [self.runner.loader.fitted(frame) for frame in frames]
        images = torch.stack(fitted).mul(2.0).sub(1.0).to(self.dtype)  # what the VAE sees
        return None if self.filter.should_skip(images) else fitted

    def accept(self, result: CallResult, position: int, kind: FrameKind) -> list[Frame] | None:
        """Take this stream's share (at ``position``) of a call that ran: its finished frames, or None while warming up.

        Raises :class:`NonFiniteOutputError` for NaN/inf: latents (the stream is reset, since its
        state is lost) or only the decoded picture (the stream goes on).
        """
        if not result.latents_finite[position]:
            self.reset()
            raise NonFiniteOutputError("the model produced NaN/inf for this frame; the stream was reset")
        finished = self.advance()
        if not result.pixels_finite[position]:
            raise NonFiniteOutputError("the VAE decoded NaN/inf for this frame", advanced=True, output_due=finished)
        if not finished:
            return None
        self._last_outputs = result.frames(position, self.frames, kind)
        return self._last_outputs

    def advance(self) -> bool:
        """Count a call that moved the state on; True when it finished a frame (the pipeline was full)."""
        finished = not self.warming_up
        self.calls += 1
        return finished

    def update(self, **changes: Any) -> None:
        """Change parameters for the next frame without a pause or a new warm-up.

        Accepts every :class:`StreamConfig` field except the shape-defining ones, plus
        ``strength`` (see :func:`engine.config.updated_config`). A refused update changes nothing.
        """
        self.apply_config(updated_config(self.config, changes))

    def apply_config(self, new: StreamConfig) -> None:
        """Switch to ``new``, already validated by :func:`engine.config.updated_config`.

        All-or-nothing: if recomputing raises (say the text encoder runs out of memory),
        the stream keeps its old configuration and state.
        """
        old, state = self.config, self._changed_state(self.config, new)
        self.slots.write(self.slot, **state, **self._scalars(new))
        self.config = new
        if new.seed != old.seed:
            self.filter.reseed(new.seed)
        self.filter.threshold = new.similarity_threshold
        self.filter.max_skip_frames = new.max_skip_frames
        if old.similarity_filter and not new.similarity_filter:
            self.filter.reset()

    def reset(self) -> None:
        """Forget in-flight frames (a new scene): the next frames warm the pipeline up again."""
        self.calls = 0
        self._last_outputs = None
        self.filter.reset()
        self.slots.write(self.slot, buffer=0.0, stock=self.noise)

    def close(self) -> None:
        """Give the slot back (its runner's other streams go on). Idempotent."""
        if self.slot is not None:
            self.slots.release(self.slot)
            self.slot = None  # type: ignore[assignment]

    # ------------------------------------------------------------- state set-up

    def _schedule_state(self, config: StreamConfig) -> dict[str, torch.Tensor]:
        schedule = step_schedule(self.components.scheduler, config.t_index_list, config.num_inference_steps)
        per_row = dict(frames=config.frame_buffer_size, device=self.device, dtype=MATH_DTYPE)
        timesteps = schedule.timesteps.repeat_interleave(config.frame_buffer_size).to(self.device)
        return {"alpha": schedule.per_row("alpha", **per_row), "beta": schedule.per_row("beta", **per_row),
                "c_skip": schedule.per_row("c_skip", **per_row), "c_out": schedule.per_row("c_out", **per_row),
                "timesteps": self._unet_layout(timesteps)}

    def _noise_state(self, config: StreamConfig) -> dict[str, torch.Tensor]:
        """The stream's noise, drawn once from the seed (on the CPU, so every device agrees)."""
        rows = config.denoising_steps * config.frame_buffer_size
        height, width = config.latent_size
        generator = torch.Generator("cpu").manual_seed(config.seed)
        shape = (rows, self.components.latent_channels, height, width)
        noise = torch.randn(shape, generator=generator, dtype=MATH_DTYPE).to(self.device)
        return {"noise": noise, "stock": noise}

    def _prompt_state(self, config: StreamConfig) -> dict[str, torch.Tensor]:
        cond = self.prompts.encode_weighted(config.prompt).to(self.dtype)
        uncond = self.prompts.encode(config.negative_prompt).to(self.dtype)
        rows, f = config.denoising_steps * config.frame_buffer_size, config.frame_buffer_size
        layouts = {
            "full": [uncond.expand(rows, -1, -1), cond.expand(rows, -1, -1)],
            "initialize": [uncond.expand(f, -1, -1), cond.expand(rows, -1, -1)],
        }
        return {"embeds": torch.cat(layouts.get(config.cfg_type, [cond.expand(rows, -1, -1)]))}

    @staticmethod
    def _scalars(config: StreamConfig) -> dict[str, float]:
        return {"guidance": config.guidance_scale, "delta": config.delta, "add_noise": float(config.do_add_noise)}

    def _changed_state(self, old: StreamConfig, new: StreamConfig) -> dict[str, torch.Tensor]:
        """Everything ``new`` needs recomputed, built before any of it is committed."""
        state: dict[str, torch.Tensor] = {}
        if new.t_index_list != old.t_index_list or new.num_inference_steps != old.num_inference_steps:
            state.update(self._schedule_state(new))
        if new.seed != old.seed:
            state.update(self._noise_state(new))
        if (new.prompt, new.negative_prompt) != (old.prompt, old.negative_prompt):
            state.update(self._prompt_state(new))
        return state

    def _unet_layout(self, rows: torch.Tensor) -> torch.Tensor:
        return layout(rows[None], self.slots.shape)[0]

    # ------------------------------------------------------------- helpers

    def _check_mode(self, mode: str) -> None:
        if self.config.mode != mode:
            raise ValueError(f"this stream was configured with mode={self.config.mode!r}; {mode} needs mode={mode!r}")
