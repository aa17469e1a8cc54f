"""The virtual camera: one stream's stylized frames as a system camera that OBS, Zoom or a browser can pick.

pyvirtualcam drives the platform's virtual camera (OBS Virtual Camera on Windows and macOS,
v4l2loopback on Linux). A sender thread sends at a steady rate: every tick the newest stylized
frame, again when the model has not made a new one yet (apps expect a camera to keep its rate),
and a dim "waiting" frame while no stream is live. Which stream: the first live one, and when
it ends the next; or the one chosen with :meth:`VirtualCamera.follow`.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import threading
from typing import TYPE_CHECKING, Any

import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from app.local import VIRTUAL_CAM_FPS
from app.whip import NotFound, Published, WhipHub

if TYPE_CHECKING:
    from pyvirtualcam import Camera

log = logging.getLogger(__name__)

DEFAULT_FPS = VIRTUAL_CAM_FPS  # the flag's default, in app.local
#: grey level of the frame shown while no stream is live: dark, but visibly not a dead camera
WAITING_LEVEL = 16


class VirtualCamError(RuntimeError):
    """No virtual camera can be opened; the message (one line) says what to install or change."""


def install_hint(system: str | None = None) -> str:
    """What gives ``system`` (this machine's by default) a virtual camera that pyvirtualcam can drive."""
    system = system or platform.system()
    if system == "Linux":
        return ("install and load v4l2loopback: `sudo apt install v4l2loopback-dkms && "
                "sudo modprobe v4l2loopback devices=1 exclusive_caps=1`")
    if system == "Darwin":
        return ("install OBS Studio 28 or later and start its Virtual Camera once (Start Virtual Camera), "
                "so that macOS enables its camera extension")
    if system == "Windows":
        return ("install OBS Studio 26 or later and start its Virtual Camera once (Start Virtual Camera), "
                "or install Unity Capture")
    return f"pyvirtualcam has no virtual camera for {system}; it supports Linux, macOS and Windows"


def open_camera(width: int, height: int, fps: float = DEFAULT_FPS, device: str | None = None,
                backend: str | None = None) -> Camera:
    """A ``pyvirtualcam.Camera`` taking RGB frames of ``width×height``; ``VirtualCamError`` says what to do if not."""
    try:
        import pyvirtualcam
    except ImportError:
        raise VirtualCamError("--virtual-cam needs pyvirtualcam: `pip install pyvirtualcam`") from None
    from pyvirtualcam.camera import BACKENDS

    if backend is not None and backend not in BACKENDS:
        available = ", ".join(sorted(BACKENDS)) or "none"
        raise VirtualCamError(f"--virtual-cam-backend {backend!r} is unknown; available here: {available}")
    try:
        return pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device or None,
                                   backend=backend)
    except RuntimeError as error:  # every backend refused: no module, no OBS, no such device
        reason = " / ".join(line.strip() for line in str(error).splitlines() if line.strip()) or "no backend"
        where = f" {device}" if device else ""
        raise VirtualCamError(f"--virtual-cam{where}: no virtual camera could be opened ({reason}); "
                              f"{install_hint()}") from None


def waiting_frame(width: int, height: int) -> np.ndarray:
    """The dim frame shown while no stream is live (RGB uint8)."""
    return np.full((height, width, 3), WAITING_LEVEL, dtype=np.uint8)


class VirtualCamera:
    """Sends one stream's newest stylized frame to an opened ``pyvirtualcam.Camera``, ``fps`` times a second.

    :meth:`start` on the event loop with the hub; :meth:`follow` picks the stream; :meth:`aclose`
    stops the sender and closes the camera (:meth:`close` when it was never started).
    """

    def __init__(self, camera: Camera) -> None:
        self.camera = camera
        self.width, self.height, self.fps = camera.width, camera.height, camera.fps
        self.device, self.backend = camera.device, camera.backend  # asked now: a closed camera cannot say
        self.frames_sent = 0
        self.frames_received = 0
        self.error: str | None = None
        self._hub: WhipHub | None = None
        self._chosen: str | None = None  # the stream follow() asked for; None: the first live one
        self._target: str | None = None  # the stream it should show now
        self._following: str | None = None  # the stream it reads now
        self._reader: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self._waiting = waiting_frame(self.width, self.height)
        self._lock = threading.Lock()
        self._newest: np.ndarray | None = None
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_until_stopped, name="diffcam-virtual-cam", daemon=True)

    # ------------------------------------------------------------ event loop side

    def start(self, hub: WhipHub, follow: str | None = None) -> None:
        """Send from now on, showing stream ``follow`` (None: the first live stream); on the event loop."""
        self._hub = hub
        hub.add_listener(self._on_start, self._on_end)
        self._sender.start()
        self._task = asyncio.create_task(self._follow_streams(), name="diffcam-virtual-cam-follow")
        self.follow(follow)

    def follow(self, stream_id: str | None) -> None:
        """Show stream ``stream_id`` (``NotFound`` if it is not live), or with None the first live stream.

        When a chosen stream ends the camera goes on with the first live one."""
        if self._hub is None:
            raise RuntimeError("the virtual camera is not started")
        if stream_id is not None and stream_id not in self._live():
            raise NotFound(f"no live stream {stream_id!r} to show on the virtual camera")
        self._chosen = stream_id
        self._retarget(stream_id if stream_id is not None else self._first_live())

    def status(self) -> dict[str, Any]:
        """What the camera is and does, as plain data (for an HTTP endpoint). ``following``: the stream it
        shows (from the next frame that stream makes on); ``chosen``: picked by :meth:`follow`, not the first live."""
        return {"device": self.device, "backend": self.backend, "width": self.width, "height": self.height,
                "fps": self.fps, "following": self._target, "chosen": self._chosen is not None,
                "frames_sent": self.frames_sent, "frames_received": self.frames_received, "error": self.error}

    def _live(self) -> list[str]:
        """Live stream ids, oldest first (the hub keeps them in the order they started)."""
        assert self._hub is not None
        return [stream_id for stream_id, published in self._hub.streams.items() if published.live]

    def _first_live(self, besides: str | None = None) -> str | None:
        return next((stream_id for stream_id in self._live() if stream_id != besides), None)

    def _retarget(self, stream_id: str | None) -> None:
        self._target = stream_id
        self._changed.set()

    def _on_start(self, stream_id: str, _: Published) -> None:
        if self._target is None and not self._closed:
            self._retarget(stream_id)

    def _on_end(self, stream_id: str, _: Published) -> None:
        if stream_id == self._chosen:
            self._chosen = None
        if stream_id == self._target and not self._closed:
            self._retarget(self._first_live(besides=stream_id))

    async def _follow_streams(self) -> None:
        """Keep the reader on the target stream: the one task that switches, so switches never overlap."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._target != self._following:
                await self._switch(self._target)

    async def _switch(self, stream_id: str | None) -> None:
        await self._stop_reading()
        self._following = None
        if stream_id is None:
            self._show(None)  # no stream: the waiting frame (between two streams the last frame stays)
            return
        assert self._hub is not None
        try:
            track = self._hub.subscribe(stream_id)
        except NotFound:  # it ended as we switched
            self._retarget(self._first_live(besides=stream_id))
            return
        self._following = stream_id
        self._reader = asyncio.create_task(self._read(track), name="diffcam-virtual-cam-read")

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    self._show(frame.to_ndarray(format="rgb24"))
                    self.frames_received += 1
        except MediaStreamError:  # the stream ended: the hub tells _on_end, which picks the next one
            pass
        finally:
            track.stop()

    async def _stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    def _show(self, frame: np.ndarray | None) -> None:
        with self._lock:
            self._newest = frame

    async def aclose(self, timeout: float = 1.5) -> None:
        """Stop following and sending, and close the camera, within about ``timeout`` seconds."""
        self._closed = True
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._stop_reading()
        self._following = None
        if self._sender.ident is None:
            self.camera.close()
        else:
            await asyncio.to_thread(self._sender.join, timeout)

    def close(self) -> None:
        """Close a camera that was never started (a started one: :meth:`aclose`)."""
        self._closed = True
        if self._sender.ident is None:
            self.camera.close()

    # ------------------------------------------------------------ sender thread

    def _send_until_stopped(self) -> None:
        try:
            while not self._stop.is_set():
                self.camera.send(self._frame_to_send())
                self.frames_sent += 1
                self.camera.sleep_until_next_frame()
        except Exception as error:  # noqa: BLE001 - a camera that fails stops itself, not the server
            self.error = f"{type(error).__name__}: {error}"
            log.warning("virtual camera %s stopped: %s; the server keeps serving", self.device, self.error)
        finally:
            self.camera.close()

    def _frame_to_send(self) -> np.ndarray:
        with self._lock:
            frame = self._newest
        if frame is None:
            return self._waiting
        if frame.shape == (self.height, self.width, 3):
            return frame
        fitted = cv2.resize(frame, (self.width, self.height), interpolation=cv2.INTER_AREA)
        with self._lock:  # a stream of another size: fitted once per frame, not at every repeat
            if self._newest is frame:
                self._newest = fitted
        return fitted


__all__ = ["DEFAULT_FPS", "VirtualCamError", "VirtualCamera", "install_hint", "open_camera",
           "waiting_frame"]
