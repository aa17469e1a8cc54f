"""A rank's UNet component, replayed from a CUDA graph: the sharded stream's counterpart of :mod:`engine.graphs`.

Eager, a UNet on a GPU spends most of its time launching kernels (27 ms eager against 9 ms from a
graph for sd-turbo's at 512² on an H200), and a component is a slice of that UNet with the same
launches per block. So each rank captures its component's call once and replays it on every call
after. The shapes never change within a :class:`~engine.parallel.sharded.ShardedStream` (a new
shape is a new stream), so one graph serves the stream's life:

- static inputs: the hidden state, the skips the component reads, the time and text embeddings.
  They arrive in the links' two alternating buffers (or, on rank 0, fresh from the encoder), so
  each call copies them in: device copies of a few MiB;
- static outputs: the hidden state and the skips the component gives. The sends pack them into
  the outboxes' own buffers (:class:`~engine.parallel.links.Outbox`), so the next replay never
  overwrites what is still on its way.

The exchange between ranks (NCCL) stays outside the graph, and so, for now, do rank 0's encode and
scheduler math and rank k−1's decode. On the CPU, ``graphs=True`` stands a re-run through the same
static buffers in for the replay, so tests cover the buffer logic; only the replay needs a GPU.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from engine.graphs import CAPTURE_LOCK, WARMUP_CALLS

log = logging.getLogger(__name__)

Skips = dict[int, torch.Tensor]
ComponentCall = Callable[[torch.Tensor, Skips, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Skips]]


class ComponentGraph:
    """``call(hidden, skips, temb, text) -> (hidden, gives)`` over static buffers, replayed once captured.

    ``graphs=False`` runs ``call`` as it is. :meth:`prepare` captures (on CUDA: two warm-up calls on a
    side stream, then the capture; a call that cannot be captured is logged and runs eagerly); else
    the first call does. The tensors returned are the graph's own outputs: read or copy them before
    the next call.

    Capture where no transfer is in flight: entering a capture synchronises the whole device, and a
    posted NCCL receive waits there for a peer that may be waiting for this rank.
    """

    def __init__(self, call: ComponentCall, device: torch.device, *, graphs: bool) -> None:
        self.call = call
        self.device = device
        self.graphs = graphs
        self.captured = False
        self._inputs: tuple[torch.Tensor, Skips, torch.Tensor, torch.Tensor] | None = None
        self._outputs: tuple[torch.Tensor, Skips] | None = None
        self._replay: Callable[[], None] | None = None

    def __call__(self, hidden: torch.Tensor, skips: Skips, temb: torch.Tensor,
                 text: torch.Tensor) -> tuple[torch.Tensor, Skips]:
        if not self.graphs:
            return self.call(hidden, skips, temb, text)
        if self._replay is None:
            self.prepare(hidden, skips, temb, text)
            if self._replay is None:  # it could not be captured: eager from now on
                return self.call(hidden, skips, temb, text)
        self._fill(hidden, skips, temb, text)
        self._replay()
        assert self._outputs is not None
        return self._outputs

    def _fill(self, hidden: torch.Tensor, skips: Skips, temb: torch.Tensor, text: torch.Tensor) -> None:
        assert self._inputs is not None
        static_hidden, static_skips, static_temb, static_text = self._inputs
        if skips.keys() != static_skips.keys():
            raise ValueError(f"the component reads skips {sorted(static_skips)}, got {sorted(skips)}")
        static_hidden.copy_(hidden)
        for index, tensor in skips.items():
            static_skips[index].copy_(tensor)
        static_temb.copy_(temb)
        static_text.copy_(text)

    def prepare(self, hidden: torch.Tensor, skips: Skips, temb: torch.Tensor, text: torch.Tensor) -> None:
        """Capture now, on inputs of the shapes, dtypes and devices every call will bring (their values do not matter)."""
        if not self.graphs or self._replay is not None:
            return
        self._inputs = (hidden.clone(), {index: tensor.clone() for index, tensor in skips.items()},
                        temb.clone(), text.clone())
        if self.device.type != "cuda":
            self._outputs = self.call(*self._inputs)
            self._replay = self._rerun
            self.captured = True
            return
        caller = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):  # a call that fails here fails eagerly too: the caller hears it
            for _ in range(WARMUP_CALLS):
                self.call(*self._inputs)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with CAPTURE_LOCK, torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self._outputs = self.call(*self._inputs)
        except RuntimeError as error:  # an op that cannot be captured: eager, still correct
            torch.cuda.set_stream(caller)  # a failed capture_end leaves the side stream current
            torch.cuda.synchronize(self.device)
            log.warning("could not capture the UNet component as a CUDA graph (%s); it runs eagerly", error)
            self.graphs, self._inputs, self._outputs = False, None, None
            return
        self._replay = graph.replay
        self.captured = True

    def _rerun(self) -> None:
        """The CPU's stand-in for a replay: the call again, its results copied into the first run's outputs."""
        assert self._inputs is not None and self._outputs is not None
        hidden, gives = self.call(*self._inputs)
        self._outputs[0].copy_(hidden)
        for index, tensor in gives.items():
            self._outputs[1][index].copy_(tensor)
