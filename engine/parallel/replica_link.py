"""One replica process as the front sees it: the process, its pipe, and the two threads on that pipe.

The reader thread blocks in ``recv`` (so the event loop never does): it frees input slots,
copies outputs out of shared memory and hands the rest to the loop with
``call_soon_threadsafe``. The sender thread is the pipe's only writer: control messages
first, in order, then the newest frame of each session that has a free input slot,
converted to the model's size there (so frames dropped for newer ones cost nothing).
A pipe that ends without :meth:`ReplicaLink.stop` means the process died, and one silent for
``silence_s`` (a serving replica reports twice a second) means it hung: the reader kills it
and says so. A replica that lost its device says why before it exits; the death is reported
with that reason.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Callable

import torch
import torch.multiprocessing as mp
from multiprocessing.process import BaseProcess

from engine.models import ModelUnavailableError
from engine.parallel.replica_process import Fault, replica_main
from engine.runtime import EngineConfig, Progress

if TYPE_CHECKING:
    from engine.parallel.replica_session import ReplicaSession

log = logging.getLogger(__name__)

POLL_S = 0.5
#: a serving replica reports its stats every 0.5 s; this long without a word, it is hung and is killed
SILENCE_S = 20.0
OnMessage = Callable[["ReplicaLink", tuple], None]
OnDeath = Callable[["ReplicaLink", str], None]


class ReplicaFailed(RuntimeError):
    """A replica process could not load its model, or died; the message names its device."""


class ReplicaLink:
    """Process ``index`` serving ``config.devices[0]`` with up to ``config.max_sessions`` sessions.

    ``fault``: a fault to inject there (tests, see :class:`~engine.parallel.replica_process.Fault`).
    """

    def __init__(self, index: int, config: EngineConfig, threads: int, silence_s: float = SILENCE_S,
                 fault: Fault | None = None) -> None:
        context = mp.get_context("spawn")
        self.index, self.config = index, config
        self.silence_s = silence_s
        self.device = config.devices[0]
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=replica_main, args=(config, child, threads, fault),
                                       daemon=True, name=f"diffcam-replica-{index}")
        self.process.start()
        child.close()  # only the child holds its end: the pipe ends when the child does
        self.sessions: dict[str, ReplicaSession] = {}
        self.opening = 0
        self.alive = True
        self.info: dict = {}
        self.stats: dict = {}
        self.lost: str | None = None  # why the process gave up its device, when it says so before exiting
        self._outbox: deque[tuple] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return f"replica {self.index} on {self.device} (pid {self.process.pid})"

    @property
    def load(self) -> int:
        """Sessions held and being opened (balancing counts both)."""
        return len(self.sessions) + self.opening

    @property
    def stalled(self) -> bool:
        """Whether its last stats show a round running for a tenth of the time that means its device hangs: a
        GPU round takes milliseconds, so new sessions had better go elsewhere while it may be hanging."""
        limit = self.config.hang_timeout_on(torch.device(self.device))
        return limit is not None and self.stats.get("busy_for", 0.0) > limit / 10

    def wait_ready(self, progress: Progress) -> dict:
        """Block until the process has loaded its model; its ``info``. Raises :class:`ReplicaFailed`."""
        while True:
            if not self.conn.poll(POLL_S):
                if not self.process.is_alive():
                    raise ReplicaFailed(f"{self.name} {exit_reason(self.process)} while loading")
                continue
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(POLL_S)
                raise ReplicaFailed(f"{self.name} {exit_reason(self.process)} while loading") from None
            if kind == "progress":
                progress(payload)
            elif kind == "failed":
                raise load_error(self.name, *payload)
            elif kind == "ready":
                self.info = payload
                return payload

    def start(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_death: OnDeath) -> None:
        """Start the reader and the sender."""
        self._threads = [
            threading.Thread(target=self._read, args=(loop, on_message, on_death), daemon=True,
                             name=f"diffcam-replica-{self.index}-reader"),
            threading.Thread(target=self._write, daemon=True, name=f"diffcam-replica-{self.index}-sender"),
        ]
        for thread in self._threads:
            thread.start()

    def post(self, message: tuple) -> None:
        """Send a control message (from any thread); it goes before any later frame."""
        with self._wake:
            self._outbox.append(message)
            self._wake.notify()

    def wake(self) -> None:
        """A session has a new frame, or a free slot: the sender looks again."""
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float, grace: float = 2.0) -> None:
        """Ask the process to stop; SIGTERM it after ``timeout``, SIGKILL after ``grace`` more (blocking)."""
        if self._threads:
            self.post(("stop",))
        else:  # loaded but never started: no sender to carry the message, so say it here
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("%s did not stop within %.1fs; terminating it", self.name, timeout)
            self.process.terminate()
            self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(grace)
        self.conn.close()

    def halt(self) -> None:
        """Stop the threads of a process that is already gone (blocking, briefly)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    # ------------------------------------------------------------ the reader thread

    def _read(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage, on_death: OnDeath) -> None:
        how = None
        while True:
            try:
                if not self.conn.poll(self.silence_s) and not self._stopping:
                    how = f"stopped answering for {self.silence_s:.0f} s and was killed"
                    self.process.kill()
                    break
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(loop, message, on_message)
            except RuntimeError:  # the loop closed under us: nobody is left to tell
                return
        if self._stopping:
            return
        self.process.join(POLL_S)  # it is gone or going: its exit code says how
        if self.lost is not None:  # it said why (and may have hung in its exit, on a device that hangs)
            how = f"lost its device ({self.lost}) and exited"
        try:
            loop.call_soon_threadsafe(on_death, self, how or exit_reason(self.process))
        except RuntimeError:
            pass

    def _dispatch(self, loop: asyncio.AbstractEventLoop, message: tuple, on_message: OnMessage) -> None:
        kind = message[0]
        session = self.sessions.get(message[1]) if kind in ("in_free", "output") else None
        if kind == "in_free":
            if session is not None:
                session.input_freed(message[2])
                self.wake()
        elif kind == "output":
            if session is not None:
                output = session.copy_output(*message[2:])
                if output is not None:
                    self.post(("out_free", session.id, message[2]))
                    loop.call_soon_threadsafe(session.deliver, output)
        elif kind == "stats":
            self.stats = message[1]
            loop.call_soon_threadsafe(on_message, self, message)
        elif kind == "lost":
            self.lost = message[1]
        else:
            loop.call_soon_threadsafe(on_message, self, message)

    # ------------------------------------------------------------ the sender thread

    def _write(self) -> None:
        while (work := self._next_work()) is not None:
            messages, sessions = work
            try:
                for message in messages:
                    self._send(message)
                for session in sessions:
                    frame = session.fill_input()
                    if frame is not None and (error := self._send(frame)) is not None:
                        _, _, slot, (frame_id, _, _) = frame
                        session.frame_failed(slot, frame_id, error)
            except (BrokenPipeError, OSError):  # the process is gone; the reader reports it
                return

    def _send(self, message: tuple) -> Exception | None:
        """Send ``message``; a message that cannot be pickled (a caller's odd pts, say) is not sent, and its
        error returned, so that it fails alone. Pipe errors propagate: the process is gone."""
        try:
            self.conn.send(message)  # pickles whole before writing: a failed pickle writes nothing
        except (BrokenPipeError, OSError):
            raise
        except Exception as error:  # noqa: BLE001 - see the docstring
            log.warning("%s: a %r message could not be sent: %s", self.name, message[0], error)
            return error
        return None

    def _next_work(self) -> tuple[list[tuple], list[ReplicaSession]] | None:
        with self._wake:
            while True:
                if self._stopping:
                    return None
                messages, self._outbox = list(self._outbox), deque()
                ready = [s for s in list(self.sessions.values()) if s.has_frame_to_send]
                if messages or ready:
                    return messages, ready
                self._wake.wait(POLL_S)


def load_error(name: str, kind: str, message: str) -> Exception:
    """What a replica's failure to load is raised as here: a missing model as itself (the CLI prints
    its advice as it does for one device), anything else as :class:`ReplicaFailed` naming the replica."""
    if kind == "ModelUnavailableError":
        return ModelUnavailableError(f"{name}: {message}")
    return ReplicaFailed(f"{name} could not load: {kind}: {message}")


def exit_reason(process: BaseProcess) -> str:
    """How a process ended, in words ("was killed by SIGKILL", "exited with code 1")."""
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
