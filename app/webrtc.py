"""WebRTC peers: a browser's camera in, its stylized video out, controls over a data channel.

Per peer: aiortc decodes the camera on its own thread; ``MediaRelay(buffered=False)`` keeps only
the newest decoded frame (aiortc's receive queue is unbounded, so a slow consumer would
otherwise fall further and further behind); a feeder task submits each newest frame to the
peer's engine session; :class:`StylizedTrack` hands the session's outputs back to aiortc with
the input's pts. A ``control`` data channel carries parameter updates in (JSON) and live
stats out. Closing the peer, ICE failing or the tab going away frees everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import av
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs import h264, vpx
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from engine.runtime import Engine
from engine.session import FrameError, Session, SessionClosedError

log = logging.getLogger(__name__)

VIDEO_CLOCK = fractions.Fraction(1, 90000)
STATS_PERIOD = 1.0
MAX_SDP_BYTES = 100_000
FIRST_FRAME_TIMEOUT = 20.0
#: What a data-channel message may change; everything else is refused (no paths, no models).
CONTROL_FIELDS = frozenset({
    "prompt", "negative_prompt", "guidance_scale", "delta", "seed", "strength", "t_index_list",
    "similarity_filter", "similarity_threshold",
})


class OfferError(ValueError):
    """The offer cannot be answered; the message says why (HTTP 400)."""


@dataclass(frozen=True)
class VideoOptions:
    """Outgoing video: codec preference and bitrate (aiortc's VP8 default of 500 kbps smears 512²)."""

    codec: str = "vp8"
    bitrate: int = 3_000_000

    def apply(self) -> None:
        """aiortc reads these module constants when it creates each encoder."""
        vpx.DEFAULT_BITRATE = h264.DEFAULT_BITRATE = self.bitrate
        vpx.MAX_BITRATE = max(vpx.MAX_BITRATE, self.bitrate)
        h264.MAX_BITRATE = max(h264.MAX_BITRATE, self.bitrate)


class StylizedTrack(MediaStreamTrack):
    """The stylized video sent back: each ``recv`` returns the session's newest output."""

    kind = "video"

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    async def recv(self) -> av.VideoFrame:
        while True:
            try:
                output = await self.session.next_output()
            except FrameError:
                continue  # reported in the stats; the stream goes on with the next frame
            except SessionClosedError:
                self.stop()
                raise MediaStreamError from None
            frame = av.VideoFrame.from_ndarray(output.frame, format="rgb24")
            frame.pts, frame.time_base = output.pts if output.pts is not None else 0, VIDEO_CLOCK
            return frame


class Peer:
    """One browser connection: its peer connection, engine session and the tasks it owns."""

    def __init__(self, pc: RTCPeerConnection, session: Session, on_closed, input_timeout: float = 5.0) -> None:
        self.pc = pc
        self.input_timeout = input_timeout
        self.session = session
        self.channel = None
        self._tasks: set[asyncio.Task] = set()
        self._relay = MediaRelay()
        self._on_closed = on_closed
        self._closed = False
        self.errors = 0

    def spawn(self, coroutine, name: str) -> None:
        task = asyncio.create_task(coroutine, name=f"{name}-{self.session.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def has_camera(self) -> bool:
        return any(task.get_name().startswith("feed-") for task in self._tasks)

    def attach_camera(self, track: MediaStreamTrack) -> None:
        newest = self._relay.subscribe(track, buffered=False)
        self.spawn(self._feed(newest), "feed")

    async def _feed(self, track: MediaStreamTrack) -> None:
        """Submit every newest camera frame to the engine; it converts to RGB only the frames it takes."""
        # the first frame waits for ICE, DTLS and a keyframe too (OBS may send one every few seconds)
        timeout = max(self.input_timeout, FIRST_FRAME_TIMEOUT)
        while True:
            try:  # a camera that stops (tab gone, network lost) ends the peer long before ICE gives up
                frame = await asyncio.wait_for(track.recv(), timeout)
                timeout = self.input_timeout
            except (MediaStreamError, asyncio.TimeoutError):
                await self.close()
                return
            pts = int(frame.pts * frame.time_base / VIDEO_CLOCK) if frame.pts is not None else None
            try:
                self.session.submit(frame, pts=pts)
            except SessionClosedError:
                await self.close()
                return

    def discard(self, track: MediaStreamTrack) -> None:
        """Read and drop everything ``track`` brings (a track nobody reads grows aiortc's queue forever)."""
        self.spawn(discard_frames(track), "discard")

    def attach_channel(self, channel) -> None:
        self.channel = channel
        channel.on("message", self._on_message)
        self.spawn(self._send_stats(), "stats")

    def _on_message(self, message: Any) -> None:
        try:
            params = json.loads(message)
            if not isinstance(params, dict):
                raise ValueError("a control message is a JSON object of parameters")
            unknown = sorted(set(params) - CONTROL_FIELDS)
            if unknown:
                raise ValueError(f"unknown control(s) {unknown}; allowed: {sorted(CONTROL_FIELDS)}")
            self.session.update(**params)
            reply = {"type": "applied", "params": params}
        except (ValueError, TypeError) as error:
            reply = {"type": "error", "error": str(error)}
        self._send(reply)

    async def _send_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_PERIOD)
            metrics = self.session.metrics.snapshot()
            self._send({"type": "stats", **metrics})

    def _send(self, payload: dict) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(payload))

    async def close(self) -> None:
        """Free the session, stop the tasks, close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.session.close()
        try:
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), timeout=2.0)
        finally:  # even when the close itself is cancelled, the owner forgets this peer
            self._on_closed(self)


class PeerManager:
    """Answers offers and owns every live peer; ``close()`` ends them all."""

    def __init__(self, engine: Engine, video: VideoOptions = VideoOptions(), input_timeout: float = 5.0) -> None:
        self.engine = engine
        self.video = video
        self.input_timeout = input_timeout
        self.peers: set[Peer] = set()
        video.apply()

    async def open_peer(self, on_closed: Callable[[Peer], None] | None = None) -> Peer:
        """A new peer with its own engine session; raises ``EngineBusyError`` at capacity."""
        session = await self.engine.open_session()

        def closed(peer: Peer) -> None:
            self.peers.discard(peer)
            if on_closed is not None:
                on_closed(peer)

        peer = Peer(RTCPeerConnection(), session, closed, self.input_timeout)
        self.peers.add(peer)
        return peer

    async def answer(self, sdp: str, kind: str) -> tuple[RTCSessionDescription, Peer]:
        """Answer a browser's offer; raises :class:`OfferError` (bad offer) or ``EngineBusyError``."""
        check_offer(sdp, kind)
        peer = await self.open_peer()
        await self.negotiate(peer, sdp)
        return peer.pc.localDescription, peer

    async def negotiate(self, peer: Peer, sdp: str, *, send_back: bool = True) -> None:
        """Answer ``sdp`` on ``peer``: its first video track feeds the session, and with ``send_back``
        the stylized video goes back on the same connection. A failure closes the peer."""
        try:
            await self._negotiate(peer, sdp, send_back)
        except BaseException as error:  # cancelled too: the session must not outlive a half-made peer
            await asyncio.shield(peer.close())
            if isinstance(error, OfferError) or not isinstance(error, Exception):
                raise
            raise OfferError(f"could not negotiate this offer: {type(error).__name__}: {error}") from error

    async def _negotiate(self, peer: Peer, sdp: str, send_back: bool) -> None:
        pc = peer.pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and not peer.has_camera:  # the first video track is the camera
                peer.attach_camera(track)
                if send_back:
                    sender = pc.addTrack(StylizedTrack(peer.session))
                    self._prefer_codec(pc, sender)
            else:  # OBS sends audio too: aiortc queues decoded frames without bound unless they are read
                peer.discard(track)

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            peer.attach_channel(channel)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await peer.close()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        if not any(t.kind == "video" for t in pc.getTransceivers()):
            raise OfferError("the offer has no video track to stylize")
        await pc.setLocalDescription(await pc.createAnswer())

    def _prefer_codec(self, pc: RTCPeerConnection, sender) -> None:
        preferred = f"video/{self.video.codec.upper()}"
        codecs = RTCRtpSender.getCapabilities("video").codecs
        ordered = [c for c in codecs if c.mimeType.upper() == preferred.upper()]
        ordered += [c for c in codecs if c not in ordered]
        for transceiver in pc.getTransceivers():
            if transceiver.sender is sender:
                transceiver.setCodecPreferences(ordered)

    async def close(self) -> None:
        await asyncio.gather(*(peer.close() for peer in list(self.peers)), return_exceptions=True)


async def discard_frames(track: MediaStreamTrack) -> None:
    """Read ``track`` until it ends, keeping nothing."""
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


def check_offer(sdp: Any, kind: Any) -> None:
    """Refuse what is not a WebRTC video offer, before any state is created."""
    if kind != "offer":
        raise OfferError(f'"type" must be "offer", got {kind!r}')
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise OfferError('"sdp" must be an SDP offer string starting with "v=0"')
    if len(sdp) > MAX_SDP_BYTES:
        raise OfferError(f"the SDP is larger than {MAX_SDP_BYTES} bytes")
    if "\nm=video" not in sdp.replace("\r\n", "\n"):
        raise OfferError("the offer has no video (m=video) section; diffcam needs a camera track")

