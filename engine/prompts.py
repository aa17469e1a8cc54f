"""Prompt encoding and weighted blending of prompt embeddings."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

WeightedPrompts = Sequence[tuple[str, float]]


class PromptEncoder:
    """Encodes prompts to CLIP hidden states ``(1, 77, D)``, remembering recent ones.

    The runtime shares one per device among all its streams (on the device's worker), so a
    prompt many users pick, or a preset, is encoded once.
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    def encode(self, prompt: str) -> torch.Tensor:
        return self.encode_all([prompt])[0]

    def encode_all(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Each prompt's hidden states; those not cached go through the text encoder in one batch."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for prompt, embedding in zip(missing, self._encode_uncached(missing)):
                self._cache[prompt] = embedding
        found = []
        for prompt in prompts:
            self._cache.move_to_end(prompt)
            found.append(self._cache[prompt])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found

    def encode_weighted(self, prompts: str | WeightedPrompts) -> torch.Tensor:
        """One prompt, or a blend of ``(prompt, weight)`` pairs (see :func:`blend_embeddings`)."""
        if isinstance(prompts, str):
            return self.encode(prompts)
        pairs = list(prompts)
        return blend_embeddings(self.encode_all([p for p, _ in pairs]), [float(w) for _, w in pairs])

    @torch.inference_mode()
    def _encode_uncached(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return list(self.text_encoder(ids)[0].split(1))


def blend_embeddings(embeddings: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Blend prompt embeddings: spherical interpolation for two, normalised weighted sum for more.

    For two prompts with weights ``(w0, w1)`` each token vector is slerped at ``w1 / (w0 + w1)``,
    which keeps the vectors' norm where a straight average would shrink it.
    """
    check_weights(weights)
    total = float(sum(weights))
    if len(embeddings) == 1:
        return embeddings[0]
    if len(embeddings) == 2:
        return slerp(embeddings[0], embeddings[1], weights[1] / total)
    return sum(w / total * e for w, e in zip(weights, embeddings))  # type: ignore[return-value]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation along the last dimension; falls back to lerp for parallel vectors."""
    a32, b32 = a.float(), b.float()
    a_unit = a32 / a32.norm(dim=-1, keepdim=True).clamp_min(eps)
    b_unit = b32 / b32.norm(dim=-1, keepdim=True).clamp_min(eps)
    dot = (a_unit * b_unit).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    parallel = sin_omega.abs() < 1e-4
    safe_sin = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    wa = torch.where(parallel, torch.full_like(omega, 1 - t), torch.sin((1 - t) * omega) / safe_sin)
    wb = torch.where(parallel, torch.full_like(omega, t), torch.sin(t * omega) / safe_sin)
    return (wa * a32 + wb * b32).to(a.dtype)


def check_weights(weights: Sequence[float]) -> None:
    if not weights:
        raise ValueError("prompt blend is empty; give at least one (prompt, weight) pair")
    if any(not (w >= 0 and w < float("inf")) for w in weights):
        raise ValueError(f"prompt weights {list(weights)} must be finite and >= 0")
    if sum(weights) <= 0:
        raise ValueError(f"prompt weights {list(weights)} sum to 0; at least one must be positive")
