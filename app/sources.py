"""Local sources: a camera, a video file or a network stream read on the server, fed to an engine session.

``--source 0`` is a camera index, ``--source clip.mp4`` a file (looped forever at its own frame
rate), ``--source rtsp://…`` (or http(s)://…) a stream; OpenCV reads them all. :func:`open_source`
opens one and reads its first frame, so a wrong path, a busy camera or a silent URL fails at
start-up with one line that says what to do. :class:`SourceReader` then reads it on its own
thread and hands the newest frame to its session on the event loop (older ones are dropped).
A camera or stream that stops mid-run (a cable pulled, a network blip, a camera rebooting) is
opened again, with a growing pause between tries, for up to ``reconnect_s`` seconds; its stream
stays the same one meanwhile (players show the last picture), so nothing downstream has to
reconnect. A source that does not come back, or a file that cannot be read, is logged once and
closes its session, which ends its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal
from urllib.parse import urlsplit

# Our own message says what failed; FFmpeg's ("moov atom not found", ...) would only add lines before it.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:  # the engine brings torch: loaded when a source is served, not for --help
    from engine.session import Session

log = logging.getLogger(__name__)

#: seconds a source has to open and deliver its first frame
OPEN_TIMEOUT = 5.0
#: a file whose frame rate OpenCV cannot tell (0, NaN, absurd) plays at this rate
DEFAULT_FPS = 30.0
MAX_FPS = 240.0
#: the clock of the pts given to sessions, as WebRTC video uses
PTS_CLOCK = 90_000
#: seconds a camera or stream that stopped is tried again before its stream ends
RECONNECT_S = 30.0
#: the pause after the first failed try to reopen a source; it doubles up to RETRY_MAX_S
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "srt", "udp")
SourceKind = Literal["camera", "file", "stream"]


class SourceError(RuntimeError):
    """A source cannot be opened; the message (one line) says what was tried and what to do."""


@dataclass(frozen=True)
class SourceSpec:
    """What ``--source`` names: a camera index, a file path or a stream URL."""

    kind: SourceKind
    target: int | str

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        text = text.strip()
        if not text:
            raise SourceError("--source needs a camera index (0, 1, …), a video file or a stream URL (rtsp://…)")
        if text.isdigit():
            return cls("camera", int(text))
        scheme, sep, _ = text.partition("://")
        if sep and scheme.lower() in STREAM_SCHEMES:
            return cls("stream", text)
        if sep and scheme.isalpha():
            raise SourceError(f"--source {text}: {scheme}:// is not a stream OpenCV reads here; "
                              f"allowed: {', '.join(s + '://' for s in STREAM_SCHEMES)}")
        return cls("file", str(Path(text).expanduser()))

    @property
    def name(self) -> str:
        """How it is shown: ``camera 0``, the file's name, or the URL without its password."""
        if self.kind == "camera":
            return f"camera {self.target}"
        if self.kind == "file":
            return Path(str(self.target)).name
        return redacted(str(self.target))


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (it is logged and listed in ``/streams``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def camera_hint(system: str | None = None) -> str:
    """Where to look when a camera will not open, on ``system`` (this machine's by default)."""
    system = system or platform.system()
    if system == "Linux":
        return "List cameras with `v4l2-ctl --list-devices` (v4l-utils); /dev/videoN is --source N"
    if system == "Darwin":
        return "macOS must allow this terminal to use the camera (System Settings > Privacy & Security > Camera)"
    return "Close apps that may hold it (Zoom, Teams, OBS); cameras are numbered from 0"


def refusal(spec: SourceSpec, opened: bool, timeout: float) -> str:
    """The one line that says why ``spec`` gave no first frame, and what to do."""
    if spec.kind == "camera":
        if not opened:
            return (f"camera {spec.target} could not be opened: is it connected and not used by another app? "
                    f"{camera_hint()}")
        return f"camera {spec.target} sent no frame within {timeout:g} s: is another app using it? {camera_hint()}"
    if spec.kind == "file":
        return (f"--source {spec.target}: OpenCV cannot read video from this file (not a video, or a codec it "
                f"lacks); convert it with `ffmpeg -i {spec.target} -c:v libx264 clip.mp4`")
    what = "did not answer" if not opened else "sent no frame"
    return (f"stream {spec.name} {what} within {timeout:g} s: check the URL and that the camera or server is on "
            f"and reachable from here (`ffplay URL` shows what it sends)")


def check_file(path: str) -> None:
    """``SourceError`` for a path that is no readable file (before OpenCV, which only says 'not opened')."""
    file = Path(path)
    if not file.exists():
        raise SourceError(f"--source {path}: no such file; give a video file, a camera index (0, 1, …) "
                          "or a stream URL (rtsp://…)")
    if not file.is_file():
        raise SourceError(f"--source {path}: not a file; give a video file, a camera index or a stream URL")
    if not os.access(file, os.R_OK):
        raise SourceError(f"--source {path}: not readable by this user; check its permissions")


class Capture:
    """An opened source: OpenCV's capture, its frame rate and its first frame (RGB).

    Read it from one thread at a time; :class:`SourceReader` owns it once started and releases it.
    """

    def __init__(self, spec: SourceSpec, video: cv2.VideoCapture, first: np.ndarray) -> None:
        self.spec = spec
        self.video = video
        self.first = first
        #: a file's frame rate, which the reader keeps to; None for cameras and streams, which deliver at theirs
        self.fps = file_fps(video) if spec.kind == "file" else None

    @property
    def name(self) -> str:
        return self.spec.name

    def next_frame(self) -> np.ndarray | None:
        """The next frame (RGB); a file starts again at its end; None when the source has stopped."""
        frame = read_rgb(self.video)
        if frame is None and self.spec.kind == "file" and self.video.set(cv2.CAP_PROP_POS_FRAMES, 0):
            frame = read_rgb(self.video)
        return frame

    def release(self) -> None:
        self.video.release()


def read_rgb(video: cv2.VideoCapture) -> np.ndarray | None:
    ok, frame = video.read()
    if not ok or frame is None or frame.ndim != 3 or frame.shape[2] != 3:
        return None
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def file_fps(video: cv2.VideoCapture) -> float:
    fps = video.get(cv2.CAP_PROP_FPS)
    return fps if math.isfinite(fps) and 0 < fps <= MAX_FPS else DEFAULT_FPS


def open_source(text: str, timeout: float = OPEN_TIMEOUT) -> Capture:
    """Open ``--source text`` and read its first frame within ``timeout`` seconds; ``SourceError`` if not."""
    spec = SourceSpec.parse(text)
    if spec.kind == "file":
        check_file(str(spec.target))
    return _Opening(spec, timeout).capture()


class _Opening:
    """Opens a source on a helper thread: a camera driver or a silent server may block past the timeout.
    A capture that opens after the caller gave up is released by that thread."""

    def __init__(self, spec: SourceSpec, timeout: float) -> None:
        self.spec, self.timeout = spec, timeout
        self.video: cv2.VideoCapture | None = None
        self.first: np.ndarray | None = None
        self.opened = self.abandoned = False
        self._done, self._lock = threading.Event(), threading.Lock()
        threading.Thread(target=self._open, name=f"diffcam-open-{spec.name}", daemon=True).start()

    def _open(self) -> None:
        try:
            video = _video_capture(self.spec, self.timeout)
            first = read_rgb(video) if video.isOpened() else None
        except cv2.error:  # e.g. a backend that rejects the name outright: the same as not opening
            video, first = None, None
        with self._lock:
            self.video, self.first, self.opened = video, first, video is not None and video.isOpened()
            keep = first is not None and not self.abandoned
            self._done.set()
        if video is not None and not keep:
            video.release()

    def capture(self) -> Capture:
        """The opened capture, once it gave its first frame; ``SourceError`` if it failed or took too long."""
        self._done.wait(self.timeout)
        with self._lock:
            if not self._done.is_set():
                self.abandoned = True
                # still opening: a camera that hangs has opened as far as the user can tell; a stream has not answered
                raise SourceError(refusal(self.spec, opened=self.spec.kind == "camera", timeout=self.timeout))
        if self.video is None or self.first is None:
            raise SourceError(refusal(self.spec, opened=self.opened, timeout=self.timeout))
        return Capture(self.spec, self.video, self.first)


def _video_capture(spec: SourceSpec, timeout: float) -> cv2.VideoCapture:
    with _quiet_opencv():
        if spec.kind == "stream":  # a reopen near the end of its window opens briefly, but reads as patiently
            opening, reading = int(timeout * 1000), int(max(timeout, OPEN_TIMEOUT) * 1000)
            return cv2.VideoCapture(str(spec.target), cv2.CAP_FFMPEG,
                                    [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, opening, cv2.CAP_PROP_READ_TIMEOUT_MSEC, reading])
        video = cv2.VideoCapture(spec.target)
        if spec.kind == "camera":
            video.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver's queue, where it has one: the newest frame wins
        return video


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV's warnings while opening ("can't open camera by index") repeat what our message says."""
    logging_ = cv2.utils.logging
    previous = logging_.getLogLevel()
    logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging_.setLogLevel(previous)


class Pacer:
    """Ticks ``fps`` times a second on the monotonic clock; when behind, it starts again from now (no burst)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.due = time.monotonic()

    def wait(self, stop: threading.Event) -> None:
        """Until the next tick, or until ``stop`` is set."""
        self.due += self.period
        delay = self.due - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            self.due = time.monotonic()


class SourceReader:
    """Reads an opened source on its own thread; each newest frame goes to ``session`` on ``loop``.

    A file is paced to its frame rate and loops; a camera or stream is read as fast as it delivers.
    Frames wait in a one-frame slot for the loop (the newest wins), so a busy loop never queues them.
    A camera or stream that stops is opened again for up to ``reconnect_s`` seconds (0: never); one
    that does not come back is logged once and closes the session. A session closed by others stops
    the reader.
    """

    def __init__(self, capture: Capture, session: Session, loop: asyncio.AbstractEventLoop,
                 reconnect_s: float = RECONNECT_S) -> None:
        self.capture = capture
        self.session = session
        self.loop = loop
        self.reconnect_s = reconnect_s
        self.reconnects = 0  # times the source came back
        self.frames_read = 0
        self.ended: str | None = None  # why it stopped: "stopped", "source ended", "session closed", an error
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._newest: tuple[np.ndarray, int] | None = None
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"diffcam-source-{capture.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.capture.name

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop (it releases the capture on its way out); see :meth:`join`."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the thread; True when it ended. Never started: release the capture now."""
        self._stop.set()
        if self._thread.ident is None:
            self.capture.release()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._read_until_stopped()
        except Exception as error:  # noqa: BLE001 - a failing source ends its stream, not the server
            self._end(f"{type(error).__name__}: {error}")
        finally:
            self.capture.release()

    def _read_until_stopped(self) -> None:
        while not self._stop.is_set():
            pacer = Pacer(self.capture.fps) if self.capture.fps is not None else None
            frame: np.ndarray | None = self.capture.first
            while frame is not None and not self._stop.is_set():
                self._offer(frame)
                frame = self.capture.next_frame()
                if pacer is not None:
                    pacer.wait(self._stop)
            if self._stop.is_set():
                return
            if self.capture.spec.kind == "file" or not self._reopen():  # a file that stops reading stays stopped
                if not self._stop.is_set():
                    self._end("source ended" if self.reconnect_s <= 0 or self.capture.spec.kind == "file"
                              else f"source ended and did not come back within {self.reconnect_s:g} s")
                return

    def _reopen(self) -> bool:
        """Open the stopped source again, pausing longer after each failed try, until ``reconnect_s`` runs
        out or the reader is stopped; True once it gives frames again (``capture`` is then the new one)."""
        if self.reconnect_s <= 0:
            return False
        log.warning("source %s stopped: trying to reopen it for up to %g s", self.name, self.reconnect_s)
        self.capture.release()
        deadline, pause = time.monotonic() + self.reconnect_s, RETRY_FIRST_S
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                capture = _Opening(self.capture.spec, min(OPEN_TIMEOUT, left)).capture()
            except SourceError:
                self._stop.wait(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(2 * pause, RETRY_MAX_S)
                continue
            if self._stop.is_set():
                capture.release()
                return False
            self.capture = capture
            self.reconnects += 1
            log.warning("source %s is back; its stream goes on", self.name)
            return True
        return False

    def _offer(self, frame: np.ndarray) -> None:
        """Put ``frame`` in the slot; only an empty slot needs a call on the loop to empty it."""
        self.frames_read += 1
        pts = round((time.monotonic() - self._started_at) * PTS_CLOCK)
        with self._lock:
            waiting = self._newest is not None
            self._newest = (frame, pts)
        if not waiting:
            try:
                self.loop.call_soon_threadsafe(self._hand_over)
            except RuntimeError:  # the loop is closed: nobody is left to serve this source
                self._stop.set()

    def _hand_over(self) -> None:
        """On the loop: the newest frame to the session."""
        with self._lock:
            newest, self._newest = self._newest, None
        if newest is None or self._stop.is_set():
            return
        from engine.session import SessionClosedError

        try:
            self.session.submit(newest[0], pts=newest[1])
        except SessionClosedError:  # ended by others (the stream was deleted, the engine stopped)
            self.ended = self.ended or "session closed"
            self._stop.set()

    def _end(self, why: str) -> None:
        """The source stopped on its own: say so once, and end its stream (the server keeps serving)."""
        self.ended = why
        log.warning("source %s stopped (%s): its stream ends; the server keeps serving", self.name, why)
        with contextlib.suppress(RuntimeError):  # a closed loop has closed the session already
            self.loop.call_soon_threadsafe(self.session.close)


__all__ = ["Capture", "OPEN_TIMEOUT", "PTS_CLOCK", "RECONNECT_S", "SourceError", "SourceReader", "SourceSpec", "open_source",
           "redacted"]
