"""txt2img from the stream's fixed noise."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import StreamConfig
from engine.stream import StreamDiffusion


def generate(components, seed: int, prompt: str = "a red balloon", f: int = 1) -> list[np.ndarray]:
    config = StreamConfig(mode="txt2img", t_index_list=(0, 25), frame_buffer_size=f, width=64, height=96,
                          cfg_type="none", seed=seed, prompt=prompt)
    stream = StreamDiffusion(components, config)
    assert stream.txt2img() is None, "the first call only fills the pipeline"
    return stream.txt2img()


def test_shape_and_kind(tiny) -> None:
    frames = generate(tiny, seed=1, f=2)
    assert len(frames) == 2
    assert all(f.shape == (96, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert all(f.std() > 1 for f in frames), "not a flat picture"


def test_same_seed_same_frames_other_seed_other_frames(tiny) -> None:
    a, b, c = generate(tiny, 1)[0], generate(tiny, 1)[0], generate(tiny, 2)[0]
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_prompt_changes_frames(tiny) -> None:
    a, b = generate(tiny, 1, "a red balloon")[0], generate(tiny, 1, "a green field")[0]
    assert not np.array_equal(a, b)


def test_modes_are_not_mixed(tiny) -> None:
    stream = StreamDiffusion(tiny, StreamConfig(mode="txt2img", width=64, height=64))
    with pytest.raises(ValueError, match="mode='img2img'"):
        stream(np.zeros((64, 64, 3), np.uint8))
