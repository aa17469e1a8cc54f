"""WebRTC peers: a browser's camera in, its stylized video out, controls over a data channel.

Per peer: aiortc decodes the camera on its own thread; ``MediaRelay(buffered=False)`` keeps only
the newest decoded frame (aiortc's receive queue is unbounded, so a slow consumer would
otherwise fall further and further behind); a feeder task submits each newest frame to the
peer's engine session; :class:`StylizedTrack` hands the session's outputs back to aiortc with
the input's pts. A ``control`` data channel carries parameter updates in (JSON) and live
stats out. Closing the peer, ICE failing or the tab going away frees everything.

What a peer may hold is bounded: every incoming track is read (or refused in the answer); a
watchdog closes a peer whose session closed, that has not connected in ``connect_timeout`` or
whose camera sent nothing for ``input_timeout`` (a peer with no camera at all included); only
its first data channel is a control channel; control messages are size- and rate-limited, and
each gets a short reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs import h264, vpx
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from engine.runtime import Engine
from engine.session import EngineBusyError, FrameError, Session, SessionClosedError

log = logging.getLogger(__name__)

VIDEO_CLOCK = fractions.Fraction(1, 90000)
STATS_PERIOD = 1.0
MAX_SDP_BYTES = 100_000
FIRST_FRAME_TIMEOUT = 20.0
#: seconds a peer may take to reach "connected" (Chromium never sends a=end-of-candidates to end it sooner)
CONNECT_TIMEOUT = 15.0
WATCH_PERIOD = 0.25  # how often a peer's watchdog looks at its session, connection and camera
MAX_CONTROL_CHARS = 16_384  # a control message is a few parameters; prompts are bounded far below this
ECHO_CHARS = 200  # an "applied" reply echoes each value up to this long
ERROR_CHARS = 500  # and an error reply says this much at most
CONTROL_RATE = 30.0  # control messages per second per peer, on average (a slider drag sends ~60/s briefly)
CONTROL_BURST = 60  # and at once
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


@dataclass
class TokenBucket:
    """At most ``burst`` events at once and ``rate`` per second on average."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self) -> bool:
        """Spend one token; False (nothing spent) when there is none."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait(self) -> float:
        """Seconds until a token is available."""
        return max(0.0, (1 - self.tokens) / self.rate - (time.monotonic() - self.stamp))


def parse_control(message: Any) -> dict[str, Any]:
    """A control message's parameters; ``ValueError`` saying what is wrong with it."""
    if len(message) > MAX_CONTROL_CHARS:
        raise ValueError(f"a control message may be at most {MAX_CONTROL_CHARS} characters; "
                         f"this one has {len(message)}")
    try:
        params = json.loads(message)
    except RecursionError:
        raise ValueError("the control message is nested too deeply; send a flat JSON object") from None
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"a control message must be a JSON object: {error}") from None
    if not isinstance(params, dict):
        raise ValueError("a control message is a JSON object of parameters")
    unknown = sorted(set(params) - CONTROL_FIELDS)
    if unknown:
        raise ValueError(f"unknown control(s) {unknown}; allowed: {sorted(CONTROL_FIELDS)}")
    return params


def clipped(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters: a reply never echoes unbounded input."""
    return text if len(text) <= limit else text[:limit] + "…"


def echo(params: dict[str, Any]) -> dict[str, Any]:
    """What an "applied" reply says was applied: short values as sent, long ones cut (as JSON text)."""
    shown = {}
    for key, value in params.items():
        text = json.dumps(value)
        shown[key] = value if len(text) <= ECHO_CHARS else clipped(text, ECHO_CHARS)
    return shown


def apply_control(session: Session, message: Any) -> dict[str, Any]:
    """Apply one control message (JSON text) to ``session``; the reply, always short: ``applied`` with
    the values, or ``error`` with why and the ``fields`` of the refused message (none when it did not
    parse), so that a page can show it beside its control."""
    fields: list[str] = []
    try:
        params = parse_control(message)
        fields = sorted(params)
        shown = echo(params)
        session.update(**params)
        return {"type": "applied", "params": shown}
    except (ValueError, TypeError, RecursionError) as error:
        return {"type": "error", "error": clipped(str(error), ERROR_CHARS), "fields": fields}
    except Exception as error:  # noqa: BLE001 - errors are data: the peer and its stream go on
        log.exception("control message failed on session %s", session.id)
        return {"type": "error", "error": clipped(f"{type(error).__name__}: {error}", ERROR_CHARS), "fields": fields}


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

    def __init__(self, pc: RTCPeerConnection, session: Session, on_closed, input_timeout: float = 5.0,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.pc = pc
        self.input_timeout = input_timeout
        self.session = session
        self.channel = None
        self._tasks: set[asyncio.Task] = set()
        self._relay = MediaRelay()
        self._on_closed = on_closed
        self._closed = False
        self.errors = 0
        self.connect_timeout = connect_timeout
        self._connect_by = self._input_by = math.inf  # set when the offer is answered (start_watchdog)
        self._connected = False
        self._controls = TokenBucket(CONTROL_RATE, CONTROL_BURST)
        self._throttled = False
        self._deferred: Any = None  # the newest control message that came too fast; applied when the rate allows
        self._deferred_timer: asyncio.TimerHandle | None = None
        #: the secret that closes this peer over HTTP (a page's beacon as its tab goes away)
        self.token = secrets.token_urlsafe(16)

    def spawn(self, coroutine, name: str) -> None:
        if self._closed:  # nobody would cancel it
            coroutine.close()
            return
        task = asyncio.create_task(coroutine, name=f"{name}-{self.session.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def has_camera(self) -> bool:
        return any(task.get_name().startswith("feed-") for task in self._tasks)

    def attach_camera(self, track: MediaStreamTrack) -> None:
        newest = self._relay.subscribe(track, buffered=False)
        # the first frame waits for ICE, DTLS and a keyframe too (OBS may send one every few seconds)
        self._input_by = time.monotonic() + max(self.input_timeout, FIRST_FRAME_TIMEOUT)
        self.spawn(self._feed(newest), "feed")

    def start_watchdog(self) -> None:
        """From the answer on, close this peer when it outlives its purpose (see :meth:`_expired`)."""
        now = time.monotonic()
        self._connect_by = now + self.connect_timeout
        if not self.has_camera:  # a peer without a camera is closed like one whose camera stopped
            self._input_by = now + self.input_timeout
        self.spawn(self._watch(), "watch")

    async def _watch(self) -> None:
        while (reason := self._expired()) is None:
            await asyncio.sleep(WATCH_PERIOD)
        log.info("closing peer of session %s: %s", self.session.id, reason)
        await self.close()

    def _expired(self) -> str | None:
        """Why this peer should close now, or None: a camera that stops (tab gone, network lost) or never
        comes, or a connection that never completes, ends the peer long before ICE gives up."""
        now = time.monotonic()
        self._connected = self._connected or self.pc.connectionState == "connected"
        if self.session.closed:
            return "its session closed"
        if not self._connected and now > self._connect_by:
            return "not connected in time"
        if now > self._input_by:
            return "no camera frames in time"
        return None

    async def _feed(self, track: MediaStreamTrack) -> None:
        """Submit every newest camera frame to the engine; it converts to RGB only the frames it takes."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                await self.close()
                return
            self._input_by = time.monotonic() + self.input_timeout
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
        """The first data channel carries the controls; any other is closed (each would cost a stats task)."""
        if self.channel is not None:
            channel.close()
            return
        self.channel = channel
        channel.on("message", self._on_message)
        self.spawn(self._send_stats(), "stats")

    def _on_message(self, message: Any) -> None:
        """Apply at most ``CONTROL_RATE`` messages a second; of those that come faster, the newest waits
        for its turn (a slider drag ends where it stopped) and the others are dropped, with one error."""
        if self._deferred_timer is not None or not self._controls.take():
            self._defer(message)
            return
        self._throttled = False
        self._send(self._reply(message))

    def _defer(self, message: Any) -> None:
        self._deferred = message
        if not self._throttled:
            self._throttled = True
            self._send({"type": "error", "error": f"more than {CONTROL_RATE:g} control messages per second: "
                                                  "the newest is applied shortly, the others are dropped"})
        if self._deferred_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._deferred_timer = loop.call_later(self._controls.wait(), self._apply_deferred)

    def _apply_deferred(self) -> None:
        self._deferred_timer = None
        message, self._deferred = self._deferred, None
        if self._controls.take():
            self._send(self._reply(message))
        else:
            self._defer(message)

    def _reply(self, message: Any) -> dict[str, Any]:
        return apply_control(self.session, message)

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
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
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

    def __init__(self, engine: Engine, video: VideoOptions = VideoOptions(), input_timeout: float = 5.0,
                 connect_timeout: float = CONNECT_TIMEOUT, ice_servers: Sequence[IceServer] = ()) -> None:
        self.engine = engine
        self.video = video
        self.input_timeout = input_timeout
        self.connect_timeout = connect_timeout
        self.ice_servers = tuple(ice_servers)
        self.peers: set[Peer] = set()
        self._by_token: dict[str, Peer] = {}
        self._opening = 0
        video.apply()

    def peer_connection(self) -> RTCPeerConnection:
        """A server-side peer connection with this server's STUN/TURN servers (``--ice-server``)."""
        return peer_connection(self.ice_servers)

    async def close_by_token(self, token: str) -> bool:
        """Close the peer whose close token is ``token`` (a page going away); False if there is none."""
        peer = self._by_token.get(token)
        if peer is None:
            return False
        await peer.close()
        return True

    async def open_peer(self, on_closed: Callable[[Peer], None] | None = None) -> Peer:
        """A new peer with its own engine session; raises ``EngineBusyError`` at capacity.

        Capacity counts peers (closing ones included), not only sessions: a peer outlives its session
        until its watchdog closes it, and must hold its slot until then."""
        limit = self.engine.config.max_sessions
        if len(self.peers) + self._opening >= limit:
            self.engine.metrics.sessions_rejected += 1
            raise EngineBusyError(f"all {limit} sessions are in use; try again later")
        self._opening += 1
        try:
            session = await self.engine.open_session()
        finally:
            self._opening -= 1

        def closed(peer: Peer) -> None:
            self.peers.discard(peer)
            self._by_token.pop(peer.token, None)
            if on_closed is not None:
                on_closed(peer)

        peer = Peer(self.peer_connection(), session, closed, self.input_timeout, self.connect_timeout)
        self.peers.add(peer)
        self._by_token[peer.token] = peer
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
            peer.start_watchdog()
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


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server (``--ice-server URL[,USER,CREDENTIAL]``), for aiortc and for the page."""

    url: str
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, text: str) -> IceServer:
        url, *login = (part.strip() for part in text.split(","))
        scheme = url.partition(":")[0].lower()
        if scheme not in ICE_SCHEMES or not url.partition(":")[2]:
            raise ValueError(f"--ice-server {url!r} is not a STUN or TURN URL; allowed: stun:host[:port], "
                             "turn:host[:port][?transport=udp|tcp], stuns:, turns:")
        if scheme.startswith("turn") and len(login) != 2:
            raise ValueError(f"--ice-server {url!r}: a TURN server needs a user and a credential: "
                             "turn:host:3478,USER,CREDENTIAL")
        if len(login) not in (0, 2) or not all(login):
            raise ValueError(f"--ice-server {text!r}: write URL or URL,USER,CREDENTIAL")
        return cls(url, *login) if login else cls(url)

    def for_aiortc(self) -> RTCIceServer:
        return RTCIceServer(urls=self.url, username=self.username, credential=self.credential)

    def for_browser(self) -> dict[str, str]:
        """As ``RTCPeerConnection``'s ``iceServers`` takes it."""
        entry = {"urls": self.url}
        if self.username is not None:
            entry |= {"username": self.username, "credential": self.credential or ""}
        return entry


ICE_SCHEMES = ("stun", "stuns", "turn", "turns")


def peer_connection(ice_servers: Sequence[IceServer] = ()) -> RTCPeerConnection:
    """A server-side peer connection. With no ``ice_servers`` (the default) it uses no STUN or TURN
    server: aiortc would otherwise ask a public STUN server on every offer. The server then answers
    with its own addresses (host candidates); a browser behind NAT still connects through its own
    server-reflexive candidates, and ``--ice-server`` adds STUN/TURN where that is not enough."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[server.for_aiortc() for server in ice_servers]))


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

