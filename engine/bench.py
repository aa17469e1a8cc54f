"""Engine benchmark: ``python -m engine.bench --preset small --t-index-list 0,16,32,45 --frames 40 --json out.json``.

Runs the same moving synthetic frames through five ways of doing img2img, in one process,
interleaved in short rounds so machine drift hits them all alike (frames/s = all frames / all time):

- ``stream``: our stream batch (:class:`engine.stream.StreamDiffusion`), frames out per second;
- ``floor``: the bare model work for the same frames (VAE encode + one batched UNet call + VAE
  decode per frame), the physical floor of this machine;
- ``sequential``: the same denoising one frame at a time, one UNet call per step;
- ``diffusers``: ``StableDiffusionImg2ImgPipeline`` per frame, same UNet weights and steps, with the
  model's own full VAE: what a user would otherwise write;
- ``diffusers_same_vae``: that pipeline given our (tiny) VAE, to separate the VAE's share of the gain.

With ``--devices`` naming several, it runs the parallel benchmark ``--parallel`` picks instead:
``asyncdiff`` :mod:`engine.parallel.bench_stream` (one stream sharded over the devices against one
device), ``replicas`` :mod:`engine.parallel.bench_replicas` (concurrent streams, one whole model
per device, against one process), passing on the flags it shares with this one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from typing import TYPE_CHECKING

from engine.config import StreamConfig, parse_t_index_list
from engine.names import BACKEND_CHOICES
from engine.parallel.flags import add_parallel_arguments, given_flags
from engine.parallel.torchrun import refuse_torchrun
from engine.quiet import quiet_libraries

if TYPE_CHECKING:  # torch and the engine load once the flags are read: --help answers before them
    import torch

PROMPT = "a watercolor painting of a city street"
SEVERAL_DEVICES = """\
--devices naming two or more runs a parallel benchmark instead, passing on those of the flags
above that you give and it shares: --preset (as --model), --size, --t-index-list, --threads,
--json; with asyncdiff --frames (as --calls); with replicas --sessions, --duration (as --seconds)
and --warmup. For the rest it keeps its own defaults (see its --help)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (tiny, small) or any --model spec")
    parser.add_argument("--t-index-list", default="0,16,32,45", help="denoising steps out of 50")
    parser.add_argument("--frames", type=int, default=40, help="frames timed per method")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds the frames are split into")
    parser.add_argument("--size", type=int, default=None, help="square frame size (default: the preset's)")
    parser.add_argument("--cfg-type", default="none", choices=["none", "full", "self", "initialize"])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-diffusers", action="store_true", help="leave out the diffusers baselines")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="also time the stream on this backend (stream_<backend>) unless it is eager torch; "
                             "the runtime benchmark uses it (auto: compile on CUDA, torch elsewhere)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each call as a CUDA graph (stream_<backend>+graphs; default: on CUDA)")
    parser.add_argument("--json", default=None, help="write the results here")
    runtime = parser.add_argument_group("runtime benchmark (--runtime)")
    runtime.add_argument("--runtime", action="store_true",
                         help="drive the asyncio runtime with concurrent synthetic streams instead")
    runtime.add_argument("--sessions", default="1,2,4", help="concurrent stream counts to measure")
    runtime.add_argument("--offer-fps", type=float, default=30.0,
                         help="frames/s each stream offers (far above capacity, e.g. 400 on a GPU, measures capacity)")
    runtime.add_argument("--floor-calls", type=int, default=4, help="calls per floor chunk (more on a GPU)")
    runtime.add_argument("--duration", type=float, default=24.0, help="measured seconds per session count")
    runtime.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before the first window")
    several = parser.add_argument_group("several devices", SEVERAL_DEVICES)
    add_parallel_arguments(several, devices="the devices (one alone: the same as --device)",
                           default="default: replicas with --runtime (python -m engine.parallel.bench_replicas: "
                                   "concurrent streams, one process per device), asyncdiff otherwise (python -m "
                                   "engine.parallel.bench_stream: one sharded stream against one device)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def bench_config(args: argparse.Namespace) -> StreamConfig:
    """The stream configuration both benchmarks use: square frames at the preset's size by default."""
    from engine.presets import PRESETS

    size = args.size or (PRESETS[args.preset].default_size if args.preset in PRESETS else 512)
    return StreamConfig(t_index_list=parse_t_index_list(args.t_index_list), width=size, height=size,
                        cfg_type=args.cfg_type, guidance_scale=1.0, prompt=PROMPT, seed=0)


def environment(device: torch.device) -> dict:
    import torch

    return {
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------ several devices

#: engine.bench flags a parallel benchmark takes, by mode: dest here → its flag there
PASSED = {
    "asyncdiff": {"preset": "--model", "size": "--size", "t_index_list": "--t-index-list", "threads": "--threads",
                  "json": "--json", "frames": "--calls"},
    "replicas": {"preset": "--model", "size": "--size", "t_index_list": "--t-index-list", "threads": "--threads",
                 "json": "--json", "sessions": "--sessions", "duration": "--seconds", "warmup": "--warmup"},
}
#: engine.bench's own knobs: with several devices, those the parallel benchmark does not take are refused
OWN_FLAGS = ("frames", "rounds", "cfg_type", "skip_diffusers", "graphs", "offer_fps", "floor_calls", "sessions",
             "duration", "warmup")


def parallel_mode(args: argparse.Namespace, given: set[str]) -> str:
    """``--parallel`` resolved (the default follows ``--runtime``); ``ValueError`` naming what does not fit."""
    mode = args.parallel or ("replicas" if args.runtime else "asyncdiff")
    if mode == "asyncdiff" and args.runtime:
        raise ValueError("--runtime drives several streams and --parallel asyncdiff shards one: give --parallel "
                         "replicas, or leave --runtime out to benchmark the sharded stream")
    if args.backend not in ("auto", "torch"):
        raise ValueError(f"--backend {args.backend}: the parallel benchmarks' device processes run eager torch; "
                         f"leave --backend out with --devices")
    unused = [dest for dest in OWN_FLAGS if dest in given and dest not in PASSED[mode]]
    if unused:
        flags = ", ".join("--" + dest.replace("_", "-") for dest in unused)
        raise ValueError(f"{flags} would do nothing with --parallel {mode} on several --devices: leave "
                         f"{'them' if len(unused) > 1 else 'it'} out (the parallel benchmark's --help lists its own)")
    return mode


def parallel_argv(args: argparse.Namespace, given: set[str], mode: str, devices: tuple[str, ...]) -> list[str]:
    """The parallel benchmark's arguments: ``--devices``, and the shared flags the user gave, under its names."""
    argv = ["--devices", ",".join(devices)]
    for dest, flag in PASSED[mode].items():
        if dest in given:
            argv += [flag, str(getattr(args, dest))]
    return argv


def run_parallel(args: argparse.Namespace, given: set[str], devices: tuple[str, ...]) -> int:
    """Run the benchmark of ``--parallel`` on ``devices`` (two or more), with the flags it shares with this one."""
    from engine.parallel import bench_replicas, bench_stream

    try:
        mode = parallel_mode(args, given)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    module = {"asyncdiff": bench_stream, "replicas": bench_replicas}[mode]
    argv = parallel_argv(args, given, mode, devices)
    print(f"--parallel {mode}: python -m {module.__name__} {' '.join(argv)}", file=sys.stderr, flush=True)
    return module.main(argv)


def bench_devices(args: argparse.Namespace) -> tuple[str, ...]:
    """``--devices`` as names (empty without it); ``ValueError`` for a bad list or ``--parallel`` with one device."""
    from engine.parallel.replicas import parse_devices

    refuse_torchrun("python -m engine.bench")
    devices = parse_devices(args.devices) if args.devices else ()
    if args.parallel and len(devices) < 2:
        raise ValueError(f"--parallel {args.parallel} spreads the work over several devices: give --devices with "
                         f"two or more (e.g. cpu,cpu or 0,1)")
    return devices


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before torch loads: --help and bad flags answer at once
    quiet_libraries()
    try:
        devices = bench_devices(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(devices) > 1:
        return run_parallel(args, given_flags(build_parser(), argv), devices)
    if devices:
        args.device = devices[0]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.runtime:
        from engine.bench_runtime import main as runtime_main

        return runtime_main(args)
    from engine.bench_methods import main as methods_main

    return methods_main(args)


if __name__ == "__main__":
    sys.exit(main())
