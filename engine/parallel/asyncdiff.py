"""AsyncDiff (arXiv 2406.06911) for multi-step txt2img and img2img: k UNet components on k devices.

The schedule is the reference code's (github czg1225/AsyncDiff, ``asyncdiff/async_sd.py``):

- Every rank holds the whole model. The first ``warmup_steps`` steps are synchronous: every
  rank runs the whole UNet, so they are exact; the last of them fills every component's cache.
- After warm-up, at step t, rank i runs only component i, with step t's time embedding:
  component 0 on the fresh latent x_t, component i ≥ 1 on what the components before it
  produced in the previous round (the hidden state of i−1 and the skips it consumes). Each
  rank broadcasts its outputs; the last component's output is the noise prediction, and every
  rank applies the same scheduler step to it, so all ranks hold the same latent.
- Stride 2 (``components + 1`` ranks, the paper's model_n + stride − 1 = world size): rounds
  run only at odd steps t. Ranks 0…k−1 run their components with step t+1's time embedding and
  the extra rank runs the last component again with step t's: one round yields the noise
  predictions of steps t (the extra rank's) and t+1 (rank k−1's), so each device computes
  every second step's share. As in the reference, an even ``warmup_steps`` makes the first
  step after warm-up reuse the last warm-up prediction; odd warm-ups avoid that.

Exact when ``warmup_steps >= steps``: every rank then runs exactly the one-device loop
(:func:`engine.parallel.sampling.denoise`), the same operations on the same inputs in the same
order, so on one CPU thread per process rank 0's picture equals the one-device picture bit for
bit. ``components == 1`` runs that one-device loop itself (the reference, in its own process).

Run ``python -m engine.parallel.asyncdiff --help`` for the command line.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line, before torch loads below: --help and bad flags answer at once
    from engine.parallel.cli import main

    sys.exit(main())

import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from engine.components import Components
from engine.models import ModelSpec, load_components
from engine.parallel.costs import COST_KINDS, estimate_costs, measure_costs
from engine.parallel.exchange import Exchange, Packing, Round
from engine.parallel.launch import GroupSpec, launch
from engine.parallel.sampling import GenerationRequest, Sampling, denoise
from engine.parallel.split import UNetSplit, balanced_bounds
from engine.quiet import quiet_libraries


@dataclass(frozen=True)
class AsyncDiffPlan:
    """``components`` (k, the paper's model_n), ``stride`` 1 or 2, and how block costs are found for the cuts."""

    components: int = 2
    stride: int = 1
    cost: str = "measured"

    def __post_init__(self) -> None:
        if self.components < 1:
            raise ValueError(f"components={self.components} must be at least 1")
        if self.stride not in (1, 2):
            raise ValueError(f"stride={self.stride} must be 1 or 2 (as in the paper)")
        if self.stride == 2 and self.components < 2:
            raise ValueError("stride=2 needs components >= 2 (world size = components + 1)")
        if self.cost not in COST_KINDS:
            raise ValueError(f"cost={self.cost!r} is not one of {list(COST_KINDS)}")

    @property
    def world_size(self) -> int:
        return self.components + self.stride - 1


@dataclass(frozen=True)
class AsyncDiffJob:
    """One picture and its warm-up: the first ``warmup_steps`` steps run the whole UNet on every rank."""

    request: GenerationRequest
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be at least 1 (it fills the caches)")


@dataclass(frozen=True)
class Ranks:
    """Where the ranks run: ``devices[r]`` is rank r's device (``cpu``, ``cuda:1``); one model per rank."""

    model: str = "tiny"
    devices: tuple[str, ...] = ("cpu", "cpu")
    vae: str = "tiny"
    dtype: str | None = None
    threads: int = 1
    timeout_s: float = 120.0
    progress: bool = False
    #: (rank, step): that rank kills itself (SIGKILL) when it reaches that step. For tests of failure.
    crash_at: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        kinds = {torch.device(d).type for d in self.devices}
        if not self.devices or len(kinds) != 1 or not kinds <= {"cpu", "cuda"}:
            raise ValueError(f"devices={list(self.devices)} must be all 'cpu' or all CUDA devices")
        cuda = [torch.device(d) for d in self.devices if torch.device(d).type == "cuda"]
        if len({d.index for d in cuda}) != len(cuda):
            raise ValueError(f"devices={list(self.devices)}: each rank needs its own CUDA device")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads} must be at least 1")

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.devices[0]).type == "cuda" else "gloo"


@dataclass(frozen=True)
class AsyncDiffResult:
    """Rank 0's picture; ``seconds`` from the first step to the decoded picture; the cuts it used.

    ``exchange_bytes``: what one round broadcasts, all slots together (0 when no step was asynchronous).
    """

    image: np.ndarray
    seconds: float
    bounds: tuple[int, ...]
    blocks: tuple[str, ...]
    costs: tuple[float, ...]
    exchange_bytes: int = 0


def run_asyncdiff(ranks: Ranks, plan: AsyncDiffPlan, jobs: Sequence[AsyncDiffJob],
                  started: Callable[[list[int]], None] | None = None,
                  torchrun: bool = False) -> list[AsyncDiffResult] | None:
    """Generate each job's picture with AsyncDiff on ``plan.world_size`` processes, one per device.

    With ``torchrun`` and under torchrun, this process is one of them, and only rank 0 gets the results
    (the others None).

    Raises :class:`~engine.parallel.launch.RankFailed` when a rank fails (the others are stopped first);
    ``started`` gets the ranks' pids as soon as they exist.
    """
    if len(ranks.devices) != plan.world_size:
        raise ValueError(f"components={plan.components} with stride={plan.stride} needs "
                         f"components + stride - 1 = {plan.world_size} devices, got {len(ranks.devices)}")
    group = GroupSpec(ranks.backend, ranks.timeout_s, ranks.threads, ranks.devices)
    budget = ranks.timeout_s * (2 + len(jobs))
    return launch(_rank_main, plan.world_size, (ranks, plan, tuple(jobs)), group=group,
                  timeout_s=budget, started=started, torchrun=torchrun)


def _rank_main(rank: int, world_size: int, ranks: Ranks, plan: AsyncDiffPlan,
               jobs: tuple[AsyncDiffJob, ...]) -> list[AsyncDiffResult] | None:
    # launch() made ranks.devices[rank] this process's current device: every CUDA operation of this
    # rank runs here, on this process's one thread, on its own device
    quiet_libraries()
    spec = ModelSpec(model=ranks.model, vae=ranks.vae, lcm_lora="none", device=ranks.devices[rank],
                     dtype=ranks.dtype)
    components = load_components(spec)
    results = [_run_job(components, plan, job, ranks, rank) for job in jobs]
    return results if rank == 0 else None


@torch.inference_mode()
def _run_job(components: Components, plan: AsyncDiffPlan, job: AsyncDiffJob, ranks: Ranks,
             rank: int) -> AsyncDiffResult:
    sampling = Sampling(components, job.request)
    costs, bounds = _cuts(components, sampling, plan)
    split = UNetSplit(components.unet, bounds)
    progress = _progress_bar(len(sampling), rank == 0 and ranks.progress)
    crash_step = ranks.crash_at[1] if ranks.crash_at and ranks.crash_at[0] == rank else None
    _synchronize(components.device)
    dist.barrier()
    start = time.perf_counter()
    loop = None
    if plan.components == 1:
        latent = denoise(sampling, progress=lambda index: _tick(progress, index, crash_step))
    else:
        loop = AsyncDenoiser(split, sampling, plan, job.warmup_steps, rank)
        latent = loop.run(progress=lambda index: _tick(progress, index, crash_step))
    image = sampling.decode(latent) if rank == 0 else np.zeros(0, np.uint8)
    _synchronize(components.device)
    seconds = time.perf_counter() - start
    progress.close()
    exchanged = loop.exchange.bytes_per_round if loop and loop.exchange else 0
    return AsyncDiffResult(image, seconds, split.bounds, tuple(b.name for b in split.blocks), tuple(costs), exchanged)


class AsyncDenoiser:
    """One rank's AsyncDiff loop over one generation (see the module docstring for the schedule)."""

    def __init__(self, split: UNetSplit, sampling: Sampling, plan: AsyncDiffPlan, warmup_steps: int,
                 rank: int) -> None:
        self.split, self.sampling, self.plan = split, sampling, plan
        self.warmup_steps = warmup_steps
        self.rank = rank
        k = plan.components
        self.component = split.components[min(rank, k - 1)]  # stride 2's extra rank runs the last one again
        self.ahead = plan.stride == 2 and rank < k  # stride 2: ranks 0…k−1 work for the next step
        self.eps_slot = k if plan.stride == 2 else k - 1  # whose prediction a round's own step uses
        producer = {s: c.index for c in split.components for s in c.gives}
        index = self.component.index
        self.reads = sorted({index - 1, *(producer[s] for s in self.component.needs)}) if index else []
        self.exchange: Exchange | None = None

    def computes(self, index: int) -> bool:
        """Whether step ``index`` runs a round (after warm-up: every step; stride 2: odd steps only)."""
        return index >= self.warmup_steps and (self.plan.stride == 1 or (index - 1) % 2 == 0)

    def run(self, progress: Callable[[int], None] = lambda index: None) -> torch.Tensor:
        """The final latent (the same on every rank)."""
        sampling, latent = self.sampling, self.sampling.latent
        pending: list[tuple[int, Round, int]] = []  # steps whose prediction is (being) broadcast
        last: Round | None = None
        for index in range(len(sampling)):
            if index < self.warmup_steps:
                keep = index == self.warmup_steps - 1 < len(sampling) - 1  # async steps follow
                prediction, outputs = self._whole_unet(latent, index, keep)
                latent = sampling.step(latent, prediction, index)
                last = self._first_round(outputs, prediction) if outputs else last
            elif not self.computes(index):
                pending.append((index, last, self.plan.components - 1))
            else:
                if self.component.index == 0:
                    latent = self._apply(pending, latent)  # component 0 needs x_t now
                last.wait(self.reads)
                mine = self._component(latent, index, last)
                last = self.exchange.post({self.rank: mine})
                latent = self._apply(pending, latent)
                pending.append((index, last, self.eps_slot))
            progress(index)
        latent = self._apply(pending, latent)
        if self.exchange is not None:
            self.exchange.wait_all()
        return latent

    def _whole_unet(self, latent: torch.Tensor, index: int, keep: bool) -> tuple[torch.Tensor, list]:
        """A synchronous step: every component in sequence (= the UNet); with ``keep``, each one's outputs."""
        split, sampling = self.split, self.sampling
        sample = sampling.model_input(latent, index)
        temb = split.embed(sampling.timesteps[index], sample.shape[0], sample.dtype)
        hidden, skips, outputs = sample, {}, []
        for component in split.components:
            hidden, gives = split.run(component.index, hidden, skips, temb, sampling.text, tuple(sample.shape[-2:]))
            skips.update(gives)
            if keep:
                outputs.append([hidden, *(gives[s] for s in component.gives)])
        return hidden, outputs

    def _first_round(self, outputs: list[list[torch.Tensor]], prediction: torch.Tensor) -> Round:
        """The caches after the last warm-up step: computed here in full, so nothing to receive."""
        slots = outputs + ([[prediction]] if self.plan.stride == 2 else [])
        packings = [Packing([t.shape for t in tensors]) for tensors in slots]
        self.exchange = Exchange(packings, range(len(slots)), self.rank, prediction.device, prediction.dtype)
        return self.exchange.local(slots)

    def _component(self, latent: torch.Tensor, index: int, last: Round) -> list[torch.Tensor]:
        """This rank's component at step ``index`` on the previous round's outputs: [hidden, *gives]."""
        split, sampling, component = self.split, self.sampling, self.component
        ahead = self.ahead and index + 1 < len(sampling)
        timestep = sampling.timesteps[index + 1 if ahead else index]
        rows = sampling.text.shape[0]
        if component.index == 0:
            hidden, skips = sampling.model_input(latent, index), {}
        else:
            hidden, skips = last.tensors(component.index - 1)[0], self._skips(last)
        temb = split.embed(timestep, rows, hidden.dtype)
        size = tuple(sampling.latent.shape[-2:])
        hidden, gives = split.run(component.index, hidden, skips, temb, sampling.text, size)
        return [hidden, *(gives[s] for s in component.gives)]

    def _skips(self, last: Round) -> dict[int, torch.Tensor]:
        """The skips this component needs, from the slots it waited for (:attr:`reads`): others may be in flight."""
        found = {}
        for producer in self.split.components[:self.component.index]:
            if producer.index not in self.reads:
                continue
            tensors = last.tensors(producer.index)
            found.update({s: tensors[1 + i] for i, s in enumerate(producer.gives) if s in self.component.needs})
        return found

    def _apply(self, pending: list[tuple[int, Round, int]], latent: torch.Tensor) -> torch.Tensor:
        """Scheduler steps for every pending prediction, in order, each once its broadcast has arrived."""
        for index, round_, slot in pending:
            round_.wait([slot])
            latent = self.sampling.step(latent, round_.tensors(slot)[0], index)
        pending.clear()
        return latent


def _cuts(components: Components, sampling: Sampling, plan: AsyncDiffPlan) -> tuple[list[float], tuple[int, ...]]:
    """Per-block costs and balanced cuts; measured costs are rank 0's, shared so every rank cuts alike."""
    if plan.components == 1:  # the one-device loop: no cuts to choose
        return [], (0, len(UNetSplit(components.unet).blocks))
    sample = sampling.model_input(sampling.latent, 0)
    if plan.cost == "estimated":
        costs = estimate_costs(components.unet, tuple(sample.shape), sampling.text.shape[1])
        return costs, balanced_bounds(costs, plan.components)
    shared: list = [None]
    if dist.get_rank() == 0:
        costs = measure_costs(UNetSplit(components.unet), sample, sampling.timesteps[0], sampling.text)
        shared = [(costs, balanced_bounds(costs, plan.components))]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


class _NoProgress:
    def update(self, _count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, show: bool):
    """tqdm on stderr when shown; otherwise nothing (tqdm would still make a lock a killed rank leaks)."""
    if not show:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)


def _tick(progress, index: int, crash_step: int | None) -> None:
    if crash_step is not None and index + 1 >= crash_step:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: die as a crash would
    progress.update(1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

