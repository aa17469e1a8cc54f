"""Inside one replica process: an :class:`~engine.runtime.Engine` for one device, driven over a pipe.

The front (:mod:`engine.parallel.replicas`) sends small tuples; this side answers with small
tuples. Frames travel in shared memory (:mod:`engine.parallel.replica_frames`).

front → replica: ``("open", sid, params, in_name, out_name)``, ``("frame", sid, slot, tag)``
(``tag``: the front's frame id, pts and submit time, handed back with the output),
``("update", sid, params)``, ``("close", sid)``, ``("out_free", sid, slot)``, ``("stop",)``.

replica → front: ``("progress", stage)``, ``("ready", info)`` or ``("failed", why)`` once,
then ``("opened", sid, error)``, ``("in_free", sid, slot)``, ``("output", sid, slot, tag,
skipped)``, ``("error", sid, front_frame_id, message)``, ``("closed", sid, why)`` and
``("stats", engine_snapshot)`` every :data:`STATS_PERIOD` seconds, and ``("lost", why)`` just
before it exits on an error that left its device unusable (:func:`engine.worker.device_unusable`):
a poisoned CUDA context fails every frame and every open, so serving on would only draw new
sessions here (the front sends them to the least loaded replica). A device that hangs raises
nothing, so a round that runs on past the config's ``hang_timeout`` is taken as one too. Exiting, the replica is
handled as one that died: its sessions end, and new ones go to the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.components import Components
from engine.parallel.launch import _die_with_parent
from engine.parallel.replica_frames import SLOTS, FrameSlots
from engine.runtime import Engine, EngineConfig
from engine.session import FrameError, Session, SessionClosedError
from engine.worker import device_unusable

log = logging.getLogger(__name__)

STATS_PERIOD = 0.5
TAGS_KEPT = 64  # replica frame id → front frame id, for naming failed frames


@dataclass(frozen=True)
class Fault:
    """Fault injection for tests: from the UNet's ``call``-th call on (0: at once) replica ``replica``'s model
    fails as every call does on a GPU whose CUDA context is poisoned, or with ``hang``, never returns."""

    replica: int
    call: int
    hang: bool = False


def replica_main(config: EngineConfig, conn: Connection, threads: int, fault: Fault | None = None) -> None:
    """The replica process: load the model on ``config.devices[0]``, say so, serve until told to stop.
    ``fault``: see :class:`Fault`."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the front stops us
    torch.set_num_threads(threads)
    device = torch.device(config.devices[0])
    if device.type == "cuda":  # before anything touches CUDA: this process's current device
        torch.cuda.set_device(device)
    engine = Engine(config, progress=lambda stage: conn.send(("progress", stage)))
    try:
        engine.load()
    except BaseException as error:  # noqa: BLE001 - the front reports it and stops everything
        conn.send(("failed", (type(error).__name__, str(error))))
        return
    components = engine.components
    conn.send(("ready", {"name": components.name, "device": str(components.device),
                         "dtype": str(components.dtype).replace("torch.", ""), "backend": engine.backend}))
    if fault is not None:
        _FaultyDevice(components, fault)
    asyncio.run(ReplicaServer(engine, conn).serve())


class _FaultyDevice:
    """:class:`Fault` made real: from the UNet's ``fault.call``-th call on, the UNet and the text encoder raise a
    sticky CUDA error, as every call does on a GPU whose CUDA context an illegal memory access poisoned, or
    (``fault.hang``) sleep for good, as a call does on a GPU that hangs."""

    def __init__(self, components: Components, fault: Fault) -> None:
        self.fault, self.unet_calls = fault, 0
        self.error = getattr(torch, "AcceleratorError", RuntimeError)
        components.unet.register_forward_pre_hook(self._unet_call)
        components.text_encoder.register_forward_pre_hook(self._call)

    def _unet_call(self, module: torch.nn.Module, args: tuple) -> None:
        self.unet_calls += 1
        self._call(module, args)

    def _call(self, module: torch.nn.Module, args: tuple) -> None:
        if self.unet_calls < self.fault.call:
            return
        if self.fault.hang:
            while True:
                time.sleep(3600)
        raise self.error("CUDA error: an illegal memory access was encountered")


@dataclass
class Hosted:
    """One session served here: the engine session, its frames, and the task that sends its outputs."""

    session: Session
    inputs: FrameSlots
    outputs: FrameSlots
    free_out: list[int] = field(default_factory=lambda: list(range(SLOTS)))
    out_freed: asyncio.Event = field(default_factory=asyncio.Event)
    tags: OrderedDict = field(default_factory=OrderedDict)  # replica frame id → front frame id
    pump: asyncio.Task | None = None

    def release(self) -> None:
        self.inputs.release()
        self.outputs.release()


class ReplicaServer:
    """Serves the front's requests on this process's event loop; the engine's worker does the model."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.hosted: dict[str, Hosted] = {}
        self._opening: set[str] = set()
        self._cancelled: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()

    async def serve(self) -> None:
        await self.engine.start()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), name="diffcam-replica-reader", daemon=True).start()
        self._spawn(self._report_stats())
        self._spawn(self._watch_device())
        await self._stopped.wait()
        for sid in list(self.hosted):
            self._close(sid)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.engine.aclose()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pipe, read on a thread; each message is handled on the loop. EOF: the front is gone."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = ("stop",)
            except Exception as error:  # noqa: BLE001 - a message that does not unpickle here is lost alone
                log.warning("a message from the front could not be read: %s: %s", type(error).__name__, error)
                continue
            loop.call_soon_threadsafe(self._handle, message)
            if message[0] == "stop":
                return

    def _handle(self, message: tuple) -> None:
        kind, *args = message
        if kind == "frame":
            self._frame(*args)
        elif kind == "out_free":
            self._out_free(*args)
        elif kind == "open":
            self._opening.add(args[0])  # now, not in the task: a "close" right behind it must see it
            self._spawn(self._open(*args))
        elif kind == "update":
            self._update(*args)
        elif kind == "close":
            self._close(*args)
        elif kind == "stop":
            self._stopped.set()

    def _send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):  # the front is gone: the reader stops us
            pass

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, sid: str, params: dict[str, Any], in_name: str, out_name: str) -> None:
        try:
            session = await self.engine.open_session(**params)
        except Exception as error:  # noqa: BLE001 - the front raises it to its caller
            self._exit_if_device_lost(error)
            self._cancelled.discard(sid)
            self._send(("opened", sid, (type(error).__name__, str(error))))
            return
        finally:
            self._opening.discard(sid)
        stream = self.engine.config.stream
        try:
            hosted = Hosted(session, FrameSlots.attach(in_name, stream.height, stream.width),
                            FrameSlots.attach(out_name, stream.height, stream.width))
        except (OSError, ValueError) as error:  # the front closed the session meanwhile (blocks unlinked)
            self._cancelled.discard(sid)
            session.close()
            self._send(("opened", sid, (type(error).__name__, str(error))))
            return
        self.hosted[sid] = hosted
        hosted.pump = asyncio.create_task(self._pump(sid, hosted))
        self._send(("opened", sid, None))
        if sid in self._cancelled:
            self._close(sid)

    def _frame(self, sid: str, slot: int, tag: tuple) -> None:
        hosted = self.hosted.get(sid)
        if hosted is None:
            return
        frame = hosted.inputs.read(slot)
        self._send(("in_free", sid, slot))
        try:
            frame_id = hosted.session.submit(frame, pts=tag)
        except SessionClosedError:
            return
        hosted.tags[frame_id] = tag[0]
        while len(hosted.tags) > TAGS_KEPT:
            hosted.tags.popitem(last=False)

    def _out_free(self, sid: str, slot: int) -> None:
        hosted = self.hosted.get(sid)
        if hosted is not None:
            hosted.free_out.append(slot)
            hosted.out_freed.set()

    def _update(self, sid: str, params: dict[str, Any]) -> None:
        hosted = self.hosted.get(sid)
        if hosted is None:
            return
        try:
            hosted.session.update(**params)
        except ValueError as error:  # the front validated it; this only happens if the two disagree
            self._send(("error", sid, -1, f"a parameter update of session {sid} failed: {error}"))

    def _close(self, sid: str) -> None:
        if sid in self._opening:
            self._cancelled.add(sid)
            return
        self._cancelled.discard(sid)
        hosted = self.hosted.pop(sid, None)
        if hosted is None:
            return
        hosted.session.close()
        if hosted.pump is not None:
            hosted.pump.cancel()
        hosted.release()

    async def _pump(self, sid: str, hosted: Hosted) -> None:
        """Send each output of ``sid`` to the front through a free output slot."""
        while True:
            try:
                output = await hosted.session.next_output()
            except FrameError as error:
                self._exit_if_device_lost(error.__cause__)
                front_id = hosted.tags.get(error.frame_id, -1)
                self._send(("error", sid, front_id, str(error)))
                continue
            except SessionClosedError:
                if sid in self.hosted:  # closed here (idle, engine shutting down), not by the front
                    self._send(("closed", sid, "the replica closed the session"))
                return
            while not hosted.free_out:
                hosted.out_freed.clear()
                await hosted.out_freed.wait()
            slot = hosted.free_out.pop(0)
            hosted.outputs.write(slot, output.frame)  # type: ignore[arg-type] # arrays in, arrays out
            self._send(("output", sid, slot, output.pts, output.skipped))

    def _exit_if_device_lost(self, error: BaseException | None) -> None:
        """Tell the front why and end this process at once when ``error`` left the device unusable."""
        if device_unusable(error):
            self._exit_lost(f"{type(error).__name__}: {error}")

    async def _watch_device(self) -> None:
        """End this process when its device hangs (:meth:`Engine.trouble`): that raises nothing, and its sessions
        would wait for good while the replica, reporting its stats, looks alive to the front."""
        while (trouble := self.engine.trouble()) is None:
            await asyncio.sleep(STATS_PERIOD)
        self._exit_lost(trouble)

    def _exit_lost(self, why: str) -> None:
        """Tell the front why the device is lost and end this process at once (``os._exit``): the worker thread
        may be stuck on the device, and nothing here is worth keeping; the front unlinks the sessions' shared
        memory, as it does for a replica that crashed."""
        log.critical("%s: the device is unusable, so this replica exits (its sessions end; new ones go to "
                     "the other replicas)", why)
        self._send(("lost", why))
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    async def _report_stats(self) -> None:
        while True:
            snapshot = self.engine.snapshot()
            snapshot["busy_for"] = self.engine.busy_for()  # the front sends new sessions elsewhere while it grows
            snapshot["sessions"] = {sid: {name: value for name, value in counters.items()
                                          if name in ("dropped", "processed", "skipped", "errors")}
                                    for sid, counters in self._by_front_id(snapshot["sessions"]).items()}
            self._send(("stats", snapshot))
            await asyncio.sleep(STATS_PERIOD)

    def _by_front_id(self, sessions: dict[str, dict]) -> dict[str, dict]:
        """The engine's per-session snapshots keyed by the front's session ids."""
        local = {hosted.session.id: sid for sid, hosted in self.hosted.items()}
        return {local[lid]: snap for lid, snap in sessions.items() if lid in local}
