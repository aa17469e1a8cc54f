"""What a hostile or careless HTTP client can do to the server (issue 8, items 2, 6, 8, 11 and 12).

Every test talks to a real server on 127.0.0.1 (uvicorn on a free port) over a socket: httpx
where a well-formed request will do, a bare socket where the request itself is the attack (a
body that never ends, a ``Content-Length`` it never sends).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from typing import AsyncIterator, Iterable

import httpx
import pytest
import uvicorn
from aiortc import AudioStreamTrack, RTCPeerConnection
from aiortc import sdp as aiortc_sdp
from starlette.types import ASGIApp, Receive, Scope, Send

from app import server
from app.serve import build_app, engine_app
from app.webrtc import MAX_SDP_BYTES, PeerManager
from engine.config import StreamConfig
from engine.runtime import Engine, EngineConfig
from engine.session import EngineBusyError
from engine.synthetic import moving_frame
from tests.test_app_webrtc import moving_camera

CONFIG = StreamConfig(t_index_list=(32, 45), width=64, height=64, cfg_type="none", prompt="a watercolor painting")
SDP = {"Content-Type": "application/sdp"}
JSON = {"Content-Type": "application/json"}
#: the three routes that take an offer, with the body each expects and the most each may read
OFFER_ROUTES = [("/offer", "application/json", server.MAX_OFFER_BYTES),
                ("/whip", "application/sdp", MAX_SDP_BYTES),
                ("/whep/some-stream", "application/sdp", MAX_SDP_BYTES)]
#: uvicorn hands the app what it has read, up to 64 KiB past its high-water mark plus one 256 KiB socket read
UVICORN_READ_AHEAD = 512 * 1024


class BodyCounter:
    """The app, counting the request-body bytes the server hands it: all it could ever hold."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted():
            message = await receive()
            self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted if scope["type"] == "http" else receive, send)


class Served:
    def __init__(self, url: str, port: int, counter: BodyCounter) -> None:
        self.url, self.port, self.counter = url, port, counter


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[Served]:
    """``app`` on 127.0.0.1, a free port, until the block ends."""
    counter = BodyCounter(app)
    uv = uvicorn.Server(uvicorn.Config(counter, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", port, counter)
    finally:
        uv.should_exit = True
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def api(tiny, request):
    """The whole app (page left out) as ``python app/main.py --no-ui`` serves it, engine running."""
    app, _ = build_app(tiny, CONFIG, max_sessions=2, idle_timeout=10, random_weights=True, ui=False,
                       auth=getattr(request, "param", {}).get("auth"))
    async with serving(app) as served:
        yield served


def bare_api(tiny, exposure) -> ASGIApp:
    """The API routes alone, with ``exposure``; the engine is not started (nothing here reaches it)."""
    engine = Engine(EngineConfig(stream=CONFIG, max_sessions=1), components=tiny)
    return server.create_app(engine, PeerManager(engine), exposure=exposure, start_engine=False)


async def post_raw(port: int, path: str, headers: dict[str, str], chunks: Iterable[bytes] = (),
                   timeout: float = 10.0) -> int:
    """POST over a bare socket, sending ``chunks`` until the server answers; the status it answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def send() -> None:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()

    sending = asyncio.create_task(send())
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        sending.cancel()
        with contextlib.suppress(BaseException):  # the server may close on us mid-send: that is the point
            await sending
        writer.close()
    assert status_line, "the server closed the connection without an answer"
    return int(status_line.split()[1])


def chunked(total: int, size: int = 16 * 1024) -> Iterable[bytes]:
    """``total`` bytes of chunked transfer coding, then the last chunk."""
    chunk = b"x" * size
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + chunk + b"\r\n"
    yield b"0\r\n\r\n"


# item 6: bodies


@pytest.mark.parametrize("path,content_type,limit", OFFER_ROUTES)
async def test_a_declared_oversize_body_is_refused_before_any_of_it_is_read(api, path, content_type, limit) -> None:
    headers = {"Content-Type": content_type, "Content-Length": "300000000"}
    assert await post_raw(api.port, path, headers, timeout=5) == 413  # no body was sent: none was awaited
    assert api.counter.received == 0


@pytest.mark.parametrize("path,content_type,limit", OFFER_ROUTES)
async def test_a_streamed_body_is_cut_off_at_the_limit(api, path, content_type, limit) -> None:
    sent = 8 * 1024 * 1024
    headers = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
    assert await post_raw(api.port, path, headers, chunked(sent), timeout=30) == 413
    assert api.counter.received <= limit + UVICORN_READ_AHEAD < sent, api.counter.received
    async with httpx.AsyncClient(base_url=api.url) as http:  # and the server serves on
        assert (await http.get("/healthz")).status_code == 200


# item 8: malformed JSON


@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,
    b'{"sdp": ' + b"[" * 5000 + b"]" * 5000 + b', "type": "offer"}',
    b'{"sdp": ' + b"1" * 5000 + b', "type": "offer"}',
    b'{"sdp": "v=0", "type": "offer", "n": -' + b"9" * 5000 + b"}",
    b'{"sdp": "\\ud800", "type": "offer"}',
    json.dumps({"sdp": "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:\ud800\r\n", "type": "offer"}).encode(),
], ids=["nested", "nested-sdp", "5000-digits", "negative-5000-digits", "lone-surrogate", "lone-surrogate-in-sdp"])
async def test_offer_answers_400_to_json_python_cannot_hold(api, body) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=20) as http:
        response = await http.post("/offer", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


# item 2: offers no real client sends


def offer_with(lines: list[str]) -> str:
    return "\r\n".join(["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", *lines]) + "\r\n"


MEDIA = ["m=video 9 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 0.0.0.0", "a=rtpmap:96 VP8/90000", "a=sendrecv"]
HOSTILE_OFFERS = {
    "1100-m-sections": offer_with(["m=video 9 RTP/AVP 96"] * 1100),
    "1000-candidates": offer_with(MEDIA + [f"a=candidate:{i} 1 udp 1 10.0.{i // 250}.{i % 250 + 1} {9000 + i} typ host"
                                           for i in range(1000)]),
    "10000-lines": offer_with(MEDIA + ["a=x"] * 10_000),
}


@pytest.fixture
def aiortc_parses(monkeypatch) -> list[int]:
    """Every SDP aiortc parses, by length: refused offers must not get that far."""
    parsed: list[int] = []
    original = aiortc_sdp.SessionDescription.parse.__func__

    def counting(cls, sdp: str):
        parsed.append(len(sdp))
        return original(cls, sdp)

    monkeypatch.setattr(aiortc_sdp.SessionDescription, "parse", classmethod(counting))
    return parsed


@pytest.mark.parametrize("name", HOSTILE_OFFERS)
async def test_offers_shaped_like_no_real_client_are_refused_before_aiortc_parses_them(api, aiortc_parses,
                                                                                        name) -> None:
    sdp = HOSTILE_OFFERS[name]
    assert len(sdp.encode()) <= MAX_SDP_BYTES, "under the byte limit: the shape alone must refuse it"
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        responses = [await http.post("/offer", json={"sdp": sdp, "type": "offer"}),
                     await http.post("/whip", content=sdp, headers=SDP),
                     await http.post("/whep/some-stream", content=sdp, headers=SDP)]
        for response in responses:
            assert response.status_code == 400, (response.request.url, response.status_code, response.text)
            assert "real client" in response.text, response.text
        assert (await http.get("/healthz")).json()["sessions"] == 0
    assert aiortc_parses == []


async def test_a_real_clients_offer_is_well_inside_every_limit() -> None:
    from app import sdp_limits

    pc = RTCPeerConnection()  # what the page sends: camera, audio (OBS's too), the control channel
    try:
        pc.addTransceiver(moving_camera(), direction="sendrecv")
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
    finally:
        await pc.close()
    sdp_limits.check_sdp_shape(sdp)
    lines = sdp.splitlines()  # headroom: twice the sections, four times the lines and candidates
    assert 2 * sum(line.startswith("m=") for line in lines) <= sdp_limits.MAX_MEDIA_SECTIONS
    assert 4 * len(lines) <= sdp_limits.MAX_SDP_LINES
    assert 4 * sum(line.startswith("a=candidate") for line in lines) <= sdp_limits.MAX_CANDIDATES


# item 11: exposure by default


async def test_offer_takes_only_json_so_a_cross_site_form_cannot_post_one(api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as http:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            response = await http.post("/offer", content=b"{}", headers={"Content-Type": content_type})
            assert response.status_code == 415, (content_type, response.text)
        assert (await http.post("/offer", content=b"{}")).status_code == 415  # no type at all
        typed = await http.post("/offer", content=b"{}", headers={"Content-Type": "application/json; charset=utf-8"})
        assert typed.status_code == 400  # past the type check: a bad offer
        assert (await http.post("/whip", content=b"v=0", headers={"Content-Type": "text/plain"})).status_code == 415


async def test_whip_grants_no_origin_cross_origin_access_by_default(api) -> None:
    origin = {"Origin": "https://evil.example"}
    async with httpx.AsyncClient(base_url=api.url) as http:
        responses = [await http.options("/whip", headers={**origin, "Access-Control-Request-Method": "POST"}),
                     await http.post("/whip", content=b"v=0", headers={**origin, **SDP}),
                     await http.delete("/whip/no-such-stream", headers=origin)]
    for response in responses:
        assert "access-control-allow-origin" not in response.headers, (response.request.method, response.headers)


async def test_a_configured_origin_and_only_it_gets_cross_origin_access(tiny) -> None:
    allowed = "https://player.example"
    app = bare_api(tiny, server.Exposure(cors_origins=(allowed,)))
    async with serving(app) as served, httpx.AsyncClient(base_url=served.url) as http:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        for method, path in (("OPTIONS", "/whip"), ("POST", "/whip"), ("DELETE", "/whip/no-such-stream")):
            mine = await http.request(method, path, headers={"Origin": allowed, **preflight, **SDP})
            assert mine.headers.get("access-control-allow-origin") == allowed, (method, mine.headers)
            assert "origin" in mine.headers.get("vary", "").lower()
            theirs = await http.request(method, path, headers={"Origin": "https://evil.example", **preflight, **SDP})
            assert "access-control-allow-origin" not in theirs.headers, (method, theirs.headers)
        offer = await http.post("/offer", json={}, headers={"Origin": allowed})  # the page's own API stays same-origin
        assert "access-control-allow-origin" not in offer.headers


async def test_a_host_header_naming_another_server_is_refused(api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as http:
        for host in ("evil.example", f"evil.example:{api.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            response = await http.get("/healthz", headers={"Host": host})
            assert response.status_code in (400, 421), (host, response.status_code)
            refused = await http.post("/offer", json={}, headers={"Host": host})
            assert refused.status_code in (400, 421) and "host" in refused.text.lower(), (host, refused.text)
        for host in (f"127.0.0.1:{api.port}", f"localhost:{api.port}", f"[::1]:{api.port}", "LOCALHOST", "localhost"):
            assert (await http.get("/healthz", headers={"Host": host})).status_code == 200, host


def test_the_names_a_server_answers_to_follow_where_it_listens() -> None:
    for everywhere in ("0.0.0.0", "::", "", "0", "::0", "[::]", "0.0.0"):
        assert server.Exposure.bound_to(everywhere).hosts is None, everywhere
    assert set(server.Exposure.bound_to("127.0.0.1").hosts) == {"127.0.0.1", "localhost", "[::1]"}
    assert "192.168.1.5" in server.Exposure.bound_to("192.168.1.5").hosts
    assert "[fe80::1]" in server.Exposure.bound_to("fe80::1").hosts
    assert "diffcam.lan" in server.Exposure.bound_to("diffcam.lan").hosts
    assert server.Exposure.bound_to("127.0.0.1", public=True).hosts is None  # --share: the link's own host name


async def test_a_server_on_every_interface_answers_to_any_host_name(tiny) -> None:
    async with serving(bare_api(tiny, server.Exposure.bound_to("0.0.0.0"))) as served:
        async with httpx.AsyncClient(base_url=served.url) as http:
            assert (await http.get("/healthz", headers={"Host": "diffcam.lan:7860"})).status_code == 200


# item 12: the smaller ones


@pytest.mark.parametrize("host", ["", "0", "::0", "0.0.0.0", "::"])
def test_every_spelling_of_every_interface_gets_the_warning(host, tiny, monkeypatch, capsys) -> None:
    from app import main as app_main
    from app import serve as app_serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)  # listen nowhere: only what it says
    args = app_main.build_parser().parse_args(["--model", "tiny", "--no-ui", "--host", host])
    engine = Engine(EngineConfig(stream=CONFIG, max_sessions=1), components=tiny)
    app_serve.serve(args, engine)
    out, err = capsys.readouterr()
    assert "every network interface" in err, (host, err)
    assert "http://127.0.0.1:7860" in out, out


def test_a_named_address_gets_no_warning(tiny, monkeypatch, capsys) -> None:
    from app import main as app_main
    from app import serve as app_serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)
    args = app_main.build_parser().parse_args(["--model", "tiny", "--no-ui", "--host", "127.0.0.1"])
    app_serve.serve(args, Engine(EngineConfig(stream=CONFIG, max_sessions=1), components=tiny))
    assert "every network interface" not in capsys.readouterr().err


PASSWORD = "pässwörd-日本"


@pytest.mark.parametrize("api", [{"auth": ("ada", PASSWORD)}], indirect=True)
async def test_a_non_ascii_password_works_as_bearer_and_basic_and_schemes_ignore_case(api) -> None:
    basic = base64.b64encode(f"ada:{PASSWORD}".encode()).decode()
    async with httpx.AsyncClient(base_url=api.url) as http:
        async def whip(authorization: bytes) -> int:
            return (await http.post("/whip", content=b"not sdp", headers={**SDP, "Authorization": authorization})).status_code

        assert await whip(f"Bearer {PASSWORD}".encode()) == 400  # through the door: a bad offer
        assert await whip(f"bearer {PASSWORD}".encode()) == 400
        assert await whip(b"Bearer wrong") == 401
        assert await whip(f"Bearer {PASSWORD}".encode("latin-1", errors="replace")) == 401
        for scheme in ("Basic", "basic", "BASIC"):
            assert (await http.get("/metrics", headers={"Authorization": f"{scheme} {basic}"})).status_code == 200
        assert (await http.get("/metrics", auth=("ada", PASSWORD))).status_code == 200
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {PASSWORD}".encode()})).status_code == 401
        assert (await http.get("/metrics")).status_code == 401


def test_cors_origin_is_a_repeatable_flag_checked_at_start_up() -> None:
    from app import main as app_main

    args = app_main.build_parser().parse_args(["--cors-origin", "https://a.example", "--cors-origin",
                                               "http://localhost:8080"])
    assert args.cors_origin == ["https://a.example", "http://localhost:8080"]
    app_main.check_server_args(args)
    for bad in ("a.example", "https://a.example/path", "ftp://a.example", "https://"):
        args = app_main.build_parser().parse_args(["--cors-origin", bad])
        with pytest.raises(ValueError, match="--cors-origin"):
            app_main.check_server_args(args)


def test_exposure_is_checked_once_with_a_message_naming_the_value() -> None:
    with pytest.raises(ValueError, match="--cors-origin 'not an origin'"):
        server.Exposure(cors_origins=("not an origin",))


async def test_the_page_refuses_uploads_past_a_small_forms_size(tiny) -> None:
    """The page takes no files; Gradio would otherwise store whatever anyone posts to its upload route."""
    app, _ = build_app(tiny, StreamConfig(t_index_list=(30,), width=64, height=64), ui=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            response = await http.post("/gradio_api/upload", files={"files": ("big.bin", b"x" * 200_000)})
        assert response.status_code == 413, response.text[:200]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_healthz_fails_saying_why_while_the_device_hangs(tiny) -> None:
    # a GPU that hangs raises nothing: only a round that runs on tells, and a supervisor restarts on the 503
    release = threading.Event()

    def held(module, args) -> None:
        release.wait(30)

    engine = Engine(EngineConfig(stream=CONFIG, max_sessions=2, hang_timeout=1.0), components=tiny)
    hook = tiny.unet.register_forward_pre_hook(held)
    try:
        async with serving(engine_app(engine, ui=False, random_weights=True)) as served, \
                httpx.AsyncClient(base_url=served.url, timeout=10) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok", "sessions": 0, "max_sessions": 2}
            session = await engine.open_session()
            session.submit(moving_frame(0, 64, 64))
            deadline = time.monotonic() + 20
            while (health := await http.get("/healthz")).status_code == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert health.status_code == 503 and health.json()["status"] == "failing", health.text
            assert "cpu stopped answering: a round has run for" in health.json()["detail"]
            with pytest.raises(EngineBusyError, match="stopped answering"):  # it would never be answered
                await engine.open_session()
            release.set()  # it answers again
            while (health := await http.get("/healthz")).status_code == 503 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert health.json() == {"status": "ok", "sessions": 1, "max_sessions": 2}
    finally:
        hook.remove()
        release.set()
