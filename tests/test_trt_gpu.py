"""TensorRT engines for real: build the tiny model's engines on a GPU, run the stream through them.

Skipped (with what is missing) on machines without TensorRT 10+ and a CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import StreamConfig
from engine.stream import StreamDiffusion
from trt_build.cache import EngineCache
from trt_build.pipeline import BuildPlan, accelerate, build_engines, tensorrt_missing
from trt_build.shapes import Range, ShapeProfile

MISSING = tensorrt_missing()
pytestmark = [pytest.mark.trt, pytest.mark.gpu,
              pytest.mark.skipif(MISSING is not None, reason=f"needs {MISSING}")]

CONFIG = StreamConfig(t_index_list=(10, 30, 45), width=128, height=128, cfg_type="self", prompt="a red fox")


@pytest.fixture(scope="module")
def fp32_plan(gpu_tiny, tmp_path_factory) -> BuildPlan:
    profile = ShapeProfile.for_stream(CONFIG, sessions=2, height=Range(64, 128, 256), width=Range(64, 128, 256))
    return BuildPlan(gpu_tiny, profile, model="tiny", fp16=False, cache=EngineCache(tmp_path_factory.mktemp("engines")))


def test_engines_are_built_once_and_found_again(fp32_plan) -> None:
    built = build_engines(fp32_plan)
    stamps = {part: path.stat().st_mtime_ns for part, path in built.items()}
    again = build_engines(fp32_plan)
    assert again == built and {p: path.stat().st_mtime_ns for p, path in again.items()} == stamps


def test_the_stream_through_engines_equals_the_stream_through_torch(gpu_tiny, fp32_plan) -> None:
    components, unet = accelerate(fp32_plan)
    engine_stream = StreamDiffusion(components, CONFIG, unet=unet)
    torch_stream = StreamDiffusion(gpu_tiny, CONFIG)
    frames = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(k)).cuda() for k in range(6)]
    pairs = [(engine_stream(f), torch_stream(f)) for f in frames]
    for got, want in [(a, b) for a, b in pairs if a is not None]:
        assert (got - want).abs().max() < 2e-3  # TF32 and fused kernels, not a different computation


def test_shapes_switch_back_and_forth_through_their_cuda_graphs(fp32_plan) -> None:
    """A, A, A (eager, eager, graph), B, B, B, then A again: each shape's graph must still be right."""
    from trt_build.runtime import TrtEngine

    decoder = TrtEngine(build_engines(fp32_plan)["vae_decoder"], torch.device("cuda"))
    latents = {side: torch.randn(2, 4, side, side, device="cuda") for side in (8, 16, 32)}
    first = {}
    for side, tensor in latents.items():
        runs = [decoder({"latents": tensor})["images"] for _ in range(3)]
        assert runs[0].shape == (2, 3, side * 8, side * 8)
        for run in runs[1:]:
            torch.testing.assert_close(run, runs[0])
        first[side] = runs[0]
    for side in (8, 32, 16, 8):
        torch.testing.assert_close(decoder({"latents": latents[side]})["images"], first[side])
    with pytest.raises(ValueError, match="outside the engine's profile"):
        decoder({"latents": torch.randn(3, 4, 16, 16, device="cuda")})


def test_fp16_engines_keep_the_picture(gpu_tiny, tmp_path) -> None:
    plan = BuildPlan(gpu_tiny, ShapeProfile.for_stream(CONFIG), model="tiny", cache=EngineCache(tmp_path))
    components, unet = accelerate(plan)
    engine_stream, torch_stream = StreamDiffusion(components, CONFIG, unet=unet), StreamDiffusion(gpu_tiny, CONFIG)
    frame = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(3):
        got, want = engine_stream(frame), torch_stream(frame)
    assert got is not None and (got - want).abs().mean() < 0.02
