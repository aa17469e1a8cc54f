"""The app over real loopback WebRTC: an aiortc client talks to the server running the tiny model."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from app.serve import build_app
from engine.config import StreamConfig
from engine.image import fit, to_chw
from engine.synthetic import moving_frame
from app.client import Client, SyntheticCamera

SIZE = 128
CONFIG = StreamConfig(t_index_list=(32, 45), width=SIZE, height=SIZE, cfg_type="self", guidance_scale=1.2,
                      prompt="a watercolor painting", seed=2)


class RunningApp:
    def __init__(self, url: str, engine) -> None:
        self.url, self.engine = url, engine


@pytest.fixture
async def running(tiny, request):
    options = getattr(request, "param", {})
    app, engine = build_app(tiny, CONFIG, max_sessions=options.get("max_sessions", 2), idle_timeout=10,
                            auth=options.get("auth"), random_weights=True,
                            input_timeout=options.get("input_timeout", 5.0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningApp(f"http://127.0.0.1:{port}", engine)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def still_camera() -> SyntheticCamera:
    return SyntheticCamera([moving_frame(5, 240, 320)])


def moving_camera() -> SyntheticCamera:
    return SyntheticCamera([moving_frame(i, 240, 320) for i in range(60)])


def as_the_engine_sees(camera: np.ndarray) -> np.ndarray:
    """The camera frame cropped and scaled exactly as the engine does before the model: what an echo returns."""
    fitted = fit(to_chw(camera, torch.device("cpu")), SIZE, SIZE)
    return fitted.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_the_echo_check_sees_an_echo() -> None:
    camera = moving_frame(5, 240, 320)
    echoed = np.clip(as_the_engine_sees(camera).astype(int) + np.random.default_rng(0).integers(-4, 5, (SIZE, SIZE, 3)),
                     0, 255)  # the camera back through two VP8 passes: a few grey levels of noise
    assert mean_abs(echoed, as_the_engine_sees(camera)) < 20 < mean_abs(np.zeros_like(echoed), as_the_engine_sees(camera))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


async def test_stylized_frames_come_back_and_follow_the_prompt(running) -> None:
    client = Client(still_camera())
    try:
        response = await client.connect(running.url)
        assert response.status_code == 200 and response.json()["session"]
        frames = await client.wait_frames(30)
        first = frames[-1]
        assert first.shape == (SIZE, SIZE, 3)
        assert first.mean() > 10, "not black"
        assert mean_abs(first, as_the_engine_sees(moving_frame(5, 240, 320))) > 20, \
            "the model's output, not the camera echoed"
        before = np.mean(frames[-10:], axis=0)
        jitter = max(mean_abs(f, before) for f in frames[-10:])

        reply = await client.send({"prompt": "a neon cyberpunk city at night"})
        assert reply["type"] == "applied"
        await client.wait_frames(15)  # let the frames in flight and the codec settle
        after = np.mean(await client.wait_frames(10), axis=0)
        assert mean_abs(after, before) > max(3.0, 3 * jitter), (mean_abs(after, before), jitter)
    finally:
        await client.close()


async def test_bad_control_messages_are_answered_and_the_stream_goes_on(running) -> None:
    client = Client(still_camera())
    try:
        await client.connect(running.url)
        await client.wait_frames(5)
        for bad, message in [({"guidance_scale": -4}, "guidance_scale=-4"), ({"width": 64}, "unknown control"),
                             ({"model": "/etc/passwd"}, "unknown control"), ([1, 2], "JSON object")]:
            reply = await client.send(bad)
            assert reply["type"] == "error" and message in reply["error"], reply
        await client.wait_frames(10)
    finally:
        await client.close()


async def test_disconnect_frees_the_session(running) -> None:
    client = Client(moving_camera())
    await client.connect(running.url)
    await client.wait_frames(5)
    assert running.engine.snapshot()["sessions_active"] == 1
    await client.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while running.engine.snapshot()["sessions_active"]:
        assert loop.time() < deadline, "the session outlived its peer"
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=running.url) as http:
        metrics = (await http.get("/metrics")).text
    assert "diffcam_sessions_active 0.0" in metrics


@pytest.mark.parametrize("running", [{"max_sessions": 1}], indirect=True)
async def test_a_peer_beyond_max_sessions_gets_503(running) -> None:
    first, second = Client(still_camera()), Client(still_camera())
    try:
        assert (await first.connect(running.url)).status_code == 200
        response = await second.connect(running.url)
        assert response.status_code == 503
        assert response.json()["error"] == "server busy"
        await first.wait_frames(5)
    finally:
        await first.close()
        await second.close()


BAD_OFFERS = [
    b"not json at all",
    b"[1, 2, 3]",
    b'{"type": "offer"}',
    b'{"sdp": 42, "type": "offer"}',
    b'{"sdp": "v=0\\r\\n", "type": "answer"}',
    b'{"sdp": "hello", "type": "offer"}',
    b'{"sdp": "v=0\\r\\no=- 0 0 IN IP4 0.0.0.0\\r\\n", "type": "offer"}',
    b'{"sdp": "v=0\\r\\nm=video 9 UDP/TLS/RTP/SAVPF 96\\r\\n", "type": "offer"}',
    b'{"sdp": "v=0\\r\\nm=audio 9 UDP/TLS/RTP/SAVPF 111\\r\\na=ice-ufrag:x\\r\\na=ice-pwd:yyyyyyyyyyyyyyyyyyyyyy\\r\\n", "type": "offer"}',
    b"\xff\xfe\x00garbage",
]


async def test_malformed_offers_get_4xx_and_the_server_still_serves(running) -> None:
    async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
        for body in BAD_OFFERS:
            response = await http.post("/offer", content=body, headers={"Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
            assert response.json()["detail"], body
    assert running.engine.snapshot()["sessions_active"] == 0, "no session leaked from a refused offer"
    client = Client(still_camera())
    try:
        assert (await client.connect(running.url)).status_code == 200
        await client.wait_frames(5)
    finally:
        await client.close()


@pytest.mark.parametrize("running", [{"auth": ("ada", "lovelace")}], indirect=True)
async def test_auth_protects_the_page_and_offer_but_not_healthz(running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as http:
        assert (await http.get("/")).status_code == 401
        assert (await http.post("/offer", json={})).status_code == 401
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/", auth=("ada", "wrong"))).status_code == 401
        assert (await http.get("/", auth=("ada", "lovelace"))).status_code == 200
    client = Client(still_camera())
    try:
        assert (await client.connect(running.url, auth=("ada", "lovelace"))).status_code == 200
        await client.wait_frames(3)
    finally:
        await client.close()


class VanishingCamera(SyntheticCamera):
    """Sends frames until ``vanish`` is set, then nothing, without closing anything: a crashed tab.

    It vanishes when told, not after a fixed count: on a busy machine the engine may take only a
    few of a short burst (newest wins), too few to prove the stream worked before it stopped.
    """

    def __init__(self, frames) -> None:
        super().__init__(frames)
        self.vanish = asyncio.Event()

    async def recv(self):
        if self.vanish.is_set():
            await asyncio.sleep(3600)
        return await super().recv()


@pytest.mark.parametrize("running", [{"input_timeout": 1.0}], indirect=True)
async def test_a_client_that_vanishes_is_freed_within_seconds(running) -> None:
    camera = VanishingCamera([moving_frame(1, 240, 320)])
    client = Client(camera)
    try:
        await client.connect(running.url)
        await client.wait_frames(2)
        camera.vanish.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8
        while running.engine.snapshot()["sessions_active"]:
            assert loop.time() < deadline, "a vanished client's session must not linger"
            await asyncio.sleep(0.1)
    finally:
        await client.close()
