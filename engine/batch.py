"""Run one frame from each of several streams through one shared call.

Streams on one device share a shape, slots and a :class:`engine.graphs.CallRunner`, so their
frames go through ONE encode, ONE UNet call and ONE decode, which is how one GPU serves
several live streams. Each stream keeps its own state (buffer, noise, stock noise, prompts,
filter), so outputs are exactly what each stream gives alone.

Faults stay with their stream: a call changes no state unless it succeeds, so when a shared
call raises it is retried stream by stream, and only the stream whose frame breaks the model
gets the error. A stream whose state turns NaN/inf is reset and told so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from engine.graphs import CallResult, CallRunner
from engine.image import Frame, frame_kind
from engine.stream import NonFiniteOutputError, StreamDiffusion

__all__ = ["FrameJob", "NonFiniteOutputError", "run_jobs"]


@dataclass
class FrameJob:
    """One stream's frame for this round, and what became of it."""

    stream: StreamDiffusion
    frame: Frame
    outputs: list[Frame] | None = None
    skipped: bool = False
    error: BaseException | None = None
    advanced: bool = False    # the stream took this frame in (its state moved on)
    output_due: bool = False  # a frame left the pipeline on this call (lost with an error)
    fitted: list[Frame | torch.Tensor] | None = field(default=None, repr=False)


@torch.inference_mode()
def run_jobs(jobs: list[FrameJob], runner: CallRunner) -> dict[str, int]:
    """Process every job, sharing one call; fills ``outputs``/``skipped``/``error``. Returns the call's size."""
    active = [job for job in jobs if _attempt(job, lambda: _screen(job))]
    _shared(active, lambda group: _call(group, runner))
    return {"unet_streams": len(active)}


def _screen(job: FrameJob) -> bool:
    """True when the job needs the model; a skipped frame re-emits the stream's last outputs."""
    job.fitted = job.stream.screen([job.frame])
    if job.fitted is None:
        job.skipped, job.outputs = True, job.stream.last_outputs
        return False
    return True


def _call(group: list[FrameJob], runner: CallRunner) -> None:
    """One call for ``group``; each stream takes its share before the next call reuses the buffers."""
    result = runner.run([job.stream.slot for job in group], [frame for job in group for frame in job.fitted or []])
    for position, job in enumerate(group):
        _attempt(job, lambda: _accept(job, result, position))


def _accept(job: FrameJob, result: CallResult, position: int) -> None:
    try:
        job.outputs = job.stream.accept(result, position, frame_kind(job.frame))
    except NonFiniteOutputError as error:
        job.advanced, job.output_due = error.advanced, error.output_due
        raise
    job.advanced = True


T = TypeVar("T")


def _shared(jobs: list[FrameJob], run: Callable[[list[FrameJob]], None]) -> None:
    """``run`` on all jobs together; if that raises, on each alone, so a bad job fails alone."""
    if not jobs:
        return
    try:
        return run(jobs)
    except Exception as error:  # noqa: BLE001 - which job broke it is found by the retry below
        if len(jobs) == 1:
            jobs[0].error = error
            return
    for job in jobs:
        _attempt(job, lambda: run([job]))


def _attempt(job: FrameJob, run: Callable[[], T]) -> T | None:
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - errors are data: they go to the job's stream
        job.error = error
        return None
