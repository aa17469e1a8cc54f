"""Local sources (``--source``): files looped at their own rate, streams that end, clear refusals at
start-up, and the end-to-end path through the real WHIP hub, on the tiny model."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.server
import logging
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.local import LocalError, add_local_arguments, attach_local, plan_local
from app.sources import SourceError, SourceReader, SourceSpec, camera_hint, open_source, redacted
from app.webrtc import PeerManager
from app.whip import WhipHub
from engine.config import StreamConfig
from engine.runtime import Engine, EngineConfig
from engine.session import EngineBusyError
from engine.synthetic import moving_frame

SIZE = 64
CONFIG = StreamConfig(t_index_list=(32, 45), width=SIZE, height=SIZE, cfg_type="self", guidance_scale=1.2,
                      prompt="a watercolor painting", seed=2)
CLIP_FPS, CLIP_FRAMES = 10, 8


def write_clip(path: Path, frames: int = CLIP_FRAMES, fps: int = CLIP_FPS, invert: bool = False) -> Path:
    """A short MJPG clip of the moving test picture (96×64), inverted for a second, different source."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (96, 64))
    assert writer.isOpened()
    for index in range(frames):
        picture = moving_frame(index * 3, 64, 96)
        writer.write(cv2.cvtColor(255 - picture if invert else picture, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_clip(tmp_path / "clip.avi")


@pytest.fixture
async def engine(tiny):
    async with Engine(EngineConfig(stream=CONFIG, max_sessions=4, idle_timeout=10), components=tiny) as running:
        yield running


@pytest.fixture
async def hub(engine):
    hub = WhipHub(PeerManager(engine))
    try:
        yield hub
    finally:
        await hub.close()


def local_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_local_arguments(parser)
    return parser.parse_args(list(argv))


async def frames_from(track, count: int, timeout: float = 20.0) -> list[np.ndarray]:
    """``count`` frames of a subscribed track (RGB arrays); fails after ``timeout`` s."""
    frames: list[np.ndarray] = []
    async with asyncio.timeout(timeout):
        while len(frames) < count:
            frames.append((await track.recv()).to_ndarray(format="rgb24"))
    return frames


async def until(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.02)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@contextlib.contextmanager
def serving(directory: Path):
    """An HTTP server on loopback for ``directory``: a stream URL that ends when its file does."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_source_flags_name_cameras_files_and_streams(tmp_path: Path) -> None:
    assert SourceSpec.parse("0") == SourceSpec("camera", 0)
    assert SourceSpec.parse("rtsp://me:secret@cam.local/live").kind == "stream"
    assert SourceSpec.parse("https://example.org/live.m3u8").kind == "stream"
    assert SourceSpec.parse(str(tmp_path / "a.mp4")) == SourceSpec("file", str(tmp_path / "a.mp4"))
    assert SourceSpec.parse("rtsp://me:secret@cam.local:554/live").name == "rtsp://me:***@cam.local:554/live"
    assert redacted("rtsp://cam.local/live") == "rtsp://cam.local/live"
    with pytest.raises(SourceError, match="ftp:// is not a stream"):
        SourceSpec.parse("ftp://example.org/clip.mp4")


async def test_a_file_plays_at_its_own_rate_and_loops(engine, clip: Path) -> None:
    capture = open_source(str(clip))
    assert capture.fps == CLIP_FPS and capture.first.shape == (64, 96, 3) and capture.first.dtype == np.uint8
    picture = moving_frame(0, 64, 96)
    assert mean_abs(capture.first, picture) < 8 < mean_abs(capture.first, picture[..., ::-1]), "RGB, not BGR"
    session = await engine.open_session()
    drain = asyncio.create_task(discard_outputs(session))
    reader = SourceReader(capture, session, asyncio.get_running_loop())
    reader.start()
    try:
        await asyncio.sleep(1.5)
        submitted = session.metrics.frames_in
        assert 10 <= submitted <= 20, f"{submitted} frames in 1.5 s of a {CLIP_FPS} fps clip"
        assert submitted > CLIP_FRAMES, "the clip starts again at its end"
        assert session.metrics.outputs > 0 and reader.ended is None
    finally:
        reader.stop()
        assert await asyncio.to_thread(reader.join, 2.0), "the reader stops promptly"
        session.close()
        await drain
    assert not capture.video.isOpened(), "the reader releases its capture"


async def discard_outputs(session) -> None:
    async for _ in session.outputs():
        pass


def test_missing_and_undecodable_files_are_refused_in_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as missing:
        open_source(str(tmp_path / "nowhere.mp4"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(20_000))
    with pytest.raises(SourceError) as undecodable:
        open_source(str(junk))
    assert "no such file" in str(missing.value) and "camera index" in str(missing.value)
    assert "cannot read video" in str(undecodable.value) and "ffmpeg -i" in str(undecodable.value)
    for error in (missing.value, undecodable.value):
        assert "\n" not in str(error)


def test_a_camera_that_is_not_there_is_refused_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(SourceError) as refused:
        open_source("97", timeout=3.0)
    assert time.monotonic() - started < 4.0
    message = str(refused.value)
    assert message.startswith("camera 97 ") and "another app" in message and "\n" not in message
    assert camera_hint() in message  # on Linux: how to list the cameras there are


def test_a_stream_that_does_not_answer_is_refused_after_the_timeout() -> None:
    with socket.socket() as silent:  # accepts the connection, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(SourceError) as refused:
            open_source(f"rtsp://me:secret@127.0.0.1:{silent.getsockname()[1]}/live", timeout=1.0)
        assert time.monotonic() - started < 3.0
    message = str(refused.value)
    assert "did not answer within 1 s" in message and "secret" not in message and "\n" not in message


def test_plan_local_fails_fast_with_the_sources_error(tmp_path: Path, clip: Path) -> None:
    with pytest.raises(LocalError, match="no such file"):
        plan_local(local_args("--source", str(clip), "--source", str(tmp_path / "gone.avi")), (SIZE, SIZE))
    plan = plan_local(local_args("--source", str(clip)), (SIZE, SIZE))
    assert [capture.name for capture in plan.captures] == ["clip.avi"]
    plan.close()
    assert not plan.captures[0].video.isOpened(), "closing an unattached plan releases its captures"


async def test_source_end_to_end_is_a_hub_stream_with_stylized_frames(engine, hub: WhipHub, clip: Path) -> None:
    plan = plan_local(local_args("--source", str(clip)), (SIZE, SIZE))
    async with attach_local(plan, engine)(hub):
        [(stream_id, published)] = hub.streams.items()
        assert published.kind == "source" and published.name == "clip.avi" and len(stream_id) >= 16
        track = hub.subscribe(stream_id)
        frames = await frames_from(track, 8)
        track.stop()
        assert all(frame.shape == (SIZE, SIZE, 3) for frame in frames)
        inputs = [cv2.resize(moving_frame(i * 3, 64, 96)[:, 16:80], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                  for i in range(CLIP_FRAMES)]
        echo = min(mean_abs(frames[-1], picture) for picture in inputs)
        assert echo > 15, f"the stream carries the model's output, not the clip echoed ({echo:.1f})"
        assert engine.snapshot()["sessions_active"] == 1
        left = time.monotonic()
    assert time.monotonic() - left < 3.0, "leaving stops the reader and closes the session promptly"
    await until(lambda: not hub.streams, what="the source's stream ending")
    assert engine.snapshot()["sessions_active"] == 0
    assert not any(t.name.startswith("diffcam-source") for t in threading.enumerate())


async def test_a_source_that_ends_ends_its_stream_and_the_rest_keep_serving(
        engine, hub: WhipHub, clip: Path, tmp_path: Path, caplog) -> None:
    write_clip(tmp_path / "short.avi", frames=30)
    ended: list[str] = []
    hub.add_listener(lambda *_: None, lambda _, published: ended.append(published.name))
    caplog.set_level(logging.WARNING, logger="app.sources")
    with serving(tmp_path) as url:
        plan = plan_local(local_args("--source", str(clip), "--source", f"{url}/short.avi", "--source-reconnect", "0"),
                          (SIZE, SIZE))
        async with attach_local(plan, engine)(hub):
            await until(lambda: ended, what="the HTTP stream ending at the end of its file")
            assert ended == [f"{url}/short.avi"]
            [(stream_id, published)] = hub.streams.items()
            assert published.name == "clip.avi"
            track = hub.subscribe(stream_id)
            await frames_from(track, 5)  # the file's stream goes on
            track.stop()
            assert engine.snapshot()["sessions_active"] == 1
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "short.avi" in warnings[0] and "keeps serving" in warnings[0], warnings
            session = await engine.open_session()  # and the engine still opens new sessions
            session.close()


async def test_a_stream_that_stops_is_reopened_and_keeps_its_stream_until_it_stays_away(
        engine, hub: WhipHub, tmp_path: Path, caplog) -> None:
    short = write_clip(tmp_path / "short.avi", frames=30)
    ended: list[str] = []
    hub.add_listener(lambda *_: None, lambda _, published: ended.append(published.name))
    caplog.set_level(logging.WARNING, logger="app.sources")
    with serving(tmp_path) as url:
        plan = plan_local(local_args("--source", f"{url}/short.avi", "--source-reconnect", "3"), (SIZE, SIZE))
        async with attach_local(plan, engine)(hub):
            # each time the HTTP stream reaches the end of its file, the reader opens it again
            await until(lambda: "is back" in caplog.text, timeout=20, what="the stream reopened")
            [(stream_id, published)] = hub.streams.items()
            assert not ended and published.name == f"{url}/short.avi"
            track = hub.subscribe(stream_id)
            await frames_from(track, 3)  # the same stream goes on
            track.stop()
            started = time.monotonic()
            short.unlink()  # now it cannot come back: tried for 3 s, then its stream ends
            await until(lambda: ended, timeout=20, what="the stream ending once the source stayed away")
            assert time.monotonic() - started >= 2.0, "it gave up before --source-reconnect ran out"
            assert not hub.streams and engine.snapshot()["sessions_active"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("did not come back within 3 s" in m for m in messages), messages


def test_source_reconnect_is_checked() -> None:
    with pytest.raises(LocalError, match="--source-reconnect -1 is out of range"):
        plan_local(local_args("--source-reconnect", "-1"), (SIZE, SIZE))


async def test_attaching_more_sources_than_the_engine_takes_frees_everything(engine, hub: WhipHub, clip: Path) -> None:
    plan = plan_local(local_args(*["--source", str(clip)] * 5), (SIZE, SIZE))  # the engine takes 4 sessions
    with pytest.raises(EngineBusyError):
        async with attach_local(plan, engine)(hub):
            pass
    await until(lambda: not hub.streams, what="the opened sources' streams ending")
    assert engine.snapshot()["sessions_active"] == 0
    assert not any(capture.video.isOpened() for capture in plan.captures), "every capture released"
