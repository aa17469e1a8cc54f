"""The round trip's server side: the stream list, steering a stream over HTTP, a page's close beacon,
ICE servers for both ends, HTTPS, and a port already in use."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl

import httpx
import pytest
import uvicorn

from app import main as app_main, streams
from app.serve import announce_streams, build_app, check_port
from app.server import Exposure
from app.tls import self_signed
from app.webrtc import IceServer, PeerManager
from tests.test_app_webrtc import CONFIG, RunningApp, moving_camera
from tests.test_whip import SDP, VIDEO_WITHOUT_ICE, Player, Publisher
from app.client import Client


@contextlib.asynccontextmanager
async def serving(app, **ssl_options):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **ssl_options))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def running_app(tiny, **options):
    app, engine = build_app(tiny, CONFIG, max_sessions=2, idle_timeout=10, random_weights=True, ui=False, **options)
    async with serving(app) as port:
        yield RunningApp(f"http://127.0.0.1:{port}", engine), app


async def published(url: str) -> tuple[Publisher, str]:
    publisher = Publisher()
    response = await publisher.publish(url)
    assert response.status_code == 201, response.text
    return publisher, response.headers["location"].rsplit("/", 1)[1]


async def test_streams_are_listed_and_steered_over_http(tiny, capsys, monkeypatch) -> None:
    monkeypatch.setattr(streams, "CONTROL_RATE", 0.5)  # a slow machine cannot outrun 30 a second
    monkeypatch.setattr(streams, "CONTROL_BURST", 5)
    async with running_app(tiny) as (running, app):
        announce_streams(app, running.url)
        publisher, stream_id = await published(running.url)
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                listed = (await http.get("/streams")).json()["streams"]
                assert [(s["id"], s["kind"], s["whep"], s["view"]) for s in listed] == \
                       [(stream_id, "whip", f"/whep/{stream_id}", f"/view/{stream_id}")]
                session = app.state.hub.streams[stream_id].session

                applied = await http.post(f"/streams/{stream_id}/params", json={"prompt": "a cat", "seed": 7})
                assert applied.status_code == 200 and applied.json() == {"type": "applied",
                                                                        "params": {"prompt": "a cat", "seed": 7}}
                assert (session.config.prompt, session.config.seed) == ("a cat", 7)

                now = (await http.get("/streams")).json()["streams"][0]["params"]
                assert (now["prompt"], now["seed"], now["t_index_list"]) == ("a cat", 7, list(CONFIG.t_index_list))

                refused = await http.post(f"/streams/{stream_id}/params", json={"seed": -5})
                assert refused.status_code == 400 and refused.json()["fields"] == ["seed"]
                assert "seed" in refused.json()["error"] and session.config.seed == 7, "nothing changed"
                unknown = await http.post(f"/streams/{stream_id}/params", json={"model": "/etc/passwd"})
                assert unknown.status_code == 400 and "unknown control" in unknown.json()["error"]
                assert (await http.post(f"/streams/{stream_id}/params", content=b"seed=1",
                                        headers={"Content-Type": "text/plain"})).status_code == 415
                assert (await http.post("/streams/nosuchstream/params", json={"seed": 1})).status_code == 404

                burst = [await http.post(f"/streams/{stream_id}/params", json={"seed": 1}) for _ in range(5)]
                statuses = [response.status_code for response in burst]
                assert 429 in statuses and 200 in statuses, "a stream's changes are rate-limited like a channel's"
                assert "Retry-After" in burst[statuses.index(429)].headers

                assert (await http.delete(f"/whip/{stream_id}")).status_code == 200
                assert (await http.get("/streams")).json() == {"streams": []}
        finally:
            await publisher.pc.close()
    out = capsys.readouterr().out
    assert f"stream {stream_id} (WHIP) started: watch {running.url}/view/{stream_id}" in out
    assert f"WHEP {running.url}/whep/{stream_id}" in out and f"stream {stream_id} (WHIP) ended" in out


async def test_latest_plays_the_newest_stream_where_streams_are_listed(tiny) -> None:
    async with running_app(tiny) as (running, _):
        async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
            assert "no stream is live" in (await http.post("/whep/latest", content=VIDEO_WITHOUT_ICE,
                                                           headers=SDP)).text
        first, first_id = await published(running.url)
        second, second_id = await published(running.url)
        player = Player()
        try:
            watched = await player.watch(f"{running.url}/whep/latest")
            assert watched.status_code == 201, watched.text
            assert watched.headers["location"].startswith(f"/whep/{second_id}/"), "the newest, by its own id"
            await player.wait_frames(3)
            async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                assert (await http.delete(watched.headers["location"])).status_code == 200
        finally:
            await asyncio.gather(first.pc.close(), second.pc.close(), player.close())
    async with running_app(tiny, exposure=Exposure(hosts=None)) as (running, _):
        publisher, _ = await published(running.url)
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                refused = await http.post("/whep/latest", content=VIDEO_WITHOUT_ICE, headers=SDP)
            assert refused.status_code == 404 and "--auth" in refused.text, "ids stay the only way in"
        finally:
            await publisher.pc.close()


async def test_streams_are_not_listed_to_the_network_without_auth(tiny) -> None:
    async with running_app(tiny, exposure=Exposure(hosts=None)) as (running, _):  # as --host 0.0.0.0 serves
        async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
            refused = await http.get("/streams")
            assert refused.status_code == 403 and "--auth" in refused.json()["detail"]
            assert (await http.get("/client-config")).json()["streams_listed"] is False
    async with running_app(tiny, exposure=Exposure(hosts=None), auth=("me", "pw")) as (running, _):
        async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
            assert (await http.get("/streams")).status_code == 401
            assert (await http.get("/streams", auth=("me", "pw"))).json() == {"streams": []}


def test_the_page_offers_the_stream_picker_from_the_start_only_where_streams_are_listed(tiny) -> None:
    # shown as the page renders, not when the first list arrives: a row appearing above Start moves it
    # down under a click that was aimed at it
    def picker(**options) -> str:
        app, _ = build_app(tiny, CONFIG, max_sessions=1, idle_timeout=10, random_weights=True, **options)
        page = next(route.app.get_blocks() for route in app.routes if hasattr(getattr(route, "app", None),
                                                                               "get_blocks"))
        bars = [block.value for block in page.blocks.values()
                if 'id="diffcam-streams"' in str(getattr(block, "value", ""))]
        assert len(bars) == 1
        return re.search(r'<div class="diffcam-row" id="diffcam-streams"[^>]*>', bars[0]).group(0)

    assert "hidden" not in picker()  # loopback only: listed
    assert "hidden" in picker(exposure=Exposure(hosts=None))
    assert "hidden" not in picker(exposure=Exposure(hosts=None), auth=("me", "pw"))


async def test_a_page_going_away_frees_its_session_at_once_with_its_close_url(tiny) -> None:
    async with running_app(tiny) as (running, _):
        client = Client(moving_camera())
        try:
            response = await client.connect(running.url)
            answer = response.json()
            assert answer["close"].startswith("/offer/") and len(answer["close"]) > len("/offer/") + 16
            await client.wait_frames(2)
            assert running.engine.snapshot()["sessions_active"] == 1
            async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                assert (await http.post("/offer/not-the-token")).status_code == 404
                assert running.engine.snapshot()["sessions_active"] == 1, "a wrong token closes nothing"
                assert (await http.post(answer["close"], content=b"")).status_code == 204  # as sendBeacon posts
                assert running.engine.snapshot()["sessions_active"] == 0
                assert (await http.delete(answer["close"])).status_code == 404
        finally:
            await client.close()


async def test_a_refused_control_names_its_field(tiny) -> None:
    async with running_app(tiny) as (running, _):
        client = Client(moving_camera())
        try:
            await client.connect(running.url)
            reply = await client.send({"seed": -5})
            assert reply["type"] == "error" and reply["fields"] == ["seed"]
            assert (await client.send("not an object"))["fields"] == []
        finally:
            await client.close()


def test_ice_servers_are_parsed_for_aiortc_and_the_page() -> None:
    stun = IceServer.parse("stun:stun.example.org:3478")
    turn = IceServer.parse("turn:turn.example.org:3478?transport=tcp, user , secret")
    assert stun.for_browser() == {"urls": "stun:stun.example.org:3478"}
    assert turn.for_browser() == {"urls": "turn:turn.example.org:3478?transport=tcp", "username": "user",
                                  "credential": "secret"}
    assert turn.for_aiortc().username == "user"
    for bad, message in (("http://example.org", "not a STUN or TURN URL"), ("stun:", "not a STUN or TURN URL"),
                         ("turn:turn.example.org", "needs a user and a credential"),
                         ("stun:a.org,user", "URL or URL,USER,CREDENTIAL")):
        with pytest.raises(ValueError, match=message):
            IceServer.parse(bad)


async def test_ice_servers_reach_the_server_peers_and_the_page(tiny) -> None:
    servers = [IceServer.parse("stun:127.0.0.1:3478"), IceServer.parse("turn:127.0.0.1:3478,u,p")]
    async with running_app(tiny, ice_servers=servers) as (running, app):
        async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
            config = (await http.get("/client-config")).json()
        assert config["ice_servers"] == [server.for_browser() for server in servers]
        peers: PeerManager = app.state.hub.peers
        pc = peers.peer_connection()
        try:
            configuration = pc._RTCPeerConnection__configuration  # aiortc keeps it private
            assert [(s.urls, s.username) for s in configuration.iceServers] == [("stun:127.0.0.1:3478", None),
                                                                               ("turn:127.0.0.1:3478", "u")]
        finally:
            await pc.close()


@pytest.mark.parametrize("argv,message", [
    (["--ice-server", "http://x"], "not a STUN or TURN URL"),
    (["--ssl-keyfile", "/no/key.pem"], "--ssl-keyfile needs --ssl-certfile"),
    (["--ssl-certfile", "/no/cert.pem"], "--ssl-certfile /no/cert.pem: no such file"),
])
def test_bad_server_flags_exit_2_with_one_line(argv, message, capsys) -> None:
    assert app_main.main(["--model", "tiny", "--no-ui", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffcam: ") and message in err[0], err


def test_a_port_in_use_is_one_line_naming_another_port_before_the_model_loads(capsys, monkeypatch) -> None:
    from engine.runtime import Engine

    monkeypatch.setattr(Engine, "load", lambda *_: pytest.fail("the model loaded before the port was checked"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port("127.0.0.1", port)
        assert app_main.main(["--model", "tiny", "--no-ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--port {port + 1}" in err[0], err


def test_the_self_signed_certificate_is_kept_and_made_again_for_a_new_address(tmp_path) -> None:
    cert, key = self_signed("127.0.0.1", tmp_path)
    assert key.stat().st_mode & 0o077 == 0, "the private key is the owner's only"
    made = cert.read_bytes()
    assert self_signed("0.0.0.0", tmp_path)[0].read_bytes() == made, "kept across starts"
    assert self_signed("192.0.2.7", tmp_path)[0].read_bytes() != made, "an address it does not name: made again"
    assert self_signed("192.0.2.7", tmp_path)[0].read_bytes() == self_signed("localhost", tmp_path)[0].read_bytes()


async def test_https_serves_with_the_self_signed_certificate(tiny, tmp_path) -> None:
    cert, key = self_signed("127.0.0.1", tmp_path)
    app, _ = build_app(tiny, CONFIG, max_sessions=1, ui=False)
    async with serving(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as port:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=trusted, timeout=20) as http:
            for host in ("127.0.0.1", "localhost"):
                assert (await http.get(f"https://{host}:{port}/healthz")).json()["status"] == "ok"
        async with httpx.AsyncClient(timeout=20) as http:
            with pytest.raises(httpx.ConnectError):  # plain http to an https port, or an untrusting client
                await http.get(f"https://127.0.0.1:{port}/healthz")


async def test_with_auth_the_player_page_is_open_and_reaches_its_stream_with_a_bearer_token(tiny) -> None:
    """An OBS Browser Source cannot answer a password prompt: /view is static and open, and what it
    reads (/client-config, /whep) takes the password as a bearer token from the URL's fragment."""
    async with running_app(tiny, auth=("me", "pw")) as (running, _):
        publisher = Publisher()
        response = await publisher.publish(running.url, headers={"Authorization": "Bearer pw"})
        stream_id = response.headers["location"].rsplit("/", 1)[1]
        bearer = {"Authorization": "Bearer pw"}
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                page = await http.get("/view/latest")
                assert page.status_code == 200 and "Bearer" in page.text
                assert (await http.get("/client-config")).status_code == 401
                assert (await http.get("/client-config", headers=bearer)).status_code == 200
                assert (await http.get("/client-config", headers={"Authorization": "Bearer nope"})).status_code == 401
                assert (await http.get("/streams", headers=bearer)).status_code == 401, "bearer only where needed"
                assert (await http.post(f"/view/{stream_id}")).status_code in (401, 405), "only GET is open"
            player = Player()  # what the page does, with its fragment's token
            try:
                await player.pc.setLocalDescription(await player.pc.createOffer())
                async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                    answered = await http.post("/whep/latest", content=player.pc.localDescription.sdp,
                                               headers={**SDP, **bearer})
                assert answered.status_code == 201 and answered.headers["location"].startswith(f"/whep/{stream_id}/")
            finally:
                await player.close()
        finally:
            await publisher.pc.close()


def test_the_entry_script_serves_https_with_a_kept_self_signed_certificate(tmp_path) -> None:
    """``python app/main.py --https``: the certificate is made in the cache folder and the URL printed is https."""
    import os
    import subprocess
    import sys
    import time

    from tests.test_main import ROOT, free_port, stop_with_ctrl_c

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "app/main.py", "--model", "tiny", "--no-ui", "--https",
                                "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    cert = tmp_path / "diffcam" / "tls" / "cert.pem"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                trusted = ssl.create_default_context(cafile=str(cert))
                if httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trusted, timeout=1).status_code == 200:
                    break
            except (httpx.HTTPError, OSError, ssl.SSLError):
                pass
            assert time.monotonic() < deadline, "the server did not come up over https"
            time.sleep(0.2)
    finally:
        output = stop_with_ctrl_c(process)
    assert process.returncode == 0, output
    assert f"https://127.0.0.1:{port}" in output and (tmp_path / "diffcam" / "tls" / "key.pem").exists()
