"""What each UNet block costs: estimated from the shapes, or measured on the device.

``estimate_costs`` counts multiply-accumulates (convolutions, linear layers, attention's two
matrix products, and a calibrated charge per attention score for the softmax) while a copy of
the model built on the meta device runs the blocks: shapes flow, nothing is computed or
allocated, and every rank gets the same numbers, so every rank derives the same cuts. ``measure_costs`` times each block's forward on the real device (median
of a few runs) and so also sees what multiply-accumulates miss (normalisation, memory traffic,
kernel launches); timings differ between runs, so one rank measures and shares the cuts.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import lru_cache
from typing import Callable, Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from engine.names import COST_KINDS
from engine.parallel.split import Size, UNetSplit, run_block, unet_blocks

TEXT_TOKENS = 77
#: Multiply-accumulates one attention score costs besides its products (scale, max, exp, sum, divide):
#: measured 2–5 ns a score in ``scaled_dot_product_attention`` on a CPU core that does a convolution's
#: multiply-accumulate in 0.06 ns. Without it full-resolution self-attention looks half its cost.
SCORE_COST = 32.0


@torch.inference_mode()
def estimate_costs(unet: UNet2DConditionModel, sample_shape: Sequence[int],
                   text_tokens: int = TEXT_TOKENS) -> list[float]:
    """Multiply-accumulates per block for one UNet call on ``sample_shape`` (B, C, H, W)."""
    meta = UNetSplit(_meta_copy(unet))
    batch = sample_shape[0]
    sample = torch.empty(*sample_shape, device="meta")
    text = torch.empty(batch, text_tokens, unet.config.cross_attention_dim, device="meta")
    temb = meta.embed(torch.zeros((), device="meta"), batch, torch.float32)
    sizes = meta.upsample_sizes(tuple(sample_shape[-2:]))
    counter = _MacCounter(meta.unet)
    hidden, skips, costs = sample, {}, []
    for index, block in enumerate(meta.blocks):
        counter.total = 0.0
        hidden, produced = run_block(meta.unet, block, hidden, skips, temb, text, sizes.get(index))
        skips.update(produced)
        costs.append(counter.total)
    counter.remove()
    return costs


@torch.inference_mode()
def trace_shapes(unet: UNet2DConditionModel, latent_size: Size) -> dict[int, torch.Size]:
    """The shape of every skip connection for a latent of ``latent_size``, batch 1 (down path only, on meta)."""
    meta = UNetSplit(_meta_copy(unet))
    hidden = torch.empty(1, unet.config.in_channels, *latent_size, device="meta")
    text = torch.empty(1, TEXT_TOKENS, unet.config.cross_attention_dim, device="meta")
    temb = meta.embed(torch.zeros((), device="meta"), 1, torch.float32)
    skips: dict[int, torch.Tensor] = {}
    for block in meta.blocks:
        if block.kind not in ("in", "down"):
            break
        hidden, produced = run_block(meta.unet, block, hidden, skips, temb, text)
        skips.update(produced)
    return {s: t.shape for s, t in skips.items()}


@torch.inference_mode()
def measure_costs(split: UNetSplit, sample: torch.Tensor, timestep: torch.Tensor | int, text: torch.Tensor,
                  runs: int = 3) -> list[float]:
    """Seconds per block on the split's device: the median of ``runs`` timed passes after one untimed."""
    timings: list[list[float]] = [[] for _ in split.blocks]
    sync = synchronizer(sample.device)
    temb = split.embed(timestep, sample.shape[0], sample.dtype)
    sizes = split.upsample_sizes(tuple(sample.shape[-2:]))
    for run in range(runs + 1):
        hidden, skips = sample, {}
        for index, block in enumerate(split.blocks):
            sync()
            start = time.perf_counter()
            hidden, produced = run_block(split.unet, block, hidden, skips, temb, text, sizes.get(index))
            sync()
            if run:
                timings[index].append(time.perf_counter() - start)
            skips.update(produced)
    return [statistics.median(t) for t in timings]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A call that waits for ``device``'s queued work (nothing to wait for on the CPU): for timing."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _meta_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    unet_blocks(unet)  # refuse unsupported models before building anything
    return _meta_unet(json.dumps(dict(unet.config), sort_keys=True, default=list))


@lru_cache(maxsize=4)
def _meta_unet(config_json: str) -> UNet2DConditionModel:
    """The same architecture with weights on the meta device: no memory, no compute."""
    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config).eval().requires_grad_(False)


class _MacCounter:
    """Adds up multiply-accumulates of convolutions, linear layers and attention products while hooked."""

    def __init__(self, model: nn.Module) -> None:
        self.total = 0.0
        self._handles = []
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self._handles.append(module.register_forward_hook(self._weighted))
            elif isinstance(module, Attention):
                self._handles.append(module.register_forward_hook(self._attention, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _weighted(self, module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            self.total += output.numel() * module.in_channels // module.groups * kh * kw
        else:
            self.total += output.numel() * module.in_features

    def _attention(self, module: Attention, args: tuple, kwargs: dict, _output: torch.Tensor) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        queries = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[-1] * hidden.shape[-2]
        keys = context.shape[1] if context is not None else queries
        scores = hidden.shape[0] * module.heads * queries * keys
        self.total += 2.0 * hidden.shape[0] * queries * keys * module.inner_dim + SCORE_COST * scores


__all__ = ["COST_KINDS", "SCORE_COST", "TEXT_TOKENS", "estimate_costs", "measure_costs", "trace_shapes"]
