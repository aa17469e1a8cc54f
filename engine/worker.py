"""One worker thread per device: gathers the pending frames of its sessions, runs them together.

Torch releases the GIL inside its kernels, so the event loop stays responsive while the
worker computes. Sessions are taken round-robin, at most ``max_batch`` per UNet call, so
under load every session gets its turn and none starves.
"""

from __future__ import annotations

import logging
import threading
import time

from engine.backends import UNetFn
from engine.batch import FrameJob, run_jobs
from engine.components import Components
from engine.metrics import EngineMetrics
from engine.session import PendingFrame, Session

log = logging.getLogger(__name__)


class Worker:
    """Owns a device's model and the thread that runs it."""

    def __init__(self, components: Components, unet: UNetFn, metrics: EngineMetrics, max_batch: int) -> None:
        self.components = components
        self.unet = unet
        self.device = components.device
        self._metrics = metrics
        self._max_batch = max_batch
        self._sessions: list[Session] = []
        self.reserved = 0  # sessions being opened for this worker (balancing counts them)
        self._next = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._working = False
        self._thread = threading.Thread(target=self._run, name=f"diffcam-worker-{self.device}", daemon=True)

    @property
    def session_count(self) -> int:
        return len(self._sessions) + self.reserved

    @property
    def idle(self) -> bool:
        """No round running and no frame waiting."""
        return not self._working and not any(s.has_pending for s in self._sessions)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Ask the thread to finish its current round and exit; True if it did within ``timeout``."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def add(self, session: Session) -> None:
        with self._wake:
            self._sessions.append(session)

    def remove(self, session: Session) -> None:
        with self._wake:
            if session in self._sessions:
                self._sessions.remove(session)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        while True:
            taken = self._gather()
            if taken is None:
                return
            started = time.monotonic()
            try:
                self._process(taken)
            except Exception as error:  # noqa: BLE001 - the worker must outlive any one round
                log.exception("worker round failed")
                for session, frame in taken:
                    session.failed(frame, error)
            self._metrics.busy.add(started, time.monotonic())
            self._working = False

    def _gather(self) -> list[tuple[Session, PendingFrame]] | None:
        """Wait for frames; take up to ``max_batch`` sessions' frames, round-robin. None to stop."""
        with self._wake:
            chosen: list[Session] = []
            while not chosen:  # a session closing meanwhile can empty its slot: look again
                while not self._stopping and not any(s.has_pending for s in self._sessions):
                    self._wake.wait(timeout=0.5)
                if self._stopping:
                    return None
                count = len(self._sessions)
                order = [self._sessions[(self._next + i) % count] for i in range(count)]
                chosen = [s for s in order if s.has_pending][: self._max_batch]
            self._working = True
            self._next = (self._sessions.index(chosen[-1]) + 1) % count
        taken = [(session, session.take()) for session in chosen]
        return [(session, frame) for session, frame in taken if frame is not None]

    def _process(self, taken: list[tuple[Session, PendingFrame]]) -> None:
        jobs = [FrameJob(session.stream, frame.frame) for session, frame in taken]
        sizes = run_jobs(jobs, self.unet, self.components.vae)
        if sizes["unet_streams"]:
            self._metrics.record_call(sizes["unet_streams"])
        for (session, frame), job in zip(taken, jobs):
            if job.error is not None:
                log.warning("session %s: %s", session.id, job.error)
                session.failed(frame, job.error, advanced=job.advanced, output_due=job.finished is not None)
            else:
                session.completed(frame, job.outputs, job.skipped)
