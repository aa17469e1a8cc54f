"""Replicas (``--parallel replicas``): one whole model per device, each in its own process.

    engine = ReplicaEngine(EngineConfig(model=ModelSpec("tiny"), devices=("cpu", "cpu"), max_sessions=4))
    async with engine:
        session = await engine.open_session(prompt="a cat")    # on the replica with the fewest sessions
        session.submit(frame, pts)                            # never blocks; the newest frame wins
        output = await session.next_output()

Each process runs a plain :class:`~engine.runtime.Engine` for its one device (its worker is
the device's owner), so batching, fairness and newest-frame-wins hold inside each replica as
they do in one process. This front offers the same interface the app uses from ``Engine``.

Frames cross in shared memory, converted here to RGB uint8 at the model's size; only slot
indices and ids cross the pipe (:mod:`engine.parallel.replica_frames` says why that is
race-free). A process that dies, hangs, or exits because its device became unusable (a
sticky CUDA error, :mod:`engine.parallel.replica_process`) is logged with its device and why,
its sessions end with :class:`SessionClosedError`, and new sessions go to the living replicas
(``max_sessions`` shrinks); with none left, :meth:`ReplicaEngine.open_session` says the device
processes died.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.config import updated_config
from engine.metrics import EngineMetrics, prometheus_text
from engine.parallel.replica_link import SILENCE_S, ReplicaFailed, ReplicaLink
from engine.parallel.replica_process import Fault
from engine.parallel.replica_session import ReplicaSession
from engine.runtime import EngineConfig, Progress
from engine.session import EngineBusyError, FrameError, reap_idle

log = logging.getLogger(__name__)

ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "EngineBusyError": EngineBusyError}


def parse_devices(text: str) -> tuple[str, ...]:
    """``--devices``: ``0,1`` (CUDA indices), ``cuda:0,cuda:1`` or ``cpu,cpu``; ``ValueError`` saying what is wrong."""
    names = tuple(f"cuda:{d}" if d.isdigit() else d for d in (part.strip() for part in text.split(",")) if d)
    if not names:
        raise ValueError(f"--devices {text!r} names no device; e.g. 0,1 or cuda:0,cuda:1 or cpu,cpu")
    try:
        kinds = {torch.device(name).type for name in names}
    except RuntimeError:
        raise ValueError(f"--devices {text!r}: each must be cpu, cuda:N or N (a CUDA index)") from None
    if not kinds <= {"cpu", "cuda"} or len(kinds) > 1:
        raise ValueError(f"--devices {text!r} must be all cpu or all CUDA devices")
    if kinds == {"cuda"} and any(torch.device(name).index is None for name in names):
        raise ValueError(f"--devices {text!r}: give each GPU's index (cuda:0 or 0), not plain cuda")
    if kinds == {"cuda"} and len(set(names)) < len(names):
        raise ValueError(f"--devices {text!r} names a GPU twice; each replica needs its own")
    return names


def check_present(devices: tuple[str, ...]) -> None:
    """Refuse GPUs this torch build does not see (``ValueError``), before any device process starts."""
    seen = torch.cuda.device_count()
    missing = [d for d in devices if torch.device(d).type == "cuda" and (torch.device(d).index or 0) >= seen]
    if missing:
        raise ValueError(f"--devices names {','.join(missing)}, but this torch build sees {seen} CUDA GPU(s)")


def shares(total: int, replicas: int) -> list[int]:
    """``total`` sessions spread over ``replicas`` as evenly as possible (each gets at least one)."""
    if total < replicas:
        raise ValueError(f"max_sessions={total} is fewer than the {replicas} devices; each replica serves "
                         f"at least one session: raise --max-sessions to {replicas} or more")
    return [total // replicas + (i < total % replicas) for i in range(replicas)]


@dataclass(frozen=True)
class ModelInfo:
    """What ``describe()`` shows of the model the replicas serve (``Components``' name, device, dtype)."""

    name: str
    device: str
    dtype: str


class ReplicaEngine:
    """Sessions spread over one process per device; the interface the app uses from ``Engine``.

    ``config.devices`` names the devices (one process each; a name may repeat, e.g. ``cpu``
    twice for tests); ``config.max_sessions`` is the total, split evenly. ``threads``: torch
    threads per process on the CPU. ``silence_s``: a replica silent this long is taken as hung,
    killed, and handled as one that died; so is one whose device became unusable (it exits), and
    one whose device hangs (a round running past ``config.hang_timeout``). ``fault``: a device
    fault to inject (tests, :class:`~engine.parallel.replica_process.Fault`).
    """

    def __init__(self, config: EngineConfig, *, threads: int = 1, silence_s: float = SILENCE_S,
                 progress: Progress | None = None, fault: Fault | None = None) -> None:
        if len(config.devices) < 1:
            raise ValueError("replicas need at least one device in config.devices")
        self._config = config
        self._shares = shares(config.max_sessions, len(config.devices))
        self.threads = threads
        self.silence_s = silence_s
        self.fault = fault
        self.metrics = EngineMetrics()
        self._progress: Progress = progress or (lambda stage: None)
        self.links: list[ReplicaLink] = []
        self._sessions: dict[str, ReplicaSession] = {}
        self._opening: dict[str, tuple[asyncio.Future, ReplicaLink]] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task | None = None
        self._closed = False

    async def __aenter__(self) -> "ReplicaEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------ what the app reads

    @property
    def config(self) -> EngineConfig:
        """The configuration, with ``max_sessions`` the capacity of the replicas still alive."""
        if not self.links:
            return self._config
        shrunk = copy.copy(self._config)  # not replace(): zero (none alive) is below the allowed range
        object.__setattr__(shrunk, "max_sessions", sum(link.config.max_sessions for link in self._living()))
        return shrunk

    @property
    def devices(self) -> list[str]:
        return [link.device for link in self._living()] if self.links else list(self._config.devices)

    @property
    def components(self) -> ModelInfo:
        """The model's name, the devices and the dtype, once loaded (what ``describe()`` shows)."""
        if not self.links:
            raise RuntimeError("the replicas have not loaded their model yet; call load() or start()")
        info = self.links[0].info
        devices = ", ".join(link.device for link in self.links)
        return ModelInfo(info["name"], f"{devices} ({len(self.links)} replica processes)", info["dtype"])

    @property
    def backend(self) -> str:
        return self.links[0].info["backend"] if self.links else self._config.backend

    def sessions(self) -> list[ReplicaSession]:
        return list(self._sessions.values())

    def trouble(self) -> str | None:
        """Why no session can be served, or None: every replica has died (one that hung or lost its device
        exits). With some left, they serve on."""
        if self.links and not self._living():
            return "every device process has died (see the log for why; restart diffcam)"
        return None

    def snapshot(self) -> dict:
        """Engine metrics summed over the replicas, per-session metrics, and each replica's own."""
        stats = [link.stats for link in self.links]
        busy = [s.get("worker_busy_fraction", 0.0) for s, link in zip(stats, self.links) if link.alive]
        histogram: dict[int, int] = {}
        for snap in stats:
            for size, count in snap.get("batch_size_histogram", {}).items():
                histogram[size] = histogram.get(size, 0) + count
        return {
            "sessions_active": len(self._sessions),
            "sessions_opened": self.metrics.sessions_opened,
            "sessions_closed": self.metrics.sessions_closed,
            "sessions_rejected": self.metrics.sessions_rejected,
            "sessions_expired": self.metrics.sessions_expired,
            "unet_calls": sum(s.get("unet_calls", 0) for s in stats),
            "batch_size_histogram": dict(sorted(histogram.items())),
            "worker_busy_fraction": sum(busy) / len(busy) if busy else 0.0,
            "worker_busy_seconds": sum(s.get("worker_busy_seconds", 0.0) for s in stats),
            "sessions": {sid: s.metrics.snapshot() for sid, s in self._sessions.items()},
            "replicas": [self._replica_snapshot(link) for link in self.links],
        }

    def _replica_snapshot(self, link: ReplicaLink) -> dict:
        return {"index": link.index, "device": link.device, "pid": link.process.pid, "alive": link.alive,
                "max_sessions": link.config.max_sessions, "sessions": sorted(link.sessions),
                "unet_calls": link.stats.get("unet_calls", 0),
                "worker_busy_fraction": link.stats.get("worker_busy_fraction", 0.0), "stalled": link.stalled}

    def prometheus(self) -> bytes:
        """The aggregate metrics in Prometheus text format, for ``/metrics``."""
        return prometheus_text(self.snapshot)

    # ------------------------------------------------------------ life cycle

    def load(self, progress: Progress | None = None) -> None:
        """Start one process per device and wait until each has loaded its model (blocking).

        ``progress`` hears the first replica's stages (the others load alongside). Raises
        :class:`ReplicaFailed` naming the device that could not load; every process is stopped then.
        """
        if self.links:
            return
        progress = progress or self._progress
        links: list[ReplicaLink] = []
        try:
            for index, device in enumerate(self._config.devices):
                fault = self.fault if self.fault is not None and self.fault.replica == index else None
                links.append(ReplicaLink(index, self._replica_config(index, device), self.threads, self.silence_s,
                                         fault))
            for link in links:
                link.wait_ready(progress if link.index == 0 else (lambda stage: None))
        except BaseException:
            for link in links:
                link.stop(0.0)
            raise
        self.links = links

    def _replica_config(self, index: int, device: str) -> EngineConfig:
        return replace(self._config, devices=(device,), model=replace(self._config.model, device=device),
                       max_sessions=self._shares[index],
                       max_batch=min(self._config.max_batch, self._shares[index]))

    async def start(self) -> None:
        """Load unless :meth:`load` did (the loop only waits), then serve. Idempotent."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if not self.links:
            await asyncio.to_thread(self.load)
        for link in self.links:
            link.start(self._loop, self._on_message, self._on_death)
        self._reaper = asyncio.create_task(reap_idle(self.sessions, self._config.idle_timeout, self.metrics),
                                           name="diffcam-replicas-reaper")

    async def aclose(self) -> None:
        """Close every session, stop every process (terminate, then kill), unlink every block."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._sessions.values()):
            session.close()
        for future, _ in self._opening.values():
            if not future.done():
                future.set_exception(RuntimeError("the engine shut down while the session was being opened"))
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        timeout = self._config.shutdown_timeout
        await asyncio.gather(*(asyncio.to_thread(link.stop, timeout) for link in self.links))

    # ------------------------------------------------------------ sessions

    async def open_session(self, **params: Any) -> ReplicaSession:
        """A new session on the living replica with the fewest; ``EngineBusyError`` when all are full."""
        if self._closed or not self.links or self._loop is None:
            raise RuntimeError("the engine is not running; use `async with ReplicaEngine(...)`")
        config = updated_config(self._config.stream, params)
        link = self._least_loaded()
        session_id = f"s{next(self._ids)}"
        link.opening += 1
        try:
            try:
                session = ReplicaSession(session_id, config, link, self._loop, self._forget)
            except EngineBusyError:  # no room in shared memory for its frames
                self.metrics.sessions_rejected += 1
                raise
            try:
                await self._open_on(link, session, params)
            except BaseException:  # failed, or the caller gave up: a session opened there anyway is closed
                if link.alive:
                    link.post(("close", session_id))
                session.closed = True
                session.in_frames.release()
                session.out_frames.release()
                raise
        finally:
            link.opening -= 1
        self._sessions[session_id] = session
        link.sessions[session_id] = session
        self.metrics.sessions_opened += 1
        if not link.alive:  # it died while we were opening
            session.end(self._death_message(link))
        return session

    def _least_loaded(self) -> ReplicaLink:
        living = self._living()
        if not living:
            self.metrics.sessions_rejected += 1
            raise EngineBusyError("the device processes died; no replica is left to serve a session "
                                  "(see the log for why; restart diffcam)")
        free = [link for link in living if link.load < link.config.max_sessions]
        if not free:
            self.metrics.sessions_rejected += 1
            raise EngineBusyError(f"all {self.config.max_sessions} sessions are in use; try again later")
        answering = [link for link in free if not link.stalled] or free  # a device that may hang: the last resort
        return min(answering, key=lambda link: (link.load, link.index))

    async def _open_on(self, link: ReplicaLink, session: ReplicaSession, params: dict[str, Any]) -> None:
        future = asyncio.get_running_loop().create_future()
        self._opening[session.id] = (future, link)
        try:
            link.post(("open", session.id, params, session.in_frames.name, session.out_frames.name))
            error = await future
        finally:
            self._opening.pop(session.id, None)
        if self._closed:  # the answer came, but aclose() ran before this resumed: it will not close this one
            raise RuntimeError("the engine shut down while the session was being opened")
        if error is not None:
            kind, message = error
            raise ERRORS.get(kind, RuntimeError)(f"{link.name}: {message}" if kind not in ERRORS else message)

    def _forget(self, session: ReplicaSession) -> None:
        if self._sessions.pop(session.id, None) is not None:
            self.metrics.sessions_closed += 1
        session.link.sessions.pop(session.id, None)

    def _living(self) -> list[ReplicaLink]:
        return [link for link in self.links if link.alive]

    # ------------------------------------------------------------ what the replicas say (on the loop)

    def _on_message(self, link: ReplicaLink, message: tuple) -> None:
        kind, *args = message
        if kind == "opened":
            future, _ = self._opening.get(args[0], (None, None))
            if future is not None and not future.done():
                future.set_result(args[1])
        elif kind == "error":
            session = link.sessions.get(args[0])
            if session is not None:
                session.deliver(FrameError(args[2], args[1]))
        elif kind == "closed":
            session = link.sessions.get(args[0])
            if session is not None:
                session.end(f"session {session.id}: {args[1]}")
        elif kind == "stats":
            for sid, counters in args[0].get("sessions", {}).items():
                session = link.sessions.get(sid)
                if session is not None:
                    session.counted(counters)

    def _on_death(self, link: ReplicaLink, how: str) -> None:
        if not link.alive or self._closed:
            return
        link.alive = False
        link.halt()
        log.error("%s %s; its %d session(s) end, new sessions go to the %d replica(s) left",
                  link.name, how, len(link.sessions), len(self._living()))
        message = self._death_message(link, how)
        for session in list(link.sessions.values()):
            session.end(message)
        for future, home in list(self._opening.values()):
            if home is link and not future.done():
                future.set_result(("EngineBusyError", message))

    @staticmethod
    def _death_message(link: ReplicaLink, how: str = "died") -> str:
        return f"the device process for {link.device} {how}; this stream has ended (reconnect to continue)"


__all__ = ["ModelInfo", "ReplicaEngine", "ReplicaFailed", "ReplicaSession", "parse_devices", "shares"]
