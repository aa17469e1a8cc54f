"""Point-to-point links between the ranks of a sharded stream: what goes where each call, and how.

Every call each component's outputs go straight to the ranks that read them (``isend`` /
``irecv``, not broadcast: a rank gets only what it reads, and component 0's skips for component 2
do not pass through rank 1). A :class:`Route` names one such message; :func:`activation_routes`
derives them from the components' ``needs`` and ``gives``. Besides these, rank k−1 sends rank 0
the noise prediction, and rank 0 sends rank k−1 the finished latents to decode. Each call's command
goes from rank 0 to every rank over gloo, on the CPU, whatever the device: a rank waits for the next
command as long as the stream is idle (days, in a server), and a CPU wait sleeps where an NCCL
receive would keep a kernel spinning on the GPU and its host wait a CPU core. (After an
asynchronous call a rank still has the next call's activations posted as an NCCL receive: that
kernel waits on the GPU until the stream goes on, but no CPU core waits with it.)

Each direction of each link has its own process group (:class:`LinkGroups`), because NCCL would
otherwise deadlock the first call: it has no tags, matches a pair's messages by the order they
were issued, and runs one pair's sends and receives on one stream in that order. Rank 0 posts its
receive of the prediction from rank k−1 before it sends rank k−1 the activations that prediction
needs, so on a shared stream each rank's send would wait behind its own receive. With a group per
direction a receive only ever waits for the sender it names. No tags, on gloo either: so the CPU
tests match messages as NCCL does, by order, and a message out of order fails them.

Each link has two buffers: a receive can be posted for call c+1 while call c's buffer is still
being read (the asynchronous mode computes on what the previous call delivered), and a send waits
for the one two calls back before reusing its buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from engine.parallel.exchange import Packing
from engine.parallel.split import Component

HIDDEN = -1  # a route item: the hidden state (skip connections are their ids, 0 and up)


@dataclass(frozen=True)
class Route:
    """Component ``src``'s outputs that rank ``dst`` reads: ``items`` are :data:`HIDDEN` or skip ids."""

    src: int
    dst: int
    items: tuple[int, ...]


def activation_routes(components: Sequence[Component]) -> tuple[Route, ...]:
    """Every message of one call: the hidden state to the next rank, each skip straight to its reader."""
    routes = []
    for dst, reader in enumerate(components):
        for src, writer in enumerate(components[:dst]):
            items = ((HIDDEN,) if src == dst - 1 else ()) + tuple(s for s in reader.needs if s in writer.gives)
            if items:
                routes.append(Route(src, dst, items))
    return tuple(routes)


def link_pairs(world: int, routes: Iterable[Route]) -> list[tuple[int, int]]:
    """Every ``(src, dst)`` that carries the device's data: the activations' routes, the finished latents from
    rank 0 to rank k−1 and the prediction back (the commands have a group of their own: :func:`command_group`)."""
    ends = {(0, world - 1), (world - 1, 0)} if world > 1 else set()
    return sorted({(r.src, r.dst) for r in routes} | ends)


def command_group(timeout: timedelta, new_group: Callable[..., dist.ProcessGroup] = dist.new_group
                  ) -> dist.ProcessGroup:
    """The gloo group that carries rank 0's commands to every rank: one group of all ranks, collective.

    All ranks, not a group per pair: where the default group is NCCL bound to a device (on CUDA),
    torch makes each rank outside a new group join a split of the default NCCL communicator, which
    the new gloo group's own members never join, so a pair group would hang every rank beyond two.
    gloo keeps each pair's messages in order within one group.
    """
    return new_group(None, timeout=timeout, backend="gloo")


class LinkGroups:
    """One process group per direction of each link (two 2-rank groups for a link used both ways).

    Every rank of the default group must create them, the same ones in the same order (torch's
    ``new_group`` is collective): build it on every rank from the same :func:`link_pairs`.
    """

    def __init__(self, pairs: Iterable[tuple[int, int]], timeout: timedelta,
                 new_group: Callable[..., dist.ProcessGroup] = dist.new_group) -> None:
        """``timeout``: how long a message may be waited for. A new group does not take the default group's (it
        gets torch's default, 10 minutes on NCCL, whose watchdog then kills a rank idle that long)."""
        self._groups = {(src, dst): new_group(sorted((src, dst)), timeout=timeout) for src, dst in sorted(pairs)}

    def connect(self, rank: int, device: torch.device) -> None:
        """Open every link with one small message, one link at a time in one order on every rank, with nothing
        else in flight: before the first call.

        NCCL connects a pair on its first message, and setting a connection up may synchronise the device.
        Left to the first call, that would happen while another group's receive is already waiting on the
        device for a peer that waits for this rank: the deadlock NCCL's guide warns of for several
        communicators used at once. Done here, the calls only launch kernels.
        """
        token = torch.zeros(1, device=device)
        for (src, dst), group in sorted(self._groups.items()):
            if rank == src:
                dist.send(token, dst, group=group)
            elif rank == dst:
                dist.recv(token, src, group=group)
            else:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # NCCL's send and recv only queue work: finish each link first

    def __call__(self, src: int, dst: int) -> dist.ProcessGroup:
        """The group that carries ``src``'s messages to ``dst``, and nothing the other way."""
        try:
            return self._groups[src, dst]
        except KeyError:
            raise KeyError(f"no link from rank {src} to rank {dst}") from None


class Outbox:
    """Sends one message kind to one rank each call, asynchronously, from two alternating buffers."""

    def __init__(self, packing: Packing, dst: int, group: dist.ProcessGroup | None, device: torch.device,
                 dtype: torch.dtype, name: str = "message") -> None:
        self.packing, self.dst, self.group, self.name = packing, dst, group, name
        self._buffers = [torch.empty(packing.numel, device=device, dtype=dtype) for _ in range(2)]
        self._works: list[dist.Work | None] = [None, None]
        self._count = 0

    @property
    def nbytes(self) -> int:
        return self._buffers[0].numel() * self._buffers[0].element_size()

    def send(self, tensors: Sequence[torch.Tensor]) -> None:
        index = self._count % 2
        if self._works[index] is not None:
            self._works[index].wait()  # the send two calls back still reads this buffer
        self.packing.pack(tensors, self._buffers[index])
        self._works[index] = dist.isend(self._buffers[index], self.dst, group=self.group)
        self._count += 1

    def flush(self) -> None:
        for work in self._works:
            if work is not None:
                work.wait()


class Inbox:
    """Receives one message kind from one rank each call into two alternating buffers.

    :meth:`post` starts the receive of the next message; :meth:`wait` completes it and makes it
    :attr:`latest`, which stays readable while the following message is being received.
    """

    def __init__(self, packing: Packing, src: int, group: dist.ProcessGroup | None, device: torch.device,
                 dtype: torch.dtype, name: str = "message") -> None:
        self.packing, self.src, self.group, self.name = packing, src, group, name
        self._buffers = [torch.empty(packing.numel, device=device, dtype=dtype) for _ in range(2)]
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._count = 0
        self.latest: list[torch.Tensor] | None = None

    def post(self) -> None:
        if self._pending is not None:
            raise RuntimeError(f"a receive of the {self.name} from rank {self.src} is already in flight")
        buffer = self._buffers[self._count % 2]
        self._pending = (dist.irecv(buffer, self.src, group=self.group), buffer)
        self._count += 1

    def wait(self) -> list[torch.Tensor]:
        """The message now in flight, once arrived (or :attr:`latest` when none is in flight)."""
        if self._pending is not None:
            work, buffer = self._pending
            work.wait()
            self._pending = None
            self.latest = self.packing.unpack(buffer)
        if self.latest is None:
            raise RuntimeError(f"no {self.name} received from rank {self.src} yet")
        return self.latest

    def receive(self) -> list[torch.Tensor]:
        """Post and wait: the next message, now."""
        self.wait_pending()
        self.post()
        return self.wait()

    def wait_pending(self) -> None:
        if self._pending is not None:
            self.wait()
