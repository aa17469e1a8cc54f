"""A session: one live stream (a browser peer, a WHIP publisher, a camera) on the engine.

Input is one slot, newest wins: ``submit`` never blocks and never queues; a frame the worker
has not taken yet is replaced (and counted as dropped). Output is one slot too, read with
``await next_output()``. The worker thread fills it through the event loop's thread-safe
call, so the loop only ever moves references.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
import logging
from typing import Any, AsyncIterator, Callable, Iterable

from engine.config import StreamConfig, updated_config
from engine.image import Frame
from engine.metrics import EngineMetrics, SessionMetrics
from engine.stream import StreamDiffusion

log = logging.getLogger(__name__)


class EngineBusyError(RuntimeError):
    """The engine is at its session limit; try again later (HTTP servers answer 503)."""


class SessionClosedError(RuntimeError):
    """The session was closed (by its owner, by the engine shutting down, or for being idle)."""


class FrameError(RuntimeError):
    """Processing one frame failed; the session goes on with the next frame."""

    def __init__(self, message: str, frame_id: int) -> None:
        super().__init__(message)
        self.frame_id = frame_id


@dataclass(frozen=True)
class Output:
    """A stylized frame and the input it came from (``frame_id``, ``pts`` as given to ``submit``)."""

    frame: Frame
    frame_id: int
    pts: Any
    latency: float
    skipped: bool = False


@dataclass(frozen=True)
class PendingFrame:
    frame: Frame
    frame_id: int
    pts: Any
    submitted_at: float


class OutputMailbox:
    """The output side of every kind of session: one slot, the newest output wins.

    Filled on the event loop (:meth:`_put`, from a worker thread through ``call_soon_threadsafe``);
    read with ``await next_output()``. A subclass sets ``closed`` and ``metrics`` and says what
    a closed session raises (:meth:`_closed_error`).
    """

    closed: bool
    metrics: SessionMetrics

    def __init__(self) -> None:
        self._output: Output | FrameError | None = None
        self._output_ready = asyncio.Event()
        self._waiters = 0
        self._last_consumed = time.monotonic()

    def close(self) -> None:
        raise NotImplementedError

    def _closed_error(self) -> SessionClosedError:
        raise NotImplementedError

    async def next_output(self) -> Output:
        """The newest stylized frame; raises :class:`FrameError` for a failed frame, then goes on."""
        self._waiters += 1
        try:
            while self._output is None:
                if self.closed:
                    raise self._closed_error()
                self._output_ready.clear()
                await self._output_ready.wait()
        finally:
            self._waiters -= 1
            self._last_consumed = time.monotonic()
        item, self._output = self._output, None
        if isinstance(item, FrameError):
            raise item
        return item

    async def outputs(self) -> AsyncIterator[Output]:
        """Iterate outputs until the session closes (frame errors are skipped)."""
        while True:
            try:
                yield await self.next_output()
            except FrameError:
                continue
            except SessionClosedError:
                return

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since a consumer last read or waited for an output (0 while one waits)."""
        if self._waiters:
            return 0.0
        return (time.monotonic() if now is None else now) - self._last_consumed

    def _put(self, item: Output | FrameError) -> None:
        """Put an output or a frame error in the slot (on the event loop; the newest wins)."""
        if self.closed:
            return
        if isinstance(item, Output):
            self.metrics.outputs += 1
            self.metrics.output_rate.tick()
            if isinstance(self._output, Output):
                self.metrics.outputs_dropped += 1
        self._output = item
        self._output_ready.set()

    def _wake_readers(self) -> None:
        """Let every ``next_output`` waiter see that the session closed (on the event loop)."""
        self._output_ready.set()


class NewestFrameSlot:
    """The input side a session and the sharded stream's session share: one slot, the newest frame wins.

    A subclass holds ``_lock``, ``_pending``, ``_ids`` and ``metrics``, and says how to wake whoever
    takes frames (:meth:`_wake`) and what a closed session raises (``_closed_error``).
    """

    closed: bool
    metrics: SessionMetrics
    _lock: threading.Lock
    _pending: PendingFrame | None
    _ids: itertools.count

    def _closed_error(self) -> SessionClosedError:
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def submit(self, frame: Frame, pts: Any = None) -> int:
        """Offer a frame; returns its id. Never blocks: an older frame not taken yet is dropped."""
        if self.closed:
            raise self._closed_error()
        frame_id = next(self._ids)
        with self._lock:
            if self._pending is not None:
                self.metrics.dropped += 1
            self._pending = PendingFrame(frame, frame_id, pts, time.monotonic())
            self.metrics.frames_in += 1
        self._wake()
        return frame_id


class Session(NewestFrameSlot, OutputMailbox):
    """Handle to one stream. Create it with :meth:`engine.runtime.Engine.open_session`."""

    def __init__(self, session_id: str, stream: StreamDiffusion, loop: asyncio.AbstractEventLoop,
                 wake_worker: Callable[[], None], on_close: Callable[["Session"], None]) -> None:
        self.id = session_id
        self.stream = stream
        self.metrics = SessionMetrics()
        self._loop = loop
        self._wake_worker = wake_worker
        self._on_close = on_close
        self._lock = threading.Lock()
        self._pending: PendingFrame | None = None
        self._pending_config: StreamConfig | None = None
        self._latest_config = stream.config  # what update() builds on: pending updates included
        self._in_flight: deque[PendingFrame] = deque()
        self._ids = itertools.count()
        self.closed = False
        super().__init__()

    # ------------------------------------------------------------ caller side (event loop)

    @property
    def config(self) -> StreamConfig:
        """The parameters in force for the next frame (pending updates included)."""
        with self._lock:
            return self._latest_config

    def _wake(self) -> None:
        self._wake_worker()

    def update(self, **params: Any) -> StreamConfig:
        """Validate now (``ValueError`` if bad, nothing changed); apply from the next frame on."""
        with self._lock:
            new = updated_config(self._latest_config, params)
            self._latest_config = self._pending_config = new
        return new

    def close(self) -> None:
        """Stop the session and free its stream state. Idempotent; call on the event loop."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            self._pending = None
            self._in_flight.clear()
        self._on_close(self)
        self._wake_readers()

    def _closed_error(self) -> SessionClosedError:
        return SessionClosedError(f"session {self.id} is closed")

    # ------------------------------------------------------------ worker side (worker thread)

    def take(self) -> PendingFrame | None:
        """The pending frame, if any; parameter updates made before it take effect now (worker thread)."""
        with self._lock:
            pending, self._pending = self._pending, None
            new_config, self._pending_config = self._pending_config, None
        if new_config is not None and not self.closed:
            try:
                self.stream.apply_config(new_config)
            except Exception as error:  # noqa: BLE001 - e.g. the text encoder failed: report, keep going
                with self._lock:
                    if self._pending_config is None:  # no newer update: report what is really in force
                        self._latest_config = self.stream.config
                self.failed(pending, error)
                return None
        return pending

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def completed(self, frame: PendingFrame, outputs: list[Frame] | None, skipped: bool) -> None:
        """Record a processed frame; deliver the output that left the pipeline, if one did."""
        if skipped:
            self.metrics.skipped += 1
            if outputs is not None:
                self._deliver(Output(outputs[0], frame.frame_id, frame.pts, self._latency(frame), skipped=True))
            return
        self.metrics.processed += 1
        self._in_flight.append(frame)
        if outputs is not None and self._in_flight:
            source = self._in_flight.popleft()
            self._deliver(Output(outputs[0], source.frame_id, source.pts, self._latency(source)))

    def failed(self, frame: PendingFrame | None, error: BaseException, *, advanced: bool = False,
               output_due: bool = False) -> None:
        """Report a failure. ``advanced``: the stream moved on before it (the frame is in flight now);
        ``output_due``: the failure cost the output of the frame leaving the pipeline, which it names."""
        self.metrics.errors += 1
        frame_id = frame.frame_id if frame is not None else -1  # -1: a parameter update failed
        if self.stream.calls == 0:  # the stream was reset: frames in flight are gone
            self._in_flight.clear()
        elif advanced and frame is not None:
            self._in_flight.append(frame)
            if output_due:
                frame_id = self._in_flight.popleft().frame_id
        what = f"frame {frame_id}" if frame_id >= 0 else "a parameter update"
        message = f"{what} of session {self.id} failed: {type(error).__name__}: {error}"
        failure = FrameError(message, frame_id)
        failure.__cause__ = error
        self._deliver(failure)

    def _latency(self, frame: PendingFrame) -> float:
        latency = time.monotonic() - frame.submitted_at
        self.metrics.latency.add(latency)
        return latency

    def _deliver(self, item: Output | FrameError) -> None:
        try:
            self._loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the loop is closed: nobody is left to read it
            pass


async def reap_idle(sessions: Callable[[], Iterable[OutputMailbox]], idle_timeout: float,
                    metrics: EngineMetrics) -> None:
    """Close sessions whose consumer went away (nobody read or waited for ``idle_timeout``); runs until cancelled."""
    period = min(1.0, idle_timeout / 4)
    while True:
        await asyncio.sleep(period)
        for session in list(sessions()):
            if session.idle_for() > idle_timeout:
                log.info("closing idle session %s", getattr(session, "id", "?"))
                metrics.sessions_expired += 1
                session.close()
