"""One live stream with its UNet split over devices, served to the app (``--parallel asyncdiff``).

    engine = ShardedEngine(EngineConfig(model=ModelSpec("tiny"), devices=("cpu", "cpu")))
    async with engine:
        session = await engine.open_session(prompt="a cat")
        session.submit(frame, pts)                 # never blocks; the newest frame wins
        output = await session.next_output()

A :class:`~engine.parallel.sharded.ShardedStream` is one stream, so this engine serves one
session at a time (its ``max_sessions`` is 1: a second caller hears "busy", as from a full
``Engine``). It is for making one stream faster; :class:`~engine.parallel.replicas.ReplicaEngine`
is for serving more streams.

**One driver thread** is the only caller of the stream. It takes the session's newest frame and
keeps two calls in flight while frames keep coming (rank 0 encodes the next frame and runs the
first component while the last rank decodes the frame before), one when they come slower than
the ranks run. Opening a session (a reset and the session's parameters) and parameter updates
are requests that it carries out between calls. The ranks own their devices: neither this thread
nor the event loop touches one.

A rank that dies ends the session with a clear error, and the engine refuses new sessions with
the reason (restart diffcam), as the replicas do when none is left.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch

from engine.config import StreamConfig, updated_config
from engine.metrics import EngineMetrics, SessionMetrics, engine_snapshot, prometheus_text
from engine.models import local_model
from engine.parallel.launch import RankFailed
from engine.parallel.replicas import ModelInfo
from engine.parallel.sharded import CALL_TIMEOUT_S, MAX_IN_FLIGHT, ShardedStream
from engine.runtime import EngineConfig, Progress
from engine.session import (EngineBusyError, FrameError, NewestFrameSlot, Output, OutputMailbox, PendingFrame,
                            SessionClosedError, reap_idle)

log = logging.getLogger(__name__)

#: backends the ranks can run: each runs its component in eager torch
BACKENDS = ("auto", "torch")
#: how long a rank may wait for the next call: a server may sit without a session for days
IDLE_S = 30 * 24 * 3600.0
#: how often an idle driver looks at the ranks
CHECK_S = 1.0


def check_sharded(config: EngineConfig) -> None:
    """``ValueError`` naming the flag when ``config`` asks for what the sharded stream cannot do."""
    if len(config.devices) < 2:
        raise ValueError(f"--parallel asyncdiff splits the UNet over several devices; --devices names "
                         f"{len(config.devices)}: give two or more (e.g. 0,1)")
    if config.backend not in BACKENDS:
        raise ValueError(f"--backend {config.backend} is not supported with --parallel asyncdiff: each rank runs "
                         "its share of the UNet in eager torch; leave --backend out (or use --parallel replicas)")
    _check_stream(config.stream)


def _check_stream(config: StreamConfig) -> None:
    if config.similarity_filter:
        raise ValueError("the similarity filter is not supported with --parallel asyncdiff yet: leave out "
                         "--similarity-filter (or use --parallel replicas)")


def _changes(old: StreamConfig, new: StreamConfig) -> dict[str, Any]:
    return {f.name: getattr(new, f.name) for f in fields(new) if getattr(new, f.name) != getattr(old, f.name)}


@dataclass
class _Call:
    """A call in flight: whose frame it carries, and which opening of that session it belongs to."""

    session: ShardedSession
    frame: PendingFrame
    started: float  # when it was submitted (monotonic)


class ShardedSession(NewestFrameSlot, OutputMailbox):
    """The one stream a :class:`ShardedEngine` serves; the :class:`~engine.session.Session` interface."""

    def __init__(self, session_id: str, config: StreamConfig, engine: ShardedEngine,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.id = session_id
        self.metrics = SessionMetrics()
        self.closed = False
        self._engine = engine
        self._loop = loop
        self._lock = threading.Lock()
        self._latest_config = config
        self._pending: PendingFrame | None = None
        self._ids = itertools.count()
        self._end_reason = f"session {session_id} is closed"
        self.opened = False  # set once its open went through: only then does its close count
        #: frames whose outputs are still to come, oldest first (the driver's)
        self.entered: deque[PendingFrame] = deque()
        super().__init__()

    @property
    def config(self) -> StreamConfig:
        """The parameters in force for the next frame (pending updates included)."""
        with self._lock:
            return self._latest_config

    def _wake(self) -> None:
        self._engine.wake()

    def update(self, **params: Any) -> StreamConfig:
        """Validate now (``ValueError`` if bad, nothing changed); the ranks apply it from the next call."""
        if self.closed:
            raise SessionClosedError(self._end_reason)
        with self._lock:
            new = updated_config(self._latest_config, params)
            _check_stream(new)
            self._latest_config = new
            self._engine.request(lambda: self._engine.apply(self, new))  # under the lock: in order
        return new

    def close(self) -> None:
        """Stop the session; the engine is free for the next one. Idempotent; on the event loop."""
        self.end(None)

    def end(self, reason: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        if reason is not None:
            self._end_reason = reason
        with self._lock:
            self._pending = None
        self._engine.forget(self)
        self._wake_readers()

    def _closed_error(self) -> SessionClosedError:
        return SessionClosedError(self._end_reason)

    # ------------------------------------------------------------ the driver's side

    @property
    def has_pending(self) -> bool:
        return self._pending is not None and not self.closed

    def take(self) -> PendingFrame | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def deliver(self, item: Output | FrameError) -> None:
        """From the driver thread: into the output slot, on the loop."""
        try:
            self._loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the loop is closed: nobody is left to read it
            pass


class ShardedEngine:
    """One stream at a time, its UNet split over ``config.devices`` (one process each); ``Engine``'s interface.

    ``threads``: torch threads per rank on the CPU. ``resync_every``, ``warmup_calls``, ``cost``:
    as :class:`~engine.parallel.sharded.ShardedStream`.
    """

    def __init__(self, config: EngineConfig, *, threads: int = 1, resync_every: int | None = None,
                 warmup_calls: int | None = None, cost: str = "estimated", progress: Progress | None = None) -> None:
        check_sharded(config)
        self.config = replace(config, max_sessions=1, max_batch=1)
        self.threads = threads
        self.resync_every = resync_every
        self.warmup_calls = warmup_calls
        self.cost = cost
        self.metrics = EngineMetrics()
        self.stream: ShardedStream | None = None
        self._progress: Progress = progress or (lambda stage: None)
        self._session: ShardedSession | None = None
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task | None = None
        self._driver: threading.Thread | None = None
        self._wakeup = threading.Condition()
        self._requests: deque[tuple[Callable[[], None], Future | None]] = deque()
        self._calls: deque[_Call] = deque()
        self._stopping = False
        self._failure: str | None = None
        self._closed = False
        self._call_s = 0.0  # how long a call takes the ranks, recent average: how long a frame may be waited for
        self._last_result = 0.0
        self.most_in_flight = 0

    async def __aenter__(self) -> "ShardedEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ what the app reads

    @property
    def devices(self) -> list[str]:
        return list(self.config.devices)

    @property
    def components(self) -> ModelInfo:
        """The model's name, the devices and the dtype, once loaded (what ``describe()`` shows)."""
        if self.stream is None:
            raise RuntimeError("the ranks have not loaded the model yet; call load() or start()")
        devices = ", ".join(self.stream.devices)
        return ModelInfo(self.config.model.model, f"{devices} (UNet split over {self.stream.components} processes, "
                                                  f"blocks {_cuts(self.stream.bounds)})", self._dtype())

    @property
    def backend(self) -> str:
        return "torch"

    def sessions(self) -> list[ShardedSession]:
        return [] if self._session is None else [self._session]

    def snapshot(self) -> dict:
        """Engine metrics (as ``Engine``'s), and the ranks: devices, cuts, bytes each call sends."""
        sessions = {s.id: s.metrics for s in self.sessions()}
        snap = engine_snapshot(self.metrics, sessions)
        stream = self.stream
        if stream is not None:
            snap["ranks"] = [{"rank": info["rank"], "device": device, "pid": pid}
                             for info, device, pid in zip(stream.ranks, stream.devices, stream.pids)]
            snap["bounds"] = list(stream.bounds)
            snap["bytes_per_call"] = stream.bytes_per_call
            snap["calls_synchronous"] = stream.sync_calls
        snap["most_in_flight"] = self.most_in_flight
        snap["failure"] = self._failure
        return snap

    def prometheus(self) -> bytes:
        return prometheus_text(self.snapshot)

    def trouble(self) -> str | None:
        """Why no session can be served (a rank failed; new sessions are refused), or None."""
        return self._failure

    # ------------------------------------------------------------ life cycle

    def load(self, progress: Progress | None = None) -> None:
        """Start the ranks and wait until each holds its share of the model (blocking).

        A hub model is fetched here once (``ModelUnavailableError`` if it cannot be), not by each rank.
        """
        if self.stream is not None:
            return
        report = progress or self._progress
        spec = local_model(self.config.model, self.config.devices[0])
        report("pipeline")
        self.stream = ShardedStream(spec.model, self.config.stream, devices=self.config.devices, vae=spec.vae,
                                    dtype=self._dtype(), cost=self.cost, threads=self.threads,
                                    resync_every=self.resync_every, warmup_calls=self.warmup_calls,
                                    idle_timeout_s=IDLE_S, lcm_lora=spec.lcm_lora, graphs=self.config.graphs,
                                    call_timeout_s=self.config.hang_timeout or CALL_TIMEOUT_S)
        for stage in ("lcm-lora", "vae", "device"):
            report(stage)
        log.info("sharded stream on %s: blocks %s, %.1f MiB exchanged per call", ", ".join(self.stream.devices),
                 _cuts(self.stream.bounds), self.stream.bytes_per_call / 2**20)

    async def start(self) -> None:
        """Load unless :meth:`load` did (the loop only waits), then serve. Idempotent."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()  # set first: a second start() meanwhile returns at once
        if self.stream is None:
            try:
                await asyncio.to_thread(self.load)
            except BaseException:
                self._loop = None  # not running: open_session refuses instead of waiting for a driver
                raise
        self._driver = threading.Thread(target=self._drive, name="diffcam-sharded-driver", daemon=True)
        self._driver.start()
        self._reaper = asyncio.create_task(reap_idle(self.sessions, self.config.idle_timeout, self.metrics),
                                           name="diffcam-sharded-reaper")

    async def aclose(self) -> None:
        """Close the session, stop the driver and the ranks (they are killed if they do not stop)."""
        if self._closed:
            return
        self._closed = True
        if self._session is not None:
            self._session.close()
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._driver is not None:
            await asyncio.to_thread(self._driver.join, self.config.shutdown_timeout)
        if self.stream is not None:
            await asyncio.to_thread(self.stream.close, self.config.shutdown_timeout)

    # ------------------------------------------------------------ sessions (event loop)

    async def open_session(self, **params: Any) -> ShardedSession:
        """The stream, if free: reset, then set to ``params``; ``EngineBusyError`` while another holds it."""
        if self._closed or self._loop is None:
            raise RuntimeError("the engine is not running; use `async with ShardedEngine(...)`")
        if self._failure is not None:
            self.metrics.sessions_rejected += 1
            raise EngineBusyError(self._failure)
        if self._session is not None:
            self.metrics.sessions_rejected += 1
            raise EngineBusyError("the sharded stream serves one session at a time and it is in use; try again later")
        config = updated_config(self.config.stream, params)
        _check_stream(config)
        session = ShardedSession(f"s{next(self._ids)}", config, self, self._loop)
        self._session = session
        future: Future = Future()
        self.request(lambda: self._open(session), future)
        try:
            await asyncio.wrap_future(future)
        except BaseException:
            session.end("the session could not be opened")
            raise
        session.opened = True
        self.metrics.sessions_opened += 1
        return session

    def forget(self, session: ShardedSession) -> None:
        """The session closed: the driver drops its calls in flight (on the loop)."""
        if self._session is session:
            self._session = None
            self.metrics.sessions_closed += session.opened
        self.wake()

    # ------------------------------------------------------------ the driver thread

    def wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def request(self, work: Callable[[], None], future: Future | None = None) -> None:
        """Have the driver run ``work`` between calls (``future`` gets its result or error)."""
        with self._wakeup:
            if self._stopping or self._failure is not None:  # nobody is left to run it
                if future is not None and not future.done():
                    future.set_exception(EngineBusyError(self._failure or "the engine is shutting down"))
                return
            self._requests.append((work, future))
            self._wakeup.notify()

    def apply(self, session: ShardedSession, config: StreamConfig) -> None:
        """On the driver: a session's parameter update, sent to the ranks for the next call."""
        if session is not self._session or self.stream is None:
            return
        changes = _changes(self.stream.config, config)
        if not changes:
            return
        try:
            self.stream.update(**changes)
        except ValueError as error:  # validated on the loop already; the stream may still refuse
            session.metrics.errors += 1
            session.deliver(FrameError(f"a parameter update of session {session.id} failed: {error}", -1))

    def _open(self, session: ShardedSession) -> None:
        assert self.stream is not None
        self._drain()
        self.stream.reset()
        self.apply(session, session.config)

    def _drive(self) -> None:
        try:
            while self._step():
                pass
        except RankFailed as error:
            self._fail(f"the sharded stream stopped: {error}")
        except BaseException as error:  # noqa: BLE001 - the driver must report whatever ends it
            log.exception("the sharded stream's driver failed")
            self._fail(f"the sharded stream stopped: {type(error).__name__}: {error}")

    def _has_work(self) -> bool:
        session = self._session
        return self._stopping or bool(self._requests) or bool(self._calls) or \
            (session is not None and session.has_pending)

    def _step(self) -> bool:
        """One thing: a request, or a frame in, or a call's frames out. False once stopping.

        Idle, it looks at the ranks every :data:`CHECK_S`, so a rank that dies between sessions is
        reported then, not when the next session is refused."""
        with self._wakeup:
            busy = self._wakeup.wait_for(self._has_work, timeout=CHECK_S)
            if self._stopping:
                self._refuse_requests("the engine is shutting down")
                return False
            request = self._requests.popleft() if self._requests else None
        if not busy:
            assert self.stream is not None
            self.stream.check()
            return True
        if request is not None:
            self._run(*request)
            return True
        session = self._session
        submitted = False
        if session is not None and len(self._calls) < MAX_IN_FLIGHT:
            frame = session.take()
            if frame is not None:
                submitted = self._submit(session, frame)
        if not self._calls or (submitted and len(self._calls) < MAX_IN_FLIGHT):
            return True
        if len(self._calls) < MAX_IN_FLIGHT and self._next_frame_comes(session):
            return True  # the next step submits it: two calls in flight
        self._finish()
        return True

    def _next_frame_comes(self, session: ShardedSession | None) -> bool:
        """With one call in flight: wait, for at most the rest of that call, for the next frame (or a request).

        Taking the call's frames at once would block the driver in ``result()``, and a frame that came
        meanwhile would wait for it: the ranks would run one call at a time. Submitting it first keeps
        two in flight, rank 0 encoding the next frame while the last rank decodes this one."""
        if session is None:
            return False
        rest = self._call_s - (time.monotonic() - self._calls[-1].started)
        if rest <= 0:
            return session.has_pending
        with self._wakeup:
            return self._wakeup.wait_for(lambda: self._stopping or bool(self._requests) or session.has_pending,
                                         timeout=rest)

    def _run(self, work: Callable[[], None], future: Future | None) -> None:
        if future is not None and not future.set_running_or_notify_cancel():
            return  # the caller gave up (its session was ended then)
        try:
            work()
        except RankFailed:
            if future is not None:
                future.set_exception(EngineBusyError("the sharded stream's ranks failed; see the log"))
            raise
        except Exception as error:  # noqa: BLE001 - the caller hears it; the driver goes on
            if future is None:
                log.warning("a request to the sharded stream failed: %s", error)
            else:
                future.set_exception(error)
            return
        if future is not None:
            future.set_result(None)

    def _submit(self, session: ShardedSession, frame: PendingFrame) -> bool:
        assert self.stream is not None
        try:
            self.stream.submit([frame.frame])
        except (ValueError, TypeError) as error:  # a frame the stream cannot take: this frame fails alone
            session.metrics.errors += 1
            session.deliver(FrameError(f"frame {frame.frame_id} of session {session.id} failed: {error}",
                                       frame.frame_id))
            return False
        self._calls.append(_Call(session, frame, time.monotonic()))
        self.most_in_flight = max(self.most_in_flight, len(self._calls))
        session.entered.append(frame)
        return True

    def _finish(self) -> None:
        """The oldest call's frames: to its session, as the output of the frame that entered n − 1 calls before."""
        assert self.stream is not None
        started = time.monotonic()
        outputs = self.stream.result()
        done = time.monotonic()
        self.metrics.busy.add(started, done)
        self.metrics.record_call(1)
        call = self._calls.popleft()
        service = done - max(call.started, self._last_result)  # this call alone: from when the ranks could start it
        self._call_s = service if self._call_s == 0.0 else 0.8 * self._call_s + 0.2 * service
        self._last_result = done
        session = call.session
        session.metrics.processed += 1
        if outputs is None or session is not self._session or not session.entered:
            return  # the pipeline is filling, or the session has gone
        source = session.entered.popleft()
        latency = time.monotonic() - source.submitted_at
        session.metrics.latency.add(latency)
        session.deliver(Output(outputs[0], source.frame_id, source.pts, latency))

    def _drain(self) -> None:
        """Take (and drop) the frames of every call in flight: before a reset."""
        while self._calls:
            self._finish()

    def _fail(self, message: str) -> None:
        log.error("%s; the session ends and new ones are refused (restart diffcam)", message)
        with self._wakeup:
            self._failure = f"{message} (restart diffcam)"
            self._refuse_requests(self._failure)
        session, loop = self._session, self._loop
        if session is not None and loop is not None:
            reason = f"{message}; this stream has ended (reconnect after restarting diffcam)"
            try:
                loop.call_soon_threadsafe(session.end, reason)
            except RuntimeError:  # the loop is closed
                pass

    def _refuse_requests(self, why: str) -> None:
        """Fail every queued request (under ``_wakeup``): nobody will run them."""
        requests, self._requests = list(self._requests), deque()
        for _, future in requests:
            if future is not None and not future.done():
                future.set_exception(EngineBusyError(why))

    def _dtype(self) -> str:
        spec = self.config.model
        if spec.dtype is not None:
            return spec.dtype
        return "float16" if torch.device(self.config.devices[0]).type == "cuda" else "float32"


def _cuts(bounds: tuple[int, ...]) -> str:
    """``(0, 8, 11)`` as ``0–7 | 8–10``."""
    return " | ".join(f"{a}–{b - 1}" for a, b in zip(bounds, bounds[1:]))


__all__ = ["ShardedEngine", "ShardedSession", "check_sharded"]
