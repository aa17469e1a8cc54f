"""Local sources and outputs, for use without a browser: ``--source`` and ``--virtual-cam``.

Two steps, so that mistakes surface before the model loads:

    plan = plan_local(args, (width, height))    # opens the sources and the virtual camera now; LocalError
    ...load the model, build the app...
    async with attach_local(plan, engine)(hub):  # in the app's lifespan, once the engine runs
        ...serve...

Each source gets its own engine session, registered with the hub as a stream of kind ``source``
(its output is drained and relayed like a WHIP stream's, so WHEP players can watch it). The
virtual camera shows one stream: the ``--virtual-cam-source``-th source, or the first live one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable

from app.sources import OPEN_TIMEOUT, RECONNECT_S, Capture, SourceError, SourceReader, open_source

if TYPE_CHECKING:  # the virtual camera and the hub bring aiortc and PyAV: loaded when used, not for --help
    from app.virtualcam import VirtualCamera
    from app.whip import WhipHub
    from engine.runtime import Engine

#: the virtual camera's rate by default and at most (``--virtual-cam-fps``)
VIRTUAL_CAM_FPS = 30.0
MAX_VIRTUAL_CAM_FPS = 120.0
#: seconds that stopping the sources and the virtual camera may take, together
STOP_SECONDS = 2.0
#: the longest --source-reconnect: a day
MAX_RECONNECT_S = 86_400.0


class LocalError(RuntimeError):
    """A ``--source`` or ``--virtual-cam`` flag cannot be served; one line that says what to do."""


def add_local_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of local sources and outputs, as their own group of ``parser``."""
    group = parser.add_argument_group("local sources and outputs")
    group.add_argument("--source", action="append", default=None, metavar="SOURCE",
                       help="stylize a source read on this machine, without a browser: a camera index (0, 1, …), "
                            "a video file (looped at its own frame rate) or a stream URL (rtsp://…, http(s)://…); "
                            "repeat for more; each is a stream that /whep players can watch")
    group.add_argument("--source-reconnect", type=float, default=RECONNECT_S, metavar="SECONDS",
                       help="how long a camera or stream URL that stops is tried again before its stream ends "
                            "(its stream stays the same meanwhile); 0 ends it at once")
    group.add_argument("--virtual-cam", nargs="?", const="", default=None, metavar="DEVICE",
                       help="send the stylized video to a virtual camera (OBS Virtual Camera on Windows/macOS, "
                            "v4l2loopback on Linux) that other apps can pick; DEVICE picks one, e.g. /dev/video10")
    group.add_argument("--virtual-cam-backend", default=None, metavar="NAME",
                       help="pyvirtualcam backend: v4l2loopback (Linux), obs, unitycapture (Windows) "
                            "(default: the first that works)")
    group.add_argument("--virtual-cam-fps", type=float, default=VIRTUAL_CAM_FPS, metavar="FPS",
                       help="frames per second the virtual camera sends; the newest frame is repeated when the "
                            "model is slower")
    group.add_argument("--virtual-cam-source", type=int, default=None, metavar="N",
                       help="the N-th --source (1 = the first) feeds the virtual camera (default: the first "
                            "stream that starts, then the next live one)")


@dataclass
class LocalPlan:
    """What the flags asked for, opened: the sources' captures and the virtual camera. ``close()`` frees them
    when they are never attached (after :func:`attach_local` it has nothing left to free)."""

    captures: list[Capture] = field(default_factory=list)
    virtual_camera: VirtualCamera | None = None
    #: which capture feeds the virtual camera at start-up (an index into ``captures``); None: the first live stream
    camera_source: int | None = None
    #: seconds a camera or stream that stops is tried again (``--source-reconnect``)
    reconnect_s: float = RECONNECT_S
    attached: bool = False

    def close(self) -> None:
        """Release what was opened and never attached. Idempotent."""
        if self.attached:
            return
        self.attached = True
        for capture in self.captures:
            capture.release()
        if self.virtual_camera is not None:
            self.virtual_camera.close()


def plan_local(args: argparse.Namespace, size: tuple[int, int]) -> LocalPlan:
    """Check the flags and open the sources and the virtual camera (``size``: the output's width, height).

    Called before the model loads, so that a missing camera or file fails in seconds; raises
    :class:`LocalError` with one line. The plan's captures and camera are open: attach or close it.
    """
    from app.virtualcam import VirtualCamera, VirtualCamError, open_camera

    check_local_args(args)
    plan = LocalPlan(reconnect_s=args.source_reconnect)
    try:
        for text in args.source or ():
            plan.captures.append(open_source(text, OPEN_TIMEOUT))
        if args.virtual_cam is not None:
            width, height = size
            plan.virtual_camera = VirtualCamera(open_camera(width, height, args.virtual_cam_fps,
                                                            args.virtual_cam or None, args.virtual_cam_backend))
    except (SourceError, VirtualCamError) as error:
        plan.close()
        raise LocalError(str(error)) from None
    if args.virtual_cam_source is not None:
        plan.camera_source = args.virtual_cam_source - 1
    return plan


def check_local_args(args: argparse.Namespace) -> None:
    """``LocalError`` for flags that cannot go together or are out of range (nothing is opened)."""
    sources = args.source or []
    if args.virtual_cam is None:
        for flag, value in (("--virtual-cam-backend", args.virtual_cam_backend),
                            ("--virtual-cam-source", args.virtual_cam_source)):
            if value is not None:
                raise LocalError(f"{flag} sets up the virtual camera; add --virtual-cam")
    if not 0 <= args.source_reconnect <= MAX_RECONNECT_S:
        raise LocalError(f"--source-reconnect {args.source_reconnect:g} is out of range; allowed: "
                         f"[0, {MAX_RECONNECT_S:g}] seconds (0: a source that stops ends its stream at once)")
    if not 1 <= args.virtual_cam_fps <= MAX_VIRTUAL_CAM_FPS:
        raise LocalError(f"--virtual-cam-fps {args.virtual_cam_fps:g} is out of range; allowed: "
                         f"[1, {MAX_VIRTUAL_CAM_FPS:g}]")
    if args.virtual_cam_source is not None and not 1 <= args.virtual_cam_source <= len(sources):
        raise LocalError(f"--virtual-cam-source {args.virtual_cam_source} names no --source; allowed: "
                         + (f"1 to {len(sources)} (1 = the first --source)" if sources else "none: add --source"))
    max_sessions = getattr(args, "max_sessions", None)
    if max_sessions is not None and len(sources) > max_sessions:
        raise LocalError(f"{len(sources)} --source streams need --max-sessions {len(sources)} or more "
                         f"(it is {max_sessions}); raise it to leave room for browsers and OBS too")


def attach_local(plan: LocalPlan, engine: Engine) -> Callable[[WhipHub], AbstractAsyncContextManager[None]]:
    """What the app's lifespan enters once the engine runs: ``async with attach_local(plan, engine)(hub):``.

    Inside, each source feeds its own session, published on ``hub``, and the virtual camera sends;
    on the way out everything stops and closes within about :data:`STOP_SECONDS`.
    """

    @contextlib.asynccontextmanager
    async def attached(hub: WhipHub) -> AsyncIterator[None]:
        if plan.attached:
            raise RuntimeError("this plan was attached (or closed) already; plan_local() opens a new one")
        plan.attached = True
        loop = asyncio.get_running_loop()
        readers: list[SourceReader] = []
        try:
            stream_ids = []
            for capture in plan.captures:
                session = await engine.open_session()
                readers.append(SourceReader(capture, session, loop, plan.reconnect_s))
                stream_ids.append(await hub.publish_local(session, capture.name))
                readers[-1].start()
            if plan.virtual_camera is not None:
                first = stream_ids[plan.camera_source] if plan.camera_source is not None else None
                plan.virtual_camera.start(hub, follow=first)
            yield
        finally:
            await stop(readers, plan)

    return attached


async def stop(readers: list[SourceReader], plan: LocalPlan) -> None:
    """Stop the readers and the virtual camera, end the sources' streams (closing a session ends its stream
    on the hub), release the captures: briefly. Captures whose reader never started are released too."""
    deadline = time.monotonic() + STOP_SECONDS
    for reader in readers:
        reader.stop()
    if plan.virtual_camera is not None:
        await plan.virtual_camera.aclose(timeout=STOP_SECONDS / 2)
    for reader in readers:
        reader.session.close()
    for capture in plan.captures[len(readers):]:
        capture.release()
    for reader in readers:
        left = max(0.05, deadline - time.monotonic())
        await asyncio.to_thread(reader.join, left)  # a stream stuck in a read is left to end on its own


__all__ = ["LocalError", "LocalPlan", "add_local_arguments", "attach_local", "check_local_args", "plan_local"]
