"""The engine: models, one worker thread per device, sessions, metrics.

    async with Engine(EngineConfig(model=ModelSpec("tiny"))) as engine:
        session = await engine.open_session(prompt="a cat")
        session.submit(frame, pts)              # never blocks; the newest frame wins
        output = await session.next_output()    # stylized frame + the id/pts of its input
        session.close()

The event loop never waits for the model: loading runs in a thread, frames cross to the
worker through one-slot mailboxes, outputs come back through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

from engine.backends import BACKENDS, BackendOptions, UNetFn, prepare_backend
from engine.components import Components
from engine.config import StreamConfig, updated_config
from engine.metrics import EngineMetrics, engine_snapshot, prometheus_text
from engine.models import ModelSpec, load_components
from engine.session import EngineBusyError, Session
from engine.stream import StreamDiffusion
from engine.worker import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. ``stream`` holds the shape every session shares and default parameters."""

    model: ModelSpec = field(default_factory=ModelSpec)
    stream: StreamConfig = field(default_factory=StreamConfig)
    devices: tuple[str, ...] = ()          # empty: the model spec's device; several: one replica each
    backend: str = "torch"
    max_sessions: int = 4
    max_batch: int = 8                     # sessions per UNet call
    idle_timeout: float = 30.0             # close a session nobody has read from for this long
    shutdown_timeout: float = 5.0

    @property
    def sessions_per_call(self) -> int:
        """The most streams one UNet call holds: the shapes a backend must be ready for."""
        return min(self.max_sessions, self.max_batch)

    def __post_init__(self) -> None:
        if self.stream.mode != "img2img":
            raise ValueError(f"stream.mode={self.stream.mode!r}: the runtime stylizes incoming frames (img2img)")
        if self.stream.frame_buffer_size != 1:
            raise ValueError(f"stream.frame_buffer_size={self.stream.frame_buffer_size}: the runtime batches one "
                             "frame per session per call; it must be 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown; available: {sorted(BACKENDS)}")
        for name, low, high in (("max_sessions", 1, 256), ("max_batch", 1, 256)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} is out of range; allowed: [{low}, {high}]")
        for name in ("idle_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name}={value!r} must be a positive number of seconds")


class Engine:
    """Serves many live streams from one model per device. Use as ``async with Engine(config)``."""

    def __init__(self, config: EngineConfig = EngineConfig(), *, components: Components | None = None,
                 unet: UNetFn | None = None) -> None:
        self.config = config
        self.metrics = EngineMetrics()
        self._given = (components, unet)
        self._workers: list[Worker] = []
        self._sessions: dict[str, Session] = {}
        self._opening = 0
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Load the model(s) off the event loop and start the workers."""
        self._loop = asyncio.get_running_loop()
        components, unet = self._given
        if components is not None:
            # the caller's components may be in use elsewhere: the backend must not free them
            ready = [(components, unet) if unet is not None
                     else await asyncio.to_thread(self._prepare, components, False)]
        else:
            devices = self.config.devices or (self.config.model.device,)
            loaded = [await asyncio.to_thread(load_components, replace(self.config.model, device=device))
                      for device in devices]
            ready = [await asyncio.to_thread(self._prepare, c, True) for c in loaded]
        self._workers = [Worker(c, u, self.metrics, self.config.max_batch) for c, u in ready]
        for worker in self._workers:
            worker.start()
        self._reaper = asyncio.create_task(self._reap_idle(), name="diffcam-engine-reaper")

    def _prepare(self, components: Components, release: bool) -> tuple[Components, UNetFn]:
        """``components`` ready for the configured backend (compiling or building engines can take minutes)."""
        options = BackendOptions(sessions=self.config.sessions_per_call,
                                 model=self.config.model.model, lora=self.config.model.lcm_lora, release=release)
        return prepare_backend(self.config.backend, components, self.config.stream, options)

    async def open_session(self, **params: Any) -> Session:
        """A new session with ``params`` (any non-shape stream parameter, or ``strength``).

        Raises :class:`EngineBusyError` at ``max_sessions`` and ``ValueError`` for bad parameters.
        """
        if self._closed or not self._workers:
            raise RuntimeError("the engine is not running; use `async with Engine(...)`")
        config = updated_config(self.config.stream, params)
        if len(self._sessions) + self._opening >= self.config.max_sessions:
            self.metrics.sessions_rejected += 1
            raise EngineBusyError(f"all {self.config.max_sessions} sessions are in use; try again later")
        worker = min(self._workers, key=lambda w: w.session_count)
        self._opening += 1
        worker.reserved += 1
        try:  # prompt encoding runs the text encoder: not on the event loop
            stream = await asyncio.to_thread(StreamDiffusion, worker.components, config, worker.unet)
        finally:
            self._opening -= 1
            worker.reserved -= 1
        if self._closed:
            raise RuntimeError("the engine shut down while the session was being opened")
        session_id = f"s{next(self._ids)}"
        session = Session(session_id, stream, self._loop, worker.wake, self._forget)
        self._sessions[session_id] = session
        worker.add(session)
        self.metrics.sessions_opened += 1
        return session

    @property
    def idle(self) -> bool:
        """True when no worker is running a round and no frame waits."""
        return all(worker.idle for worker in self._workers)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def snapshot(self) -> dict:
        """Engine and per-session metrics as plain data."""
        return engine_snapshot(self.metrics, {sid: s.metrics for sid, s in self._sessions.items()})

    def prometheus(self) -> bytes:
        """The same metrics in Prometheus text format, for ``/metrics``."""
        return prometheus_text(self.snapshot)

    async def aclose(self) -> None:
        """Close every session and stop the workers within ``shutdown_timeout``."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._sessions.values()):
            session.close()
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        stopped = await asyncio.gather(*(asyncio.to_thread(w.stop, self.config.shutdown_timeout)
                                         for w in self._workers))
        if not all(stopped):
            log.warning("a worker was still inside a model call after %.1fs; leaving it (daemon thread)",
                        self.config.shutdown_timeout)

    def _forget(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is not None:
            self.metrics.sessions_closed += 1
        for worker in self._workers:
            worker.remove(session)

    async def _reap_idle(self) -> None:
        """Close sessions whose consumer went away (nobody read or waited for ``idle_timeout``)."""
        period = min(1.0, self.config.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            for session in list(self._sessions.values()):
                if session.idle_for() > self.config.idle_timeout:
                    log.info("closing idle session %s", session.id)
                    self.metrics.sessions_expired += 1
                    session.close()
