"""What the page and players need besides signalling: the live streams, steering one, the player page.

``GET /client-config``: the ICE servers a page's peer connections use (``--ice-server``) and
whether it may list streams. ``GET /streams``: the live streams (WHIP publishers and local
sources) with their WHEP and ``/view`` URLs, to whoever passes ``--auth``, or to anyone when the
server listens on loopback only (everyone who can reach it is on this machine); otherwise 403,
since a stream's id is what lets one watch it. ``POST /streams/<id>/params``: change a stream's
parameters as the page's data channel does (same fields, same limits, same replies).
``GET``/``PUT /virtual-cam``: which stream the virtual camera shows (``--virtual-cam``).
``GET /view/<id>``: a bare full-window player of one stream over WHEP, for an OBS Browser Source;
``/view/latest`` plays whichever stream started last (where streams are listed), so one Browser
Source URL keeps working as OBS starts and stops streaming.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from app.sdp_limits import BodyTooLarge, media_type, read_body
from app.webrtc import CONTROL_BURST, CONTROL_RATE, MAX_CONTROL_CHARS, TokenBucket, apply_control
from app.whip import NotFound, WhipHub

if TYPE_CHECKING:
    from app.virtualcam import VirtualCamera

STATIC = Path(__file__).resolve().parent / "static"


def add_stream_routes(app: FastAPI, hub: WhipHub, *, listed: bool, virtual_camera: VirtualCamera | None = None) -> None:
    """The routes above; ``listed``: whether ``GET /streams`` answers (see the module's note); with a
    ``virtual_camera``, ``/virtual-cam`` says what it shows (GET) and picks it (PUT ``{"stream": id | null}``)."""
    buckets: dict[str, TokenBucket] = {}  # per stream: the same rate limit as a data channel's
    hub.add_listener(lambda *_: None, lambda stream_id, _: buckets.pop(stream_id, None))

    @app.get("/client-config")
    async def client_config() -> dict[str, Any]:
        return {"ice_servers": [server.for_browser() for server in hub.peers.ice_servers], "streams_listed": listed}

    @app.get("/streams")
    async def streams() -> Response:
        if not listed:
            return JSONResponse({"error": "not listed", "detail": "streams are listed only to users who pass "
                                 "--auth, or on a server that listens on 127.0.0.1; start diffcam with "
                                 "--auth USER:PASS to see them from another machine"}, status_code=403)
        live = sorted(hub.streams.items(), key=lambda item: item[1].started)
        return JSONResponse({"streams": [published.describe(stream_id) for stream_id, published in live]})

    @app.post("/streams/{stream_id}/params")
    async def params(stream_id: str, request: Request) -> Response:
        published = hub.streams.get(stream_id)
        if published is None:
            return _error(404, "no such stream (ended, or never published)")
        if media_type(request) != "application/json":
            return _error(415, "the body must be a JSON object of parameters, sent as Content-Type: application/json")
        try:
            body = await read_body(request, MAX_CONTROL_CHARS * 4)  # UTF-8: up to 4 bytes a character
        except BodyTooLarge as error:
            return _error(413, str(error), {"Connection": "close"})
        if not buckets.setdefault(stream_id, TokenBucket(CONTROL_RATE, CONTROL_BURST)).take():
            return _error(429, f"more than {CONTROL_RATE:g} changes per second on this stream; send the newest "
                               "again shortly", {"Retry-After": "1"})
        reply = apply_control(published.session, body.decode("utf-8", errors="replace"))
        return JSONResponse(reply, status_code=200 if reply["type"] == "applied" else 400)

    @app.get("/virtual-cam")
    async def virtual_cam() -> Response:
        if virtual_camera is None:
            return _error(404, "no virtual camera: start diffcam with --virtual-cam")
        return JSONResponse(virtual_camera.status())

    @app.put("/virtual-cam")
    async def follow(request: Request) -> Response:
        if virtual_camera is None:
            return _error(404, "no virtual camera: start diffcam with --virtual-cam")
        try:
            body = json.loads(await read_body(request, 1024))
        except BodyTooLarge as error:
            return _error(413, str(error), {"Connection": "close"})
        except ValueError:
            body = None
        stream = body.get("stream", ...) if isinstance(body, dict) else ...
        if not (stream is None or isinstance(stream, str)):
            return _error(400, 'send {"stream": "<id>"} to show a stream, or {"stream": null} for the first live one')
        try:
            virtual_camera.follow(stream)
        except NotFound as error:
            return _error(404, str(error))
        return JSONResponse(virtual_camera.status())

    @app.get("/view/{stream_id}")
    async def view(stream_id: str) -> Response:  # the page reads the id from its own URL
        return HTMLResponse((STATIC / "view.html").read_text("utf-8"), headers={"Cache-Control": "no-store"})


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"type": "error", "error": detail, "fields": []}, status_code=status, headers=headers)
