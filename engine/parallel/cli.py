"""``python -m engine.parallel.asyncdiff``: one picture with AsyncDiff on several devices (or CPU processes)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from engine.names import COST_KINDS, SCHEDULER_NAMES
from engine.parallel.torchrun import torchrun_rank

if TYPE_CHECKING:  # torch and diffusers load once the flags are read: --help answers before them
    import numpy as np

    from engine.parallel.asyncdiff import AsyncDiffJob, AsyncDiffPlan, Ranks

EXAMPLES = """examples:
  python -m engine.parallel.asyncdiff --model tiny --procs 2 --steps 25 --width 64 --height 64 --output out.png
  python -m engine.parallel.asyncdiff --model small --procs 3 --stride 2 --steps 50 --warmup-steps 3 --compare
  python -m engine.parallel.asyncdiff --model stabilityai/stable-diffusion-2-1 --devices 0,1,2,3 --vae full
  torchrun --nproc-per-node 2 -m engine.parallel.asyncdiff --steps 50    # torchrun starts the ranks (GPU i each)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.parallel.asyncdiff", epilog=EXAMPLES,
                                     description="AsyncDiff (arXiv 2406.06911): the UNet split into k components "
                                     "on k devices, each fed its predecessor's output from the previous step.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, small, a hub id, a diffusers folder or .safetensors")
    parser.add_argument("--vae", default="tiny", help="tiny (TAESD) or full (the model's own)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--devices", default=None,
                       help="one device per rank, comma-separated: cpu,cpu or 0,1 (CUDA indices) or cuda:0,cuda:1")
    where.add_argument("--procs", type=int, default=None, help="this many CPU processes (default 2)")
    parser.add_argument("--components", type=int, default=None,
                        help="UNet components k (default: devices - stride + 1, the paper's rule)")
    parser.add_argument("--stride", type=int, default=1, choices=[1, 2], help="denoising stride (paper: 1 or 2)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="synchronous steps first (exact; >= 1)")
    parser.add_argument("--cost", default="measured", choices=COST_KINDS, help="how block costs for the cuts are found")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="ddim", choices=SCHEDULER_NAMES)
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale; <= 1 turns guidance off")
    parser.add_argument("--prompt", default="a kitten sitting by a door")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--width", type=int, default=None, help="default: 512, or 64 for tiny and 256 for small")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", default=None, help="img2img: the input picture")
    parser.add_argument("--strength", type=float, default=0.75, help="img2img: how much of the schedule runs")
    parser.add_argument("--output", default="asyncdiff.png", help="where to write the picture")
    parser.add_argument("--compare", action="store_true", help="also run one device and print PSNR/SSIM against it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds any one collective may wait")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on CUDA)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before torch loads: --help and bad flags answer at once
    from engine.parallel.asyncdiff import AsyncDiffPlan, run_asyncdiff
    from engine.parallel.launch import RankFailed

    try:
        ranks, plan, job = build(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        start = time.perf_counter()
        results = run_asyncdiff(ranks, plan, [job], torchrun=True)
        wall = time.perf_counter() - start
        if results is None:  # a rank other than 0 under torchrun: rank 0 reports
            return 0
        result = results[0]
        reference = run_asyncdiff(_one_device(ranks), AsyncDiffPlan(components=1), [job])[0] if args.compare else None
    except RankFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _save(result.image, args.output)
    cuts = " | ".join(",".join(result.blocks[a:b]) for a, b in zip(result.bounds, result.bounds[1:]))
    print(f"wrote {args.output}: {plan.world_size} ranks, k={plan.components}, stride {plan.stride}, "
          f"{job.warmup_steps} warm-up steps; denoise+decode {result.seconds:.2f} s (wall {wall:.1f} s)")
    print(f"components: {cuts}")
    if reference is not None:
        from engine.parallel.fidelity import psnr, ssim

        print(f"one device: {reference.seconds:.2f} s, speedup {reference.seconds / result.seconds:.2f}x, "
              f"PSNR {psnr(result.image, reference.image):.2f} dB, SSIM {ssim(result.image, reference.image):.4f}")
    return 0


def build(args: argparse.Namespace) -> tuple[Ranks, AsyncDiffPlan, AsyncDiffJob]:
    """The ranks, plan and job the arguments describe; ``ValueError`` naming the flag when they do not fit."""
    from engine.parallel.asyncdiff import AsyncDiffJob, AsyncDiffPlan, Ranks
    from engine.parallel.sampling import GenerationRequest

    devices = _devices(args)
    components = args.components if args.components is not None else len(devices) - args.stride + 1
    if args.stride == 2 and len(devices) < 3:
        raise ValueError(f"--stride 2 needs at least 3 devices (2 components + 1), got {len(devices)}")
    plan = AsyncDiffPlan(components=components, stride=args.stride, cost=args.cost)
    if plan.world_size != len(devices):
        raise ValueError(f"--components {components} with --stride {args.stride} needs {plan.world_size} devices "
                         f"(components + stride - 1), got {len(devices)}")
    default_size = {"tiny": 64, "small": 256}.get(args.model, 512)
    image = _load(args.image) if args.image else None
    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                                guidance_scale=args.guidance_scale, width=args.width or default_size,
                                height=args.height or default_size, seed=args.seed, scheduler=args.scheduler,
                                image=image, strength=args.strength)
    ranks = Ranks(model=args.model, devices=devices, vae=args.vae, dtype=args.dtype, threads=args.threads,
                  timeout_s=args.timeout, progress=True)
    return ranks, plan, AsyncDiffJob(request, warmup_steps=args.warmup_steps)


def _devices(args: argparse.Namespace) -> tuple[str, ...]:
    joined = torchrun_rank()
    if joined is not None:
        return _torchrun_devices(args, joined[1])
    if args.devices:
        names = [d.strip() for d in args.devices.split(",") if d.strip()]
        return tuple(f"cuda:{d}" if d.isdigit() else d for d in names)
    procs = 2 if args.procs is None else args.procs
    if procs < 1:
        raise ValueError(f"--procs {procs} must be at least 1")
    return ("cpu",) * procs


def _torchrun_devices(args: argparse.Namespace, world: int) -> tuple[str, ...]:
    """Under torchrun, which started the processes: by default GPU ``LOCAL_RANK`` each (cpu without CUDA)."""
    if args.procs is not None:
        raise ValueError("torchrun started the processes: leave out --procs (--nproc-per-node sets how many)")
    if args.compare:
        raise ValueError("--compare runs one device after the ranks; under torchrun run it without --compare, "
                         "then with --procs 1 or --devices naming one")
    if args.devices:
        names = [d.strip() for d in args.devices.split(",") if d.strip()]
        if len(names) != world:
            raise ValueError(f"--devices names {len(names)}, but torchrun started {world} processes")
        return tuple(f"cuda:{d}" if d.isdigit() else d for d in names)
    import torch

    if not torch.cuda.is_available():
        return ("cpu",) * world
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return tuple(f"cuda:{rank % per_node}" for rank in range(world))


def _one_device(ranks: Ranks) -> Ranks:
    from dataclasses import replace

    return replace(ranks, devices=ranks.devices[:1], progress=False)


def _load(path: str) -> np.ndarray:
    import numpy as np
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def _save(image: np.ndarray, path: str) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
