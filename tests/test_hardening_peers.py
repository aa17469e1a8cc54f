"""Issue 8, the peers' side: what a careless or hostile client can hold, grow or break, over real loopback WebRTC.

The server runs in this process, so its peers, tasks, aiortc tracks and file descriptors are this
process's: the checks read them directly (every bound is a count, none a speed).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os

import httpx
import pytest
import uvicorn
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpreceiver import RemoteStreamTrack

from app import webrtc
from app.client import Client
from app.server import create_app
from app.webrtc import PeerManager
from engine.runtime import Engine, EngineConfig
from tests.test_app_webrtc import CONFIG, moving_camera, still_camera
from tests.test_whip import SDP, Player, Publisher, no_loop_errors  # noqa: F401 - autouse: no stray exceptions


class Running:
    def __init__(self, url: str, engine: Engine, peers: PeerManager) -> None:
        self.url, self.engine, self.peers = url, engine, peers


@pytest.fixture
async def server(tiny, request):
    """The API (no page) on a free 127.0.0.1 port; ``peers`` is the server's own :class:`PeerManager`."""
    options = {"max_sessions": 2, "idle_timeout": 10.0, "input_timeout": 5.0, "connect_timeout": 15.0,
               **getattr(request, "param", {})}
    engine = Engine(EngineConfig(stream=CONFIG, max_sessions=options["max_sessions"],
                                 idle_timeout=options["idle_timeout"], shutdown_timeout=5), components=tiny)
    peers = PeerManager(engine, input_timeout=options["input_timeout"], connect_timeout=options["connect_timeout"])
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, peers), host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(uv.serve())
    while not uv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}", engine, peers)
    finally:
        uv.should_exit = True
        await asyncio.wait_for(task, 15)


async def eventually(condition, timeout: float, message: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, message
        await asyncio.sleep(0.05)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_remote_tracks() -> set[RemoteStreamTrack]:
    """Every track aiortc decodes incoming media into, in this process (server and test clients alike)."""
    return {o for o in gc.get_objects() if _is_remote_track(o) and o.readyState == "live"}


def _is_remote_track(candidate: object) -> bool:
    try:
        return isinstance(candidate, RemoteStreamTrack)
    except ReferenceError:  # a weak proxy whose object is gone (other tests leave some behind)
        return False


class Watcher:
    """A peer without a camera: a receive-only video offer to ``/offer``."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")

    async def offer(self, url: str, complete: bool = True) -> int:
        """POST the offer; with ``complete`` apply the answer (connect), else leave ICE unfinished."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            response = await http.post("/offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer"})
        if response.status_code == 200 and complete:
            await self.pc.setRemoteDescription(RTCSessionDescription(response.json()["sdp"], "answer"))
        return response.status_code


class SendingPlayer(Player):
    """A WHEP player that also sends a camera (sendrecv), as a careless or hostile one may."""

    def __init__(self) -> None:
        super().__init__()
        self.pc.getTransceivers()[0].sender.replaceTrack(moving_camera())
        self.pc.getTransceivers()[0].direction = "sendrecv"


def video_direction(sdp: str) -> str:
    video = sdp.split("m=video", 1)[1].split("\nm=", 1)[0]
    return next(d for d in ("sendrecv", "sendonly", "recvonly", "inactive") if f"a={d}" in video)


# ------------------------------------------------------------------ item 1: every incoming track drained or refused

async def test_a_whep_player_that_sends_video_is_answered_sendonly_and_nothing_piles_up(server) -> None:
    before = live_remote_tracks()
    publisher, player = Publisher(), SendingPlayer()
    try:
        stream_id = (await publisher.publish(server.url)).headers["location"].rsplit("/", 1)[1]
        watched = await player.watch(f"{server.url}/whep/{stream_id}")
        assert watched.status_code == 201, watched.text
        assert video_direction(watched.text) == "sendonly", "a player only watches: its video is refused"
        await player.wait_frames(20)  # a second and more of the player's camera has been offered meanwhile
        queued = [(track.kind, track._queue.qsize()) for track in live_remote_tracks() - before]
        assert all(size <= 5 for _, size in queued), f"decoded frames pile up unread: {queued}"
    finally:
        await asyncio.gather(publisher.pc.close(), player.close())


# ------------------------------------------------------------------ item 3: peers without a camera

@pytest.mark.parametrize("server", [{"max_sessions": 2, "input_timeout": 1.0}], indirect=True)
async def test_peers_without_a_camera_hold_no_slot_beyond_max_sessions_and_are_closed(server) -> None:
    fds = open_fds()
    watchers = [Watcher() for _ in range(3)]
    try:
        assert [await w.offer(server.url) for w in watchers] == [200, 200, 503]
        await eventually(lambda: not server.peers.peers, 10, "a peer that sends no camera frames must time out")
        assert not server.engine.sessions(), "its session closes with it"
    finally:
        await asyncio.gather(*(w.pc.close() for w in watchers))
    await eventually(lambda: open_fds() <= fds + 2, 10, f"file descriptors leaked: {fds} -> {open_fds()}")


@pytest.mark.parametrize("server", [{"max_sessions": 2, "idle_timeout": 0.5, "input_timeout": 60.0}], indirect=True)
async def test_a_reaped_session_closes_its_peer_and_peers_never_exceed_max_sessions(server) -> None:
    watchers, statuses = [], []
    try:
        for _ in range(12):  # unconnected peers: nobody reads their sessions, which the engine reaps
            watchers.append(Watcher())
            statuses.append(await watchers[-1].offer(server.url, complete=False))
            assert len(server.peers.peers) <= 2, "--max-sessions counts peers, not only engine sessions"
            await asyncio.sleep(0.3)
        assert statuses.count(200) > 2, statuses  # slots came back as sessions were reaped
        await eventually(lambda: not server.engine.sessions(), 5, "sessions are reaped")
        await eventually(lambda: not server.peers.peers, 5, "a peer whose session closed must close")
    finally:
        await asyncio.gather(*(w.pc.close() for w in watchers))


# ------------------------------------------------------------------ item 4: players that never connect

@pytest.mark.parametrize("server", [{"connect_timeout": 3.0}], indirect=True)
async def test_players_that_never_connect_give_their_slot_back(server) -> None:
    from app.whip import MAX_VIEWERS

    publisher, stalled, player = Publisher(), [RTCPeerConnection() for _ in range(MAX_VIEWERS)], Player()
    try:
        stream_id = (await publisher.publish(server.url)).headers["location"].rsplit("/", 1)[1]
        # the publisher is held to the same connect timeout: let it connect before loading the machine
        await eventually(lambda: publisher.pc.connectionState == "connected", 10, "the publisher did not connect")
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            for pc in stalled:  # offers whose ICE never completes: the answer is never applied
                pc.addTransceiver("video", direction="recvonly")
                await pc.setLocalDescription(await pc.createOffer())
                assert (await http.post(f"/whep/{stream_id}", content=pc.localDescription.sdp,
                                        headers=SDP)).status_code == 201
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while (await player.watch(f"{server.url}/whep/{stream_id}")).status_code == 503:
            assert loop.time() < deadline, "players that never connected still hold every slot"
            await player.close()
            player = Player()
            await asyncio.sleep(0.2)
        await player.wait_frames(5)
    finally:
        await asyncio.gather(publisher.pc.close(), player.close(), *(pc.close() for pc in stalled))


# ------------------------------------------------------------------ item 10: one control channel per peer

def stats_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("stats-")]


async def test_only_the_first_data_channel_is_a_control_channel(server) -> None:
    client = Client(still_camera())
    extra = [client.pc.createDataChannel(f"extra-{i}") for i in range(3)]
    try:
        await client.connect(server.url)
        await client.wait_frames(3)
        await eventually(lambda: all(c.readyState == "closed" for c in extra), 10, "extra channels are closed")
        assert len(stats_tasks()) == 1, "one stats task per peer, whatever it opens"
        assert (await client.send({"seed": 3}))["type"] == "applied", "the control channel still works"
    finally:
        await client.close()


# ------------------------------------------------------------------ item 7: every message answered, none ends the peer

async def send_raw(client: Client, text: str, timeout: float = 10.0) -> dict:
    await asyncio.wait_for(client.opened.wait(), timeout)
    seen = len(client.messages)
    client.channel.send(text)
    await eventually(lambda: any(m.get("type") in ("applied", "error") for m in client.messages[seen:]), timeout,
                     f"no reply to {text[:40]!r}…")
    return next(m for m in client.messages[seen:] if m.get("type") in ("applied", "error"))


async def test_hostile_control_messages_get_short_error_replies_and_the_stream_goes_on(server) -> None:
    client = Client(still_camera())
    try:
        await client.connect(server.url)
        await client.wait_frames(3)
        for text, says in [("[" * 6000, "nested"), ('{"a": ' * 2500, "nested"),
                           (json.dumps({"prompt": "猫" * 60_000}, ensure_ascii=False), "characters"),
                           ("{not json", "JSON")]:
            reply = await send_raw(client, text)
            assert reply["type"] == "error" and says in reply["error"], (text[:40], reply)
            assert len(json.dumps(reply)) <= 1_000, "replies never echo unbounded input"
        reply = await send_raw(client, json.dumps({"negative_prompt": "x" * 5_000}))
        assert len(json.dumps(reply)) <= 1_000, reply["type"]
        assert (await client.send({"seed": 4}))["type"] == "applied"
        await client.wait_frames(5)
    finally:
        await client.close()


# ------------------------------------------------------------------ item 10: control floods

async def test_a_flood_of_control_messages_is_rate_limited_and_the_newest_applies(server) -> None:
    client = Client(still_camera())
    try:
        await client.connect(server.url)
        await client.wait_frames(3)
        await asyncio.wait_for(client.opened.wait(), 10)
        loop = asyncio.get_running_loop()
        start, seen = loop.time(), len(client.messages)
        for seed in range(1, 501):
            client.channel.send(json.dumps({"seed": seed}))
        session = server.engine.sessions()[0]
        await eventually(lambda: session.config.seed == 500, 10, "the newest of a flood is applied, late or not")
        replies = [m for m in client.messages[seen:] if m.get("type") in ("applied", "error")]
        allowed = webrtc.CONTROL_BURST + webrtc.CONTROL_RATE * (loop.time() - start) + 1
        assert sum(m["type"] == "applied" for m in replies) <= allowed, "control messages are rate-limited"
        throttled = [m for m in replies if m["type"] == "error"]
        assert throttled and "per second" in throttled[0]["error"], "the first dropped message says why"
        assert len(throttled) < 10, "dropped messages get one error per burst, not one each"
        await client.wait_frames(5)  # the sender's own camera went on
    finally:
        await client.close()


async def test_the_server_asks_no_stun_server_unless_one_is_configured(server, monkeypatch) -> None:
    """aiortc's default asks a public STUN server on every offer; the server answers with its own addresses."""
    import aiortc.rtcicetransport

    asked: list = []
    real = aiortc.rtcicetransport.Connection

    def connection(*args, **kwargs):
        asked.append(kwargs.get("stun_server"))
        return real(*args, **kwargs)

    watcher = Watcher()  # the test's own client, made first: only the server's connections are recorded
    monkeypatch.setattr(aiortc.rtcicetransport, "Connection", connection)
    try:
        assert await watcher.offer(server.url) == 200
    finally:
        await watcher.pc.close()
    assert asked and all(stun is None for stun in asked), asked
