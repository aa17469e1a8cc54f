"""WHIP in, WHEP out, over real loopback WebRTC: an aiortc publisher (as OBS would) and aiortc players."""

from __future__ import annotations

import asyncio
import contextlib

import cv2
import httpx
import numpy as np
import pytest
from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from tests.test_app_webrtc import mean_abs, moving_camera, running  # noqa: F401 - the app fixture

SDP = {"Content-Type": "application/sdp"}
VIDEO_WITHOUT_ICE = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n" \
                    "c=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\na=sendonly\r\na=mid:0\r\n"


@pytest.fixture(autouse=True)
async def no_loop_errors():
    """An exception no one awaited (a callback raising after a player left, say) fails the test."""
    loop, errors = asyncio.get_running_loop(), []
    loop.set_exception_handler(lambda _, context: errors.append(context.get("exception") or context["message"]))
    yield
    await asyncio.sleep(0.2)
    loop.set_exception_handler(None)
    assert not errors, errors


class Publisher:
    """A WHIP client as OBS is one: send-only video and audio, offer POSTed as application/sdp."""

    def __init__(self) -> None:
        self.camera = moving_camera()
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver(self.camera, direction="sendonly")
        self.pc.addTransceiver(AudioStreamTrack(), direction="sendonly")

    async def publish(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(timeout=20) as http:
            response = await http.post(f"{url}/whip", content=self.pc.localDescription.sdp,
                                       headers={**SDP, **(headers or {})})
        if response.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        return response


class Player:
    """A WHEP client: a receive-only video transceiver; keeps every frame it gets."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.frames: list[np.ndarray] = []
        self.ended = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.pc.on("track", lambda track: setattr(self, "_reader", asyncio.create_task(self._read(track))))

    async def _read(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                self.frames.append((await track.recv()).to_ndarray(format="rgb24"))
        self.ended.set()

    async def watch(self, url: str) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(timeout=20) as http:
            response = await http.post(url, content=self.pc.localDescription.sdp, headers=SDP)
        if response.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
        return response

    async def wait_frames(self, count: int, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.frames) < count:
            assert loop.time() < deadline, f"only {len(self.frames)} of {count} frames in {timeout} s"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def test_obs_publishes_with_whip_and_two_players_watch_it_stylized(running) -> None:
    publisher, players = Publisher(), [Player(), Player()]
    try:
        response = await publisher.publish(running.url)
        assert response.status_code == 201, response.text
        assert response.headers["content-type"].startswith("application/sdp")
        resource = response.headers["location"]
        stream_id = resource.rsplit("/", 1)[1]
        assert resource == f"/whip/{stream_id}" and len(stream_id) >= 16, "ids must not be guessable"
        assert response.headers["link"] == f'</whep/{stream_id}>; rel="alternate"'
        for player in players:
            watched = await player.watch(f"{running.url}/whep/{stream_id}")
            assert watched.status_code == 201, watched.text
            assert watched.headers["location"].startswith(f"/whep/{stream_id}/")
        for player in players:
            await player.wait_frames(10)
        frame = players[0].frames[-1]
        assert frame.shape == (128, 128, 3) and frame.mean() > 10, "stylized output, not black"
        sent = [cv2.resize(f[:, 40:280], (128, 128), interpolation=cv2.INTER_AREA) for f in publisher.camera.frames]
        echo = min(mean_abs(frame, picture) for picture in sent)  # as the engine crops and scales the camera
        assert echo > 15, f"the players see the model's output, not the camera echoed ({echo:.1f})"
        assert running.engine.snapshot()["sessions_active"] == 1

        async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
            assert (await http.delete(resource)).status_code == 200
            assert (await http.delete(resource)).status_code == 404
        for player in players:
            await asyncio.wait_for(player.ended.wait(), 10)  # a deleted stream ends its players
        assert running.engine.snapshot()["sessions_active"] == 0
    finally:
        await publisher.pc.close()
        await asyncio.gather(*(p.close() for p in players))


async def test_a_player_leaving_leaves_the_stream_running(running) -> None:
    publisher, leaving, staying = Publisher(), Player(), Player()
    try:
        stream_id = (await publisher.publish(running.url)).headers["location"].rsplit("/", 1)[1]
        viewer = (await leaving.watch(f"{running.url}/whep/{stream_id}")).headers["location"]
        await staying.watch(f"{running.url}/whep/{stream_id}")
        await leaving.wait_frames(3)
        async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
            assert (await http.delete(viewer)).status_code == 200
            assert (await http.delete(viewer)).status_code == 404
        seen = len(staying.frames)
        await staying.wait_frames(seen + 5)
        assert running.engine.snapshot()["sessions_active"] == 1
    finally:
        await publisher.pc.close()
        await asyncio.gather(leaving.close(), staying.close())


async def test_bad_whip_and_whep_requests_get_clear_4xx_and_nothing_leaks(running) -> None:
    async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
        cases = [
            (await http.post("/whip", content="v=0\r\n", headers={"Content-Type": "application/json"}), 415),
            (await http.post("/whip", content="not sdp at all", headers=SDP), 400),
            (await http.post("/whip", content="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", headers=SDP), 400),
            (await http.post("/whip", content="v=0\r\n" + "a=x\r\n" * 30_000, headers=SDP), 413),
            (await http.post("/whep/no-such-stream", content="v=0\r\n", headers=SDP), 404),
            (await http.delete("/whip/no-such-stream"), 404),
            (await http.patch("/whip/anything", content="a=candidate", headers={"Content-Type": "application/trickle-ice-sdpfrag"}), 405),
            (await http.get("/whip"), 405),
            (await http.post("/whip", content=VIDEO_WITHOUT_ICE, headers=SDP), 400),  # a session opens, then closes
        ]
        for response, status in cases:
            assert response.status_code == status, (response.request.method, response.request.url, response.text)
            assert response.text.strip(), "every refusal says why"
        preflight = await http.options("/whip")
        assert preflight.status_code == 204 and preflight.headers["accept-post"] == "application/sdp"
        assert "Location" in preflight.headers["access-control-expose-headers"]
    assert running.engine.snapshot()["sessions_active"] == 0


async def test_whip_is_busy_at_capacity_like_the_page(running) -> None:
    publishers = [Publisher(), Publisher(), Publisher()]
    try:
        statuses = [(await p.publish(running.url)).status_code for p in publishers]
        assert statuses == [201, 201, 503]  # the fixture's --max-sessions is 2
    finally:
        await asyncio.gather(*(p.pc.close() for p in publishers))


@pytest.mark.parametrize("running", [{"auth": ("me", "secret")}], indirect=True)
async def test_with_auth_whip_and_whep_take_the_password_as_a_bearer_token(running) -> None:
    refused, accepted, basic, player = Publisher(), Publisher(), Publisher(), Player()
    bearer = {"Authorization": "Bearer secret"}
    try:
        denied = await refused.publish(running.url)
        assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")
        assert (await refused.publish(running.url, {"Authorization": "Bearer wrong"})).status_code == 401
        published = await accepted.publish(running.url, bearer)
        assert published.status_code == 201
        assert (await basic.publish(running.url, {"Authorization": "Basic bWU6c2VjcmV0"})).status_code == 201
        stream = published.headers["location"].rsplit("/", 1)[1]
        async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
            assert (await http.post(f"/whep/{stream}", content="v=0\r\n", headers=SDP)).status_code == 401
            assert (await http.post("/offer", json={}, headers=bearer)).status_code == 401  # the page's API: Basic only
            assert (await http.options("/whip")).status_code == 204  # preflights carry no credentials
            assert (await http.delete(published.headers["location"])).status_code == 401
            assert (await http.delete(published.headers["location"], headers=bearer)).status_code == 200
    finally:
        await asyncio.gather(refused.pc.close(), accepted.pc.close(), basic.pc.close(), player.close())


async def test_every_player_encodes_its_own_copy_of_each_frame() -> None:
    """Two encoders converting one shared av.VideoFrame at once crash PyAV (its converter is cached on
    the frame, and not thread-safe): each player must get a frame object of its own."""
    from aiortc.contrib.media import MediaRelay

    from app.whip import FrameCopies

    source, relay = moving_camera(), MediaRelay()
    players = [FrameCopies(relay.subscribe(source, buffered=False)) for _ in range(2)]
    first, second = await asyncio.gather(*(player.recv() for player in players))
    assert first is not second
    assert np.array_equal(first.to_ndarray(format="rgb24"), second.to_ndarray(format="rgb24"))
    assert first.pts == second.pts
    for player in players:
        player.stop()
