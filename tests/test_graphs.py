"""The call runner: static buffers, slots, graphs per call size (stand-ins on the CPU), and one call's math.

Everything here but the CUDA replay itself runs on the CPU: :class:`engine.graphs.EagerGraph`
keeps a CUDA graph's contract (outputs land in the same memory on every replay), so a bug that
reads an output after the next call overwrote it, or a slot that leaks state between streams,
shows up here.
"""

from __future__ import annotations

import logging

import av
import numpy as np
import pytest
import torch

from engine.batch import FrameJob, run_jobs
from engine.config import StreamConfig
from engine.graphs import CallRunner
from engine.image import PixelLoader, fit, to_chw
from engine.runtime import Engine, EngineConfig
from engine.slots import StreamSlots
from engine.step import stream_step
from engine.step import step_models
from engine.stream import StreamDiffusion
from tests.test_runtime import lockstep, solo

SIZE = 64
CONFIG = StreamConfig(t_index_list=(10, 30, 45), width=SIZE, height=SIZE, cfg_type="self", guidance_scale=1.3,
                      prompt="a red fox")


def pictures(count: int, seed: int = 2, size: int = SIZE) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(count)]


def assert_same_picture(got: np.ndarray, want: np.ndarray) -> None:
    """Equal but for rounding: batched convolutions on the CPU pick other algorithms for other batch
    sizes, so a value may land on the other side of a uint8 step."""
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def runner_for(tiny, config: StreamConfig = CONFIG, streams: int = 3, capture: bool = True) -> CallRunner:
    runner = CallRunner(step_models(tiny), StreamSlots.for_config(tiny, config, capacity=streams + 1), streams)
    if capture:
        runner.capture()
    return runner


def run_schedule(runner: CallRunner, streams: list[StreamDiffusion], inputs: list[list[np.ndarray]],
                 schedule: list[tuple[int, ...]]) -> tuple[list[list], list[list], list[int]]:
    """Calls where ``schedule[c]`` names the streams sending a frame (their next input) on call ``c``: each
    stream's outputs and the frames it was fed, and each call's UNet stream count. Every job must succeed."""
    got: list[list] = [[] for _ in streams]
    fed: list[list] = [[] for _ in streams]
    unet_streams = []
    for members in schedule:
        jobs = [FrameJob(streams[i], inputs[i][len(fed[i])]) for i in members]
        for i, job in zip(members, jobs):
            fed[i].append(job.frame)
        unet_streams.append(run_jobs(jobs, runner)["unet_streams"])
        for i, job in zip(members, jobs):
            assert job.error is None
            got[i] += job.outputs or []
    return got, fed, unet_streams


def test_graphs_replayed_for_streams_joining_and_leaving_equal_each_stream_alone(tiny) -> None:
    runner = runner_for(tiny)
    assert runner.captured == [1, 2, 3]
    streams = [StreamDiffusion(tiny, CONFIG.with_updates(prompt=p), runner=runner) for p in ("ink", "neon", "oil")]
    inputs = [pictures(6, seed=i) for i in range(len(streams))]
    schedule = [(0,), (0, 1), (0, 1, 2), (1, 2), (0, 2), (0, 1, 2)]  # who sends a frame on each call
    got, fed, unet_streams = run_schedule(runner, streams, inputs, schedule)
    assert unet_streams == [len(members) for members in schedule]
    for stream, outputs, frames in zip(streams, got, fed):
        want = solo(tiny, stream.config, frames)
        assert len(outputs) == len(want) > 0
        for a, b in zip(outputs, want):
            assert_same_picture(a, b)


def test_outputs_stay_valid_after_the_next_replay_and_buffers_never_move(tiny) -> None:
    runner = runner_for(tiny, streams=1)
    stream = StreamDiffusion(tiny, CONFIG, runner=runner)
    pointers = (runner.pixels.data_ptr(), runner.index.data_ptr(), runner._graphs[1].outputs.pixels.data_ptr())
    outputs = [stream(picture) for picture in pictures(6)]
    kept = [o.copy() for o in outputs if o is not None]
    assert all(np.array_equal(a, b) for a, b in zip([o for o in outputs if o is not None], kept)), \
        "an output changed when a later call replayed into the same buffers"
    assert not np.array_equal(kept[0], kept[-1])
    assert (runner.pixels.data_ptr(), runner.index.data_ptr(), runner._graphs[1].outputs.pixels.data_ptr()) == pointers


def test_tensor_frames_come_back_as_tensors_that_later_calls_leave_alone(tiny) -> None:
    runner = runner_for(tiny, streams=1)
    stream = StreamDiffusion(tiny, CONFIG, runner=runner)
    inputs = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pictures(5)]
    outputs = [o for o in (stream(x) for x in inputs) if o is not None]
    assert [tuple(o.shape) for o in outputs] == [(3, SIZE, SIZE)] * 3
    assert not torch.equal(outputs[0], outputs[1])
    want = solo(tiny, CONFIG, inputs)
    for a, b in zip(outputs, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_size_without_a_graph_runs_eagerly_and_says_so_once(tiny, caplog) -> None:
    runner = runner_for(tiny, streams=3, capture=False)
    runner.capture(sizes=[1])
    streams = [StreamDiffusion(tiny, CONFIG.with_updates(seed=s), runner=runner) for s in range(3)]
    with caplog.at_level(logging.INFO, logger="engine.graphs"):
        for picture in pictures(3):
            run_jobs([FrameJob(s, picture) for s in streams[:2]], runner)
    assert [r.getMessage() for r in caplog.records] == [
        "no graph captured for 2 streams per call: running that size eagerly"]


def test_capture_refuses_once_streams_hold_slots(tiny) -> None:
    runner = runner_for(tiny, streams=1, capture=False)
    StreamDiffusion(tiny, CONFIG, runner=runner)
    with pytest.raises(RuntimeError, match="before streams take slots"):
        runner.capture()
    with pytest.raises(ValueError, match="a call takes 1 to 1 streams, got 2"):
        runner.run([0, 1], pictures(2))


def test_a_call_that_raises_changes_no_stream_state(tiny) -> None:
    def broken_unet(sample, timesteps, embeds):
        raise RuntimeError("out of memory")

    slots = StreamSlots.for_config(tiny, CONFIG, capacity=2)
    runner = CallRunner(step_models(tiny), slots, 2)
    streams = [StreamDiffusion(tiny, CONFIG.with_updates(seed=s), runner=runner) for s in range(2)]
    for picture in pictures(2):
        run_jobs([FrameJob(s, picture) for s in streams], runner)
    before = {name: getattr(slots, name).clone() for name in ("buffer", "stock")}
    index = torch.tensor([s.slot for s in streams])
    with pytest.raises(RuntimeError, match="out of memory"):
        stream_step(step_models(tiny, broken_unet), slots, index, runner.pixels[:2])
    for name, tensor in before.items():
        assert torch.equal(getattr(slots, name), tensor), name


def test_a_stream_that_leaves_frees_its_slot_for_the_next_and_the_next_starts_clean(tiny) -> None:
    runner = runner_for(tiny, streams=1)
    inputs = pictures(5)
    leaving = StreamDiffusion(tiny, CONFIG.with_updates(prompt="a storm"), runner=runner)
    for picture in inputs:
        leaving(picture)
    slot = leaving.slot
    leaving.close()
    joining = StreamDiffusion(tiny, CONFIG, runner=runner)
    assert joining.slot == slot, "the freed slot is the first one free"
    got = [o for o in (joining(p) for p in inputs) if o is not None]
    for a, b in zip(got, solo(tiny, CONFIG, inputs)):
        assert np.array_equal(a, b)


async def test_the_engine_with_graphs_serves_sessions_like_each_alone(tiny) -> None:
    inputs = pictures(5)
    config = EngineConfig(stream=CONFIG, graphs=True, max_sessions=2)
    async with Engine(config, components=tiny) as engine:
        assert engine._workers[0].model.runner.captured == [1, 2]
        first, second = await engine.open_session(), await engine.open_session(prompt="neon city")
        outputs = [await lockstep(first, inputs), await lockstep(second, inputs[::-1])]
    expected = [solo(tiny, CONFIG, inputs), solo(tiny, CONFIG.with_updates(prompt="neon city"), inputs[::-1])]
    for got, want in zip(outputs, expected):
        assert len(got) == len(want) == 3
        for output, frame in zip(got, want):
            assert_same_picture(output.frame, frame)


def test_channels_last_modules_give_the_same_pictures(tiny) -> None:
    """On CUDA the UNet and VAE run channels_last; every reshape of a call must take those strides."""
    import copy
    from dataclasses import replace

    fast = replace(tiny, unet=copy.deepcopy(tiny.unet), vae=copy.deepcopy(tiny.vae))
    for module in (fast.unet, fast.vae):
        module.to(memory_format=torch.channels_last)
    config = CONFIG.with_updates(cfg_type="initialize")
    inputs = pictures(4)
    runner = runner_for(fast, config, streams=2)
    streams = [StreamDiffusion(fast, config.with_updates(seed=s), runner=runner) for s in range(2)]
    got: list[list] = [[], []]
    for picture in inputs:
        jobs = [FrameJob(stream, picture) for stream in streams]
        run_jobs(jobs, runner)
        for bucket, job in zip(got, jobs):
            assert job.error is None
            bucket += job.outputs or []
    for s, bucket in enumerate(got):
        want = solo(tiny, config.with_updates(seed=s), inputs)
        assert len(bucket) == len(want) == 2
        for a, b in zip(bucket, want):
            assert_same_picture(a, b)
    streams[0].close()
    as_tensors = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in inputs]
    tensor_outputs = [o for o in (streams[1](x) for x in as_tensors) if o is not None]
    assert tensor_outputs and all(o.is_contiguous() for o in tensor_outputs), "tensor frames come back contiguous"


def test_a_call_that_fails_before_capture_is_not_taken_for_a_capture_failure(tiny, monkeypatch) -> None:
    """The calls before a capture run the model as every call will (compiling it, on a GPU): when they fail, the
    call is broken, not uncapturable, and the error reaches the caller (``--backend auto`` then falls back)
    instead of a warning and a size that fails on every frame."""
    runner = runner_for(tiny, streams=2, capture=False)

    def broken_compile(k: int) -> None:
        raise RuntimeError("inductor: compilation failed")

    monkeypatch.setattr(runner, "_warm", broken_compile)
    with pytest.raises(RuntimeError, match="compilation failed"):
        runner.capture()
    assert runner.captured == []


def test_a_size_that_cannot_be_captured_runs_eagerly_and_the_rest_replay(tiny, monkeypatch, caplog) -> None:
    runner = runner_for(tiny, streams=3, capture=False)
    real_capture = runner._record

    def capture(k: int):
        if k == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_capture(k)

    monkeypatch.setattr(runner, "_record", capture)
    with caplog.at_level(logging.WARNING, logger="engine.graphs"):
        runner.capture()
    assert runner.captured == [1, 3]
    assert "could not capture the call for 2 stream(s)" in caplog.text
    streams = [StreamDiffusion(tiny, CONFIG.with_updates(seed=s), runner=runner) for s in range(2)]
    inputs = pictures(4)
    got = []
    for picture in inputs:
        jobs = [FrameJob(stream, picture) for stream in streams]
        run_jobs(jobs, runner)
        got += jobs[0].outputs or []
    for a, b in zip(got, solo(tiny, CONFIG.with_updates(seed=0), inputs)):
        assert_same_picture(a, b)


@pytest.mark.parametrize("stage", [False, True])
def test_frames_of_any_size_and_kind_load_as_the_fitted_picture(stage: bool) -> None:
    exact, wide = pictures(1)[0], pictures(1, size=96)[0][:48]
    tensor = torch.rand(3, 80, 72)
    video = av.VideoFrame.from_ndarray(exact[::-1].copy(), format="rgb24")  # as WebRTC hands them over
    frames = [exact, wide, tensor, video, av.VideoFrame.from_ndarray(wide.copy(), format="rgb24")]
    target = torch.zeros(len(frames), 3, SIZE, SIZE)
    loader = PixelLoader(target, stage=stage)
    loaded = loader.load(frames)
    assert loaded.data_ptr() == target.data_ptr() and len(loaded) == len(frames)
    for row, frame in zip(loaded, frames):
        torch.testing.assert_close(row, fit(to_chw(frame, torch.device("cpu")), SIZE, SIZE), atol=0, rtol=0)
    if stage:  # the exact-size video frame crossed in the staging buffer, with the arrays
        assert np.array_equal(loader._staging[3].numpy(), exact[::-1])
