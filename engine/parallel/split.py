"""The UNet as an ordered list of blocks with explicit skip connections, cut into k components.

Blocks, in the order ``UNet2DConditionModel.forward`` runs them, read off the model itself:
``conv_in``, each of ``down_blocks``, ``mid_block``, each of ``up_blocks``, and ``conv_out``
(with ``conv_norm_out`` and ``conv_act``). Skip connections are numbered in the order the down
path produces them (``conv_in``'s output is skip 0, then each down block's ``len(resnets)`` plus
its downsampler's); each up block consumes the newest ``len(resnets)`` still unconsumed, as the
UNet's own forward does. The time embedding is not a block: every block takes it, so whoever
runs a component computes it from that step's timestep (two small linear layers) rather than
receiving it (the AsyncDiff reference code does the same).

A :class:`Component` is a run of consecutive blocks. Its forward takes the hidden state, the
skips it consumes that earlier components produced, the time embedding and the text
embeddings, and returns the hidden state and the skips it produced that later components
consume. :func:`balanced_bounds` chooses the cuts that minimise the most expensive component
(exact: every placement is tried, a UNet has about a dozen blocks), from costs that
:mod:`engine.parallel.costs` estimates from the shapes or measures on the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import UNet2DConditionModel

Skips = dict[int, torch.Tensor]
Size = tuple[int, int]


@dataclass(frozen=True)
class Block:
    """One block: ``name`` is its path in the UNet; skip ids in the order its forward wants them."""

    name: str
    consumes: tuple[int, ...] = ()
    produces: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        """``in``, ``down``, ``mid``, ``up`` or ``out``."""
        return {"conv_in": "in", "down_blocks": "down", "mid_block": "mid", "up_blocks": "up",
                "conv_out": "out"}[self.name.split(".")[0]]


@dataclass(frozen=True)
class Component:
    """Blocks ``start:stop``; ``needs``: skips it takes from earlier components; ``gives``: skips later ones take."""

    index: int
    start: int
    stop: int
    blocks: tuple[Block, ...]
    needs: tuple[int, ...]
    gives: tuple[int, ...]


def check_supported(unet: UNet2DConditionModel) -> None:
    """Raise ``ValueError`` for UNet features the split does not carry (SDXL's added embeddings and the like)."""
    config = unet.config
    unsupported = {name: config.get(name) for name in ("class_embed_type", "addition_embed_type",
                                                       "encoder_hid_dim_type")}
    found = {name: value for name, value in unsupported.items() if value is not None}
    if found:
        raise ValueError(f"the UNet split supports SD 1.x/2.x-style UNets; this one sets {found} "
                         "(class, added or projected text embeddings), which the components do not carry")


def unet_blocks(unet: UNet2DConditionModel) -> tuple[Block, ...]:
    """The UNet's blocks in execution order, with the skip ids each produces and consumes."""
    check_supported(unet)
    blocks = [Block("conv_in", produces=(0,))]
    pending = [0]
    for index, down in enumerate(unet.down_blocks):
        count = len(down.resnets) + len(down.downsamplers or ())
        produced = tuple(range(pending[-1] + 1, pending[-1] + 1 + count))
        pending.extend(produced)
        blocks.append(Block(f"down_blocks.{index}", produces=produced))
    if unet.mid_block is not None:
        blocks.append(Block("mid_block"))
    for index, up in enumerate(unet.up_blocks):
        count = len(up.resnets)
        consumed, pending = tuple(pending[-count:]), pending[:-count]
        blocks.append(Block(f"up_blocks.{index}", consumes=consumed))
    blocks.append(Block("conv_out"))
    return tuple(blocks)


def make_components(blocks: Sequence[Block], bounds: Sequence[int]) -> tuple[Component, ...]:
    """Components from cut points ``bounds`` = ``(0, c1, …, len(blocks))``, strictly increasing."""
    if bounds[0] != 0 or bounds[-1] != len(blocks) or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"bounds={tuple(bounds)} must rise strictly from 0 to {len(blocks)} (the block count)")
    components = []
    for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        before, inside, after = blocks[:start], blocks[start:stop], blocks[stop:]
        produced_before = {s for b in before for s in b.produces}
        consumed_after = {s for b in after for s in b.consumes}
        needs = tuple(sorted({s for b in inside for s in b.consumes} & produced_before))
        gives = tuple(sorted({s for b in inside for s in b.produces} & consumed_after))
        components.append(Component(index, start, stop, tuple(inside), needs, gives))
    return tuple(components)


def balanced_bounds(costs: Sequence[float], k: int) -> tuple[int, ...]:
    """Cuts into ``k`` runs minimising the largest run's cost (then the spread: sum of squares)."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(f"components={k} must be between 1 and the UNet's {n} blocks")
    prefix = list(itertools.accumulate(costs, initial=0.0))

    def badness(cuts: tuple[int, ...]) -> tuple[float, float]:
        bounds = (0, *cuts, n)
        sums = [prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])]
        return max(sums), sum(s * s for s in sums)

    best = min(itertools.combinations(range(1, n), k - 1), key=badness)
    return (0, *best, n)


def component_costs(costs: Sequence[float], bounds: Sequence[int]) -> list[float]:
    return [float(sum(costs[a:b])) for a, b in zip(bounds, bounds[1:])]


class UNetSplit:
    """A ``UNet2DConditionModel`` run as components; the model's own modules, nothing copied."""

    def __init__(self, unet: UNet2DConditionModel, bounds: Sequence[int] | None = None) -> None:
        """``bounds`` as for :func:`make_components`; None: one component (the whole UNet)."""
        self.unet = unet
        self.blocks = unet_blocks(unet)
        self.components = make_components(self.blocks, bounds or (0, len(self.blocks)))
        self._upsample_sizes: dict[Size, dict[int, Size | None]] = {}

    def __len__(self) -> int:
        return len(self.components)

    @property
    def bounds(self) -> tuple[int, ...]:
        return (0, *(c.stop for c in self.components))

    def embed(self, timestep: torch.Tensor | float | int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The time embedding every block takes, for ``batch`` rows."""
        unet = self.unet
        probe = torch.empty(batch, 0, device=unet.device, dtype=dtype)  # get_time_embed reads batch/device/dtype
        emb = unet.time_embedding(unet.get_time_embed(sample=probe, timestep=timestep), None)
        return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb

    def run(self, index: int, hidden: torch.Tensor, skips: Skips, temb: torch.Tensor, text: torch.Tensor,
            latent_size: Size) -> tuple[torch.Tensor, Skips]:
        """Component ``index``: ``skips`` holds at least its ``needs``; returns (hidden, its ``gives``)."""
        component = self.components[index]
        available = dict(skips)
        sizes = self.upsample_sizes(latent_size)
        for offset, block in enumerate(component.blocks):
            hidden, produced = run_block(self.unet, block, hidden, available, temb, text,
                                         sizes.get(component.start + offset))
            available.update(produced)
        return hidden, {s: available[s] for s in component.gives}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                text: torch.Tensor) -> torch.Tensor:
        """All components in sequence: the UNet's noise prediction."""
        temb = self.embed(timestep, sample.shape[0], sample.dtype)
        hidden, skips = sample, {}
        for index in range(len(self.components)):
            hidden, gives = self.run(index, hidden, skips, temb, text, tuple(sample.shape[-2:]))
            skips.update(gives)
        return hidden

    def upsample_sizes(self, latent_size: Size) -> dict[int, Size | None]:
        """Block index → the size its upsampler must produce, where the UNet passes one (odd sizes)."""
        if latent_size not in self._upsample_sizes:
            self._upsample_sizes[latent_size] = upsample_sizes(self.unet, self.blocks, latent_size)
        return self._upsample_sizes[latent_size]


def run_block(unet: UNet2DConditionModel, block: Block, hidden: torch.Tensor, skips: Skips, temb: torch.Tensor,
              text: torch.Tensor, upsample_size: Size | None = None) -> tuple[torch.Tensor, Skips]:
    """One block, called exactly as ``UNet2DConditionModel.forward`` calls it; returns (hidden, skips produced)."""
    module = unet.get_submodule(block.name)
    cross = getattr(module, "has_cross_attention", False)
    text_kwargs = {"encoder_hidden_states": text} if cross else {}
    if block.kind == "in":
        hidden = module(2 * hidden - 1.0 if unet.config.center_input_sample else hidden)
        return hidden, {0: hidden}
    if block.kind == "down":
        hidden, residuals = module(hidden_states=hidden, temb=temb, **text_kwargs)
        return hidden, dict(zip(block.produces, residuals))
    if block.kind == "mid":
        return module(hidden, temb, **text_kwargs), {}
    if block.kind == "up":
        residuals = tuple(skips[s] for s in block.consumes)
        return module(hidden_states=hidden, temb=temb, res_hidden_states_tuple=residuals,
                      upsample_size=upsample_size, **text_kwargs), {}
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return module(hidden), {}


def upsample_sizes(unet: UNet2DConditionModel, blocks: Sequence[Block], latent_size: Size) -> dict[int, Size | None]:
    """As the UNet: only when a side is not a multiple of ``2**num_upsamplers`` is a size passed."""
    if all(side % 2 ** unet.num_upsamplers == 0 for side in latent_size):
        return {}
    from engine.parallel.costs import trace_shapes  # a meta-device pass: shapes without compute

    shapes = trace_shapes(unet, latent_size)
    ups = [i for i, b in enumerate(blocks) if b.kind == "up"]
    return {i: tuple(shapes[min(blocks[i].consumes) - 1][-2:]) for i in ups[:-1]}
