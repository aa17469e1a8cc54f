"""One worker thread per device, the ONE owner of everything that device runs.

The worker loads and prepares its model (compiling, capturing CUDA graphs), opens streams
(text encoding, noise), applies parameter updates and runs every call: CUDA state is per
thread in places (inductor's CUDA graph trees keep theirs in thread-local storage), and work
launched from another thread while a graph is being captured invalidates the capture. Other
threads hand it *requests* (:meth:`Worker.submit`), which it carries out between rounds.

Each round gathers the pending frames of its sessions, round-robin, at most ``max_batch``
per call, so under load every session gets its turn and none starves. Torch releases the
GIL inside its kernels, so the event loop stays responsive while the worker computes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.batch import FrameJob, run_jobs
from engine.components import Components
from engine.graphs import CallRunner
from engine.metrics import EngineMetrics
from engine.prompts import PromptEncoder
from engine.session import PendingFrame, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceModel:
    """What a worker serves with, made on its own thread: the components, the backend, the call runner,
    and the prompt encoder (and its cache) that every stream on the device shares."""

    components: Components
    runner: CallRunner
    backend: str
    prompts: PromptEncoder


Request = tuple[Callable[[], Any], Future]

#: a GPU round that runs this long hangs: rounds take milliseconds once every call size is compiled or captured,
#: which they are before serving (:attr:`engine.runtime.EngineConfig.hang_timeout`)
HANG_S = 300.0

#: what torch raises for a failed CUDA call (torch 2.8 on; before, a RuntimeError saying "CUDA error: ...")
ACCELERATOR_ERROR: type | tuple = getattr(torch, "AcceleratorError", ())


def device_unusable(error: BaseException | None) -> bool:
    """Whether ``error``, or an error that caused it, leaves this process's device unusable.

    A sticky CUDA error (an illegal memory access, a kernel fault, an Xid) poisons the process's CUDA context:
    every later call on the device fails too. Running out of memory does not: a later, smaller call may fit.
    A worker fails the frames either way; a process that serves one device for a front (a replica) asks this
    to know when to exit instead.
    """
    while error is not None:
        text = str(error)
        cuda = isinstance(error, ACCELERATOR_ERROR) or isinstance(error, RuntimeError) and text.startswith("CUDA error")
        if cuda and "out of memory" not in text:
            return True
        error = error.__cause__
    return False


class Worker:
    """Owns a device: its model, the thread that runs it, and the requests that thread carries out."""

    def __init__(self, device: torch.device, setup: Callable[[], DeviceModel], metrics: EngineMetrics,
                 max_batch: int) -> None:
        self.device = device
        self.name = str(device)
        self._setup = setup
        self._metrics = metrics
        self._max_batch = max_batch
        self.model: DeviceModel | None = None
        self.ready: Future[DeviceModel] = Future()
        self._sessions: list[Session] = []
        self._requests: deque[Request] = deque()
        self.reserved = 0  # sessions being opened for this worker (balancing counts them)
        self._next = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._busy_since: float | None = None  # when the running round (or requests) began
        self.thread = threading.Thread(target=self._run, name=f"diffcam-worker-{self.name}", daemon=True)

    @property
    def session_count(self) -> int:
        return len(self._sessions) + self.reserved

    @property
    def idle(self) -> bool:
        """No round or request running and none waiting."""
        return self._busy_since is None and not self._requests and not any(s.has_pending for s in self._sessions)

    def busy_for(self) -> float:
        """Seconds the running round (or batch of requests) has run so far; 0 between them. Every call size
        is compiled or captured before serving, so on a GPU a round takes milliseconds: one that runs on for
        minutes is a device that hangs, which raises nothing."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def start(self) -> Future[DeviceModel]:
        """Start the thread; the future resolves once the model is loaded and prepared (or fails with why not)."""
        self.thread.start()
        return self.ready

    def stop(self, timeout: float) -> bool:
        """Ask the thread to finish its current round and exit; True if it did within ``timeout``."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def submit(self, request: Callable[[], Any]) -> Future:
        """Run ``request`` on the worker's thread between rounds; its result or exception comes back in the future."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                future.set_exception(RuntimeError(f"worker {self.name} has stopped"))
                return future
            self._requests.append((request, future))
            self._wake.notify()
        return future

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

    # ------------------------------------------------------------ the worker's thread

    def _run(self) -> None:
        try:
            self.model = self._set_up()
        except BaseException as error:  # noqa: BLE001 - the caller waiting on `ready` reports it
            self.ready.set_exception(error)
            self._cancel_requests()
            return
        self.ready.set_result(self.model)
        while (work := self._gather()) is not None:
            requests, taken = work
            for request, future in requests:
                self._carry_out(request, future)
            if taken:
                self._round(taken)
            self._busy_since = None
        self._cancel_requests()

    def _set_up(self) -> DeviceModel:
        if self.device.type == "cuda" and self.device.index is not None:  # this thread's current device
            torch.cuda.set_device(self.device)
        return self._setup()

    @staticmethod
    def _carry_out(request: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(request())
        except BaseException as error:  # noqa: BLE001 - the requester gets it
            future.set_exception(error)

    def _cancel_requests(self) -> None:
        with self._wake:
            requests, self._requests = list(self._requests), deque()
        for _, future in requests:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(f"worker {self.name} has stopped"))

    def _gather(self) -> tuple[list[Request], list[tuple[Session, PendingFrame]]] | None:
        """Wait for requests or frames; take all requests and up to ``max_batch`` sessions' frames. None to stop."""
        with self._wake:
            while True:  # a session closing meanwhile can empty its slot: look again
                while not self._stopping and not self._requests and not any(s.has_pending for s in self._sessions):
                    self._wake.wait(timeout=0.5)
                if self._stopping:
                    return None
                requests, self._requests = list(self._requests), deque()
                chosen = self._choose()
                if requests or chosen:
                    break
            self._busy_since = time.monotonic()
        taken = [(session, session.take()) for session in chosen]
        return requests, [(session, frame) for session, frame in taken if frame is not None]

    def _choose(self) -> list[Session]:
        """Up to ``max_batch`` sessions with a pending frame, round-robin from where the last round stopped."""
        count = len(self._sessions)
        order = [self._sessions[(self._next + i) % count] for i in range(count)]
        chosen = [s for s in order if s.has_pending][: self._max_batch]
        if chosen:
            self._next = (self._sessions.index(chosen[-1]) + 1) % count
        return chosen

    def _round(self, taken: list[tuple[Session, PendingFrame]]) -> None:
        started = time.monotonic()
        try:
            self._process(taken)
        except Exception as error:  # noqa: BLE001 - the worker must outlive any one round
            log.exception("worker round failed")
            for session, frame in taken:
                session.failed(frame, error)
        self._metrics.busy.add(started, time.monotonic())

    def _process(self, taken: list[tuple[Session, PendingFrame]]) -> None:
        assert self.model is not None
        jobs = [FrameJob(session.stream, frame.frame) for session, frame in taken]
        sizes = run_jobs(jobs, self.model.runner)
        if sizes["unet_streams"]:
            self._metrics.record_call(sizes["unet_streams"])
        for (session, frame), job in zip(taken, jobs):
            if job.error is not None:
                log.warning("session %s: %s", session.id, job.error)
                session.failed(frame, job.error, advanced=job.advanced, output_due=job.output_due)
            else:
                session.completed(frame, job.outputs, job.skipped)
