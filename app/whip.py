"""WHIP in, WHEP out: OBS (or any WHIP client) publishes a camera, WHEP players watch it stylized.

WHIP (RFC 9725): ``POST /whip`` with an SDP offer (``application/sdp``) answers ``201 Created``
with the SDP answer and ``Location: /whip/<id>``; ``DELETE`` on that URL ends the stream. The
publisher's video becomes an engine session, exactly like a browser camera. WHEP: ``POST
/whep/<id>`` with a receive-only offer answers with the stylized video of stream ``<id>``;
``DELETE /whep/<id>/<viewer>`` ends that viewer. Any number of players (up to a limit) watch
one stream through ``MediaRelay(buffered=False)``: each gets the newest frame, a slow one drops
frames instead of delaying the others. Ids are unguessable tokens; only published streams can
be watched. ICE is not trickled (aiortc gathers every candidate first), so ``PATCH`` is 405.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

import av
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.sdp_limits import BodyTooLarge, check_sdp_shape, media_type, read_body
from app.webrtc import MAX_SDP_BYTES, OfferError, Peer, PeerManager, StylizedTrack, check_offer, discard_frames
from engine.session import EngineBusyError, Session

log = logging.getLogger(__name__)

MAX_VIEWERS = 8
#: the stream id that names the stream started last (see :meth:`WhipHub.resolve`)
LATEST = "latest"


class NotFound(LookupError):
    """No such stream or viewer (HTTP 404)."""


class TooManyViewers(RuntimeError):
    """The stream has ``MAX_VIEWERS`` players already (HTTP 503)."""


@dataclass
class Published:
    """One live stream: what feeds it (a WHIP publisher, or a local source), its stylized output
    shared out, and who watches."""

    kind: str  # "whip" (a WHIP publisher such as OBS) or "source" (a camera, file or URL on the server)
    name: str
    session: Session
    output: StylizedTrack
    publisher: Peer | None = None  # the WHIP peer; None for a local source
    relay: MediaRelay = field(default_factory=MediaRelay)
    viewers: dict[str, RTCPeerConnection] = field(default_factory=dict)
    drain: asyncio.Task | None = None
    #: per viewer, when it is dropped unless connected by then
    deadlines: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    live: bool = False  # announced to the listeners (negotiated, or a local source registered)

    def describe(self, stream_id: str) -> dict[str, Any]:
        """What ``GET /streams`` says about it: where to watch it and the parameters it runs with now."""
        config = self.session.config
        params = {name: getattr(config, name) for name in SHOWN_PARAMS}
        params["t_index_list"] = list(config.t_index_list)
        if not isinstance(config.prompt, str):  # a blend: [[text, weight], ...]
            params["prompt"] = [list(part) for part in config.prompt]
        return {"id": stream_id, "kind": self.kind, "name": self.name, "viewers": len(self.viewers),
                "seconds": round(time.monotonic() - self.started, 1),
                "whep": f"/whep/{stream_id}", "view": f"/view/{stream_id}", "params": params}


#: the parameters ``GET /streams`` shows for each stream (those a page or a script may change)
SHOWN_PARAMS = ("prompt", "negative_prompt", "guidance_scale", "delta", "seed", "similarity_filter",
                "similarity_threshold")


#: called on the event loop when a stream starts or ends: (stream id, the stream)
Listener = Callable[[str, Published], None]


class FrameCopies(MediaStreamTrack):
    """Each player its own copy of every frame.

    aiortc's encoders convert the frame they are given to yuv420p (through a converter cached
    on the frame) and may mark it as a keyframe, in executor threads; two players encoding the
    one frame a relay hands out would do both at once, which crashed the process in testing.
    """

    kind = "video"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source

    async def recv(self) -> av.VideoFrame:
        frame = await self.source.recv()
        copy = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
        copy.pts, copy.time_base = frame.pts, frame.time_base
        return copy

    def stop(self) -> None:
        super().stop()
        self.source.stop()


class WhipHub:
    """Every live stream (WHIP publishers and local sources) and WHEP viewer, by id; ``close()`` ends them all."""

    def __init__(self, peers: PeerManager) -> None:
        self.peers = peers
        self.streams: dict[str, Published] = {}
        self._tasks: set[asyncio.Task] = set()
        self._listeners: list[tuple[Listener, Listener]] = []
        #: whether ``latest`` names the newest stream; only where streams may be listed, since an id is
        #: otherwise what lets one watch a stream
        self.latest_allowed = False

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def add_listener(self, on_start: Listener, on_end: Listener) -> None:
        """Be told (on the event loop) when any stream starts and ends; a listener that raises is logged."""
        self._listeners.append((on_start, on_end))

    def _tell(self, which: int, stream_id: str, published: Published) -> None:
        for listener in self._listeners:
            try:
                listener[which](stream_id, published)
            except Exception:  # noqa: BLE001 - a listener never breaks a stream
                log.exception("stream listener failed for %s", stream_id)

    async def publish(self, sdp: str) -> tuple[str, str]:
        """Answer a publisher's offer; returns (stream id, SDP answer)."""
        check_offer(sdp, "offer")
        stream_id = secrets.token_urlsafe(16)
        peer = await self.peers.open_peer(lambda _: self._forget(stream_id))
        self.streams[stream_id] = published = Published("whip", "WHIP", peer.session, StylizedTrack(peer.session),
                                                        publisher=peer)
        await self.peers.negotiate(peer, sdp, send_back=False)  # WHIP is send-only: players use WHEP
        if stream_id not in self.streams or peer.session.closed:  # the publisher went while we answered
            raise OfferError("the publisher's connection closed during negotiation")
        self._start(stream_id, published)
        return stream_id, peer.pc.localDescription.sdp

    async def publish_local(self, session: Session, name: str) -> str:
        """A stream fed by ``session`` (a camera, file or URL read on the server); returns its id.

        Its output is relayed like a WHIP stream's (WHEP players, ``/view``); closing the session ends it."""
        stream_id = secrets.token_urlsafe(16)
        self.streams[stream_id] = published = Published("source", name, session, StylizedTrack(session))
        self._start(stream_id, published)
        return stream_id

    def _start(self, stream_id: str, published: Published) -> None:
        # Read the output even with nobody watching: the session stays live (the engine reaps
        # sessions nobody reads) and the first player gets the newest frame at once. When the
        # output ends (the session closed), so does the stream.
        published.drain = self._spawn(discard_frames(published.relay.subscribe(published.output, buffered=False)))
        published.drain.add_done_callback(lambda _: self._forget(stream_id))
        published.live = True
        self._tell(0, stream_id, published)

    def subscribe(self, stream_id: str) -> MediaStreamTrack:
        """The newest stylized frame of stream ``stream_id``, at each ``recv`` (a slow reader skips frames);
        it ends with the stream. ``stop()`` it when done."""
        published = self._stream(stream_id)
        return published.relay.subscribe(published.output, buffered=False)

    def resolve(self, stream_id: str) -> str:
        """``stream_id`` itself, or for ``latest`` (where allowed: see ``latest_allowed``) the id of the stream
        that started last: a player with one fixed URL (an OBS Browser Source) follows each new stream."""
        if stream_id != LATEST:
            return stream_id
        if not self.latest_allowed:
            raise NotFound(f"'{LATEST}' is not served here: use the stream's own id (printed when it starts), "
                           "or start the server with --auth")
        if not self.streams:
            raise NotFound("no stream is live")
        return max(self.streams, key=lambda live: self.streams[live].started)

    async def watch(self, stream_id: str, sdp: str) -> tuple[str, str]:
        """Answer a player's receive-only offer with stream ``stream_id`` (or :meth:`resolve`'s ``latest``);
        returns (``<stream id>/<viewer id>``, the player's resource under ``/whep/``, and the SDP answer)."""
        stream_id = self.resolve(stream_id)
        published = self._stream(stream_id)
        check_offer(sdp, "offer")
        if len(published.viewers) >= MAX_VIEWERS:
            raise TooManyViewers(f"stream has {MAX_VIEWERS} players already")
        viewer_id, pc = secrets.token_urlsafe(16), self.peers.peer_connection()
        published.viewers[viewer_id] = pc
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            pc.addTrack(FrameCopies(published.relay.subscribe(published.output, buffered=False)))
            self._send_only(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException as error:
            await asyncio.shield(self._drop_viewer(published, viewer_id))
            if not isinstance(error, Exception):
                raise
            raise OfferError(f"could not negotiate this offer: {type(error).__name__}: {error}") from error
        if self.streams.get(stream_id) is not published:  # the stream ended while we answered
            await self._drop_viewer(published, viewer_id)
            raise NotFound("the stream ended")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                self._cancel_deadline(published, viewer_id)
            if pc.connectionState in ("failed", "closed"):
                await self._drop_viewer(published, viewer_id)

        pc.on("datachannel", lambda channel: channel.close())  # a player has nothing to control
        published.deadlines[viewer_id] = asyncio.get_running_loop().call_later(
            self.peers.connect_timeout, self._drop_unconnected, published, viewer_id)
        return f"{stream_id}/{viewer_id}", pc.localDescription.sdp

    @staticmethod
    def _send_only(pc: RTCPeerConnection) -> None:
        """Answer a player send-only: what it offers to send is refused, so aiortc never starts a receiver
        that would decode it into a queue nobody reads."""
        for transceiver in pc.getTransceivers():
            transceiver.direction = "sendonly" if transceiver.sender.track is not None else "inactive"

    def _drop_unconnected(self, published: Published, viewer_id: str) -> None:
        """A player that has not connected in time gives its slot back (ICE may never finish, or fail)."""
        published.deadlines.pop(viewer_id, None)
        pc = published.viewers.get(viewer_id)
        if pc is not None and pc.connectionState != "connected":
            self._spawn(self._drop_viewer(published, viewer_id))

    @staticmethod
    def _cancel_deadline(published: Published, viewer_id: str) -> None:
        deadline = published.deadlines.pop(viewer_id, None)
        if deadline is not None:
            deadline.cancel()

    async def stop_watching(self, stream_id: str, viewer_id: str) -> None:
        if not await self._drop_viewer(self._stream(stream_id), viewer_id):
            raise NotFound(f"no viewer {viewer_id!r} on this stream")

    async def _drop_viewer(self, published: Published, viewer_id: str) -> bool:
        """Close one player; False when it was gone already (closing twice is no error)."""
        self._cancel_deadline(published, viewer_id)
        pc = published.viewers.pop(viewer_id, None)
        if pc is None:
            return False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pc.close(), 2.0)
        return True

    async def unpublish(self, stream_id: str) -> None:
        """End a stream: its publisher, its session and every player."""
        published = self._stream(stream_id)
        if published.publisher is not None:
            await published.publisher.close()
        else:
            published.session.close()
            self._forget(stream_id)

    async def close(self) -> None:
        """End every stream and player, and wait (briefly) for what that started."""
        await asyncio.gather(*(self.unpublish(s) for s in list(self.streams)), return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 3.0)

    def _stream(self, stream_id: str) -> Published:
        if stream_id not in self.streams:
            raise NotFound("no such stream (ended, or never published)")
        return self.streams[stream_id]

    def _forget(self, stream_id: str) -> None:
        """The stream ended (DELETE, its publisher vanished or failed, its session closed): stop the drain
        and every player, and tell the listeners. Idempotent."""
        published = self.streams.pop(stream_id, None)
        if published is None:
            return
        if published.drain is not None:
            published.drain.cancel()  # the relay's own reader ends with the output track below
        published.output.stop()
        for deadline in published.deadlines.values():
            deadline.cancel()
        for pc in published.viewers.values():
            self._spawn(pc.close())
        if published.live:
            self._tell(1, stream_id, published)


SDP = "application/sdp"
#: What a WHIP/WHEP page on another origin may do; none may unless :class:`AllowOrigins` names its
#: origin (``--cors-origin``), since only that adds ``Access-Control-Allow-Origin``.
CORS = {
    "Access-Control-Allow-Methods": "POST, DELETE, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location, Link",
}


def is_whip_path(path: str) -> bool:
    return path == "/whip" or path.startswith(("/whip/", "/whep/"))


class AllowOrigins:
    """Cross-origin access to WHIP and WHEP for pages from ``origins`` only (``*``: any site).

    Browser players may live on other origins; credentials are bearer tokens, not cookies, so
    no ``Allow-Credentials``. Every other path, and every other origin, gets no CORS grant.
    """

    def __init__(self, app: ASGIApp, origins: Collection[str]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        granted = self._granted(scope)
        if granted is None:
            return await self.app(scope, receive, send)

        async def send_granted(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Access-Control-Allow-Origin"] = granted
                headers.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_granted)

    def _granted(self, scope: Scope) -> str | None:
        """The ``Access-Control-Allow-Origin`` this request gets, or None."""
        if scope["type"] != "http" or not is_whip_path(scope["path"]):
            return None
        if "*" in self.origins:
            return "*"
        origin = Headers(scope=scope).get("origin")
        return origin if origin in self.origins else None


def add_whip_routes(app: FastAPI, hub: WhipHub, cors_origins: Collection[str] = ()) -> None:
    """``/whip`` and ``/whep``: SDP in, SDP out, resources by ``Location`` (RFC 9725 and WHEP).

    Pages from ``cors_origins`` (none by default) may call them cross-origin.
    """
    if cors_origins:
        app.add_middleware(AllowOrigins, origins=cors_origins)

    @app.post("/whip")
    @app.post("/whip/")  # a trailing slash is easy to paste into OBS
    async def whip(request: Request) -> Response:
        return await _created(request, hub.publish, lambda stream_id: f"/whip/{stream_id}",
                              lambda stream_id: {"Link": f'</whep/{stream_id}>; rel="alternate"'})

    @app.options("/whip")
    @app.options("/whip/")
    @app.options("/whip/{stream_id}")
    @app.options("/whep/{stream_id}")
    @app.options("/whep/{stream_id}/{viewer_id}")
    async def preflight() -> Response:  # CORS for browser players; Accept-Post as RFC 9725 asks
        return Response(status_code=204, headers={**CORS, "Accept-Post": SDP})

    for path, allowed in (("/whip", "POST, OPTIONS"), ("/whep/{stream_id}", "POST, OPTIONS"),
                          ("/whip/{stream_id}", "DELETE, PATCH, OPTIONS"),
                          ("/whep/{stream_id}/{viewer_id}", "DELETE, PATCH, OPTIONS")):
        methods = sorted({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH"} - set(allowed.split(", ")))
        app.add_api_route(path, _not_allowed(allowed), methods=methods, include_in_schema=False)

    @app.delete("/whip/{stream_id}")
    async def whip_delete(stream_id: str) -> Response:
        return await _deleted(hub.unpublish(stream_id))

    @app.post("/whep/{stream_id}")
    async def whep(stream_id: str, request: Request) -> Response:
        return await _created(request, lambda sdp: hub.watch(stream_id, sdp), lambda viewer: f"/whep/{viewer}")

    @app.delete("/whep/{stream_id}/{viewer_id}")
    async def whep_delete(stream_id: str, viewer_id: str) -> Response:
        return await _deleted(hub.stop_watching(stream_id, viewer_id))

    @app.patch("/whip/{stream_id}")
    @app.patch("/whep/{stream_id}/{viewer_id}")
    async def no_trickle() -> Response:  # every candidate is in the answer already
        return _problem(405, "trickle ICE is not supported: the answer carries every candidate",
                        {"Allow": "DELETE, OPTIONS"})


def _not_allowed(allowed: str):
    async def refuse(request: Request) -> Response:
        return _problem(405, f"{request.method} is not allowed here; allowed: {allowed}", {"Allow": allowed})

    return refuse


async def _created(request: Request, answer, location, extra=lambda _: {}) -> Response:
    if media_type(request) != SDP:
        return _problem(415, f"the body must be an SDP offer with Content-Type: {SDP}")
    try:
        offer = (await read_body(request, MAX_SDP_BYTES)).decode("utf-8", errors="replace")
    except BodyTooLarge as error:  # and close: the rest of the body is never read
        return _problem(413, f"the SDP offer is too large: {error}", {"Connection": "close"})
    try:
        check_sdp_shape(offer)  # before aiortc (or even the stream lookup) spends anything on it
        resource, sdp = await answer(offer)
    except NotFound as error:
        return _problem(404, str(error))
    except (EngineBusyError, TooManyViewers) as error:
        return _problem(503, f"server busy: {error}")
    except OfferError as error:
        return _problem(400, f"bad offer: {error}")
    return Response(sdp, status_code=201, media_type=SDP,
                    headers={**CORS, "Location": location(resource), **extra(resource)})


async def _deleted(closing) -> Response:
    try:
        await closing
    except NotFound as error:
        return _problem(404, str(error))
    return Response(status_code=200, headers=CORS)


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(detail + "\n", status_code=status, media_type="text/plain", headers={**CORS, **(headers or {})})
