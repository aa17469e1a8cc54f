"""The torch backend on a CUDA GPU: the same stream, the same runtime, the real architecture.

Skipped where torch sees no CUDA device; ``.ci/gpu-check`` runs them (and the GPU benchmarks)
on a machine with one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import StreamConfig
from engine.presets import build_preset
from engine.runtime import Engine, EngineConfig
from engine.stream import StreamDiffusion
from tests.test_runtime import lockstep, solo

pytestmark = pytest.mark.gpu

CONFIG = StreamConfig(t_index_list=(10, 30, 45), width=128, height=128, cfg_type="self", prompt="a red fox")


def frames(count: int, size: int = 128) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(count)]


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
        for output, frame in zip(got, want):
            assert np.array_equal(output.frame, frame)


def test_sd_turbo_architecture_runs_a_512_stream_in_fp16() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch")
    components = build_preset("sd-turbo-random", device="cuda", dtype=torch.float16)
    stream = StreamDiffusion(components, StreamConfig(t_index_list=(32, 45), prompt="a cat"))
    outputs = [stream(frame) for frame in frames(3, 512)]
    assert outputs[0] is None and outputs[-1].shape == (512, 512, 3)
    assert outputs[-1].std() > 1, "a flat picture means the random model collapsed"
