"""Replicas: one process per device, each with the whole model; sessions spread over them.

Two replica processes on the CPU (one torch thread each), the tiny preset, 64×64. Each test
bounds its waits; every engine is closed, and what it leaves behind (processes, shared
memory) is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch
import uvicorn
from multiprocessing import shared_memory

from app.client import Client, SyntheticCamera
from app.main import describe
from app.serve import engine_app
from engine.config import StreamConfig
from engine.models import ModelSpec
from engine.parallel.replica_frames import PREFIX, FrameSlots, to_model_rgb
from engine.parallel.replica_process import Fault
from engine.models import ModelUnavailableError
from engine.parallel.replicas import ReplicaEngine, parse_devices, shares
from engine.runtime import Engine, EngineConfig
from engine.session import EngineBusyError, FrameError, SessionClosedError
from engine.synthetic import moving_frame

SIZE = 64
STREAM = StreamConfig(t_index_list=(20, 40), width=SIZE, height=SIZE, cfg_type="self", guidance_scale=1.4,
                      prompt="a cat", seed=4)
WAIT_S = 30.0  # a bound on any one wait (two processes share two cores with other tests)
HANG_S = 6.0  # a round this long hangs: tiny rounds take milliseconds, a second on a loaded machine


def replica_config(**overrides) -> EngineConfig:
    options = dict(model=ModelSpec("tiny", device="cpu"), stream=STREAM, devices=("cpu", "cpu"), max_sessions=4,
                   idle_timeout=30.0, shutdown_timeout=5.0)
    return EngineConfig(**(options | overrides))


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random pictures at the model's size (uint8 RGB), different every frame."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 3, 8, 8)).astype(np.float32) / 255.0
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(SIZE, SIZE), mode="bilinear")
    return list(smooth.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def our_blocks(pids: list[int]) -> list[str]:
    """The shared-memory blocks in /dev/shm made for these replica processes."""
    return [name for name in os.listdir("/dev/shm")
            if name.startswith(PREFIX) and any(name.startswith(f"{PREFIX}{pid}-") for pid in pids)]


async def wait_until(predicate, timeout: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s")
        await asyncio.sleep(0.02)


async def lockstep(session, pictures: list[np.ndarray]) -> list[np.ndarray]:
    """Submit one picture at a time, each once the previous one went through the model; the outputs."""
    outputs = []
    for k, picture in enumerate(pictures):
        done = session.metrics.processed + 1
        session.submit(picture, pts=k)
        await wait_until(lambda: session.metrics.processed >= done, what=f"frame {k} processed")
        if k >= len(STREAM.t_index_list) - 1:  # a frame leaves n-1 calls after it entered
            outputs.append(await asyncio.wait_for(session.next_output(), WAIT_S))
    return outputs


@contextlib.asynccontextmanager
async def started(engine: ReplicaEngine) -> AsyncIterator[list[int]]:
    """``engine`` started (its processes' pids given), then closed; none of its processes or shared memory is left."""
    await asyncio.wait_for(engine.start(), 120)
    pids = [link.process.pid for link in engine.links]
    try:
        yield pids
    finally:
        await asyncio.wait_for(engine.aclose(), 30)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    assert not our_blocks(pids)


@pytest_asyncio.fixture(loop_scope="class", scope="class")
async def replicas():
    engine = ReplicaEngine(replica_config())
    await asyncio.wait_for(engine.start(), 120)
    pids = [link.process.pid for link in engine.links]
    try:
        yield engine
    finally:
        await engine.aclose()
        assert not [p for p in multiprocessing.active_children() if p.pid in pids]
        assert not our_blocks(pids)


# ---------------------------------------------------------------- without processes

def test_sessions_are_shared_out_evenly() -> None:
    assert shares(4, 2) == [2, 2] and shares(5, 2) == [3, 2] and shares(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="max_sessions=1 is fewer than the 2 devices"):
        shares(1, 2)


def test_devices_are_parsed_with_clear_errors() -> None:
    assert parse_devices("0,1") == ("cuda:0", "cuda:1") and parse_devices("cpu, cpu") == ("cpu", "cpu")
    for text, message in (("", "names no device"), ("cpu,0", "all cpu or all CUDA"), ("0,0", "GPU twice"),
                          ("gpu1", "cpu, cuda:N or N"), ("cuda", "index")):
        with pytest.raises(ValueError, match=message):
            parse_devices(text)


def test_frame_slots_copy_and_unlink() -> None:
    slots = FrameSlots.create(f"test-{os.getpid()}", SIZE, SIZE)
    other = FrameSlots.attach(slots.name, SIZE, SIZE)
    picture = frames(1)[0]
    slots.write(1, picture)
    copied = other.read(1)
    slots.write(1, np.zeros_like(picture))  # the reader's copy is its own
    assert np.array_equal(copied, picture) and not other.read(1).any()
    other.release()
    slots.release()
    slots.release()
    assert not Path("/dev/shm", slots.name).exists()


#: in a shared memory of 1 MB: a block of 384 KB fits and takes its room; the next, 1.5 MB, is refused
FULL_SHM = """
import os, numpy as np
from engine.parallel.replica_frames import FrameSlots
from engine.session import EngineBusyError
fits = FrameSlots.create("test-fits", 256, 256)
try:
    FrameSlots.create("test-too-big", 512, 512)
except EngineBusyError as error:
    print(error)
print(sorted(os.listdir("/dev/shm")))
fits.write(1, np.full((256, 256, 3), 7, np.uint8))
print(int(fits.read(1).sum()))
fits.release()
"""


@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0,
                    reason="needs root and unshare(1) to give a process a small /dev/shm of its own")
def test_a_block_shared_memory_has_no_room_for_is_refused_not_a_crash_later() -> None:
    # a tmpfs file's room is only on paper until written: without the reservation the block is made, and the
    # first frame written into it kills the process with SIGBUS (exit 135), as in a Docker container's 64 MB
    command = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c '{FULL_SHM}'"
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"unshare --mount is not allowed here: {probe.stderr.decode().strip()}")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", command], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    refusal, left, written = done.stdout.splitlines()
    assert "no room in shared memory" in refusal and "--shm-size" in refusal and "takes 3.0 MB" in refusal
    assert left == f"[{PREFIX + 'test-fits'!r}]", "the refused block is gone"
    assert written == str(7 * 256 * 256 * 3)


def test_frames_are_fitted_as_the_engine_fits_them() -> None:
    camera = moving_frame(3, 240, 320)
    fitted = to_model_rgb(camera, SIZE, SIZE)
    assert fitted.shape == (SIZE, SIZE, 3) and fitted.dtype == np.uint8
    exact = frames(1)[0]
    assert to_model_rgb(exact, SIZE, SIZE) is exact  # the model's size passes untouched


# ---------------------------------------------------------------- two replica processes

@pytest.mark.asyncio(loop_scope="class")
class TestTwoReplicas:
    """One pair of processes for these tests (started once: loading takes a while on two shared cores)."""

    async def test_sessions_spread_over_the_processes_and_match_one_device(self, replicas, tiny) -> None:
        pictures = [frames(6, seed=1), frames(6, seed=2)]
        params = [{"prompt": "a cat", "seed": 4}, {"prompt": "a dog", "seed": 9}]
        sessions = [await replicas.open_session(**p) for p in params]
        try:
            homes = {r["index"]: r["sessions"] for r in replicas.snapshot()["replicas"]}
            assert homes == {0: [sessions[0].id], 1: [sessions[1].id]}, homes
            got = [await lockstep(s, p) for s, p in zip(sessions, pictures)]
        finally:
            for session in sessions:
                session.close()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each replica runs: the same kernels, the same sums
        try:
            async with Engine(EngineConfig(stream=STREAM, max_sessions=1, max_batch=1), components=tiny) as single:
                want = []
                for p, picture_list in zip(params, pictures):
                    session = await single.open_session(**p)
                    want.append([o.frame for o in await lockstep(session, picture_list)])
                    session.close()
        finally:
            torch.set_num_threads(threads)
        for session_got, session_want in zip(got, want):
            assert len(session_got) == len(session_want) == 5
            for output, expected in zip(session_got, session_want):
                assert output.frame.dtype == np.uint8 and output.frame.shape == (SIZE, SIZE, 3)
                assert np.array_equal(output.frame, expected)
        assert [o.pts for o in got[0]] == [0, 1, 2, 3, 4]


    async def test_update_is_validated_at_once_and_applies(self, replicas) -> None:
        session = await replicas.open_session()
        try:
            with pytest.raises(ValueError, match="seed"):
                session.update(seed=-5)
            with pytest.raises(ValueError, match="width"):
                session.update(width=128)
            assert session.config.seed == STREAM.seed
            still = frames(1, seed=3)[0]
            before = (await lockstep(session, [still] * 4))[-1].frame
            session.update(prompt="a neon city", seed=11)
            assert session.config.prompt == "a neon city" and session.config.seed == 11
            after = (await lockstep(session, [still] * 4))[-1].frame
            assert not np.array_equal(before, after)
            assert session.metrics.snapshot()["errors"] == 0
        finally:
            session.close()


    async def test_the_newest_frame_wins(self, replicas) -> None:
        session = await replicas.open_session()
        try:
            for k, picture in enumerate(frames(60, seed=4)):
                session.submit(picture, pts=k)
            assert session.metrics.frames_in == 60 and session.metrics.dropped >= 50  # none waits in a queue
            m = session.metrics
            await wait_until(lambda: m.dropped + m.processed == 60, what="every frame processed or dropped")
            assert m.processed <= 10, m.snapshot()  # only the newest ones reached the model
            session.submit(frames(1, seed=5)[0], pts=60)  # it pushes the last frame of the burst out
            output = await asyncio.wait_for(session.next_output(), WAIT_S)
            while output.pts != 59 and session.metrics.outputs < m.processed:
                output = await asyncio.wait_for(session.next_output(), WAIT_S)
            assert output.pts == 59
        finally:
            session.close()

    async def test_a_frame_that_cannot_be_sent_fails_alone(self, replicas) -> None:
        """A frame the front cannot convert, or whose pts cannot be pickled, is that frame's error; the link
        keeps sending (the next good frame comes out) and the session counts both errors."""
        session = await replicas.open_session()
        try:
            session.submit(torch.rand(3, 80, 80).to_sparse(), pts=0)  # NotImplementedError, not ValueError
            with pytest.raises(FrameError, match="frame 0 of session .* failed"):
                await asyncio.wait_for(session.next_output(), WAIT_S)
            session.submit(frames(1, seed=6)[0], pts=lambda: None)  # a local function does not pickle
            with pytest.raises(FrameError, match="frame 1 of session .* failed"):
                await asyncio.wait_for(session.next_output(), WAIT_S)
            outputs = await lockstep(session, frames(len(STREAM.t_index_list), seed=7))
            assert len(outputs) == 1 and outputs[0].frame.shape == (STREAM.height, STREAM.width, 3)
            await asyncio.sleep(0.6)  # a stats report from the replica comes in, and keeps the front's count
            assert session.metrics.errors == 2
        finally:
            session.close()

    async def test_an_open_given_up_frees_its_place_there(self, replicas) -> None:
        def total(name: str) -> int:
            return sum(link.stats.get(name, 0) for link in replicas.links)

        task = asyncio.create_task(replicas.open_session(prompt="a fox"))
        await asyncio.sleep(0)  # the request is on its way to a replica; its answer cannot be back yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        known = replicas.metrics.sessions_opened  # the replicas opened one more, and closed every one
        await wait_until(lambda: total("sessions_opened") == known + 1 == total("sessions_closed"),
                         what="the replica closing the session nobody waited for")
        assert not replicas.sessions() and not our_blocks([link.process.pid for link in replicas.links])

    async def test_a_session_shared_memory_has_no_room_for_is_refused(self, replicas, monkeypatch) -> None:
        def failing(code: int):
            def fail(*args, **kwargs) -> None:
                raise OSError(code, os.strerror(code))
            return fail

        rejected = replicas.metrics.sessions_rejected
        # a full tmpfs; a container's memory limit reached; out of file descriptors
        for target, code, message in ((os, errno.ENOSPC, r"no room in shared memory .* --shm-size"),
                                      (os, errno.ENOMEM, r"no room in shared memory .* --shm-size"),
                                      (shared_memory, errno.EMFILE, r"could not make shared memory .* files")):
            with monkeypatch.context() as patched:
                patched.setattr(target, "posix_fallocate" if target is os else "SharedMemory", failing(code))
                with pytest.raises(EngineBusyError, match=message):
                    await replicas.open_session()
        assert replicas.metrics.sessions_rejected == rejected + 3
        assert not replicas.sessions() and not our_blocks([link.process.pid for link in replicas.links])
        session = await replicas.open_session()  # room again: served
        try:
            assert len(await lockstep(session, frames(3))) == 2
        finally:
            session.close()

    async def test_capacity_and_describe(self, replicas) -> None:
        assert replicas.config.max_sessions == 4
        opened = [await replicas.open_session() for _ in range(4)]
        try:
            assert sorted(len(r["sessions"]) for r in replicas.snapshot()["replicas"]) == [2, 2]
            with pytest.raises(EngineBusyError, match="all 4 sessions are in use"):
                await replicas.open_session()
        finally:
            for session in opened:
                session.close()
        text = describe(replicas, STREAM, argparse.Namespace(model="tiny", max_sessions=4))
        assert "model tiny" in text and "2 replica processes" in text and "backend torch" in text
        assert b"diffcam_sessions_rejected" in replicas.prometheus()
        assert replicas.snapshot()["sessions_rejected"] >= 1


# ---------------------------------------------------------------- a process that dies

async def test_a_killed_replica_ends_its_sessions_and_the_rest_serve_on(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="engine.parallel.replicas")
    engine = ReplicaEngine(replica_config(), silence_s=4.0)
    async with started(engine) as pids:
        doomed, survivor = await engine.open_session(), await engine.open_session()
        assert engine.snapshot()["replicas"][0]["sessions"] == [doomed.id]
        await lockstep(doomed, frames(2, seed=5))
        await lockstep(survivor, frames(2, seed=6))
        os.kill(pids[0], signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(SessionClosedError, match="device process for cpu"):
            await asyncio.wait_for(doomed.next_output(), 10)
        assert time.monotonic() - killed_at < 10
        with pytest.raises(SessionClosedError):
            doomed.submit(frames(1)[0])
        assert any("replica 0 on cpu" in r.getMessage() and "SIGKILL" in r.getMessage() for r in caplog.records)
        assert engine.config.max_sessions == 2 and engine.snapshot()["replicas"][0]["alive"] is False
        assert engine.trouble() is None, "one replica left serves"
        await lockstep(survivor, frames(3, seed=7))  # the other process goes on
        newcomer = await engine.open_session()
        assert engine.snapshot()["replicas"][1]["sessions"] == sorted([survivor.id, newcomer.id])
        await lockstep(newcomer, frames(2, seed=8))
        assert not our_blocks([pids[0]]), "the dead replica's sessions left shared memory behind"
        os.kill(pids[1], signal.SIGSTOP)  # hung, not dead: its silence gives it away
        await wait_until(lambda: survivor.closed, 15, "the hung replica noticed")
        assert any("replica 1 on cpu" in r.getMessage() and "stopped answering" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(EngineBusyError, match="device processes died"):
            await engine.open_session()
        assert "every device process has died" in engine.trouble()  # /healthz says it


ILLEGAL_ACCESS = r"lost its device \(AcceleratorError: CUDA error: an illegal memory access was encountered\)"


async def test_a_replica_whose_device_fails_for_good_exits_and_the_rest_serve_on(caplog) -> None:
    """Replica 0's third UNet call raises a sticky CUDA error (a poisoned context: every later call fails too).
    It exits rather than serve on, failing every frame while looking the least loaded: its session ends saying
    why, and new sessions go to replica 1."""
    caplog.set_level(logging.ERROR, logger="engine.parallel.replicas")
    engine = ReplicaEngine(replica_config(), fault=Fault(0, 3))
    async with started(engine) as pids:
        doomed, survivor = await engine.open_session(), await engine.open_session()
        assert engine.snapshot()["replicas"][0]["sessions"] == [doomed.id]
        await lockstep(doomed, frames(2, seed=5))  # UNet calls 1 and 2
        await lockstep(survivor, frames(2, seed=6))
        doomed.submit(frames(1, seed=7)[0], pts=2)  # call 3 fails
        with pytest.raises(SessionClosedError, match=f"device process for cpu {ILLEGAL_ACCESS}"):
            await asyncio.wait_for(doomed.next_output(), WAIT_S)
        assert any("replica 0 on cpu" in r.getMessage() and "illegal memory access" in r.getMessage()
                   for r in caplog.records)
        engine.links[0].process.join(WAIT_S)
        assert engine.links[0].process.exitcode == 1
        assert engine.config.max_sessions == 2 and engine.snapshot()["replicas"][0]["alive"] is False
        newcomer = await engine.open_session()
        assert engine.snapshot()["replicas"][1]["sessions"] == sorted([survivor.id, newcomer.id])
        await lockstep(newcomer, frames(2, seed=8))
        await lockstep(survivor, frames(2, seed=9))
        assert not our_blocks([pids[0]]), "the lost replica's session left shared memory behind"


async def test_a_replica_whose_device_hangs_exits_and_the_rest_serve_on(caplog) -> None:
    """Replica 0's third UNet call never returns, as on a GPU that hangs: nothing raises, and the replica's event
    loop goes on reporting its stats, so the front's silence check cannot tell. Its round running past the limit
    gives it away: it exits saying so, its session ends saying why, and new sessions go to replica 1."""
    caplog.set_level(logging.ERROR, logger="engine.parallel.replicas")
    engine = ReplicaEngine(replica_config(hang_timeout=HANG_S), fault=Fault(0, 3, hang=True))
    async with started(engine) as pids:
        doomed, survivor = await engine.open_session(), await engine.open_session()
        assert engine.snapshot()["replicas"][0]["sessions"] == [doomed.id]
        await lockstep(doomed, frames(2, seed=5))  # UNet calls 1 and 2
        doomed.submit(frames(1, seed=7)[0], pts=2)  # call 3 hangs
        hung_at = time.monotonic()
        # a round running a tenth of the limit: new sessions go to replica 1 although replica 0 is as loaded
        await wait_until(lambda: engine.links[0].stalled, HANG_S - 2, "replica 0's round reported as stalled")
        assert [r["stalled"] for r in engine.snapshot()["replicas"]] == [True, False]
        early = await engine.open_session()
        assert engine.snapshot()["replicas"][1]["sessions"] == sorted([survivor.id, early.id])
        early.close()
        await lockstep(survivor, frames(2, seed=6))  # meanwhile replica 1 serves on
        with pytest.raises(SessionClosedError, match="lost its device \\(cpu stopped answering: a round "
                                                     f"has run for [0-9]+ s \\(the limit is {HANG_S:.0f} s\\)"):
            await asyncio.wait_for(doomed.next_output(), WAIT_S)
        assert time.monotonic() - hung_at >= HANG_S - 1
        engine.links[0].process.join(WAIT_S)
        assert engine.links[0].process.exitcode == 1
        assert engine.snapshot()["replicas"][0]["alive"] is False
        newcomer = await engine.open_session()
        assert engine.snapshot()["replicas"][1]["sessions"] == sorted([survivor.id, newcomer.id])
        await lockstep(newcomer, frames(2, seed=8))
        assert not our_blocks([pids[0]]), "the hung replica's session left shared memory behind"


async def test_a_replica_whose_device_fails_while_opening_a_session_exits() -> None:
    """Poisoned before any frame: the text encoder fails while a session opens on replica 0 (the least loaded).
    That open is refused saying why, the replica exits, and the next open goes to replica 1."""
    engine = ReplicaEngine(replica_config(), fault=Fault(0, 0))
    async with started(engine):
        with pytest.raises(EngineBusyError, match=ILLEGAL_ACCESS):
            await asyncio.wait_for(engine.open_session(prompt="a prompt no cache has seen"), WAIT_S)
        assert engine.snapshot()["replicas"][0]["alive"] is False
        session = await engine.open_session(prompt="a prompt no cache has seen")
        assert engine.snapshot()["replicas"][1]["sessions"] == [session.id]
        await lockstep(session, frames(2, seed=10))


async def test_loaded_but_never_started_replicas_stop_when_asked(caplog) -> None:
    """``load()`` then ``aclose()`` (a start that failed after loading, say): the replicas are told to stop and
    do, rather than being terminated after the shutdown timeout."""
    caplog.set_level(logging.WARNING, logger="engine.parallel.replica_link")
    # a long shutdown timeout: a process told to stop exits well inside it even on a loaded machine (CI once took
    # over 5 s), one never told waits it out and is terminated
    engine = ReplicaEngine(replica_config(shutdown_timeout=40.0))
    await asyncio.to_thread(engine.load)
    pids = [link.process.pid for link in engine.links]
    await asyncio.wait_for(engine.aclose(), 60)
    assert "did not stop" not in caplog.text
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]


async def test_a_replica_that_cannot_load_is_named_and_nothing_is_left() -> None:
    before = set(multiprocessing.active_children())
    engine = ReplicaEngine(replica_config(model=ModelSpec("/no/such/model", device="cpu")))
    with pytest.raises(ModelUnavailableError, match="replica 0 on cpu .*does not exist"):
        await asyncio.wait_for(engine.start(), 120)
    assert set(multiprocessing.active_children()) <= before


# ---------------------------------------------------------------- the app on top, unchanged

async def test_the_app_serves_webrtc_peers_from_replicas() -> None:
    engine = ReplicaEngine(replica_config(max_sessions=2))
    app = engine_app(engine, ui=False, random_weights=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    clients = [Client(SyntheticCamera([moving_frame(i, 120, 160) for i in range(30)], fps=10)) for _ in range(2)]
    pids: list[int] = []
    try:
        await wait_until(lambda: server.started or task.done(), 120, "the server started")
        if task.done():
            task.result()
        pids = [link.process.pid for link in engine.links]
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        for client in clients:
            assert (await client.connect(url)).status_code == 200
        for client in clients:
            got = await client.wait_frames(5, timeout=60)
            assert got[-1].shape == (SIZE, SIZE, 3) and got[-1].mean() > 10
        assert sorted(len(r["sessions"]) for r in engine.snapshot()["replicas"]) == [1, 1]
        async with httpx.AsyncClient(base_url=url) as http:
            health = (await http.get("/healthz")).json()
            assert health == {"status": "ok", "sessions": 2, "max_sessions": 2}
            assert b"diffcam_session_outputs" in (await http.get("/metrics")).content
            os.kill(pids[0], signal.SIGKILL)  # its peer ends; the server serves on
            await wait_until(lambda: len(engine.sessions()) == 1, 10, "the dead replica's peer closed")
            assert (await http.get("/healthz")).json()["max_sessions"] == 1
        await clients[1].wait_frames(3, timeout=60)
    finally:
        for client in clients:
            await client.close()
        server.should_exit = True
        await asyncio.wait_for(task, 30)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    assert not our_blocks(pids)


def test_the_entry_script_serves_replicas_on_several_devices_and_stops_them_all() -> None:
    """``python app/main.py --devices cpu,cpu``: two replica processes behind one server; Ctrl+C ends them all."""
    import os
    import subprocess
    import sys

    import httpx
    import psutil

    from tests.test_main import ROOT, free_port, stop_with_ctrl_c, wait_for_server

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "app/main.py", "--model", "tiny", "--no-ui", "--devices", "cpu,cpu",
                                "--max-sessions", "2", "--width", "64", "--height", "64", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(process, port, seconds=120)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["max_sessions"] == 2
        children = psutil.Process(process.pid).children(recursive=True)
        replicas = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(replicas) == 2, f"one process per device: {[c.cmdline() for c in children]}"
    finally:
        output = stop_with_ctrl_c(process, timeout=30)
    assert process.returncode == 0, output
    assert "2 replica processes" in output, output
    _, alive = psutil.wait_procs(children, timeout=10)  # multiprocessing's resource tracker may take a moment
    assert not alive, f"left running: {[c.cmdline() for c in alive]}"


def test_bad_devices_stop_the_start_in_one_line(capsys) -> None:
    from app import main as app_main

    assert app_main.main(["--model", "tiny", "--no-ui", "--devices", "cpu,cuda:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be all cpu or all CUDA" in err[0], err
