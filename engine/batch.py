"""Run one frame from each of several streams through shared VAE and UNet calls.

Streams that share a model and a shape are denoised in ONE UNet call (their rows stacked),
which is how one GPU serves several live streams. Each stream keeps its own state (buffer,
noise, stock noise, prompts, filter), so outputs are exactly what each stream gives alone.

Faults stay with their stream: when a shared call raises, it is retried stream by stream,
so only the stream whose frame breaks the model gets the error. Nothing is mutated before
the shared UNet call succeeds, which makes the retry safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from engine.backends import UNetFn
from engine.components import Vae
from engine.image import Frame, frame_kind
from engine.stream import StreamDiffusion, UNetRows
from engine.vae import decode_latents, encode_latents


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or inf for this stream's frame; the stream was reset."""


@dataclass
class FrameJob:
    """One stream's frame for this round, and what became of it."""

    stream: StreamDiffusion
    frame: Frame
    outputs: list[Frame] | None = None
    skipped: bool = False
    error: BaseException | None = None
    advanced: bool = False  # the stream took this frame in (its state moved on)
    images: torch.Tensor | None = field(default=None, repr=False)
    rows: UNetRows | None = field(default=None, repr=False)
    finished: torch.Tensor | None = field(default=None, repr=False)


@torch.inference_mode()
def run_jobs(jobs: list[FrameJob], unet: UNetFn, vae: Vae) -> dict[str, int]:
    """Process every job, sharing calls; fills ``outputs``/``skipped``/``error``. Returns call sizes."""
    active = [job for job in jobs if _preprocess(job)]
    predicted = _shared(active, lambda group: _predict(group, unet, vae))
    ready = [job for job, prediction in predicted if _finish(job, prediction)]
    decoded = _shared(ready, lambda group: _decode(group, vae))
    for job, images in decoded:
        _attempt(job, lambda: _emit(job, images))
    return {"unet_streams": len(active), "decoded": len(ready)}


def _preprocess(job: FrameJob) -> bool:
    """True when the job needs the model; a skipped frame re-emits the stream's last outputs."""
    def run() -> bool:
        job.images = job.stream.preprocess([job.frame])
        if job.stream.skips(job.images):
            job.skipped, job.outputs = True, job.stream.last_outputs
            return False
        return True

    return bool(_attempt(job, run))


def _predict(group: list[FrameJob], unet: UNetFn, vae: Vae) -> list[tuple[FrameJob, torch.Tensor]]:
    """Encode all frames at once, then one UNet call over every stream's rows."""
    latents = encode_latents(vae, torch.cat([job.images for job in group]))
    for job, latent in zip(group, latents.split(1)):
        job.rows = job.stream.prepare(job.stream.noised(latent))
    rows = [job.rows for job in group]
    prediction = unet(torch.cat([r.sample for r in rows]), torch.cat([r.timesteps for r in rows]),
                      torch.cat([r.embeds for r in rows]))
    return list(zip(group, prediction.split([len(r.sample) for r in rows])))


def _finish(job: FrameJob, prediction: torch.Tensor) -> bool:
    """Advance the stream; True when it has a finished frame to decode."""
    def run() -> bool:
        job.finished = job.stream.finish(job.rows, prediction)
        job.advanced = True
        if not torch.isfinite(job.stream.latent_buffer).all() or (
                job.finished is not None and not torch.isfinite(job.finished).all()):
            job.stream.reset()
            raise NonFiniteOutputError("the model produced NaN/inf for this frame; the stream was reset")
        return job.finished is not None

    return bool(_attempt(job, run))


def _decode(group: list[FrameJob], vae: Vae) -> list[tuple[FrameJob, torch.Tensor]]:
    stream = group[0].stream
    images = decode_latents(vae, torch.cat([job.finished for job in group]).to(stream.dtype))
    return list(zip(group, images.split(1)))


def _emit(job: FrameJob, images: torch.Tensor) -> None:
    if not torch.isfinite(images).all():
        raise NonFiniteOutputError("the VAE decoded NaN/inf for this frame")
    job.outputs = job.stream.emit(job.finished, frame_kind(job.frame), decoded=images)


T = TypeVar("T")


def _shared(jobs: list[FrameJob], run: Callable[[list[FrameJob]], list[tuple[FrameJob, T]]]) -> list[tuple[FrameJob, T]]:
    """``run`` on all jobs together; if that raises, on each alone, so a bad job fails alone."""
    if not jobs:
        return []
    try:
        return run(jobs)
    except Exception as error:  # noqa: BLE001 - which job broke it is found by the retry below
        if len(jobs) == 1:
            jobs[0].error = error
            return []
    results: list[tuple[FrameJob, T]] = []
    for job in jobs:
        results += _attempt(job, lambda: run([job])) or []
    return results


def _attempt(job: FrameJob, run: Callable[[], T]) -> T | None:
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - errors are data: they go to the job's stream
        job.error = error
        return None
