"""The sharded stream served to the app (``--devices cpu,cpu --parallel asyncdiff``): ``ShardedEngine``.

Two CPU ranks (gloo), the tiny preset at 64². Every call synchronous (a warm-up longer than
the test) makes a session's frames equal one device's: what the engine adds (the driver thread,
newest-frame-wins, two calls in flight, one session at a time, updates between calls) must
not change a pixel. The asynchronous schedule's fidelity is tests/test_sharded.py's subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from typing import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio
import torch
import uvicorn

from app.client import Client, SyntheticCamera
from app.serve import engine_app
from engine.parallel.sharded_engine import ShardedEngine
from engine.session import EngineBusyError, FrameError, SessionClosedError
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frame
from tests.test_replicas import STREAM, WAIT_S, frames, replica_config, wait_until

ALL_SYNC = 10**6  # warm-up calls: longer than any test, so every call is synchronous


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@contextlib.asynccontextmanager
async def started(engine: ShardedEngine) -> AsyncIterator[list[int]]:
    """``engine`` started (its ranks' pids given), then closed; none of its ranks is left."""
    await asyncio.wait_for(engine.start(), 120)
    pids = list(engine.stream.pids)
    try:
        yield pids
    finally:
        await asyncio.wait_for(engine.aclose(), 60)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]


async def offer_until_closed(session, frames_at_most: int) -> None:
    """Keep offering frames, as a camera does, until the session is closed (or ``frames_at_most`` were offered)."""
    for k in range(frames_at_most):
        if session.closed:
            return
        session.submit(frames(1, seed=k)[0])
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def sharded():
    engine = ShardedEngine(replica_config(), warmup_calls=ALL_SYNC)
    await asyncio.wait_for(engine.start(), 120)
    pids = list(engine.stream.pids)
    try:
        yield engine
    finally:
        await engine.aclose()
        assert not [p for p in multiprocessing.active_children() if p.pid in pids]


async def lockstep(session, pictures: list[np.ndarray], updates: dict[int, dict] | None = None) -> list:
    """Submit one picture at a time, each once the previous one went through (``updates[k]`` before picture
    k); the outputs."""
    outputs = []
    for k, picture in enumerate(pictures):
        if k in (updates or {}):
            session.update(**updates[k])
        done = session.metrics.processed + 1
        session.submit(picture, pts=k)
        await wait_until(lambda: session.metrics.processed >= done, what=f"frame {k} processed")
        if k >= len(STREAM.t_index_list) - 1:  # a frame leaves n-1 calls after it entered
            outputs.append(await asyncio.wait_for(session.next_output(), WAIT_S))
    return outputs


def one_device(tiny, pictures: list[np.ndarray], updates: dict[int, dict] | None = None) -> list[np.ndarray]:
    """What one device makes of ``pictures`` (``updates[k]`` applied before picture k), as lockstep collects it."""
    stream = StreamDiffusion(tiny, STREAM)
    outputs = []
    for k, picture in enumerate(pictures):
        if k in (updates or {}):
            stream.update(**updates[k])
        output = stream(picture)
        if output is not None:
            outputs.append(output)
    return outputs


def assert_same(got: list, want: list[np.ndarray]) -> None:
    """``got``: lockstep's outputs, each naming the frame it came from, in order."""
    assert len(got) == len(want) and got
    assert [o.frame_id for o in got] == list(range(len(got))), "an output names the wrong input frame"
    worst = max(int(np.abs(o.frame.astype(int) - b.astype(int)).max()) for o, b in zip(got, want))
    assert worst <= 1, f"sharded frames differ from one device's by up to {worst} levels"


@pytest.mark.asyncio(loop_scope="class")
class TestOneStreamShardedOverTwoRanks:
    async def test_a_session_makes_what_one_device_makes(self, sharded, tiny) -> None:
        pictures = frames(6, seed=1)
        session = await sharded.open_session()
        try:
            got = await lockstep(session, pictures)
        finally:
            session.close()
        assert_same(got, one_device(tiny, pictures))
        snap = sharded.snapshot()
        assert snap["bounds"][0] == 0 and len(snap["ranks"]) == 2 and snap["bytes_per_call"] > 0
        assert "UNet split over 2 processes" in sharded.components.device

    async def test_one_session_at_a_time_and_the_next_starts_afresh(self, sharded, tiny) -> None:
        first = await sharded.open_session()
        await lockstep(first, frames(3, seed=2))
        with pytest.raises(EngineBusyError, match="one session at a time"):
            await sharded.open_session()
        first.close()
        await wait_until(lambda: not sharded.sessions(), what="the first session gone")
        pictures = frames(5, seed=3)
        second = await sharded.open_session(prompt="a dog")
        try:
            got = await lockstep(second, pictures)
        finally:
            second.close()
        assert_same(got, one_device(tiny, pictures, {0: {"prompt": "a dog"}}))
        assert sharded.snapshot()["sessions_rejected"] >= 1

    async def test_updates_apply_between_calls_and_bad_ones_change_nothing(self, sharded, tiny) -> None:
        pictures = frames(6, seed=4)
        session = await sharded.open_session()
        try:
            with pytest.raises(ValueError, match="similarity filter"):
                session.update(similarity_filter=True)
            with pytest.raises(ValueError, match="new stream"):
                session.update(width=128)
            got = await lockstep(session, pictures, {3: {"prompt": "a house", "guidance_scale": 2.0}})
        finally:
            session.close()
        assert_same(got, one_device(tiny, pictures, {3: {"prompt": "a house", "guidance_scale": 2.0}}))

    async def test_newest_frame_wins_under_load(self, sharded) -> None:
        session = await sharded.open_session()
        try:
            for k in range(40):  # far faster than two ranks on two shared cores can take them
                session.submit(frames(1, seed=k)[0], pts=k)
                await asyncio.sleep(0.005)
            await wait_until(lambda: session.metrics.processed >= 3, what="frames processed")
            output = await asyncio.wait_for(session.next_output(), WAIT_S)
        finally:
            session.close()
        assert output.frame.shape == (64, 64, 3)
        assert session.metrics.dropped > 0 and session.metrics.processed < 40
        # frames came faster than calls: the driver kept a second call in flight behind the first
        assert sharded.snapshot()["most_in_flight"] == 2

    async def test_an_open_given_up_on_leaves_the_engine_serving(self, sharded) -> None:
        import time

        sharded.request(lambda: time.sleep(0.5))  # the driver is busy: the open below waits behind this
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sharded.open_session(), 0.1)
        await asyncio.sleep(0.6)  # the driver reaches the abandoned open, and must pass it by
        session = await asyncio.wait_for(sharded.open_session(), WAIT_S)
        session.close()
        snap = sharded.snapshot()
        assert snap["failure"] is None
        assert snap["sessions_closed"] <= snap["sessions_opened"]  # an open that never went through closes nothing

    async def test_a_frame_that_breaks_fails_alone(self, sharded) -> None:
        """Whatever a frame raises on its way in (here NotImplementedError, not ValueError) is that frame's
        error: the session and the engine serve on."""
        session = await sharded.open_session()
        try:
            session.submit(torch.rand(3, 80, 80).to_sparse(), pts=0)
            with pytest.raises(FrameError, match="frame 0 of session .* failed: the frame cannot be used"):
                await asyncio.wait_for(session.next_output(), WAIT_S)
            got = await lockstep(session, frames(3, seed=5))
        finally:
            session.close()
        assert [o.frame_id for o in got] == [1, 2] and got[0].frame.shape == (64, 64, 3)
        assert session.metrics.errors == 1 and sharded.snapshot()["failure"] is None


async def test_a_killed_rank_ends_the_session_and_new_ones_hear_why() -> None:
    engine = ShardedEngine(replica_config())
    async with started(engine) as pids:
        session = await engine.open_session()
        await lockstep(session, frames(3))
        os.kill(pids[1], signal.SIGKILL)
        await offer_until_closed(session, 200)
        with pytest.raises(SessionClosedError, match="rank 1"):
            await asyncio.wait_for(session.next_output(), 5)
        with pytest.raises(EngineBusyError, match="restart diffcam"):
            await engine.open_session()


async def test_a_rank_that_hangs_ends_the_session_after_the_hang_timeout() -> None:
    # a GPU that hangs raises nothing, and the rank's process lives on: only the call that never ends tells
    engine = ShardedEngine(replica_config(hang_timeout=5.0))
    async with started(engine) as pids:
        session = await engine.open_session()
        await lockstep(session, frames(3))
        os.kill(pids[1], signal.SIGSTOP)
        stopped = asyncio.get_running_loop().time()
        await offer_until_closed(session, 400)
        assert session.closed and asyncio.get_running_loop().time() - stopped < 15, "the ranks are killed at once"
        with pytest.raises(SessionClosedError, match="from the ranks within 5 s"):
            await asyncio.wait_for(session.next_output(), 5)
        assert "within 5 s" in engine.trouble()  # /healthz says it


async def test_a_rank_that_dies_between_sessions_is_reported_within_seconds(caplog) -> None:
    engine = ShardedEngine(replica_config())
    async with started(engine) as pids:
        os.kill(pids[0], signal.SIGKILL)  # nobody is streaming
        await wait_until(lambda: engine.snapshot()["failure"], 15, "the dead rank reported")
        assert "rank 0" in engine.snapshot()["failure"] and "rank 0" in engine.trouble()  # /healthz says it
        assert any("restart diffcam" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        with pytest.raises(EngineBusyError, match="rank 0"):
            await engine.open_session()


async def test_the_app_serves_one_peer_from_the_sharded_stream_and_tells_the_next_it_is_busy() -> None:
    engine = ShardedEngine(replica_config())
    app = engine_app(engine, ui=False, random_weights=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    camera = [moving_frame(i, 120, 160) for i in range(30)]
    clients = [Client(SyntheticCamera(camera, fps=10)) for _ in range(2)]
    try:
        await wait_until(lambda: server.started or task.done(), 120, "the server started")
        if task.done():
            task.result()
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert (await clients[0].connect(url)).status_code == 200
        got = await clients[0].wait_frames(5, timeout=60)
        assert got[-1].shape == (64, 64, 3) and got[-1].mean() > 10
        assert (await clients[1].connect(url)).status_code == 503
    finally:
        for client in clients:
            await client.close()
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def test_the_entry_script_shards_one_stream_and_stops_every_rank() -> None:
    """``python app/main.py --devices cpu,cpu --parallel asyncdiff``: two ranks behind one server; Ctrl+C ends them."""
    import subprocess
    import sys

    import httpx
    import psutil

    from tests.test_main import ROOT, free_port, stop_with_ctrl_c, wait_for_server

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "app/main.py", "--model", "tiny", "--no-ui", "--devices", "cpu,cpu",
                                "--parallel", "asyncdiff", "--resync-every", "30", "--width", "64", "--height", "64",
                                "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(process, port, seconds=120)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["max_sessions"] == 1
        children = psutil.Process(process.pid).children(recursive=True)
        ranks = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(ranks) == 2, f"one process per device: {[c.cmdline() for c in children]}"
    finally:
        output = stop_with_ctrl_c(process, timeout=30)
    assert process.returncode == 0, output
    assert "UNet split over 2 processes" in output and "up to 1 streams" in output, output
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[c.cmdline() for c in alive]}"


@pytest.mark.parametrize(("flags", "says"), [
    (["--parallel", "asyncdiff", "--similarity-filter"], "similarity filter is not supported"),
    (["--parallel", "asyncdiff", "--backend", "compile"], "--backend compile is not supported"),
    (["--parallel", "asyncdiff", "--resync-every", "0"], "--resync-every 0 must be at least 1"),
    (["--parallel", "asyncdiff", "--source", "a.mp4", "--source", "b.mp4"], "one stream at a time"),
    (["--resync-every", "5"], "--resync-every applies to --parallel asyncdiff"),
])
def test_what_the_sharded_stream_cannot_do_stops_the_start_in_one_line(flags, says, capsys, monkeypatch) -> None:
    from app import main as app_main
    from app.local import LocalPlan

    monkeypatch.setattr(app_main, "plan_local", lambda args, size: LocalPlan())  # the files need not exist
    assert app_main.main(["--model", "tiny", "--no-ui", "--devices", "cpu,cpu", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
