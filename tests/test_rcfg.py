"""Residual classifier-free guidance: full, self, initialize, and the guidance = 1 identity."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from engine.config import StreamConfig
from engine.stream import StreamDiffusion
from tests.reference import encode_prompt, sequential_img2img, stream_noise, timesteps
from tests.test_stream_equivalence import ATOL, SIZE, frame

PROMPT, NEGATIVE = "a marble statue", "blurry, low quality"


def make_stream(components, cfg_type: str, *, n: int = 2, f: int = 1, guidance: float = 1.8,
                delta: float = 0.7, unet=None) -> StreamDiffusion:
    t_index_list = {1: (30,), 2: (20, 40), 3: (10, 25, 40)}[n]
    config = StreamConfig(t_index_list=t_index_list, frame_buffer_size=f, width=SIZE, height=SIZE,
                          cfg_type=cfg_type, guidance_scale=guidance, delta=delta, prompt=PROMPT,
                          negative_prompt=NEGATIVE, seed=3)
    return StreamDiffusion(components, config, unet=unet)


def test_full_cfg_equals_the_textbook_formula_with_a_real_negative_pass(tiny) -> None:
    stream = make_stream(tiny, "full")
    image = frame(42)
    noise = stream_noise(3, 2, 1, 4, SIZE, SIZE)
    expected = sequential_img2img(tiny, image, (20, 40), [noise[0], noise[1]], encode_prompt(tiny, PROMPT),
                                  uncond=encode_prompt(tiny, NEGATIVE), guidance=1.8)
    unguided = sequential_img2img(tiny, image, (20, 40), [noise[0], noise[1]], encode_prompt(tiny, PROMPT))
    assert (expected - unguided).abs().max() > 10 * ATOL, "guidance must make a visible difference"
    stream(image)
    torch.testing.assert_close(stream(image), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg_type", ["full", "self", "initialize"])
def test_guidance_one_equals_no_guidance(tiny, cfg_type: str) -> None:
    guided, plain = make_stream(tiny, cfg_type, n=3, f=2, guidance=1.0), make_stream(tiny, "none", n=3, f=2)
    for call in range(4):
        images = [frame(call), frame(call + 50)]
        out_guided, out_plain = guided.img2img(images), plain.img2img(images)
        if out_plain is not None:
            for a, b in zip(out_guided, out_plain):
                torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg_type", ["full", "self", "initialize"])
@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_guidance_below_one_turns_guidance_off_as_in_streamdiffusion(tiny, cfg_type: str, guidance: float) -> None:
    """StreamDiffusion and diffusers guide only when guidance > 1. Applying the formula below 1 would, in
    ``self`` mode, pull the prediction towards the very noise that was added: at 0 the camera comes back."""
    low, plain = make_stream(tiny, cfg_type, n=2, guidance=guidance), make_stream(tiny, "none", n=2)
    for call in range(3):
        out_low, out_plain = low(frame(call)), plain(frame(call))
        if out_plain is not None:
            torch.testing.assert_close(out_low, out_plain, atol=ATOL, rtol=0)


def test_one_step_self_cfg_uses_the_noise_added_to_this_frame_not_the_last_frames_residual(tiny) -> None:
    """A documented departure from StreamDiffusion's code, which starts the stock noise at zero and rolls the
    finished frame's residual into the next frame's slot. The residual of a new frame is known exactly: it is
    the noise just added to it (x = α·z + β·ε₀), which is what RCFG's self-negative estimates; so every new
    frame enters with ε₀ (hand-computed here from diffusers' scheduler, not the engine's code)."""
    spy = SpyUNet(tiny.unet)
    stream = make_stream(tiny, "self", n=1, guidance=1.8, delta=0.7, unet=spy)
    noise = stream_noise(3, 1, 1, 4, SIZE, SIZE)
    alpha, beta, c_skip, c_out = coefficients(tiny, (30,), 1)
    for call in range(3):
        out = stream(frame(call))
        sample, _, _, eps_cond = spy.calls[-1]
        eps = 0.7 * noise + 1.8 * (eps_cond - 0.7 * noise)
        x0 = c_out * (sample - beta * eps) / alpha + c_skip * sample
        decoded = tiny.vae.decode(x0 / tiny.vae.config.scaling_factor).sample
        torch.testing.assert_close(out, ((decoded[0] + 1) / 2).clamp(0, 1), atol=ATOL, rtol=0)
        torch.testing.assert_close(stream.stock_noise, noise, atol=0, rtol=0)


class SpyUNet:
    """Wraps the real UNet and records each call's inputs and outputs."""

    def __init__(self, unet) -> None:
        self.unet, self.calls = unet, []

    def __call__(self, sample, timesteps, encoder_hidden_states):
        out = self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        self.calls.append((sample.clone(), timesteps.clone(), encoder_hidden_states.clone(), out.clone()))
        return out


def coefficients(components, t_index_list, f: int):
    """α, β, c_skip, c_out per row, straight from diffusers' LCMScheduler (not from engine code)."""
    scheduler = LCMScheduler.from_config(components.scheduler.config)
    ts = timesteps(components, t_index_list)
    alphas = torch.stack([scheduler.alphas_cumprod[t] for t in ts])
    scalings = torch.tensor([scheduler.get_scalings_for_boundary_condition_discrete(t) for t in ts])
    rows = lambda v: v.float().repeat_interleave(f).view(-1, 1, 1, 1)  # noqa: E731
    return rows(alphas.sqrt()), rows((1 - alphas).sqrt()), rows(scalings[:, 0]), rows(scalings[:, 1])


@pytest.mark.parametrize("cfg_type", ["self", "initialize"])
def test_stock_noise_update_matches_a_hand_computation(tiny, cfg_type: str) -> None:
    n, f, g, delta = 3, 2, 1.8, 0.7
    spy = SpyUNet(tiny.unet)
    stream = make_stream(tiny, cfg_type, n=n, f=f, guidance=g, delta=delta, unet=spy)
    for call in range(3):  # fill the pipeline so buffer and stock noise hold real history
        stream.img2img([frame(call), frame(call + 9)])
    stock_before, buffer_before = stream.stock_noise.clone(), stream.latent_buffer.clone()
    outputs = stream.img2img([frame(20), frame(21)])
    sample, _, embeds, eps_raw = spy.calls[-1]

    alpha, beta, c_skip, c_out = coefficients(tiny, stream.config.t_index_list, f)
    noise = stream_noise(3, n, f, 4, SIZE, SIZE)
    x = sample[f:] if cfg_type == "initialize" else sample
    assert torch.equal(x[f:], buffer_before), "rows in flight go into the UNet unchanged"
    cond, uncond = encode_prompt(tiny, PROMPT), encode_prompt(tiny, NEGATIVE)
    if cfg_type == "initialize":
        assert sample.shape[0] == n * f + f, "one negative row per new frame"
        torch.testing.assert_close(sample[:f], x[:f])
        torch.testing.assert_close(embeds[:f], uncond.expand(f, -1, -1))
        stock_before[:f] = eps_raw[:f]
        eps_cond = eps_raw[f:]
    else:
        assert sample.shape[0] == n * f
        eps_cond = eps_raw
    torch.testing.assert_close(embeds[-n * f:], cond.expand(n * f, -1, -1))

    eps = delta * stock_before + g * (eps_cond - delta * stock_before)
    x0 = c_out * (x - beta * eps) / alpha + c_skip * x
    scaled = beta * stock_before
    moved = c_out * (scaled - beta * eps) / alpha + c_skip * scaled
    expected_stock = torch.cat([noise[:f], noise[f:] + alpha[f:] / beta[f:] * moved[:-f]])
    expected_buffer = alpha[f:] * x0[:-f] + beta[f:] * noise[f:]
    torch.testing.assert_close(stream.stock_noise, expected_stock, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stream.latent_buffer, expected_buffer, atol=1e-4, rtol=1e-4)
    decoded = tiny.vae.decode(x0[-f:] / tiny.vae.config.scaling_factor).sample
    for j in range(f):
        torch.testing.assert_close(outputs[j], ((decoded[j] + 1) / 2).clamp(0, 1), atol=ATOL, rtol=0)


def test_self_cfg_changes_the_picture(tiny) -> None:
    guided, plain = make_stream(tiny, "self", guidance=2.0), make_stream(tiny, "none")
    for _ in range(2):
        a, b = guided(frame(1)), plain(frame(1))
    assert (a - b).abs().max() > 10 * ATOL
