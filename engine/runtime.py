"""The engine: one worker per device that owns its model, sessions, metrics.

    async with Engine(EngineConfig(model=ModelSpec("tiny"))) as engine:
        session = await engine.open_session(prompt="a cat")
        session.submit(frame, pts)              # never blocks; the newest frame wins
        output = await session.next_output()    # stylized frame + the id/pts of its input
        session.close()

The event loop never waits for the model and never touches the device: each device's worker
thread loads the model, compiles it, captures its CUDA graphs, encodes prompts and runs every
frame (:mod:`engine.worker` says why). The loop hands it requests and frames through
one-slot mailboxes; outputs come back through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import torch

from engine.backends import BACKEND_CHOICES, BackendOptions, UNetFn, prepare_backend, resolve_backend
from engine.components import Components
from engine.config import StreamConfig, updated_config
from engine.graphs import prepared_runner
from engine.metrics import EngineMetrics, engine_snapshot, prometheus_text
from engine.models import ModelSpec, load_components
from engine.prompts import PromptEncoder
from engine.session import EngineBusyError, Session, reap_idle
from engine.slots import StreamSlots
from engine.step import step_models
from engine.stream import StreamDiffusion
from engine.worker import HANG_S, DeviceModel, Worker

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. ``stream`` holds the shape every session shares and default parameters."""

    model: ModelSpec = field(default_factory=ModelSpec)
    stream: StreamConfig = field(default_factory=StreamConfig)
    devices: tuple[str, ...] = ()          # empty: the model spec's device; several: one replica each
    backend: str = "auto"                  # auto: compile on CUDA with Triton, eager torch elsewhere
    #: capture each call size as a CUDA graph; None: on CUDA devices. True on the CPU replays
    #: stand-ins through the same buffers (for tests)
    graphs: bool | None = None
    max_sessions: int = 4
    max_batch: int = 8                     # sessions per UNet call
    idle_timeout: float = 30.0             # close a session nobody has read from for this long
    shutdown_timeout: float = 5.0
    #: a round running this long means the device hangs (it raises nothing); None: HANG_S on CUDA devices and no
    #: limit elsewhere (a CPU round may take many seconds, and a CPU does not hang)
    hang_timeout: float | None = None

    @property
    def sessions_per_call(self) -> int:
        """The most streams one UNet call holds: the shapes a backend must be ready for."""
        return min(self.max_sessions, self.max_batch)

    def graphs_on(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.graphs is None else self.graphs

    def hang_timeout_on(self, device: torch.device) -> float | None:
        if self.hang_timeout is not None:
            return self.hang_timeout
        return HANG_S if device.type == "cuda" else None

    def __post_init__(self) -> None:
        if self.stream.mode != "img2img":
            raise ValueError(f"stream.mode={self.stream.mode!r}: the runtime stylizes incoming frames (img2img)")
        if self.stream.frame_buffer_size != 1:
            raise ValueError(f"stream.frame_buffer_size={self.stream.frame_buffer_size}: the runtime batches one "
                             "frame per session per call; it must be 1")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend={self.backend!r} is unknown; available: {list(BACKEND_CHOICES)}")
        if self.graphs not in (None, True, False):
            raise ValueError(f"graphs={self.graphs!r} must be None (on for CUDA), True or False")
        for name, low, high in (("max_sessions", 1, 256), ("max_batch", 1, 256)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} is out of range; allowed: [{low}, {high}]")
        for name in ("idle_timeout", "shutdown_timeout", "hang_timeout"):
            value = getattr(self, name)
            if name == "hang_timeout" and value is None:
                continue
            if not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name}={value!r} must be a positive number of seconds")


class Engine:
    """Serves many live streams from one model per device. Use as ``async with Engine(config)``.

    ``components`` (and ``unet``): serve these instead of loading ``config.model``; they stay the
    caller's (a backend will not free them). ``progress``: told each loading and preparing stage.
    """

    def __init__(self, config: EngineConfig = EngineConfig(), *, components: Components | None = None,
                 unet: UNetFn | None = None, progress: Progress | None = None) -> None:
        self.config = config
        self.metrics = EngineMetrics()
        self._given = (components, unet)
        self._progress: Progress = progress or (lambda stage: None)
        self._workers: list[Worker] = []
        self._homes: dict[str, Worker] = {}
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

    @property
    def devices(self) -> list[torch.device]:
        """The devices this engine serves on, one worker each."""
        components, _ = self._given
        if components is not None:
            return [components.device]
        names = self.config.devices or (self.config.model.device,)
        return [replace(self.config.model, device=name).resolved_device() for name in names]

    def load(self, progress: Progress | None = None) -> None:
        """Start each device's worker and wait until it has loaded and prepared its model.

        Blocking (minutes when compiling or building engines): call it before serving to fail
        early, or let :meth:`start` call it. ``progress`` is told each stage (from the workers'
        threads). Raises what stopped a worker (a missing model, a backend that cannot run).
        """
        if self._workers:
            return
        self._progress = progress or self._progress
        workers = [Worker(device, partial(self._set_up, device), self.metrics, self.config.max_batch)
                   for device in self.devices]
        try:
            for future in [worker.start() for worker in workers]:
                future.result()
        except BaseException:
            for worker in workers:
                worker.stop(self.config.shutdown_timeout)
            raise
        self._workers = workers

    async def start(self) -> None:
        """Load the model(s) unless :meth:`load` did (the event loop only waits), then serve."""
        self._loop = asyncio.get_running_loop()
        if not self._workers:
            await asyncio.to_thread(self.load)
        self._reaper = asyncio.create_task(reap_idle(self.sessions, self.config.idle_timeout, self.metrics),
                                           name="diffcam-engine-reaper")

    def _set_up(self, device: torch.device) -> DeviceModel:
        """On ``device``'s worker: the model loaded, its backend prepared, every call size ready."""
        components, unet = self._given
        owned = components is None
        if components is None:
            spec = replace(self.config.model, device=str(device))
            components = load_components(spec, progress=self._progress)
        if unet is not None:
            return self._ready(components, unet, "given")
        backend = resolve_backend(self.config.backend, components.device)
        try:
            return self._ready(*self._prepared(backend, components, owned), backend)
        except Exception as error:  # noqa: BLE001 - auto promised a working backend, not this one
            if self.config.backend != "auto" or backend == "torch":
                raise
            log.warning("backend auto: %s failed (%s: %s); serving with eager torch", backend,
                        type(error).__name__, error)
            self._progress(f"{backend} failed ({type(error).__name__}); serving with eager torch instead")
            return self._ready(*self._prepared("torch", components, owned), "torch")

    def _prepared(self, backend: str, components: Components, owned: bool) -> tuple[Components, UNetFn]:
        options = BackendOptions(sessions=self.config.sessions_per_call, model=self.config.model.model,
                                 lora=self.config.model.lcm_lora, progress=self._progress, release=owned,
                                 call_graphs=self.config.graphs_on(components.device))
        return prepare_backend(backend, components, self.config.stream, options)

    def _ready(self, components: Components, unet: UNetFn, backend: str) -> DeviceModel:
        """Slots for every session, and a runner with every call size compiled or captured."""
        slots = StreamSlots.for_config(components, self.config.stream, capacity=self.config.max_sessions)
        runner = prepared_runner(step_models(components, unet), slots, self.config.sessions_per_call,
                                 graphs=self.config.graphs_on(components.device), compiled=backend == "compile",
                                 progress=self._progress)
        return DeviceModel(components, runner, backend, PromptEncoder(components.tokenizer, components.text_encoder))

    async def open_session(self, **params: Any) -> Session:
        """A new session with ``params`` (any non-shape stream parameter, or ``strength``).

        Raises :class:`EngineBusyError` at ``max_sessions`` and ``ValueError`` for bad parameters.
        """
        if self._closed or not self._workers or self._loop is None:
            raise RuntimeError("the engine is not running; use `async with Engine(...)`")
        config = updated_config(self.config.stream, params)
        if len(self._sessions) + self._opening >= self.config.max_sessions:
            self.metrics.sessions_rejected += 1
            raise EngineBusyError(f"all {self.config.max_sessions} sessions are in use; try again later")
        if (trouble := self.trouble()) is not None:  # a device that hangs would never answer it
            self.metrics.sessions_rejected += 1
            raise EngineBusyError(f"{trouble}; restart diffcam")
        worker = min(self._workers, key=lambda w: w.session_count)
        self._opening += 1
        worker.reserved += 1
        try:  # the text encoder and the noise run on the device's worker, between rounds
            stream = await _on_worker(worker, partial(_open_stream, worker, config))
        except Exception as error:
            if self._closed:
                raise RuntimeError("the engine shut down while the session was being opened") from error
            raise
        finally:
            self._opening -= 1
            worker.reserved -= 1
        if self._closed:
            worker.submit(stream.close)
            raise RuntimeError("the engine shut down while the session was being opened")
        session_id = f"s{next(self._ids)}"
        session = Session(session_id, stream, self._loop, worker.wake, self._forget)
        self._sessions[session_id] = session
        self._homes[session_id] = worker
        worker.add(session)
        self.metrics.sessions_opened += 1
        return session

    async def run_on_device(self, request: Callable[[DeviceModel], Any], device: int = 0) -> Any:
        """``request(model)`` on device ``device``'s worker, between rounds (maintenance, benchmarks)."""
        if not self._workers:
            raise RuntimeError("the engine is not running; use `async with Engine(...)`")
        worker = self._workers[device]
        return await asyncio.wrap_future(worker.submit(lambda: request(worker.model)))

    @property
    def components(self) -> Components:
        """The first device's components, as its backend prepared them (once loaded)."""
        if not self._workers or self._workers[0].model is None:
            raise RuntimeError("the engine has not loaded its model yet; call load() or start()")
        return self._workers[0].model.components

    @property
    def backend(self) -> str:
        """The backend the workers run (``auto`` resolved), once loaded."""
        return self._workers[0].model.backend if self._workers and self._workers[0].model else self.config.backend

    @property
    def idle(self) -> bool:
        """True when no worker is running a round and no frame waits."""
        return all(worker.idle for worker in self._workers)

    def busy_for(self) -> float:
        """Seconds the longest-running round on any device has run so far (0 when every device is between
        rounds): see :meth:`engine.worker.Worker.busy_for`."""
        return max((worker.busy_for() for worker in self._workers), default=0.0)

    def trouble(self) -> str | None:
        """Why this engine cannot serve now, or None: a device whose round has run past ``hang_timeout``
        hangs (see :meth:`engine.worker.Worker.busy_for`)."""
        for worker in self._workers:
            busy, limit = worker.busy_for(), self.config.hang_timeout_on(worker.device)
            if limit is not None and busy > limit:
                return f"{worker.name} stopped answering: a round has run for {busy:.0f} s (the limit is {limit:.0f} s)"
        return None

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
        worker = self._homes.pop(session.id, None)
        if worker is not None:
            worker.remove(session)
            worker.submit(session.stream.close)  # its slot is freed between rounds, by the slot's owner


def _open_stream(worker: Worker, config: StreamConfig) -> StreamDiffusion:
    """On the worker: a stream in a free slot of the worker's runner."""
    assert worker.model is not None
    model = worker.model
    return StreamDiffusion(model.components, config, runner=model.runner, prompts=model.prompts)


async def _on_worker(worker: Worker, request: Callable[[], StreamDiffusion]) -> StreamDiffusion:
    """``request``'s result from the worker; if the caller gives up first, a stream made anyway is closed there."""
    future: Future = worker.submit(request)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: _close_orphan(worker, done))
        raise


def _close_orphan(worker: Worker, done: Future) -> None:
    if not done.cancelled() and done.exception() is None:
        worker.submit(done.result().close)
