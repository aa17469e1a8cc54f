"""A rank's fixed-shape calls over static buffers (:mod:`engine.parallel.rank_graph`) against the same calls run
eagerly: on the CPU through the stand-in replay (a re-run), on a GPU through a real CUDA graph (``.ci/gpu-check``
runs this file; the CUDA cases skip where torch sees no GPU)."""

from __future__ import annotations

import pytest
import torch

from engine.parallel.rank_graph import RankGraph
from engine.vae import decode_latents
from engine.parallel.split import UNetSplit, unet_blocks
from engine.presets import build_preset

ROWS, LATENT = 2, (8, 8)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tiny_on(device: str):
    """The tiny preset on ``device``; a CUDA case skips where torch sees no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch (the CUDA build of torch on an NVIDIA machine)")
    return build_preset("tiny", device=device)


def inputs(split: UNetSplit, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A latent, a time embedding and text states, different for every ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    unet = split.unet
    sample = torch.randn(ROWS, unet.config.in_channels, *LATENT, generator=generator)
    text = torch.randn(ROWS, 77, unet.config.cross_attention_dim, generator=generator)
    temb = split.embed(torch.tensor([100.0 + 300 * seed] * ROWS, device=device), ROWS, torch.float32)
    return sample.to(device), temb, text.to(device)


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_both_components_replayed_over_static_buffers_match_eager(device: str) -> None:
    unet = tiny_on(device).unet
    blocks = len(unet_blocks(unet))
    split = UNetSplit(unet, (0, blocks // 2, blocks))
    first, second = (RankGraph(lambda h, s, t, x, i=i: split.run(i, h, s, t, x, LATENT), torch.device(device),
                               graphs=True) for i in (0, 1))
    for seed in range(3):  # new inputs every call: each must reach the static buffers
        sample, temb, text = inputs(split, device, seed)
        hidden, gives = split.run(0, sample, {}, temb, text, LATENT)
        want, _ = split.run(1, hidden, gives, temb, text, LATENT)
        got_hidden, got_gives = first(sample, {}, temb, text)
        got_hidden, got_gives = got_hidden.clone(), {k: v.clone() for k, v in got_gives.items()}
        got, _ = second(got_hidden, got_gives, temb, text)
        assert got_gives.keys() == gives.keys() and got_gives
        tolerance = 0.0 if device == "cpu" else 1e-4  # the stand-in re-runs the same ops; a graph replays kernels
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    assert first.captured and second.captured


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_the_decode_replayed_matches_eager(device: str) -> None:
    """Rank k−1's decode: latents in, frames in [0, 1], uint8 pixels and a finite flag out (a tuple of outputs)."""
    vae = tiny_on(device).vae

    def decode(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        decoded = decode_latents(vae, latents)
        return decoded.clamp(-1, 1), decoded.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8), \
            torch.isfinite(decoded).all()

    graph = RankGraph(decode, torch.device(device), graphs=True, name="decode")
    graph.prepare(torch.zeros(2, 4, *LATENT, device=device))  # at set-up, on zeros, as the ranks do
    for seed in range(3):
        latents = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(seed)).to(device)
        got, want = graph(latents), decode(latents)
        tolerance = 0.0 if device == "cpu" else 1e-4
        torch.testing.assert_close(got[0], want[0], atol=tolerance, rtol=tolerance)
        assert (got[1].int() - want[1].int()).abs().max() <= (0 if device == "cpu" else 1)
        assert bool(got[2]) and got[2].dtype == torch.bool


def test_without_graphs_the_call_runs_as_it_is() -> None:
    calls = []
    graph = RankGraph(lambda h, s, t, x: calls.append(h) or (h, s), torch.device("cpu"), graphs=False)
    hidden = torch.ones(1)
    assert graph(hidden, {}, hidden, hidden)[0] is hidden and calls == [hidden] and not graph.captured


def test_inputs_of_another_structure_are_refused() -> None:
    graph = RankGraph(lambda h, s, t, x: (h * 2, dict(s)), torch.device("cpu"), graphs=True, name="UNet component 1")
    one = torch.ones(2)
    graph(one, {3: one}, one, one)
    with pytest.raises(ValueError, match="the UNet component 1 was captured for inputs"):
        graph(one, {4: one}, one, one)
