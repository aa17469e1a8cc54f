"""Component outputs between ranks: packed into one flat buffer per slot, broadcast asynchronously.

A *slot* is what one rank publishes each round: a component's outputs (hidden state, then the
skips it gives later components), or, for stride 2's extra rank, its noise prediction. Every
round every rank issues one ``broadcast`` per slot, in slot order, ``async_op=True``: a rank
waits only for the slots it reads next, so its own sends and the slots it does not need go on
while it computes. Rounds alternate between two buffer sets, so a round can be read while the
next one is being filled; before a set is reused, the round that last used it has completed.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.distributed as dist


class Packing:
    """Tensors of fixed shapes laid end to end in one flat buffer."""

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def pack(self, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        for tensor, start, stop in zip(tensors, self.offsets, self.offsets[1:]):
            out[start:stop].copy_(tensor.reshape(-1))
        return out

    def unpack(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views into ``flat``, one per tensor."""
        return [flat[a:b].view(s) for s, a, b in zip(self.shapes, self.offsets, self.offsets[1:])]


class Round:
    """One round's slots: flat buffers, and the broadcasts still filling them."""

    def __init__(self, buffers: list[torch.Tensor], packings: list[Packing],
                 works: dict[int, dist.Work] | None = None) -> None:
        self.buffers = buffers
        self.packings = packings
        self._works = dict(works or {})

    def wait(self, slots: Iterable[int]) -> None:
        """Block (CPU) or order the stream (CUDA) until ``slots`` have arrived."""
        for slot in slots:
            work = self._works.pop(slot, None)
            if work is not None:
                work.wait()

    def wait_all(self) -> None:
        self.wait(list(self._works))

    def tensors(self, slot: int) -> list[torch.Tensor]:
        """Slot ``slot``'s tensors (views); call :meth:`wait` for it first."""
        if slot in self._works:
            raise RuntimeError(f"slot {slot} is still in flight; wait for it first")
        return self.packings[slot].unpack(self.buffers[slot])


class Exchange:
    """Rounds of slot broadcasts: slot ``j`` always comes from rank ``sources[j]``."""

    def __init__(self, packings: Sequence[Packing], sources: Sequence[int], rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.packings = list(packings)
        self.sources = list(sources)
        self.rank = rank
        self._sets = [[torch.empty(p.numel, device=device, dtype=dtype) for p in self.packings] for _ in range(2)]
        self._last: list[Round | None] = [None, None]
        self._count = 0

    @property
    def bytes_per_round(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._sets[0])

    def local(self, outputs: Sequence[Sequence[torch.Tensor]]) -> Round:
        """A round every rank already holds in full (the last synchronous step computed every slot)."""
        buffers = self._next_set()
        for slot, tensors in enumerate(outputs):
            self.packings[slot].pack(tensors, buffers[slot])
        return self._remember(Round(buffers, self.packings))

    def post(self, mine: dict[int, Sequence[torch.Tensor]]) -> Round:
        """Publish this rank's slots and receive everyone else's, asynchronously, in slot order."""
        buffers = self._next_set()
        works = {}
        for slot, source in enumerate(self.sources):
            if source == self.rank:
                self.packings[slot].pack(mine[slot], buffers[slot])
            works[slot] = dist.broadcast(buffers[slot], src=source, async_op=True)
        return self._remember(Round(buffers, self.packings, works))

    def wait_all(self) -> None:
        for round_ in self._last:
            if round_ is not None:
                round_.wait_all()

    def _next_set(self) -> list[torch.Tensor]:
        index = self._count % 2
        previous = self._last[index]
        if previous is not None:
            previous.wait_all()  # its buffers are about to be overwritten
        return self._sets[index]

    def _remember(self, round_: Round) -> Round:
        self._last[self._count % 2] = round_
        self._count += 1
        return round_
