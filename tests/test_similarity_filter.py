"""The stochastic similarity filter skips at the rate its formula predicts, and no more."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import StreamConfig
from engine.similarity import SimilarityFilter
from engine.stream import StreamDiffusion
from tests.test_rcfg import SpyUNet


def vector_at_similarity(previous: torch.Tensor, similarity: float, seed: int) -> torch.Tensor:
    """A vector whose cosine similarity to ``previous`` is exactly ``similarity``."""
    unit = previous.flatten() / previous.norm()
    other = torch.randn(unit.shape, generator=torch.Generator().manual_seed(seed))
    other = other - (other @ unit) * unit
    other = other / other.norm()
    return (similarity * unit + math.sqrt(1 - similarity**2) * other).view_as(previous)


def test_skip_probability_follows_the_formula() -> None:
    eta = 0.9
    ssf = SimilarityFilter(threshold=eta, max_skip_frames=1000, seed=0)
    base = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert not ssf.should_skip(base), "the first frame is never skipped"
    for similarity in (0.5, 0.9, 0.93, 0.97, 0.999):
        expected = max(0.0, (similarity - eta) / (1 - eta))
        assert ssf.skip_probability(vector_at_similarity(base, similarity, 2)) == pytest.approx(expected, abs=1e-4)


def test_skip_rate_matches_the_formula_over_many_frames() -> None:
    eta, similarity, trials = 0.9, 0.96, 4000
    ssf = SimilarityFilter(threshold=eta, max_skip_frames=10_000, seed=123)
    previous = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ssf.should_skip(previous)
    skips = 0
    for trial in range(trials):
        candidate = vector_at_similarity(previous, similarity, trial)
        if ssf.should_skip(candidate):
            skips += 1
        else:
            previous = candidate  # the filter now compares against this one
    p = (similarity - eta) / (1 - eta)
    sigma = math.sqrt(p * (1 - p) / trials)
    assert abs(skips / trials - p) < 4 * sigma, (skips / trials, p)
    assert ssf.skipped_total == skips


def test_identical_frames_skip_at_most_max_skip_frames_in_a_row() -> None:
    ssf = SimilarityFilter(threshold=0.98, max_skip_frames=4, seed=0)
    still = torch.rand(3, 8, 8)
    decisions = [ssf.should_skip(still) for _ in range(31)]
    # identical frames: probability 1, so exactly 4 skips then one processed frame, repeating
    assert decisions == [False] + ([True] * 4 + [False]) * 6


def test_threshold_one_never_skips() -> None:
    ssf = SimilarityFilter(threshold=1.0, max_skip_frames=10, seed=0)
    still = torch.rand(3, 8, 8)
    assert not any(ssf.should_skip(still) for _ in range(50))


def test_same_seed_same_decisions() -> None:
    runs = []
    for _ in range(2):
        ssf = SimilarityFilter(threshold=0.5, max_skip_frames=3, seed=9)
        base = torch.randn(32, generator=torch.Generator().manual_seed(0))
        runs.append([ssf.should_skip(vector_at_similarity(base, 0.8, k)) for k in range(200)])
    assert runs[0] == runs[1] and 0 < sum(runs[0]) < 200


def test_stream_reemits_the_last_output_on_a_skip(tiny) -> None:
    config = StreamConfig(t_index_list=(20, 40), width=64, height=64, cfg_type="none",
                          similarity_filter=True, similarity_threshold=0.9, max_skip_frames=3)
    spy = SpyUNet(tiny.unet)
    calls = spy.calls
    stream = StreamDiffusion(tiny, config, unet=spy)
    still = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs = [stream(still) for _ in range(12)]
    # frame 0 runs; identical frames then skip 3, run 1, ... → 3 model calls in 12 frames
    assert len(calls) == 3 and stream.filter.skipped_total == 9
    first_real = next(o for o in outputs if o is not None)
    assert all(o is None or torch.equal(o, first_real) for o in outputs)
    stream.update(similarity_filter=False)
    stream(still)
    assert len(calls) == 4
