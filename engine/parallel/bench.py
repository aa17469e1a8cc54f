"""AsyncDiff benchmark: ``python -m engine.parallel.bench --json bench-asyncdiff.json``.

k processes with one torch thread each against one process with one thread, each process
standing for a device (on a CPU, a core). Every configuration runs the same jobs in one launch
(txt2img at each ``--steps``, and img2img at strength 0.5 with the largest), timed inside rank 0
from the first step to the decoded picture (process start and model build are not counted).
Fidelity is PSNR / SSIM of the picture against the one-device picture of the same job; with
random weights txt2img is chaotic (see ``tests/test_asyncdiff.py``), so the one-device distance
between two seeds is printed beside it, and img2img is the meaningful fidelity figure.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.parallel.flags import DEVICES_HELP, bench_parser, write_json
from engine.parallel.torchrun import refuse_torchrun

if TYPE_CHECKING:  # torch and the engine load in the functions that use them: --help answers before they do
    from engine.parallel.asyncdiff import AsyncDiffJob, AsyncDiffPlan, AsyncDiffResult

#: AsyncDiff paper, Table 1: SD 2.1, 50 DDIM steps, NVIDIA A5000s; (components, stride) → speedup.
PAPER_SPEEDUP = {(2, 1): 1.8, (3, 1): 2.3, (4, 1): 2.6, (2, 2): 3.0, (3, 2): 4.0}
PROMPT = "a kitten sitting by a door"


@dataclass(frozen=True)
class Config:
    components: int
    stride: int

    @property
    def name(self) -> str:
        return "one device" if self.components == 1 else f"k={self.components}, stride {self.stride}"

    @property
    def plan(self) -> AsyncDiffPlan:
        from engine.parallel.asyncdiff import AsyncDiffPlan

        return AsyncDiffPlan(self.components, self.stride, cost="measured")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("engine.parallel.bench", __doc__)
    parser.add_argument("--steps", default="25,50", help="txt2img step counts")
    parser.add_argument("--configs", default="2x1,2x2", help="components x stride, comma-separated")
    parser.add_argument("--warmup-steps", type=int, default=1, help="synchronous steps first (the paper's code: 1)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--devices", default=None, metavar="LIST",
                        help=f"the devices, each configuration on as many of the first as it has ranks (default: "
                             f"that many CPU processes): {DEVICES_HELP}")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def named_devices(args: argparse.Namespace, configs: list[Config]) -> tuple[str, ...]:
    """``--devices`` (empty: CPU processes); ``ValueError`` if it names fewer than a configuration has ranks."""
    if args.devices is None:
        return ()
    from engine.parallel.replicas import parse_devices

    devices = parse_devices(args.devices)
    most = max(config.plan.world_size for config in configs)
    if most > len(devices):
        raise ValueError(f"--devices {args.devices!r} names {len(devices)}, but --configs {args.configs} needs "
                         f"{most} (components + stride - 1); name more or drop the largest configuration")
    return devices


def jobs_for(args: argparse.Namespace) -> list[tuple[str, AsyncDiffJob]]:
    """The labelled jobs every configuration runs; the one device also runs each with another seed."""
    from engine.parallel.asyncdiff import AsyncDiffJob
    from engine.parallel.sampling import GenerationRequest
    from engine.synthetic import moving_frame

    steps = [int(s) for s in args.steps.split(",")]
    base = GenerationRequest(prompt=PROMPT, width=args.size, height=args.size, guidance_scale=args.guidance_scale,
                             seed=0, steps=steps[0])
    txt = [(f"txt2img {n}", replace(base, steps=n)) for n in steps]
    img = [(f"img2img {max(steps)} @0.5", replace(base, steps=max(steps), image=moving_frame(3, args.size, args.size),
                                                  strength=0.5))]
    return [(label, AsyncDiffJob(request, args.warmup_steps)) for label, request in txt + img]


def run_config(config: Config, args: argparse.Namespace, jobs: list[AsyncDiffJob],
               devices: tuple[str, ...]) -> tuple[list[AsyncDiffResult], float]:
    from engine.parallel.asyncdiff import Ranks, run_asyncdiff

    world = config.plan.world_size
    ranks = Ranks(model=args.model, devices=devices[:world] or ("cpu",) * world, threads=args.threads,
                  timeout_s=600.0)
    start = time.perf_counter()
    results = run_asyncdiff(ranks, config.plan, jobs)
    assert results is not None  # it spawns its own ranks, under torchrun too
    return results, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before torch loads: --help and bad flags answer at once
    configs = [Config(1, 1)] + [Config(*map(int, c.split("x"))) for c in args.configs.split(",")]
    try:
        refuse_torchrun("python -m engine.parallel.bench")
        devices = named_devices(args, configs)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labelled = jobs_for(args)
    labels, jobs = [label for label, _ in labelled], [job for _, job in labelled]
    seeded = [0, len(jobs) - 1]  # another seed on one device for the first txt2img and the img2img job
    other_seed = [replace(jobs[i], request=replace(jobs[i].request, seed=1)) for i in seeded]
    cores = os.cpu_count() or 1
    rows, results = [], {}
    for config in configs:
        todo = jobs + (other_seed if config.components == 1 else [])
        print(f"{config.name}: {config.plan.world_size} processes, {len(todo)} jobs ...", file=sys.stderr, flush=True)
        results[config], wall = run_config(config, args, todo, devices)
        print(f"  done in {wall:.0f} s", file=sys.stderr, flush=True)
    one = results[configs[0]]
    seeds = {i: one[len(jobs) + n] for n, i in enumerate(seeded)}
    for config in configs:
        for index, label in enumerate(labels):
            rows.append(_row(config, label, results[config][index], one[index], seeds.get(index), cores))
    print(_table(rows))
    if args.json:
        _write_json(args, rows, argv)
    return 0


def _row(config: Config, label: str, result: AsyncDiffResult, one: AsyncDiffResult, seed: AsyncDiffResult | None,
         cores: int) -> dict:
    from engine.parallel.fidelity import psnr, ssim

    costs = result.costs
    parts = [sum(costs[a:b]) for a, b in zip(result.bounds, result.bounds[1:])] if costs else [1.0]
    return {
        "config": config.name, "components": config.components, "stride": config.stride,
        "processes": config.plan.world_size, "oversubscribed": config.plan.world_size > cores, "job": label,
        "seconds": result.seconds, "speedup": one.seconds / result.seconds,
        "balance_bound": config.stride * sum(parts) / max(parts),
        "paper_speedup": PAPER_SPEEDUP.get((config.components, config.stride)),
        "psnr": psnr(result.image, one.image), "ssim": ssim(result.image, one.image),
        "seed_psnr": psnr(seed.image, one.image) if seed else None, "exchange_kib": result.exchange_bytes / 1024,
        "cuts": " | ".join(",".join(result.blocks[a:b]) for a, b in zip(result.bounds, result.bounds[1:])),
    }


def _table(rows: list[dict]) -> str:
    lines = ["| config | processes | job | s | speedup | balance bound | paper (SD 2.1, 50 steps) "
             "| PSNR dB | SSIM | 2 seeds PSNR dB | exchange KiB/round |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " *" if r["oversubscribed"] else ""
        paper = f"{r['paper_speedup']:.1f}×" if r["paper_speedup"] else ""
        fidelity = ("exact", "1.000") if r["psnr"] >= 100 else (f"{r['psnr']:.1f}", f"{r['ssim']:.3f}")
        lines.append(f"| {r['config']} | {r['processes']}{mark} | {r['job']} | {r['seconds']:.1f} | "
                     f"{r['speedup']:.2f}× | {r['balance_bound']:.2f}× | {paper} | {fidelity[0]} | {fidelity[1]} | "
                     f"{'' if r['seed_psnr'] is None else format(r['seed_psnr'], '.1f')} | {r['exchange_kib']:.0f} |")
    return "\n".join(lines)


def _write_json(args: argparse.Namespace, rows: list[dict], argv: list[str] | None) -> None:
    import torch

    write_json(args.json, {
        "command": "python -m engine.parallel.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "args": vars(args), "rows": rows,
    })


if __name__ == "__main__":
    sys.exit(main())
