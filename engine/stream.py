"""The stream-batch denoiser (StreamDiffusion, arXiv 2312.12491) with residual CFG.

Rows of the batch are laid out step-major: row ``i·f + j`` holds frame slot ``j`` at step ``i``
(``n`` steps, ``f = frame_buffer_size``). One call takes ``f`` new frames, noises them to step 0,
stacks them on the ``(n-1)·f`` rows still in flight, runs ONE UNet call over all of them, emits
the ``f`` rows that reached the last step and moves every other row one step on. A frame
comes out ``n - 1`` calls after it went in; until the pipeline is full a call returns ``None``.

Scheduler math runs in float32 whatever the model dtype, so fp16 UNets lose nothing to the
division by ``alpha`` (as small as 0.07 at t = 999).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from engine.backends import UNetFn, torch_unet
from engine.components import Components
from engine.config import StreamConfig, updated_config
from engine.image import Frame, FrameKind, frame_kind, postprocess, preprocess
from engine.prompts import PromptEncoder
from engine.schedule import step_schedule
from engine.similarity import SimilarityFilter
from engine.vae import decode_latents, encode_latents

MATH_DTYPE = torch.float32


@dataclass(frozen=True)
class UNetRows:
    """One stream's share of a UNet call: its batch ``x`` and the UNet inputs laid out for its CFG type."""

    x: torch.Tensor
    sample: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor


class StreamDiffusion:
    """One live stream: its latent buffer, noise, stock noise, prompts and similarity filter."""

    def __init__(self, components: Components, config: StreamConfig = StreamConfig(),
                 unet: UNetFn | None = None) -> None:
        self.components = components
        self.config = config
        self.device = components.device
        self.dtype = components.dtype
        self.unet = unet or torch_unet(components.unet)
        self.prompts = PromptEncoder(components.tokenizer, components.text_encoder)
        self.filter = SimilarityFilter(config.similarity_threshold, config.max_skip_frames, config.seed)
        self.calls = 0
        self._last_outputs: list[Frame] | None = None
        self.__dict__.update(self._schedule_state(config), **self._noise_state(config), **self._prompt_state(config))
        self._buffer = torch.zeros_like(self._noise[self.frames:])

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
        return self._noise

    @property
    def stock_noise(self) -> torch.Tensor:
        """RCFG's stock noise ``s``, one row per batch row (used by ``self`` and ``initialize``)."""
        return self._stock

    @property
    def latent_buffer(self) -> torch.Tensor:
        """The ``(n-1)·f`` rows in flight, already noised to steps 1..n-1."""
        return self._buffer

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
        images = self.preprocess(frames)
        if self.skips(images):
            return self.last_outputs
        finished = self.denoise(self.noised(encode_latents(self.components.vae, images)))
        return self.emit(finished, frame_kind(frames[0]))

    def preprocess(self, frames: Sequence[Frame]) -> torch.Tensor:
        """Frames → the VAE's input batch at the configured size (see :mod:`engine.image`)."""
        return preprocess(list(frames), self.config.height, self.config.width, self.device, self.dtype)

    def skips(self, images: torch.Tensor) -> bool:
        """Whether the similarity filter (when on) skips these preprocessed images."""
        return self.config.similarity_filter and self.filter.should_skip(images)

    def noised(self, latents: torch.Tensor) -> torch.Tensor:
        """Encoded frames noised to the first step with the stream's fixed noise."""
        f = self.frames
        return self._alpha[:f] * latents.to(MATH_DTYPE) + self._beta[:f] * self._noise[:f]

    def emit(self, finished: torch.Tensor | None, kind: FrameKind,
             decoded: torch.Tensor | None = None) -> list[Frame] | None:
        """Finished latents (or their ``decoded`` images) → output frames, remembered for re-emission."""
        if finished is None:
            return None
        if decoded is None:
            decoded = decode_latents(self.components.vae, finished.to(self.dtype))
        self._last_outputs = postprocess(decoded, kind)
        return self._last_outputs

    @property
    def last_outputs(self) -> list[Frame] | None:
        return self._last_outputs

    @torch.inference_mode()
    def txt2img(self, output: FrameKind = "np") -> list[Frame] | None:
        """Generate ``frame_buffer_size`` frames from the stream's fixed noise and the prompt."""
        self._check_mode("txt2img")
        return self.emit(self.denoise(self._noise[: self.frames].clone()), output)

    @torch.inference_mode()
    def denoise(self, noisy: torch.Tensor) -> torch.Tensor | None:
        """One stream-batch call on ``f`` new rows at step 0; the finished latents, or ``None`` when warming up."""
        rows = self.prepare(noisy)
        return self.finish(rows, self.unet(rows.sample, rows.timesteps, rows.embeds))

    def prepare(self, noisy: torch.Tensor) -> UNetRows:
        """The rows this stream adds to a UNet call; changes no state, so a failed call can be retried."""
        x = torch.cat([noisy, self._buffer]) if self.steps > 1 else noisy
        return UNetRows(x, self._cfg_layout(x).to(self.dtype), self._unet_timesteps, self._unet_embeds)

    def finish(self, rows: UNetRows, prediction: torch.Tensor) -> torch.Tensor | None:
        """Apply the UNet's ``prediction`` for ``rows``: guidance, x0, stock noise, buffer shift."""
        f, x = self.frames, rows.x
        eps = self._guide(self._as_epsilon(prediction.to(MATH_DTYPE), self._cfg_layout(x)))
        x0 = self._c_out * (x - self._beta * eps) / self._alpha + self._c_skip * x
        finished = None if self.warming_up else x0[-f:]
        if self.config.cfg_type in ("self", "initialize"):
            self._stock = self._next_stock(eps)
        self._buffer = self._next_buffer(x0)
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
        self.config = new
        self.__dict__.update(state)
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
        self._buffer = torch.zeros_like(self._buffer)
        self._stock = self._noise.clone()

    # ------------------------------------------------------------- the math

    def _guide(self, eps: torch.Tensor) -> torch.Tensor:
        """Residual CFG over the UNet's noise predictions (laid out as :meth:`_cfg_layout`)."""
        cfg, f = self.config.cfg_type, self.frames
        if cfg == "none":
            return eps
        if cfg == "full":
            eps_uncond, eps_cond = eps.chunk(2)
        else:
            if cfg == "initialize":  # the real negative pass on the new frames refreshes their stock noise
                self._stock = torch.cat([eps[:f], self._stock[f:]])
                eps = eps[f:]
            eps_cond, eps_uncond = eps, self.config.delta * self._stock
        return eps_uncond + self.config.guidance_scale * (eps_cond - eps_uncond)

    def _as_epsilon(self, prediction: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self.components.prediction_type == "v_prediction":  # ε = α·v + β·x
            return self._cfg_layout(self._alpha) * prediction + self._cfg_layout(self._beta) * sample
        return prediction

    def _next_stock(self, eps: torch.Tensor) -> torch.Tensor:
        """Residual noise each row will carry at its next step (StreamDiffusion's stock-noise update).

        ``Δ = c_out·(β·s − β·ε̂)/α + c_skip·β·s``; a row moving from step i to i+1 gets
        ``ε_{i+1} + (α_{i+1}/β_{i+1})·Δ_i``; new frames enter with the noise they were given, ``ε_0``.
        """
        f = self.frames
        scaled = self._beta * self._stock
        delta = self._c_out * (scaled - self._beta * eps) / self._alpha + self._c_skip * scaled
        moved = self._noise[f:] + self._alpha[f:] / self._beta[f:] * delta[:-f]
        return torch.cat([self._noise[:f], moved])

    def _next_buffer(self, x0: torch.Tensor) -> torch.Tensor:
        """Rows at steps 0..n-2 re-noised to their next step: ``α_{i+1}·x0_i (+ β_{i+1}·ε_{i+1})``."""
        f = self.frames
        moved = self._alpha[f:] * x0[:-f]
        if self.config.do_add_noise:
            moved = moved + self._beta[f:] * self._noise[f:]
        return moved

    def _cfg_layout(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row values laid out like the UNet batch: ``[uncond rows, cond rows]``."""
        cfg = self.config.cfg_type
        if cfg == "full":
            return torch.cat([rows, rows])
        if cfg == "initialize":
            return torch.cat([rows[: self.frames], rows])
        return rows

    # ------------------------------------------------------------- state set-up

    def _schedule_state(self, config: StreamConfig) -> dict[str, torch.Tensor]:
        schedule = step_schedule(self.components.scheduler, config.t_index_list, config.num_inference_steps)
        per_row = dict(frames=config.frame_buffer_size, device=self.device, dtype=MATH_DTYPE)
        timesteps = schedule.timesteps.repeat_interleave(config.frame_buffer_size).to(self.device)
        return {"_alpha": schedule.per_row("alpha", **per_row), "_beta": schedule.per_row("beta", **per_row),
                "_c_skip": schedule.per_row("c_skip", **per_row), "_c_out": schedule.per_row("c_out", **per_row),
                "_unet_timesteps": self._cfg_layout(timesteps)}

    def _noise_state(self, config: StreamConfig) -> dict[str, torch.Tensor]:
        """The stream's noise, drawn once from the seed (on the CPU, so every device agrees)."""
        rows = config.denoising_steps * config.frame_buffer_size
        height, width = config.latent_size
        generator = torch.Generator("cpu").manual_seed(config.seed)
        shape = (rows, self.components.latent_channels, height, width)
        noise = torch.randn(shape, generator=generator, dtype=MATH_DTYPE).to(self.device)
        return {"_noise": noise, "_stock": noise.clone()}

    def _prompt_state(self, config: StreamConfig) -> dict[str, torch.Tensor]:
        cond = self.prompts.encode_weighted(config.prompt).to(self.dtype)
        uncond = self.prompts.encode(config.negative_prompt).to(self.dtype)
        rows, f = config.denoising_steps * config.frame_buffer_size, config.frame_buffer_size
        layouts = {
            "full": [uncond.expand(rows, -1, -1), cond.expand(rows, -1, -1)],
            "initialize": [uncond.expand(f, -1, -1), cond.expand(rows, -1, -1)],
        }
        return {"_unet_embeds": torch.cat(layouts.get(config.cfg_type, [cond.expand(rows, -1, -1)]))}

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

    # ------------------------------------------------------------- helpers

    def _check_mode(self, mode: str) -> None:
        if self.config.mode != mode:
            raise ValueError(f"this stream was configured with mode={self.config.mode!r}; {mode} needs mode={mode!r}")
