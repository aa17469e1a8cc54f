"""The torch backend on a CUDA GPU: the same stream, the same runtime, the real architecture.

Skipped where torch sees no CUDA device; ``.ci/gpu-check`` runs them (and the GPU benchmarks)
on a machine with one. The engine's CUDA graphs are captured and replayed here for real; the
CPU tests (``tests/test_graphs.py``) cover the same runner with stand-in graphs.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from engine.components import Components
from engine.config import StreamConfig
from engine.presets import build_preset
from engine.runtime import Engine, EngineConfig
from engine.stream import StreamDiffusion
from tests.test_graphs import run_schedule, runner_for
from tests.test_runtime import lockstep, solo, wait_until

pytestmark = pytest.mark.gpu

CONFIG = StreamConfig(t_index_list=(10, 30, 45), width=128, height=128, cfg_type="self", prompt="a red fox")


def frames(count: int, size: int = 128, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(count)]


@pytest.fixture(scope="module")
def sd_turbo() -> Components:
    """sd-turbo's architecture with seeded random weights, fp16 on the GPU: built once for the tests here
    (random init of its 866 M-parameter UNet takes tens of seconds, out of gpu-check's short time limits)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch")
    return build_preset("sd-turbo-random", device="cuda", dtype=torch.float16)


def test_the_stream_on_the_gpu_equals_the_stream_on_the_cpu(tiny, gpu_tiny) -> None:
    inputs = frames(6)
    on_gpu, on_cpu = solo(gpu_tiny, CONFIG, inputs), solo(tiny, CONFIG, inputs)
    assert len(on_gpu) == len(on_cpu) == 4
    for got, want in zip(on_gpu, on_cpu):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2  # cuDNN's TF32 convolutions, uint8 rounding


def test_fp16_on_the_gpu_keeps_the_picture(gpu_tiny) -> None:
    half = build_preset("tiny", device="cuda", dtype=torch.float16)
    inputs = frames(5)
    for got, want in zip(solo(half, CONFIG, inputs), solo(gpu_tiny, CONFIG, inputs)):
        assert np.abs(got.astype(float) - want.astype(float)).mean() < 3.0


async def test_sessions_batched_on_the_gpu_equal_their_solo_runs(gpu_tiny) -> None:
    config = CONFIG.with_updates(prompt="ink drawing")
    inputs = frames(5)
    async with Engine(EngineConfig(stream=config, max_sessions=2), components=gpu_tiny) as engine:
        first, second = await engine.open_session(), await engine.open_session(prompt="neon city")
        outputs = [await lockstep(first, inputs), await lockstep(second, inputs[::-1])]
    expected = [solo(gpu_tiny, config, inputs), solo(gpu_tiny, config.with_updates(prompt="neon city"), inputs[::-1])]
    for got, want in zip(outputs, expected):
        assert len(got) == len(want) == 3
        for output, frame in zip(got, want):  # the engine's default backend (compile + graphs) against eager:
            assert np.abs(output.frame.astype(int) - frame.astype(int)).max() <= 2  # other kernels, batch 2


def test_sd_turbo_architecture_runs_a_512_stream_in_fp16(sd_turbo) -> None:
    stream = StreamDiffusion(sd_turbo, StreamConfig(t_index_list=(32, 45), prompt="a cat"))
    outputs = [stream(frame) for frame in frames(3, 512)]
    assert outputs[0] is None and outputs[-1].shape == (512, 512, 3)
    assert outputs[-1].std() > 1, "a flat picture means the random model collapsed"


async def in_step(sessions: list, frames_now: list[np.ndarray], pts: int, collected: list[list]) -> None:
    """Submit one frame to each session, wait until all went through, collect what came out."""
    targets = [s.metrics.processed + 1 for s in sessions]
    for session, picture in zip(sessions, frames_now):
        session.submit(picture, pts=pts)
    await wait_until(lambda: [s.metrics.processed for s in sessions] == targets, timeout=60)
    await asyncio.sleep(0)
    for session, bucket in zip(sessions, collected):
        if session._output is not None:
            bucket.append(await session.next_output())


@pytest.mark.parametrize("backend", ["torch", "compile"])
async def test_cuda_graphs_serve_sessions_joining_and_leaving_like_eager(gpu_tiny, backend: str) -> None:
    """The engine's own graphs (captured on the worker, one per call size, one pool), over compiled kernels
    or eager ones: a second session joins mid-stream, the first leaves, a third takes its slot."""
    config = CONFIG.with_updates(prompt="ink drawing")
    inputs = frames(8)
    outputs: list[list] = [[], [], []]
    engine_config = EngineConfig(stream=config, backend=backend, graphs=True, max_sessions=2, idle_timeout=600)
    async with Engine(engine_config, components=gpu_tiny) as engine:  # compiling and capturing happen here
        assert engine._workers[0].model.runner.captured == [1, 2]
        first = await engine.open_session()
        for k in range(3):
            await in_step([first], [inputs[k]], k, outputs[:1])
        second = await engine.open_session()
        for k in range(3, 6):
            await in_step([first, second], [inputs[k], inputs[k]], k, outputs[:2])
        first.close()
        third = await engine.open_session()
        for k in range(6, 8):
            await in_step([second, third], [inputs[k], inputs[k]], k, outputs[1:])
    expected = [solo(gpu_tiny, config, inputs[:6]), solo(gpu_tiny, config, inputs[3:]), solo(gpu_tiny, config, inputs[6:])]
    for got, want in zip(outputs, expected):
        assert len(got) == len(want) > 0
        for output, frame in zip(got, want):
            assert np.abs(output.frame.astype(int) - frame.astype(int)).max() <= 2


async def test_sd_turbo_architecture_replays_its_calls_as_graphs_like_eager(sd_turbo) -> None:
    config = StreamConfig(t_index_list=(32, 45), prompt="a cat")
    inputs = frames(4, 512)
    engine_config = EngineConfig(stream=config, backend="torch", graphs=True, max_sessions=1, idle_timeout=600)
    async with Engine(engine_config, components=sd_turbo) as engine:
        outputs = await lockstep(await engine.open_session(), inputs)
        components = engine.components
        eager = await engine.run_on_device(lambda model: solo(model.components, config, inputs))
    assert components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(outputs) == len(eager) == 3
    for output, frame in zip(outputs, eager):
        assert np.abs(output.frame.astype(int) - frame.astype(int)).max() <= 2


def test_a_size_that_cannot_be_captured_runs_eagerly_and_the_rest_replay(gpu_tiny, monkeypatch) -> None:
    """The GPU twin of the CPU test in tests/test_graphs.py. A capture that fails (here the 2-stream call syncs
    with the host, only while capturing) leaves torch's allocator recording to its pool: engine.graphs ends that,
    and captures the sizes after it into a new pool. So the other sizes still capture and replay, and
    ``empty_cache`` still frees memory."""
    runner = runner_for(gpu_tiny, CONFIG, streams=3, capture=False)
    real_step = runner._step

    def step(k: int):
        output = real_step(k)
        if k == 2 and torch.cuda.is_current_stream_capturing():
            output.pixels.sum().item()  # a host sync: CUDA invalidates the capture
        return output

    monkeypatch.setattr(runner, "_step", step)
    runner.capture()
    assert runner.captured == [1, 3]
    assert_empty_cache_frees_memory()
    streams = [StreamDiffusion(gpu_tiny, CONFIG.with_updates(prompt=p), runner=runner) for p in ("ink", "neon", "oil")]
    inputs = [frames(5, seed=i) for i in range(len(streams))]
    schedule = [(0,), (0, 1), (0, 1, 2), (1, 2), (0, 1, 2), (2,)]  # calls of 1, 2 (eager) and 3 streams
    got, fed, _ = run_schedule(runner, streams, inputs, schedule)
    for stream, outputs, fed_frames in zip(streams, got, fed):
        want = solo(gpu_tiny, stream.config, fed_frames)
        assert len(outputs) == len(want) > 0
        for a, b in zip(outputs, want):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def assert_empty_cache_frees_memory() -> None:
    """While the allocator counts a capture as under way, ``empty_cache`` (and the out-of-memory retry) frees
    nothing."""
    size = 256 << 20
    spare = torch.empty(size, dtype=torch.uint8, device="cuda")
    del spare
    cached = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= cached - size, "the allocator still thinks a capture is under way"
