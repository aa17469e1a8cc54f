"""StreamDiffusion's stochastic similarity filter: skip frames that barely changed."""

from __future__ import annotations

import random

import torch


class SimilarityFilter:
    """Decides per input whether to skip the model and re-emit the last output.

    With ``c`` the cosine similarity between the new input and the last *processed* input, a
    frame is skipped with probability ``max(0, (c - η) / (1 - η))``, drawn from a seeded RNG;
    never more than ``max_skip_frames`` in a row. ``η >= 1`` never skips.
    """

    def __init__(self, threshold: float = 0.98, max_skip_frames: int = 10, seed: int = 0) -> None:
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames
        self.skipped_total = 0
        self._skipped_in_a_row = 0
        self._previous: torch.Tensor | None = None
        self._rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def reset(self) -> None:
        self._previous = None
        self._skipped_in_a_row = 0

    def skip_probability(self, x: torch.Tensor) -> float:
        """The chance that ``x`` is skipped, given the last processed input (0 for the first)."""
        if self._previous is None or self.threshold >= 1.0:
            return 0.0
        similarity = torch.nn.functional.cosine_similarity(
            self._previous.flatten().float(), x.flatten().float(), dim=0
        ).item()
        return max(0.0, (similarity - self.threshold) / (1.0 - self.threshold))

    def should_skip(self, x: torch.Tensor) -> bool:
        """Decide for ``x``; when it is not skipped it becomes the new reference input."""
        probability = self.skip_probability(x)
        draw = self._rng.random()
        if draw < probability and self._skipped_in_a_row < self.max_skip_frames:
            self._skipped_in_a_row += 1
            self.skipped_total += 1
            return True
        self._skipped_in_a_row = 0
        self._previous = x.detach().clone()
        return False
