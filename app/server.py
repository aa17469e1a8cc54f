"""The HTTP server: one FastAPI app with ``POST /offer``, ``GET /healthz``, ``GET /metrics``, the UI at ``/``
(or, without the UI, a note at ``/`` listing the endpoints).

``/offer`` takes ``{"sdp", "type"}`` (aiortc's convention) and answers with the same plus the
session id. Bad offers get a 400 with a reason, a full engine a 503; nothing a client sends
can make it answer 500 or stop serving others.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from app.webrtc import OfferError, PeerManager
from app.whip import WhipHub, add_whip_routes
from engine.runtime import Engine
from engine.session import EngineBusyError

log = logging.getLogger(__name__)

MAX_OFFER_BYTES = 200_000


def create_app(engine: Engine, peers: PeerManager, *, auth: tuple[str, str] | None = None,
               start_engine: bool = True) -> FastAPI:
    """The API routes; :func:`app.ui.mount_ui` adds the page. The lifespan starts and stops the engine."""
    hub = WhipHub(peers)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            await engine.start()
        try:
            yield
        finally:
            await hub.close()
            await peers.close()
            if start_engine:
                await engine.aclose()

    app = FastAPI(title="diffcam", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if auth is not None:
        app.add_middleware(BasicAuth, credentials=auth)

    @app.post("/offer")
    async def offer(request: Request) -> Response:
        try:
            body = await _json_body(request)
            answer, peer = await peers.answer(body.get("sdp"), body.get("type"))
        except EngineBusyError as error:
            return JSONResponse({"error": "server busy", "detail": str(error)}, status_code=503)
        except OfferError as error:
            return JSONResponse({"error": "bad offer", "detail": str(error)}, status_code=400)
        return JSONResponse({"sdp": answer.sdp, "type": answer.type, "session": peer.session.id})

    add_whip_routes(app, hub)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "sessions": len(engine.sessions()), "max_sessions": engine.config.max_sessions}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.prometheus(), media_type=CONTENT_TYPE_LATEST)

    return app


#: what a headless server (``--no-ui``) offers, answered at ``/`` so that a visitor is not left with a 404
ENDPOINTS = {
    "POST /offer": "WebRTC signalling: {sdp, type} in, the answer and the session id out",
    "POST /whip": "WHIP ingest (OBS): an SDP offer in, the stream's resource in Location",
    "POST /whep/{stream_id}": "WHEP viewer of a WHIP stream's stylized output",
    "GET /healthz": "liveness and session count",
    "GET /metrics": "Prometheus metrics",
}


def add_headless_index(app: FastAPI) -> None:
    """``GET /``: a JSON note that the page is off (``--no-ui``) and which endpoints there are."""

    @app.get("/")
    async def index() -> dict[str, Any]:
        return {"diffcam": "serving without the page (--no-ui); restart without --no-ui for the camera page",
                "endpoints": ENDPOINTS}


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_OFFER_BYTES:
        raise OfferError(f"the request body is larger than {MAX_OFFER_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OfferError('the body must be JSON: {"sdp": "...", "type": "offer"}') from None
    if not isinstance(body, dict):
        raise OfferError('the body must be a JSON object: {"sdp": "...", "type": "offer"}')
    return body


class BasicAuth:
    """HTTP Basic auth in front of everything but ``/healthz`` (the UI, ``/offer``, ``/metrics``).

    WHIP and WHEP clients (OBS among them) only send bearer tokens: on ``/whip`` and ``/whep``
    ``Authorization: Bearer <password>`` is accepted too.
    """

    def __init__(self, app: ASGIApp, credentials: tuple[str, str]) -> None:
        self.app = app
        self.expected = _basic_token(*credentials)
        self.bearer = f"Bearer {credentials[1]}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") == "/healthz":
            return await self.app(scope, receive, send)
        whip = _is_whip(scope.get("path", ""))
        if whip and scope.get("method") == "OPTIONS":  # CORS preflights carry no credentials
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"").decode("latin-1")
        accepted = [self.expected] + ([self.bearer] if whip else [])
        if any(secrets.compare_digest(header.encode(), token.encode()) for token in accepted):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        scheme = "Bearer" if whip else "Basic"  # WHIP clients authenticate with bearer tokens (RFC 9725)
        response = Response("authentication required", status_code=401,
                            headers={"WWW-Authenticate": f'{scheme} realm="diffcam"'})
        await response(scope, receive, send)


def _is_whip(path: str) -> bool:
    return path == "/whip" or path.startswith(("/whip/", "/whep/"))


def parse_auth(text: str) -> tuple[str, str]:
    """``USER:PASS`` → ``(user, password)``; ``ValueError`` when malformed."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASS with both parts non-empty")
    return user, password


def _basic_token(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


__all__ = ["BasicAuth", "add_headless_index", "create_app", "parse_auth"]
