"""The stream batch must give exactly what sequential denoising of each frame gives."""

from __future__ import annotations

import pytest
import torch

from engine.config import StreamConfig
from engine.stream import StreamDiffusion
from tests.reference import encode_prompt, sequential_img2img, stream_noise

SIZE = 64
T_INDEX_LISTS = {1: (30,), 2: (20, 40), 3: (10, 25, 40), 4: (0, 16, 32, 45)}
ATOL = 2e-4


def make_stream(components, n: int, f: int, **overrides) -> StreamDiffusion:
    config = StreamConfig(t_index_list=T_INDEX_LISTS[n], frame_buffer_size=f, width=SIZE, height=SIZE,
                          cfg_type="none", prompt="a watercolor fox", seed=7, **overrides)
    return StreamDiffusion(components, config)


def frame(seed: int) -> torch.Tensor:
    """A smooth random picture, 3×SIZE×SIZE in [0, 1]."""
    coarse = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")[0]


def reference(components, stream: StreamDiffusion, image: torch.Tensor, slot: int) -> torch.Tensor:
    n, f = stream.steps, stream.frames
    noise = stream_noise(stream.config.seed, n, f, 4, SIZE, SIZE)
    noises = [noise[i * f + slot] for i in range(n)]
    cond = encode_prompt(components, stream.config.prompt)
    return sequential_img2img(components, image, stream.config.t_index_list, noises, cond,
                              do_add_noise=stream.config.do_add_noise)


@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_static_input_equals_sequential(tiny, n: int, f: int) -> None:
    stream = make_stream(tiny, n, f)
    images = [frame(100 + j) for j in range(f)]
    expected = [reference(tiny, stream, images[j], j) for j in range(f)]
    for call in range(n + 2):
        outputs = stream.img2img(images)
        if call < n - 1:
            assert outputs is None, f"call {call} is still warming up"
            continue
        for j in range(f):
            torch.testing.assert_close(outputs[j], expected[j], atol=ATOL, rtol=0)


@pytest.mark.parametrize("f", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_changing_input_each_frame_equals_its_own_reference(tiny, n: int, f: int) -> None:
    stream = make_stream(tiny, n, f)
    calls = n + 2
    inputs = [[frame(10 * call + j) for j in range(f)] for call in range(calls)]
    for call in range(calls):
        outputs = stream.img2img(inputs[call])
        if call < n - 1:
            continue
        entered = call - (n - 1)
        for j in range(f):
            expected = reference(tiny, stream, inputs[entered][j], j)
            torch.testing.assert_close(outputs[j], expected, atol=ATOL, rtol=0)


def test_without_added_noise_equals_sequential(tiny) -> None:
    stream = make_stream(tiny, 3, 2, do_add_noise=False)
    images = [frame(5), frame(6)]
    expected = [reference(tiny, stream, images[j], j) for j in range(2)]
    for _ in range(3):
        outputs = stream.img2img(images)
    for j in range(2):
        torch.testing.assert_close(outputs[j], expected[j], atol=ATOL, rtol=0)


def test_frames_differ_so_the_comparison_means_something(tiny) -> None:
    stream = make_stream(tiny, 2, 1)
    a, b = reference(tiny, stream, frame(1), 0), reference(tiny, stream, frame(2), 0)
    assert (a - b).abs().max() > 10 * ATOL


@pytest.mark.parametrize("n,f", [(1, 1), (3, 2)])
def test_v_prediction_models_equal_sequential_too(tiny, n: int, f: int) -> None:
    """SD 2.x 768 models predict v; the stream converts to ε (ε = α·v + β·x) before any math."""
    from dataclasses import replace

    from diffusers import LCMScheduler

    v_model = replace(tiny, scheduler=LCMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction"))
    stream = make_stream(v_model, n, f)
    images = [frame(300 + j) for j in range(f)]
    expected = [reference(v_model, stream, images[j], j) for j in range(f)]
    plain = reference(tiny, make_stream(tiny, n, f), images[0], 0)
    assert (expected[0] - plain).abs().max() > 10 * ATOL, "v-prediction really changes the result"
    for _ in range(n):
        outputs = stream.img2img(images)
    for j in range(f):
        torch.testing.assert_close(outputs[j], expected[j], atol=ATOL, rtol=0)
