"""A rank's fixed-shape calls, replayed from CUDA graphs: the sharded stream's counterpart of :mod:`engine.graphs`.

Eager, a UNet on a GPU spends most of its time launching kernels (27 ms eager against 9 ms from a
graph for sd-turbo's at 512² on an H200), and a rank's UNet component is a slice of that UNet with
the same launches per block; the TAESD decode on the last rank is launch-bound too. So each rank
captures such a call once and replays it on every call after. Shapes never change within a
:class:`~engine.parallel.sharded.ShardedStream` (a new shape is a new stream), so one graph serves
the stream's life:

- static inputs: whatever tensors the call takes (for a component: the hidden state, the skips it
  reads, the time and text embeddings). They arrive in the links' two alternating buffers, or fresh
  from the encoder, so each call copies them in: device copies of a few MiB;
- static outputs: what the call returns. A component's are packed into the outboxes' own buffers by
  the sends (:class:`~engine.parallel.links.Outbox`) and the decoded frame is copied to the host,
  so the next replay never overwrites what is still in use.

Rank 0 has two more: the encode (new frames noised and stacked on the buffer) before its component,
and the guidance and scheduler math after the prediction comes back, both over the stream's slot.
The exchange between ranks (NCCL) stays outside the graphs. On the CPU, ``graphs=True`` stands a re-run through the same static buffers in
for the replay, so tests cover the buffer logic; only the replay needs a GPU.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from engine.graphs import record_on, warm_up_on

log = logging.getLogger(__name__)


class RankGraph:
    """``call(*args)`` over static buffers, replayed once captured; ``args`` and the result are tensors, or
    tuples, lists and dicts of them (a pytree).

    ``graphs=False`` runs ``call`` as it is. :meth:`prepare` captures (on CUDA: two warm-up calls on a
    side stream, then the capture; a call that cannot be captured is logged and runs eagerly); else
    the first call does. The tensors returned are the graph's own outputs: read or copy them before
    the next call.

    Capture where no transfer is in flight: entering a capture synchronises the whole device, and a
    posted NCCL receive waits there for a peer that may be waiting for this rank.
    """

    def __init__(self, call: Callable[..., Any], device: torch.device, *, graphs: bool, name: str = "call") -> None:
        self.call = call
        self.device = device
        self.graphs = graphs
        self.name = name
        self.captured = False
        self._spec: pytree.TreeSpec | None = None
        self._inputs: list[torch.Tensor] = []
        self._outputs: Any = None
        self._replay: Callable[[], None] | None = None

    def __call__(self, *args: Any) -> Any:
        if not self.graphs:
            return self.call(*args)
        if self._replay is None:
            self.prepare(*args)
            if self._replay is None:  # it could not be captured: eager from now on
                return self.call(*args)
        self._fill(args)
        self._replay()
        return self._outputs

    def prepare(self, *args: Any) -> None:
        """Capture now, on inputs of the shapes, dtypes and devices every call will bring (their values do not matter)."""
        if not self.graphs or self._replay is not None:
            return
        leaves, self._spec = pytree.tree_flatten(args)
        self._inputs = [leaf.clone() for leaf in leaves]
        static = pytree.tree_unflatten(self._inputs, self._spec)
        if self.device.type != "cuda":
            self._outputs = self.call(*static)
            self._replay, self.captured = self._rerun, True
            return
        side = torch.cuda.Stream(self.device)
        warm_up_on(side, lambda: self.call(*static))
        try:
            graph, self._outputs = record_on(side, lambda: self.call(*static))
        except RuntimeError as error:  # an op that cannot be captured: eager, still correct
            log.warning("could not capture the %s as a CUDA graph (%s); it runs eagerly", self.name, error)
            self.graphs, self._inputs, self._outputs = False, [], None
            return
        self._replay, self.captured = graph.replay, True

    def _fill(self, args: tuple) -> None:
        leaves, spec = pytree.tree_flatten(args)
        if spec != self._spec:
            raise ValueError(f"the {self.name} was captured for inputs {self._spec}, got {spec}")
        for static, leaf in zip(self._inputs, leaves):
            static.copy_(leaf)

    def _rerun(self) -> None:
        """The CPU's stand-in for a replay: the call again, its results copied into the first run's outputs."""
        assert self._spec is not None
        fresh = pytree.tree_leaves(self.call(*pytree.tree_unflatten(self._inputs, self._spec)))
        for static, leaf in zip(pytree.tree_leaves(self._outputs), fresh):
            static.copy_(leaf)
