"""The stream's public surface: frame kinds and sizes, prompt blending, live updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import StreamConfig
from engine.prompts import blend_embeddings, slerp
from engine.stream import StreamDiffusion


def stream(components, **overrides) -> StreamDiffusion:
    fields = dict(t_index_list=(20, 40), width=64, height=64, cfg_type="none", prompt="a cat", seed=1)
    return StreamDiffusion(components, StreamConfig(**{**fields, **overrides}))


def warm_output(s: StreamDiffusion, frame):
    out = None
    for _ in range(s.steps):
        out = s(frame)
    return out


def test_numpy_of_any_size_in_numpy_of_configured_size_out(tiny) -> None:
    s = stream(tiny, width=96, height=64)
    for shape in [(480, 640, 3), (33, 17, 3), (64, 96, 3), (1, 1, 3)]:
        out = warm_output(s, np.full(shape, 128, np.uint8))
        assert out.shape == (64, 96, 3) and out.dtype == np.uint8


def test_tensor_in_tensor_out(tiny) -> None:
    s = stream(tiny)
    for frame in [torch.rand(3, 120, 80), torch.rand(1, 3, 64, 64), torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)]:
        out = warm_output(s, frame)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 64, 64)
        assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_numpy_and_tensor_inputs_agree(tiny) -> None:
    picture = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    from_np = warm_output(stream(tiny), picture)
    from_pt = warm_output(stream(tiny), torch.from_numpy(picture).permute(2, 0, 1).float() / 255)
    assert np.abs(from_np.astype(int) - (from_pt.permute(1, 2, 0).numpy() * 255).round().astype(int)).max() <= 1


@pytest.mark.parametrize("bad,message", [
    (np.zeros((64, 64), np.uint8), "uint8 H×W×3"),
    (np.zeros((64, 64, 4), np.uint8), "uint8 H×W×3"),
    (np.zeros((64, 64, 3), np.float32), "uint8 H×W×3"),
    (np.zeros((0, 64, 3), np.uint8), "at least one pixel"),
    (np.zeros((9000, 2, 3), np.uint8), "too large; at most 8192"),
    (torch.zeros(4, 64, 64), "3×H×W"),
    (torch.zeros(3, 64, 64, dtype=torch.int32), "float in"),
    ("not a frame", "numpy array or a torch tensor"),
])
def test_bad_frames_are_refused_clearly(tiny, bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        stream(tiny)(bad)


def test_wrong_number_of_frames(tiny) -> None:
    s = stream(tiny, frame_buffer_size=2)
    with pytest.raises(ValueError, match="exactly frame_buffer_size=2 frames, got 1"):
        s.img2img([np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="pass a list of 2 frames"):
        s(np.zeros((64, 64, 3), np.uint8))


def test_prompt_update_takes_effect_on_the_next_frame_without_rewarm(tiny) -> None:
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    s = stream(tiny, t_index_list=(40,))  # one step: the next output reflects the update fully
    before = s(frame)
    s.update(prompt="a dog")
    after = s(frame)
    assert after is not None and (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, stream(tiny, t_index_list=(40,), prompt="a dog")(frame))


@pytest.mark.parametrize("changes", [
    dict(guidance_scale=2.5), dict(delta=0.3), dict(negative_prompt="ugly"), dict(seed=99),
    dict(t_index_list=(10, 45)), dict(strength=0.9),
])
def test_runtime_updates_change_the_output(tiny, changes) -> None:
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    fixed, changed = stream(tiny, cfg_type="self", guidance_scale=1.5), stream(tiny, cfg_type="self", guidance_scale=1.5)
    if "negative_prompt" in changes:
        fixed, changed = stream(tiny, cfg_type="full", guidance_scale=1.5), stream(tiny, cfg_type="full", guidance_scale=1.5)
    for _ in range(2):
        fixed(frame), changed(frame)
    changed.update(**changes)
    a, b = fixed(frame), changed(frame)
    assert b is not None and (a - b).abs().max() > 1e-4


def test_seed_update_redraws_the_noise(tiny) -> None:
    s = stream(tiny)
    noise = s.noise.clone()
    s.update(seed=5)
    assert not torch.equal(noise, s.noise)
    assert torch.equal(stream(tiny, seed=5).noise, s.noise)


def test_shape_fields_cannot_change_mid_stream(tiny) -> None:
    s = stream(tiny)
    for changes, name in [(dict(width=128), "width"), (dict(cfg_type="full"), "cfg_type"),
                          (dict(frame_buffer_size=2), "frame_buffer_size"), (dict(t_index_list=(1, 2, 3)), "len")]:
        with pytest.raises(ValueError, match=name):
            s.update(**changes)
    assert s.config.width == 64
    with pytest.raises(ValueError, match="not both"):
        s.update(strength=0.5, t_index_list=(1, 2))
    with pytest.raises(ValueError, match="guidance_scale=-2"):
        s.update(guidance_scale=-2)
    assert s.config.guidance_scale == 1.0, "a refused update changes nothing"


def test_reset_rewarms(tiny) -> None:
    s = stream(tiny)
    frame = torch.rand(3, 64, 64)
    s(frame), s(frame)
    s.reset()
    assert s(frame) is None and s(frame) is not None


def test_slerp_and_blends() -> None:
    a, b, c = torch.randn(1, 77, 32), torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-5, rtol=1e-5)
    mid = slerp(a, b, 0.5)
    assert (mid.norm(dim=-1) >= torch.minimum(a.norm(dim=-1), b.norm(dim=-1)) * 0.99).all(), "no shrinking"
    torch.testing.assert_close(slerp(a, a, 0.3), a)
    torch.testing.assert_close(blend_embeddings([a, b], [1.0, 0.0]), a)
    torch.testing.assert_close(blend_embeddings([a, b, c], [2.0, 1.0, 1.0]), 0.5 * a + 0.25 * b + 0.25 * c)


def test_weighted_prompt_blend_drives_the_stream(tiny) -> None:
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    only_cat = warm_output(stream(tiny, prompt=[("a cat", 1.0), ("a dog", 0.0)]), frame)
    torch.testing.assert_close(only_cat, warm_output(stream(tiny, prompt="a cat"), frame))
    mixed = warm_output(stream(tiny, prompt=[("a cat", 0.5), ("a dog", 0.5)]), frame)
    assert (mixed - only_cat).abs().max() > 1e-4


def test_different_prompts_give_different_outputs(tiny) -> None:
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = warm_output(stream(tiny, prompt="sunset"), frame), warm_output(stream(tiny, prompt="sunrise"), frame)
    assert (a - b).abs().max() > 1e-3


def test_decoded_video_frames_are_accepted_and_come_back_as_arrays(tiny) -> None:
    import av

    picture = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    video_frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
    from_video = warm_output(stream(tiny), video_frame)
    from_array = warm_output(stream(tiny), video_frame.to_ndarray(format="rgb24"))
    assert isinstance(from_video, np.ndarray) and np.array_equal(from_video, from_array)
