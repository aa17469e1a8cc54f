"""A stream served by a replica process, as the front holds it: the :class:`~engine.session.Session` interface.

Input is a one-frame mailbox (newest wins) that the link's sender thread empties into a free
shared-memory input slot; output is one slot on the event loop, filled from the link's reader
thread through ``call_soon_threadsafe``. Closing unlinks the session's shared memory.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from engine.config import StreamConfig, updated_config
from engine.image import Frame
from engine.metrics import SessionMetrics
from engine.parallel.replica_frames import SLOTS, FrameSlots, to_model_rgb
from engine.session import FrameError, Output, OutputMailbox, SessionClosedError

if TYPE_CHECKING:
    from engine.parallel.replica_link import ReplicaLink


class ReplicaSession(OutputMailbox):
    """One stream served by a replica process; the :class:`~engine.session.Session` interface."""

    def __init__(self, session_id: str, config: StreamConfig, link: ReplicaLink, loop: asyncio.AbstractEventLoop,
                 on_close: Callable[["ReplicaSession"], None]) -> None:
        self.id = session_id
        self.link = link
        self.metrics = SessionMetrics()
        self.closed = False
        self._loop = loop
        self._on_close = on_close
        self._lock = threading.Lock()      # the mailbox, the free input slots, the config
        self._frames_lock = threading.Lock()  # shared memory: never released while a thread copies
        self._latest_config = config
        self._pending: tuple[Frame, int, Any, float] | None = None
        self._free_in = list(range(SLOTS))
        self._ids = itertools.count()
        self._front_dropped = 0
        self._front_errors = 0  # frames that failed here, before reaching the replica
        self.in_frames = FrameSlots.create(f"{link.process.pid}-{session_id}-in", config.height, config.width)
        try:
            self.out_frames = FrameSlots.create(f"{link.process.pid}-{session_id}-out", config.height, config.width)
        except BaseException:
            self.in_frames.release()  # nobody else holds it yet
            raise
        self._end_reason = f"session {session_id} is closed"
        super().__init__()

    # ------------------------------------------------------------ the caller's side (event loop)

    @property
    def config(self) -> StreamConfig:
        """The parameters in force for the next frame (pending updates included)."""
        with self._lock:
            return self._latest_config

    def submit(self, frame: Frame, pts: Any = None) -> int:
        """Offer a frame; returns its id. Never blocks: an older frame not yet sent is dropped."""
        if self.closed:
            raise SessionClosedError(self._end_reason)
        frame_id = next(self._ids)
        with self._lock:
            if self._pending is not None:
                self._front_dropped += 1
                self.metrics.dropped += 1
            self._pending = (frame, frame_id, pts, time.monotonic())
            self.metrics.frames_in += 1
        self.link.wake()
        return frame_id

    def update(self, **params: Any) -> StreamConfig:
        """Validate now (``ValueError`` if bad, nothing changed); the replica applies it from the next frame."""
        if self.closed:
            raise SessionClosedError(self._end_reason)
        with self._lock:
            new = updated_config(self._latest_config, params)
            self._latest_config = new
            self.link.post(("update", self.id, params))  # under the lock: updates reach the replica in order
        return new

    def close(self) -> None:
        """Stop the session, tell its replica, unlink its shared memory. Idempotent; on the event loop."""
        self.end(None)

    def end(self, reason: str | None) -> None:
        """Close with ``reason`` (what ``next_output`` and ``submit`` raise from now on)."""
        if self.closed:
            return
        self.closed = True
        if reason is not None:
            self._end_reason = reason
        with self._lock:
            self._pending = None
        if self.link.alive:
            self.link.post(("close", self.id))
        with self._frames_lock:
            self.in_frames.release()
            self.out_frames.release()
        self._on_close(self)
        self._wake_readers()

    def deliver(self, item: Output | FrameError) -> None:
        """Put an output or a frame error in the output slot (on the loop; the newest wins)."""
        self._put(item)

    def _closed_error(self) -> SessionClosedError:
        return SessionClosedError(self._end_reason)

    def counted(self, replica: dict) -> None:
        """The replica's counters of this session (dropped there, processed, skipped, errors), plus the front's."""
        self.metrics.dropped = self._front_dropped + replica.get("dropped", 0)
        self.metrics.errors = self._front_errors + replica.get("errors", 0)
        for name in ("processed", "skipped"):
            setattr(self.metrics, name, replica.get(name, 0))

    # ------------------------------------------------------------ the link's threads

    @property
    def has_frame_to_send(self) -> bool:
        return self._pending is not None and bool(self._free_in) and not self.closed

    def fill_input(self) -> tuple | None:
        """On the sender thread: the newest frame into a free input slot; the message that announces it."""
        with self._lock:
            if self._pending is None or not self._free_in or self.closed:
                return None
            (frame, frame_id, pts, submitted), self._pending = self._pending, None
            slot = self._free_in.pop(0)
        try:
            rgb = to_model_rgb(frame, self.in_frames.shape[0], self.in_frames.shape[1])
        except Exception as error:  # noqa: BLE001 - whatever the frame is, it fails alone, here
            self.frame_failed(slot, frame_id, error)
            return None
        with self._frames_lock:
            if self.closed:
                return None
            self.in_frames.write(slot, rgb)
        return ("frame", self.id, slot, (frame_id, pts, submitted))

    def frame_failed(self, slot: int, frame_id: int, error: BaseException) -> None:
        """On the sender thread: the frame in ``slot`` cannot go to the replica; free the slot, tell the reader."""
        self.input_freed(slot)
        with self._lock:
            self._front_errors += 1
            self.metrics.errors += 1
        failure = FrameError(f"frame {frame_id} of session {self.id} failed: {type(error).__name__}: {error}",
                             frame_id)
        try:
            self._loop.call_soon_threadsafe(self.deliver, failure)
        except RuntimeError:  # the loop is gone: nobody is left to tell
            pass

    def input_freed(self, slot: int) -> None:
        with self._lock:
            if slot not in self._free_in:
                self._free_in.append(slot)

    def copy_output(self, slot: int, tag: tuple, skipped: bool) -> Output | None:
        """On the reader thread: the output in ``slot``, copied out (None once closed)."""
        frame_id, pts, submitted = tag
        with self._frames_lock:
            if self.closed:
                return None
            frame = self.out_frames.read(slot)
        latency = time.monotonic() - submitted
        self.metrics.latency.add(latency)
        return Output(frame, frame_id, pts, latency, skipped=skipped)
