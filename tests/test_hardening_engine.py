"""What a careless or hostile client could do to the engine through parameters, and NaN handling (issue 8).

Items 5 (prompts that freeze every stream), 9 (loose validation), 15 (NaN/inf in the direct
API, the KL VAE in fp16).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine.config import MAX_BLEND_PROMPTS, MAX_PROMPT_CHARS, StreamConfig
from engine.presets import build_preset
from engine.runtime import Engine, EngineConfig
from engine.stream import NonFiniteOutputError, StreamDiffusion
from tests.test_runtime import lockstep

SIZE = 64
CONFIG = StreamConfig(t_index_list=(20, 40), width=SIZE, height=SIZE, cfg_type="self", prompt="a cat")


def pictures(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [(rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8) for _ in range(count)]


# ------------------------------------------------------------------ item 9: strict types at the boundary

@pytest.mark.parametrize("params,message", [
    (dict(prompt="a cat \ud800"), "lone surrogate"),
    (dict(negative_prompt="\udfff"), "lone surrogate"),
    (dict(similarity_filter="false"), "similarity_filter='false' must be true or false"),
    (dict(do_add_noise=1), "do_add_noise=1 must be true or false"),
    (dict(prompt={"a cat": 1.0}), "must be a string or a list of [prompt, weight] pairs"),
    (dict(prompt=[["a cat", "1"]]), "must be a string or a list of [prompt, weight] pairs"),
    (dict(prompt=[["a cat", True]]), "must be a string or a list of [prompt, weight] pairs"),
])
def test_values_of_the_wrong_type_are_refused_when_they_arrive(params, message) -> None:
    with pytest.raises(ValueError) as refused:
        CONFIG.with_updates(**params)
    assert message in str(refused.value)


def test_errors_never_echo_unbounded_input() -> None:
    for params in (dict(prompt="雨" * 150_000), dict(prompt=[["x", 1.0]] * 50_000), dict(seed=10 ** 5000),
                   dict(guidance_scale="9" * 100_000), dict(t_index_list=list(range(100_000)))):
        with pytest.raises(ValueError) as refused:
            CONFIG.with_updates(**params)
        assert len(str(refused.value)) < 300, str(refused.value)[:300]


# ------------------------------------------------------------------ item 5: prompts bounded, encodings shared

def test_prompts_and_blends_are_bounded_by_what_the_text_encoder_can_use() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_BLEND_PROMPTS}"):
        CONFIG.with_updates(prompt=[(f"style {k}", 1.0) for k in range(2000)])
    with pytest.raises(ValueError, match=f"at most {MAX_PROMPT_CHARS}"):
        CONFIG.with_updates(prompt="a cat " * 1000)
    CONFIG.with_updates(prompt=[(f"style {k}", 1.0) for k in range(MAX_BLEND_PROMPTS)], negative_prompt="x" * 2000)


async def test_sessions_on_a_device_share_prompt_encodings_and_a_blend_is_one_encoder_pass(tiny) -> None:
    passes: list[int] = []
    hook = tiny.text_encoder.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    try:
        async with Engine(EngineConfig(stream=CONFIG, max_sessions=3), components=tiny) as engine:
            await engine.open_session(prompt="a lighthouse at dusk")
            before = len(passes)
            await engine.open_session(prompt="a lighthouse at dusk")  # same prompt and negative: no pass at all
            assert len(passes) == before
            blend = [("ink", 1.0), ("neon", 2.0), ("oil", 1.0), ("chalk", 0.5)]
            await engine.open_session(prompt=blend)
            assert passes[before:] == [4], "the blend's four prompts go through the encoder as one batch"
    finally:
        hook.remove()


# ------------------------------------------------------------------ item 15: NaN/inf in the direct API

class NaNOnce:
    """The real UNet, except that the call numbered ``bad`` returns NaN."""

    def __init__(self, unet, bad: int) -> None:
        self.unet, self.bad, self.calls = unet, bad, 0

    def __call__(self, sample, timesteps, embeds):
        self.calls += 1
        out = self.unet(sample, timesteps, encoder_hidden_states=embeds).sample
        return torch.full_like(out, float("nan")) if self.calls == self.bad else out


def test_the_direct_api_raises_on_nan_resets_and_goes_on(tiny) -> None:
    stream = StreamDiffusion(tiny, CONFIG, unet=NaNOnce(tiny.unet, bad=3))
    inputs = pictures(6)
    assert stream(inputs[0]) is None and stream(inputs[1]) is not None
    with pytest.raises(NonFiniteOutputError, match="stream was reset"):
        stream(inputs[2])
    assert stream.calls == 0 and torch.isfinite(stream.latent_buffer).all()
    assert stream(inputs[3]) is None, "after a reset the pipeline fills again"
    out = stream(inputs[4])
    assert out is not None and out.dtype == np.uint8


def test_the_kl_vae_stays_float32_in_an_fp16_model_as_it_asks() -> None:
    half = build_preset("small", vae="full", dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert half.vae.config.force_upcast
    stream = StreamDiffusion(half, StreamConfig(t_index_list=(40,), width=SIZE, height=SIZE, cfg_type="none"))
    out = stream(pictures(1)[0])
    assert out is not None and out.std() > 1, "an fp32 VAE fed fp16 latents still makes a picture"


async def test_a_worker_thread_runs_prompt_encoding_for_updates(tiny) -> None:
    threads: set[str] = set()
    hook = tiny.text_encoder.register_forward_pre_hook(lambda module, args: threads.add(threading.current_thread().name))
    try:
        async with Engine(EngineConfig(stream=CONFIG, max_sessions=1), components=tiny) as engine:
            session = await engine.open_session()
            session.update(prompt=[("a river", 1.0), ("a road", 1.0)])
            await lockstep(session, pictures(2))
    finally:
        hook.remove()
    assert threads and all(name.startswith("diffcam-worker") for name in threads)
