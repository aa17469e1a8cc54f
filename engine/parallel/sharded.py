"""One live stream with its UNet sharded across k devices: AsyncDiff adapted to the stream batch.

The UNet is cut into k consecutive components of balanced cost (:mod:`engine.parallel.split`);
rank i holds component i's weights and no other (:mod:`engine.parallel.shard_rank`). The driver,
:class:`ShardedStream`, lives in the calling process; the ranks are its child processes
(:func:`engine.parallel.launch.launch`, torn down together).

**A call plays the role of a step.** In a *synchronous* call the components run one after the
other on this call's stream batch: the whole UNet, exact, and no faster than one device. In an
*asynchronous* call every rank computes at once: component 0 on this call's batch, component
i ≥ 1 on what its predecessors produced on the previous call. For live video the previous
call's row at the same position holds the same step of the previous frame, nearly the same
picture. Rank k−1's output is the noise prediction of this call: exact in the rows whose last
k−1 calls saw the same latents, slightly stale otherwise.

**Data path of one call** (sizes for ``n·f`` UNet rows of ``C×h×w`` latents):

- driver → rank 0: the frame, in shared memory (``f×3×H×W`` float32), and a command on a queue;
- rank 0 → every rank: the command (3 integers: call or stop, synchronous or not, shared-memory slot);
- rank i → rank j > i: component i's hidden state (to i+1) and each skip connection j reads
  (``isend``/``irecv``: point to point, so a rank receives only what it reads);
- rank k−1 → rank 0: the noise prediction (``n·f×C×h×w``), for RCFG and the LCM step;
- rank 0 → rank k−1: the finished latents (``f×C×h×w`` float32), which rank k−1 decodes;
- rank k−1 → driver: the frame, in shared memory, and a reply on a queue;
- synchronous calls only, rank 0 → all: the time and text embeddings (broadcast: they change
  only with the prompt or the schedule, and every such change is followed by synchronous calls).

On CUDA each rank replays its component from a CUDA graph it captures at set-up, rank 0 its encode
and scheduler math too, and rank k−1 its decode (:mod:`engine.parallel.rank_graph`), as one device
replays its whole call: eager, a GPU spends most of a UNet's time launching kernels. Only the
exchange runs eagerly around them.

Receives are posted before computing, so in an asynchronous call the next activations travel
while every rank computes (gloo runs them on its own threads; NCCL on its own streams). Within
one call the decode on rank k−1 waits for rank 0's scheduler math, which waits for rank k−1's
prediction: so :meth:`ShardedStream.submit` lets the driver start the next call before taking
the last one's frame (:meth:`ShardedStream.result`), and rank 0 encodes and runs component 0 of
call c+1 while rank k−1 decodes call c. At most two calls are in flight (two shared-memory slots).

**Exactness and latency.** The frame coming out of call c entered at call c−(n−1), as on one
device: the sharded pipeline adds no frame of latency. What it delays is the noise prediction:
component i sees inputs i calls old, so the deepest path through the UNet is k−1 calls old. So:

- a synchronous call's prediction is exact; its output equals one device's when the frame it
  finishes had all its n steps in synchronous calls (the call and the n−1 before it);
- with a static input, an asynchronous call at c equals one device once every latent row has
  been the same for the k−1 calls before: from call ``n+k−2`` on, k−1 calls after the stream
  batch's first frame at call n−1 (given at least n−1 synchronous calls at the start). The
  default warm-up, ``n+k−2`` synchronous calls, covers that gap: a static scene is exact from
  the first frame on;
- :meth:`ShardedStream.resync` (on :meth:`~ShardedStream.update` and :meth:`~ShardedStream.reset`
  too) and every ``resync_every``-th call run ``warmup_calls`` synchronous calls again, so with a
  moving input every call from the n-th of them on is exact.

A change of shape (size, steps, frames per call, RCFG mode) needs a new :class:`ShardedStream`:
the ranks' buffers and cuts are sized for one shape, as one device's CUDA graphs are.

**The UNet stage, timed.** :meth:`ShardedStream.stage_times` gives each rank's seconds running its
component and waiting for its inputs, and the calls they cover (:class:`StageTimes`; the ranks
keep the totals in shared memory, :class:`~engine.parallel.shard_rank.StageClock`). In an
asynchronous call the ranks' components run at once, so the slowest rank's compute per call is the
period of the UNet stage were the VAE and the scheduler math elsewhere; in a synchronous call the
components run one after the other, and the period is their sum.
"""

from __future__ import annotations

import math
import queue
from collections import deque
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.multiprocessing as mp

from engine.config import StreamConfig, updated_config
from engine.image import Frame, fit, frame_kind, to_chw
from engine.parallel.costs import COST_KINDS
from engine.parallel.launch import GroupSpec, RankFailed, launch
from engine.parallel.shard_rank import CALLS, COMPUTE, WAIT, Channels, RankJob, rank_main

POLL_S = 0.1
MAX_IN_FLIGHT = 2  # shared-memory slots for frames in and out
CALL_TIMEOUT_S = 120.0  # a call the ranks have not answered in this long: they hang, and are stopped
HISTORY = 4096  # calls sync_history keeps


@dataclass(frozen=True)
class StageTimes:
    """One rank's UNet stage over ``calls`` calls: seconds running its component, and waiting for its inputs."""

    rank: int
    compute_s: float
    wait_s: float
    calls: int

    @property
    def compute_per_call(self) -> float:
        """Seconds running the component per call (NaN over no calls)."""
        return self.compute_s / self.calls if self.calls else math.nan

    @property
    def wait_per_call(self) -> float:
        """Seconds waiting for the component's inputs per call (NaN over no calls)."""
        return self.wait_s / self.calls if self.calls else math.nan

    def since(self, earlier: "StageTimes") -> "StageTimes":
        """The calls after ``earlier`` (an earlier reading of the same rank) only."""
        return StageTimes(self.rank, self.compute_s - earlier.compute_s, self.wait_s - earlier.wait_s,
                          self.calls - earlier.calls)


class ShardedStream:
    """A live img2img stream whose UNet is split over ``k`` processes, one device each; driven from here.

    ``procs``: k CPU processes; or ``devices`` (``cpu`` or ``cuda:i``, one per rank). ``resync_every``:
    every N-th call starts ``warmup_calls`` synchronous calls (default ``n + k − 2``, see the module
    docstring); ``None``: only at start, :meth:`update` and :meth:`reset`. ``crash_at=(rank, call)``
    kills that rank at that call (tests). ``lcm_lora``: as :class:`~engine.models.ModelSpec`'s (``auto``
    fuses LCM-LoRA into SD 1.x models that are not few-step already). ``graphs``: each rank replays its
    UNet component (rank k−1 its decode too) from CUDA graphs (:mod:`engine.parallel.rank_graph`); None: on CUDA;
    True on the CPU re-runs stand-ins through the same buffers (tests).
    """

    def __init__(self, model: str = "tiny", config: StreamConfig = StreamConfig(), *, procs: int | None = None,
                 devices: Sequence[str] | None = None, resync_every: int | None = None,
                 warmup_calls: int | None = None, vae: str = "tiny", dtype: str | None = None,
                 cost: str = "estimated", threads: int = 1, start_timeout_s: float = 300.0,
                 call_timeout_s: float = CALL_TIMEOUT_S, idle_timeout_s: float = 3600.0,
                 crash_at: tuple[int, int] | None = None, lcm_lora: str = "none", graphs: bool | None = None) -> None:
        self.devices = _devices(procs, devices)
        k = len(self.devices)
        _check(config, cost, resync_every, warmup_calls)
        self.config = config
        self.resync_every = resync_every
        self.warmup_calls = max(1, config.denoising_steps + k - 2) if warmup_calls is None else warmup_calls
        self.call_timeout_s = call_timeout_s
        self.calls = 0  # calls finished (taken with result()) since the start or the last reset
        self.sync_history: list[bool] = []  # one entry per recent call (the last HISTORY at least): was it synchronous
        self.sync_calls = 0  # synchronous calls since the start or the last reset
        self._submitted = 0
        self._in_flight: deque[tuple[bool, str]] = deque()
        self._sync_left = self.warmup_calls
        self._closed = False
        self._failure: BaseException | None = None
        self.pids: list[int] = []
        self._channels = _channels(config, k)
        self._stage_origin = self._channels.stages.clone()  # stage_times() counts from here
        self.graphs = torch.device(self.devices[0]).type == "cuda" if graphs is None else graphs
        job = RankJob(model, vae, dtype, self.devices, config, cost, crash_at, lcm_lora, self.graphs, idle_timeout_s)
        backend = "nccl" if torch.device(self.devices[0]).type == "cuda" else "gloo"
        group = GroupSpec(backend, idle_timeout_s, threads, self.devices)
        self._thread = threading.Thread(target=self._run_ranks, args=(job, group), daemon=True,
                                        name="sharded-stream-ranks")
        self._thread.start()
        try:
            ready = [self._reply("ready", start_timeout_s) for _ in range(k)]
        except BaseException:
            self.close()
            raise
        self.ranks: list[dict[str, Any]] = sorted((message[2] for message in ready), key=lambda i: i["rank"])

    # ----------------------------------------------------------------- public API

    @property
    def components(self) -> int:
        return len(self.devices)

    @property
    def steps(self) -> int:
        return self.config.denoising_steps

    @property
    def bounds(self) -> tuple[int, ...]:
        return self.ranks[0]["bounds"]

    @property
    def bytes_per_call(self) -> int:
        """What the ranks send each other in one asynchronous call, all links together."""
        return sum(sum(info["sends_bytes"].values()) for info in self.ranks)

    def __call__(self, frame: Frame) -> Frame | None:
        """One frame in, the frame of ``n − 1`` calls ago out (None while the pipeline fills), as one device."""
        if self.config.frame_buffer_size != 1:
            raise ValueError(f"frame_buffer_size={self.config.frame_buffer_size}: pass a list of frames to img2img()")
        outputs = self.img2img([frame])
        return None if outputs is None else outputs[0]

    def img2img(self, frames: Sequence[Frame]) -> list[Frame] | None:
        """``frame_buffer_size`` frames in; as many finished ones out, or None while warming up."""
        self.submit(frames)
        return self.result()

    def submit(self, frames: Sequence[Frame]) -> None:
        """Start a call on ``frame_buffer_size`` frames without waiting for it; :meth:`result` takes its frames.

        At most two calls in flight: submit, then submit and take a result, in turn.
        """
        f = self.config.frame_buffer_size
        if len(frames) != f:
            raise ValueError(f"img2img needs exactly frame_buffer_size={f} frames, got {len(frames)}")
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            raise RuntimeError(f"{MAX_IN_FLIGHT} calls are in flight: take a result() before submitting more")
        self._check_open()
        slot, height, width = self._submitted % MAX_IN_FLIGHT, self.config.height, self.config.width
        for row, frame in enumerate(frames):  # fitted here exactly as one device's PixelLoader fits them
            try:
                self._channels.frames[slot, row].copy_(fit(to_chw(frame, torch.device("cpu")), height, width))
            except (ValueError, TypeError):
                raise
            except Exception as error:  # noqa: BLE001 - whatever breaks on a frame is that frame's fault, said so
                raise ValueError(f"the frame cannot be used: {type(error).__name__}: {error}") from error
        sync = self._next_is_sync()
        self._send(("call", sync, slot))
        self._in_flight.append((sync, frame_kind(frames[0])))
        self._submitted += 1

    def result(self) -> list[Frame] | None:
        """The frames of the oldest call in flight (None while the pipeline fills); waits for them."""
        if not self._in_flight:
            raise RuntimeError("no call in flight: submit() frames first")
        self._reply("frame", self.call_timeout_s)
        sync, kind = self._in_flight.popleft()
        slot = self.calls % MAX_IN_FLIGHT
        self.sync_history.append(sync)
        self.sync_calls += sync
        if len(self.sync_history) > 2 * HISTORY:  # a stream may run for days: keep the recent ones
            del self.sync_history[:-HISTORY]
        self.calls += 1
        if self.calls < self.steps:
            return None
        if kind == "pt":
            return list(self._channels.unit[slot].clone().unbind(0))
        return list(self._channels.pixels[slot].numpy().copy())

    def stage_times(self) -> list[StageTimes]:
        """Each rank's UNet-stage totals since the start or the last :meth:`reset`, rank 0 first.

        A rank adds a call when its share of the UNet stage ends: ranks 0 and k−1 before the call's
        frame is out, so after :meth:`result` they hold every call taken; in an asynchronous call a
        middle rank's component feeds the next call, and may not have finished yet; on CUDA a rank's
        totals trail by a call (:class:`~engine.parallel.shard_rank.StageClock`). Divide by each
        rank's own ``calls`` (:attr:`StageTimes.compute_per_call`). Readable after :meth:`close` too.
        """
        table = self._stages() - self._stage_origin
        return [StageTimes(rank, float(row[COMPUTE]), float(row[WAIT]), int(row[CALLS]))
                for rank, row in enumerate(table)]

    def check(self) -> None:
        """Raise :class:`RankFailed` (naming the rank and why) if the ranks stopped on their own; cheap."""
        self._check_open()

    def resync(self) -> None:
        """Run the next ``warmup_calls`` calls synchronously (fresh activations on every rank)."""
        self._sync_left = self.warmup_calls

    def update(self, **changes: Any) -> None:
        """Change stream parameters (as :meth:`StreamDiffusion.update`); the next calls resynchronise."""
        self._check_open()
        new = updated_config(self.config, changes)  # ValueError here, and nothing changes
        self._send(("update", new))
        self.config = new
        self.resync()

    def reset(self) -> None:
        """Forget in-flight frames (a new scene): the pipeline fills again, synchronously first."""
        self._check_open()
        if self._in_flight:
            raise RuntimeError("take the results of the calls in flight before reset()")
        self._send(("reset",))
        self._stage_origin = self._stages()
        self.calls = self._submitted = 0
        self.sync_history.clear()
        self.sync_calls = 0
        self.resync()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the ranks and wait for them (they are killed if they outlive ``timeout_s``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._channels.commands.put(("stop",))
            self._thread.join(timeout_s)
        if self._thread.is_alive():  # launch() stops ranks that outlive its own deadline; this one is ours
            self._kill_ranks()
            self._thread.join(timeout_s)

    def __enter__(self) -> "ShardedStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _next_is_sync(self) -> bool:
        if self.resync_every and self._submitted and self._submitted % self.resync_every == 0:
            self.resync()
        sync = self._sync_left > 0
        self._sync_left -= sync
        return sync

    def _run_ranks(self, job: RankJob, group: GroupSpec) -> None:
        try:
            launch(rank_main, len(self.devices), (job, self._channels), group=group, timeout_s=math.inf,
                   started=self.pids.extend)
        except BaseException as error:  # reported to the caller by the next call
            self._failure = error

    def _send(self, message: tuple) -> None:
        self._check_open()
        self._channels.commands.put(message)

    def _reply(self, kind: str, timeout_s: float) -> tuple:
        """The ranks' next reply; :class:`RankFailed` (naming the rank) if a rank fails meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                message = self._channels.replies.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                if time.monotonic() > deadline:  # hung: a polite stop would wait on them too
                    self._kill_ranks()
                    self.close()
                    raise RankFailed(f"no {kind!r} reply from the ranks within {timeout_s:.0f} s; they were stopped")
                continue
            if message[0] != kind:
                raise RuntimeError(f"expected a {kind!r} reply from the ranks, got {message[0]!r}")
            return message

    def _stages(self) -> torch.Tensor:
        """The ranks' shared totals, read until two readings agree (a rank may be writing its row)."""
        while True:
            first, second = self._channels.stages.clone(), self._channels.stages.clone()
            if torch.equal(first, second):
                return first

    def _check_alive(self) -> None:
        if self._thread.is_alive():
            return
        self._closed = True
        if isinstance(self._failure, RankFailed):
            raise self._failure
        raise RankFailed(f"the ranks stopped unexpectedly ({self._failure!r})")

    def _check_open(self) -> None:
        if self._failure is not None:
            self._thread.join()
            self._check_alive()
        if self._closed:
            raise RuntimeError("this sharded stream is closed")

    def _kill_ranks(self) -> None:
        import os
        import signal

        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _channels(config: StreamConfig, world: int) -> Channels:
    context = mp.get_context("spawn")
    f, height, width = config.frame_buffer_size, config.height, config.width
    slots = MAX_IN_FLIGHT
    return Channels(commands=context.Queue(), replies=context.Queue(),
                    frames=torch.zeros(slots, f, 3, height, width).share_memory_(),
                    unit=torch.zeros(slots, f, 3, height, width).share_memory_(),
                    pixels=torch.zeros(slots, f, height, width, 3, dtype=torch.uint8).share_memory_(),
                    stages=torch.zeros(world, 3, dtype=torch.float64).share_memory_())


def _devices(procs: int | None, devices: Sequence[str] | None) -> tuple[str, ...]:
    if (procs is None) == (devices is None):
        raise ValueError("give procs (k CPU processes) or devices (one per rank), not both and not neither")
    chosen = tuple(devices) if devices is not None else ("cpu",) * int(procs)  # type: ignore[arg-type]
    if len(chosen) < 2:
        raise ValueError(f"a sharded stream needs at least 2 ranks, got {len(chosen)}: use StreamDiffusion for one")
    kinds = {torch.device(d).type for d in chosen}
    if len(kinds) != 1 or not kinds <= {"cpu", "cuda"}:
        raise ValueError(f"devices={list(chosen)} must be all 'cpu' or all CUDA devices")
    cuda = [torch.device(d).index for d in chosen if torch.device(d).type == "cuda"]
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"devices={list(chosen)}: each rank needs its own CUDA device")
    return chosen


def _check(config: StreamConfig, cost: str, resync_every: int | None, warmup_calls: int | None) -> None:
    if config.mode != "img2img":
        raise ValueError(f"mode={config.mode!r}: the sharded stream does img2img only")
    if config.similarity_filter:
        raise ValueError("similarity_filter=True is not supported by the sharded stream yet; set it to False")
    if cost not in COST_KINDS:
        raise ValueError(f"cost={cost!r} is not one of {list(COST_KINDS)}")
    if resync_every is not None and resync_every < 1:
        raise ValueError(f"resync_every={resync_every} must be at least 1 (or None: never)")
    if warmup_calls is not None and warmup_calls < 1:
        raise ValueError(f"warmup_calls={warmup_calls} must be at least 1 (the first call fills every rank's inputs)")

