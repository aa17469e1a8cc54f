"""Invalid configuration is refused with a message naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from engine.config import StreamConfig, parse_t_index_list, strength_to_t_index_list

BAD = [
    (dict(t_index_list=()), "t_index_list is empty"),
    (dict(t_index_list=(10, 50)), r"t_index_list=\(10, 50\) has \[50\] outside \[0, 49\]"),
    (dict(t_index_list=(30, 20)), "strictly increasing"),
    (dict(t_index_list=(-1,)), "outside"),
    (dict(frame_buffer_size=0), r"frame_buffer_size=0 is out of range; allowed: \[1, 16\]"),
    (dict(width=500), "width=500 must be a multiple of 8"),
    (dict(height=4096), r"height=4096 is out of range; allowed: \[64, 2048\]"),
    (dict(width=512.0), "width=512.0 must be an integer"),
    (dict(cfg_type="double"), "cfg_type='double' is not one of"),
    (dict(mode="video"), "mode='video' is not one of"),
    (dict(guidance_scale=-1), r"guidance_scale=-1 is out of range; allowed: \[0.0, 30.0\]"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan must be a finite number"),
    (dict(delta=100), "delta=100 is out of range"),
    (dict(seed=-3), "seed=-3 is out of range"),
    (dict(seed=True), "seed=True must be an integer"),
    (dict(similarity_threshold=1.5), "similarity_threshold=1.5 is out of range"),
    (dict(max_skip_frames=-1), "max_skip_frames=-1 is out of range"),
    (dict(num_inference_steps=0), "num_inference_steps=0 is out of range"),
    (dict(prompt=[("a", -1.0)]), "prompt weights"),
    (dict(prompt=[]), "non-empty list"),
    (dict(prompt=42), "prompt=42 must be a string"),
    (dict(negative_prompt=None), "negative_prompt must be a string"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[m for _, m in BAD])
def test_bad_values_raise_a_clear_value_error(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        StreamConfig(**fields)


def test_unknown_update_names_the_known_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown stream parameter\(s\) \['colour'\]"):
        StreamConfig().with_updates(colour="red")


def test_defaults_are_valid_and_lists_become_tuples() -> None:
    config = StreamConfig(t_index_list=[0, 16, 32, 45], prompt=[["a", 1], ["b", 2]])
    assert config.t_index_list == (0, 16, 32, 45)
    assert config.prompt == (("a", 1.0), ("b", 2.0))
    assert config.latent_size == (64, 64)


@pytest.mark.parametrize("strength,steps,expected", [
    (1.0, 4, (0, 12, 25, 38)),
    (0.0, 4, (46, 47, 48, 49)),
    (0.5, 2, (24, 37)),
    (1.0, 1, (0,)),
    (0.0, 1, (49,)),
])
def test_strength_mapping(strength, steps, expected) -> None:
    assert strength_to_t_index_list(strength, steps) == expected


def test_strength_mapping_is_valid_and_monotonic_everywhere() -> None:
    for steps in range(1, 6):
        starts = []
        for k in range(101):
            indices = strength_to_t_index_list(k / 100, steps)
            StreamConfig(t_index_list=indices)  # validates: in range and strictly increasing
            starts.append(indices[0])
        assert starts == sorted(starts, reverse=True), "more strength never starts later"


def test_strength_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"strength=1.5 is out of range; allowed: \[0.0, 1.0\]"):
        strength_to_t_index_list(1.5, 2)


def test_parse_t_index_list() -> None:
    assert parse_t_index_list("0,16, 32,45") == (0, 16, 32, 45)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_t_index_list("0;16")


@pytest.mark.parametrize("fields,message", [
    (dict(t_index_list=None), "t_index_list=None must be a list of integers"),
    (dict(t_index_list=5), "must be a list of integers"),
    (dict(t_index_list=[None, 3]), "integers only"),
    (dict(t_index_list=[32.9, 45.2]), "integers only"),
    (dict(t_index_list=[float("inf")]), "integers only"),
    (dict(t_index_list=[True, 2]), "integers only"),
    (dict(guidance_scale=10**400), "must be a finite number"),
    (dict(delta="1"), "must be a finite number"),
    (dict(prompt=[("a", 10**400)]), "must be a string or a list of"),
])
def test_odd_types_are_value_errors_too(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        StreamConfig(**fields)


def test_numpy_integers_are_fine() -> None:
    import numpy as np

    assert StreamConfig(t_index_list=np.array([3, 9])).t_index_list == (3, 9)
