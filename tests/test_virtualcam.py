"""The virtual camera (``--virtual-cam``), through pyvirtualcam's own backend registry: a recording backend
stands in for v4l2loopback / OBS, which this machine does not have."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import pyvirtualcam
from pyvirtualcam.camera import BACKENDS
from pyvirtualcam.util import encode_fourcc

from app.local import LocalError, attach_local, plan_local
from app.virtualcam import VirtualCamera, VirtualCamError, install_hint, open_camera, waiting_frame
from app.whip import NotFound, WhipHub
from tests.test_sources import SIZE, clip, engine, frames_from, hub, local_args, until, write_clip  # noqa: F401 - fixtures

TEST_BACKEND = "diffcam-recording"


class RecordingBackend:
    """A pyvirtualcam backend that keeps what it is sent, and when (pyvirtualcam's Backend protocol)."""

    opened: list[RecordingBackend] = []

    def __init__(self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw) -> None:
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self.name = device or "recording camera"
        self.frames: list[np.ndarray] = []
        self.times: list[float] = []
        self.closed = False
        RecordingBackend.opened.append(self)

    def send(self, frame: np.ndarray) -> None:
        assert not self.closed, "sent to after close"
        self.frames.append(frame.reshape(self.height, self.width, 3).copy())
        self.times.append(time.monotonic())

    def close(self) -> None:
        self.closed = True

    def device(self) -> str:
        return self.name

    def native_fourcc(self) -> int | None:
        return None


@pytest.fixture
def recording():
    """Registers the recording backend for one test; yields the backends opened."""
    RecordingBackend.opened = []
    pyvirtualcam.register_backend(TEST_BACKEND, RecordingBackend)
    try:
        yield RecordingBackend.opened
    finally:
        del BACKENDS[TEST_BACKEND]


def distinct(frames: list[np.ndarray]) -> int:
    return len({frame.tobytes() for frame in frames})


def sent_since(backend: RecordingBackend, start: int) -> list[np.ndarray]:
    return backend.frames[start:]


def test_without_a_virtual_camera_it_says_what_to_install_in_one_line() -> None:
    with pytest.raises(VirtualCamError) as missing:
        open_camera(SIZE, SIZE)  # the platform's own backends: no v4l2loopback module here
    message = str(missing.value)
    assert "\n" not in message and install_hint() in message
    with pytest.raises(VirtualCamError, match="--virtual-cam-backend 'nope' is unknown; available here"):
        open_camera(SIZE, SIZE, backend="nope")
    with pytest.raises(LocalError) as planned:  # before the model loads
        plan_local(local_args("--virtual-cam", "/dev/video57"), (SIZE, SIZE))
    assert "/dev/video57" in str(planned.value) and "\n" not in str(planned.value)


def test_each_platform_is_told_its_own_virtual_camera() -> None:
    assert "v4l2loopback-dkms" in install_hint("Linux") and "exclusive_caps=1" in install_hint("Linux")
    assert "OBS Studio 28" in install_hint("Darwin")
    assert "OBS Studio 26" in install_hint("Windows") and "Unity Capture" in install_hint("Windows")


def test_virtual_camera_flags_are_checked_before_anything_opens(recording) -> None:
    cases = [
        (("--virtual-cam-source", "1"), "add --virtual-cam"),
        (("--virtual-cam", "--virtual-cam-fps", "0"), "--virtual-cam-fps 0 is out of range"),
        (("--virtual-cam", "--virtual-cam-source", "2", "--source", "x.avi"), "names no --source; allowed: 1 to 1"),
    ]
    for argv, message in cases:
        with pytest.raises(LocalError, match=message):
            plan_local(local_args(*argv), (SIZE, SIZE))
    assert not recording, "nothing was opened"


async def test_before_any_stream_it_sends_the_waiting_frame_at_its_rate(recording, hub: WhipHub) -> None:
    camera = VirtualCamera(open_camera(80, 48, 20, backend=TEST_BACKEND))
    [backend] = recording
    camera.start(hub)
    try:
        await asyncio.sleep(2.0)
    finally:
        await camera.aclose()
    sent = len(backend.frames)
    assert 30 <= sent <= 50, f"{sent} frames in 2 s at 20 fps"
    assert backend.fourcc == encode_fourcc("raw ") and (backend.width, backend.height) == (80, 48)
    assert all(np.array_equal(frame, waiting_frame(80, 48)) for frame in backend.frames)
    assert backend.frames[0].mean() < 30, "dim, not a bright test card"
    assert backend.closed and camera.status()["frames_sent"] == sent
    assert not any(thread.name == "diffcam-virtual-cam" for thread in threading.enumerate()), "the sender stopped"


async def test_it_shows_the_stylized_stream_and_repeats_frames_while_the_model_is_slower(
        recording, engine, hub: WhipHub, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "slow.avi", frames=20, fps=4)  # a stream that changes 4 times a second
    plan = plan_local(local_args("--source", str(clip), "--virtual-cam", "--virtual-cam-backend", TEST_BACKEND,
                                 "--virtual-cam-fps", "20"), (SIZE, SIZE))
    [backend] = recording
    async with attach_local(plan, engine)(hub):
        [stream_id] = hub.streams
        track = hub.subscribe(stream_id)
        produced = await frames_from(track, 6)  # what the stream made, as every subscriber sees it
        track.stop()
        status = plan.virtual_camera.status()
    assert backend.closed, "leaving closes the virtual camera"
    assert status["following"] == stream_id and status["device"] == "recording camera"
    assert (status["width"], status["height"], status["fps"]) == (SIZE, SIZE, 20)
    shown = [f for f in backend.frames if not np.array_equal(f, waiting_frame(SIZE, SIZE))]
    assert all(f.shape == (SIZE, SIZE, 3) and f.dtype == np.uint8 for f in backend.frames)
    assert len(shown) > 2 * distinct(shown), "the newest frame is sent again until the model makes the next"
    stylized = {frame.tobytes() for frame in produced}
    assert sum(frame.tobytes() in stylized for frame in shown) >= 3, "it sends the stream's own output"


async def test_follow_picks_a_stream_and_the_next_live_one_takes_over_when_it_ends(
        recording, engine, hub: WhipHub, tmp_path: Path) -> None:
    clips = [write_clip(tmp_path / "a.avi"), write_clip(tmp_path / "b.avi", invert=True)]
    plan = plan_local(local_args("--source", str(clips[0]), "--source", str(clips[1]), "--virtual-cam",
                                 "--virtual-cam-backend", TEST_BACKEND, "--virtual-cam-fps", "20"), (SIZE, SIZE))
    [backend] = recording
    camera = plan.virtual_camera
    async with attach_local(plan, engine)(hub):
        first, second = hub.streams
        assert camera.status()["following"] == first, "the first stream that started"
        await shows_stream_of(backend, hub, first)

        camera.follow(second)
        assert camera.status()["chosen"]
        await until(lambda: camera.status()["following"] == second, what="following the chosen stream")
        await shows_stream_of(backend, hub, second)
        with pytest.raises(NotFound):
            camera.follow("no-such-stream")

        await hub.unpublish(second)  # the chosen stream ends: the next live one takes over
        await until(lambda: camera.status()["following"] == first, what="going back to the live stream")
        assert not camera.status()["chosen"]
        await shows_stream_of(backend, hub, first)

        await hub.unpublish(first)  # none left: the waiting frame again
        await until(lambda: camera.status()["following"] is None, what="following nothing")
        start = len(backend.frames)
        await until(lambda: len(backend.frames) > start + 3, what="frames sent after the last stream ended")
        assert np.array_equal(backend.frames[-1], waiting_frame(SIZE, SIZE))


async def test_the_chosen_source_feeds_it_from_the_start(recording, engine, hub: WhipHub, tmp_path: Path) -> None:
    clips = [write_clip(tmp_path / "a.avi"), write_clip(tmp_path / "b.avi", invert=True)]
    plan = plan_local(local_args("--source", str(clips[0]), "--source", str(clips[1]), "--virtual-cam",
                                 "--virtual-cam-backend", TEST_BACKEND, "--virtual-cam-source", "2"), (SIZE, SIZE))
    async with attach_local(plan, engine)(hub):
        assert plan.virtual_camera.status()["following"] == list(hub.streams)[1]


async def shows_stream_of(backend: RecordingBackend, hub: WhipHub, stream_id: str) -> None:
    """The camera sends frames that stream ``stream_id`` produced (and no other stream did)."""
    others = [hub.subscribe(other) for other in hub.streams if other != stream_id]
    track = hub.subscribe(stream_id)
    start = len(backend.frames)
    try:
        produced = {frame.tobytes() for frame in await frames_from(track, 4)}
        rivals = {frame.tobytes() for other in others for frame in await frames_from(other, 2)}
    finally:
        for subscribed in [track, *others]:
            subscribed.stop()
    sent = [frame.tobytes() for frame in sent_since(backend, start)]
    assert any(frame in produced for frame in sent), "the camera shows the followed stream's output"
    assert not any(frame in rivals for frame in sent[len(sent) // 2:]), "and not another stream's"


async def test_the_app_serves_a_source_and_its_virtual_camera_follows_a_whip_stream_on_request(
        recording, tiny, clip: Path) -> None:
    """What ``python app/main.py --source FILE --virtual-cam --no-ui`` serves: the source is a listed
    stream that /view plays, and PUT /virtual-cam switches the camera to OBS's stream."""
    import httpx

    from app.serve import engine_app
    from engine.config import StreamConfig
    from engine.runtime import Engine, EngineConfig
    from tests.test_streams import published, serving
    from tests.test_whip import Player

    config = StreamConfig(t_index_list=(32, 45), width=SIZE, height=SIZE)
    engine = Engine(EngineConfig(stream=config, max_sessions=2, idle_timeout=10), components=tiny)
    plan = plan_local(local_args("--source", str(clip), "--virtual-cam", "--virtual-cam-backend", TEST_BACKEND),
                      (SIZE, SIZE))
    app = engine_app(engine, ui=False, attachments=[attach_local(plan, engine)], virtual_camera=plan.virtual_camera)
    async with serving(app) as port:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            streams = (await http.get("/streams")).json()["streams"]
            assert [s["kind"] for s in streams] == ["source"] and clip.name in streams[0]["name"]
            source_id = streams[0]["id"]
            await until(lambda: (recording[0].frames and recording[0].frames[-1].mean() > 2 * 16), 30)
            assert (await http.get("/virtual-cam")).json()["following"] == source_id

            player = Player()  # what /view/<id> does in a browser
            publisher, whip_id = await published(url)
            try:
                assert (await player.watch(f"{url}/whep/{source_id}")).status_code == 201
                await player.wait_frames(3)
                assert player.frames[-1].shape == (SIZE, SIZE, 3)

                assert (await http.put("/virtual-cam", json={"stream": "nosuch"})).status_code == 404
                assert (await http.put("/virtual-cam", json={"stream": 5})).status_code == 400
                followed = await http.put("/virtual-cam", json={"stream": whip_id})
                assert followed.status_code == 200 and followed.json()["following"] == whip_id
                assert (await http.put("/virtual-cam", json={"stream": None})).json()["following"] == source_id
            finally:
                await asyncio.gather(publisher.pc.close(), player.close())
    assert recording[0].closed, "the virtual camera is closed with the server"
    assert engine.snapshot()["sessions_active"] == 0


def test_a_missing_source_stops_the_start_in_one_line_before_the_model_loads(capsys, monkeypatch) -> None:
    from app import main as app_main
    from engine.runtime import Engine

    monkeypatch.setattr(Engine, "load", lambda *_: pytest.fail("the model loaded before the source was checked"))
    assert app_main.main(["--model", "tiny", "--no-ui", "--source", "/no/such/clip.mp4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffcam: ") and "/no/such/clip.mp4" in err[0], err
