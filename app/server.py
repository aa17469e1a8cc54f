"""The HTTP server: one FastAPI app with ``POST /offer``, ``GET /healthz``, ``GET /metrics``, the UI at ``/``
(or, without the UI, a note at ``/`` listing the endpoints).

``/offer`` takes ``{"sdp", "type"}`` (aiortc's convention, as ``application/json``) and answers
with the same plus the session id. Bad offers get a 400 with a reason, a body over the limit a
413 (read no further), a full engine a 503; nothing a client sends can make it answer 500 or
stop serving others. Only the names the server listens on are answered to (``Host``), which
keeps pages on other sites from reaching a server on 127.0.0.1 through DNS rebinding.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncContextManager, AsyncIterator, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app.sdp_limits import BodyTooLarge, check_sdp_shape, media_type, read_body
from app.webrtc import OfferError, PeerManager
from app.streams import add_stream_routes
from app.whip import WhipHub, add_whip_routes, is_whip_path
from engine.runtime import Engine
from engine.session import EngineBusyError

if TYPE_CHECKING:
    from app.virtualcam import VirtualCamera

log = logging.getLogger(__name__)

#: something that runs beside the server while it serves, given the stream hub (a local source, the virtual camera)
Attachment = Callable[[WhipHub], AsyncContextManager[None]]
#: the JSON body of ``/offer``: an SDP of up to ``MAX_SDP_BYTES``, escaped
MAX_OFFER_BYTES = 200_000
#: what a server on loopback answers to, as ``Host`` writes them; any other name is a DNS-rebinding page
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def binds_every_interface(host: str) -> bool:
    """Whether listening on ``host`` listens on every interface: 0.0.0.0 and ::, and their other
    spellings that the socket layer takes as well (``""``, ``0``, ``::0``, ``0.0.0``)."""
    host = host.strip().strip("[]")
    if not host:
        return True
    try:
        addresses = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):  # a name, not an address: it is not every interface
        return False
    return any(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_unspecified for info in addresses)


def check_origin(origin: str) -> str:
    """``--cors-origin``: ``*`` or a web origin ``scheme://host[:port]``, lower-cased as browsers send it."""
    parts = urlsplit(origin)
    try:
        valid = origin == "*" or (parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.path
                                  and not parts.query and not parts.fragment and "@" not in parts.netloc
                                  and (parts.port is None or parts.port > 0))
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise ValueError(f"--cors-origin {origin!r} is not a web origin; allowed: http(s)://host[:port] "
                         "with no path (as a browser sends it in Origin), or * for any site")
    return origin.lower()


@dataclass(frozen=True)
class Exposure:
    """Who may reach the server: the ``Host`` names it answers to (None: any) and the web origins
    whose pages may call WHIP and WHEP (none by default; ``*`` for any)."""

    hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(check_origin(o) for o in self.cors_origins))

    @classmethod
    def bound_to(cls, host: str, cors_origins: Iterable[str] = (), *, public: bool = False) -> Exposure:
        """The exposure of a server listening on ``host``; ``public`` (a share link) answers to any name."""
        if public or binds_every_interface(host):  # reached by whatever name the network gives it
            return cls(hosts=None, cors_origins=tuple(cors_origins))
        name = host.strip().lower()
        if ":" in name and not name.startswith("["):  # an IPv6 literal, as Host writes one
            name = f"[{name}]"
        return cls(hosts=tuple(dict.fromkeys(LOOPBACK_HOSTS + (name,))), cors_origins=tuple(cors_origins))


def create_app(engine: Engine, peers: PeerManager, *, auth: tuple[str, str] | None = None,
               exposure: Exposure = Exposure(), start_engine: bool = True, listed: bool | None = None,
               attachments: Sequence[Attachment] = (), virtual_camera: VirtualCamera | None = None) -> FastAPI:
    """The API routes; :func:`app.ui.mount_ui` adds the page. The lifespan starts and stops the engine.

    ``exposure``: the ``Host`` names answered to and the origins allowed cross-origin (default:
    loopback names only, no other site). ``listed``: whether ``GET /streams`` lists the live streams
    (default: with ``auth``, or on a loopback-only server). ``attachments`` run beside the server
    once the engine has started (local sources, the virtual camera), each given the stream hub;
    ``virtual_camera`` (``--virtual-cam``) is told which stream to show over ``/virtual-cam``.
    """
    hub = WhipHub(peers)
    if listed is None:
        listed = auth is not None or exposure.hosts == LOOPBACK_HOSTS
    hub.latest_allowed = listed

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            await engine.start()
        try:
            async with contextlib.AsyncExitStack() as attached:
                for attach in attachments:
                    await attached.enter_async_context(attach(hub))
                yield
        finally:
            await hub.close()
            await peers.close()
            if start_engine:
                await engine.aclose()

    app = FastAPI(title="diffcam", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.state.streams_listed = listed
    if auth is not None:
        app.add_middleware(BasicAuth, credentials=auth)

    @app.post("/offer")
    async def offer(request: Request) -> Response:
        if media_type(request) != "application/json":  # a page on another site can post text/plain, not JSON
            return JSONResponse({"error": "unsupported media type",
                                 "detail": 'the body must be JSON, sent as Content-Type: application/json'},
                                status_code=415)
        try:
            body = await _json_body(request)
            if isinstance(body.get("sdp"), str):
                check_sdp_shape(body["sdp"])
            answer, peer = await peers.answer(body.get("sdp"), body.get("type"))
        except BodyTooLarge as error:  # and close: the rest of the body is never read
            return JSONResponse({"error": "too large", "detail": str(error)}, status_code=413,
                                headers={"Connection": "close"})
        except EngineBusyError as error:
            return JSONResponse({"error": "server busy", "detail": str(error)}, status_code=503)
        except OfferError as error:
            return JSONResponse({"error": "bad offer", "detail": str(error)}, status_code=400)
        return JSONResponse({"sdp": answer.sdp, "type": answer.type, "session": peer.session.id,
                             "close": f"/offer/{peer.token}"})

    @app.post("/offer/{token}")  # a page's beacon as its tab goes away (sendBeacon can only POST)
    @app.delete("/offer/{token}")
    async def close_offer(token: str) -> Response:
        if not await peers.close_by_token(token):
            return JSONResponse({"error": "not found", "detail": "no such session (closed already?)"},
                                status_code=404)
        return Response(status_code=204)

    add_whip_routes(app, hub, exposure.cors_origins)
    add_stream_routes(app, hub, listed=listed, virtual_camera=virtual_camera)

    @app.get("/healthz")
    async def healthz() -> Response:
        """200 while the engine can serve; 503 saying why when it cannot (a device that hangs, every device
        process dead), so that a supervisor (Docker's HEALTHCHECK, Kubernetes) restarts it."""
        health = {"status": "ok", "sessions": len(engine.sessions()), "max_sessions": engine.config.max_sessions}
        trouble = engine.trouble()
        if trouble is not None:
            return JSONResponse(health | {"status": "failing", "detail": trouble}, status_code=503)
        return JSONResponse(health)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.prometheus(), media_type=CONTENT_TYPE_LATEST)

    if exposure.hosts is not None:  # added last, so it runs first: before auth and every route
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(exposure.hosts), www_redirect=False)
    return app


#: what a headless server (``--no-ui``) offers, answered at ``/`` so that a visitor is not left with a 404
ENDPOINTS = {
    "POST /offer": "WebRTC signalling: {sdp, type} in, the answer, the session id and its close URL out",
    "POST /whip": "WHIP ingest (OBS): an SDP offer in, the stream's resource in Location",
    "POST /whep/{stream_id}": "WHEP viewer of a stream's stylized output",
    "GET /view/{stream_id}": "a full-window player of a stream (OBS Browser Source)",
    "GET /streams": "the live streams (WHIP and --source): their WHEP and view URLs and parameters",
    "POST /streams/{stream_id}/params": "change a stream's prompt, strength, guidance, seed… (JSON)",
    "GET, PUT /virtual-cam": "what the virtual camera shows (--virtual-cam); PUT {\"stream\": id or null}",
    "GET /healthz": "liveness and session count; 503 saying why when nothing can be served (a GPU that hangs)",
    "GET /metrics": "Prometheus metrics",
}


def add_headless_index(app: FastAPI) -> None:
    """``GET /``: a JSON note that the page is off (``--no-ui``) and which endpoints there are."""

    @app.get("/")
    async def index() -> dict[str, Any]:
        return {"diffcam": "serving without the page (--no-ui); restart without --no-ui for the camera page",
                "endpoints": ENDPOINTS}


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, MAX_OFFER_BYTES)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON or UTF-8, an integer past 4,300 digits, nesting past the stack
        raise OfferError('the body must be JSON: {"sdp": "...", "type": "offer"}') from None
    if not isinstance(body, dict):
        raise OfferError('the body must be a JSON object: {"sdp": "...", "type": "offer"}')
    return body


class BasicAuth:
    """HTTP Basic auth in front of everything but ``/healthz`` and the ``/view`` player page (the UI,
    ``/offer``, ``/metrics``, the streams).

    WHIP and WHEP clients (OBS among them) only send bearer tokens: on ``/whip`` and ``/whep``
    ``Authorization: Bearer <password>`` is accepted too, and on ``/client-config``, which the player
    page (an OBS Browser Source cannot answer a password prompt) reads with the token of its URL's
    fragment. The player page itself holds nothing: it is served to anyone. Schemes are
    case-insensitive (RFC 9110); credentials are compared as UTF-8 bytes, so a password need not be ASCII.
    """

    def __init__(self, app: ASGIApp, credentials: tuple[str, str]) -> None:
        self.app = app
        self.tokens = {"basic": _basic_token(*credentials), "bearer": credentials[1].encode()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or _open_to_all(scope):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        whip = is_whip_path(path)
        if whip and scope.get("method") == "OPTIONS":  # CORS preflights carry no credentials
            return await self.app(scope, receive, send)
        scheme, token = _authorization(scope)
        accepted = ("basic", "bearer") if whip or path == "/client-config" else ("basic",)
        if scheme in accepted and secrets.compare_digest(token, self.tokens[scheme]):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        scheme = "Bearer" if whip else "Basic"  # WHIP clients authenticate with bearer tokens (RFC 9725)
        response = Response("authentication required", status_code=401,
                            headers={"WWW-Authenticate": f'{scheme} realm="diffcam"'})
        await response(scope, receive, send)


def _open_to_all(scope: Scope) -> bool:
    """``/healthz``, and the player page (static: it asks for the stream with its own token)."""
    path = scope.get("path", "")
    return path == "/healthz" or (scope.get("method") in ("GET", "HEAD") and path.startswith("/view/"))


def _authorization(scope: Scope) -> tuple[str, bytes]:
    """``Authorization``'s scheme, lower-cased, and its credentials as sent (bytes)."""
    header = dict(scope.get("headers", [])).get(b"authorization", b"")
    scheme, _, token = header.strip().partition(b" ")
    return scheme.decode("latin-1").lower(), token.strip()


def parse_auth(text: str) -> tuple[str, str]:
    """``USER:PASS`` → ``(user, password)``; ``ValueError`` when malformed."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASS with both parts non-empty")
    return user, password


def _basic_token(user: str, password: str) -> bytes:
    return base64.b64encode(f"{user}:{password}".encode())


__all__ = ["BasicAuth", "Exposure", "add_headless_index", "binds_every_interface", "check_origin", "create_app",
           "parse_auth"]
