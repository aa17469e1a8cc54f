"""Sharded live-stream benchmark: ``python -m engine.parallel.bench_stream --json bench-sharded.json``.

k processes with one torch thread each (each standing for a device; on a CPU, a core) against
one process with one thread, on the synthetic moving clip (:func:`engine.synthetic.moving_frame`).
For each number of denoising steps: one device (:class:`StreamDiffusion`), the sharded stream
with every call synchronous (``resync_every=1``: the whole UNet, one component after the other)
and asynchronous (the default warm-up, then every call asynchronous), one call at a time and with
the next call submitted before the last one's frame is taken (``2 in flight``). A call is timed from the
driver's side, frame in to frame out, after the warm-up calls; model build and process start are
not counted. Latency: the frame coming out of a call entered ``n − 1`` calls earlier in every mode
(``latency s`` is n calls' time: submitted at the start of one call, out at the end of n−1 later),
and an asynchronous call's noise prediction is up to ``k − 1`` calls old (``stale``). Fidelity:
PSNR of every timed call's frame against one device's frame for the same call (100: identical).
First it checks how many cores k busy processes actually get (a shared machine gives fewer).

The UNet stage, apart from the VAE and the scheduler math: each rank times, per call, the seconds
it runs its UNet component and the seconds it waits for that component's inputs (the activations
from earlier ranks; on rank 0 the noise prediction from rank k−1), and one device times its UNet
calls the same way (the same rows, the same dtype; on CUDA, device times). All are means over the
timed calls. On CUDA one device runs as the ranks do, from CUDA graphs: its whole call replayed, and
its UNet timed replayed alone (eager, a UNet's time there is mostly kernel launches, so the ranks'
graphs would look like a sharding speedup). ``UNet per rank s``: each rank's component per call (one device: its whole UNet).
``UNet stage s``, the stage's period: one device, its UNet call; sharded-sync, the sum of the
components (they run one after the other); sharded-async, the slowest component (they run at
once): the stage's throughput were the VAE and the scheduler math elsewhere. ``with waits s``: the
slowest rank's component plus waits per call, the stage as it ran here (the waits hold whatever
the other ranks did meanwhile, the VAE on ranks 0 and k−1 included). ``stage speedup``: one
device's ``UNet stage s`` over this mode's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from engine.config import StreamConfig
from engine.names import COST_KINDS
from engine.parallel.flags import (DEVICES_HELP, add_steps_arguments, bench_parser, say_free_cores, schedules,
                                   write_json)
from engine.parallel.torchrun import refuse_torchrun
from engine.quiet import quiet_libraries

if TYPE_CHECKING:  # torch and the engine load in the functions that use them: --help answers before they do
    import torch

    from engine.backends import UNetFn
    from engine.parallel.sharded import ShardedStream, StageTimes


@dataclass(frozen=True)
class Row:
    mode: str
    steps: int
    procs: int
    fps: float
    call_s: float
    latency_calls: int
    latency_s: float
    stale_calls: int
    psnr_mean: float
    psnr_min: float
    speedup: float = 1.0
    bytes_per_call: int = 0
    bounds: tuple[int, ...] = ()  # the cuts: component i runs blocks bounds[i]:bounds[i+1]
    component_s: tuple[float, ...] = ()  # per rank: seconds running its UNet component, per call
    wait_s: tuple[float, ...] = ()  # per rank: seconds waiting for that component's inputs, per call
    unet_s: float = 0.0  # the UNet stage's period (module docstring)
    unet_waits_s: float = 0.0  # the slowest rank's component plus waits
    unet_speedup: float = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("engine.parallel.bench_stream", __doc__)
    add_steps_arguments(parser, default="1,4")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--procs", type=int, default=2, help="ranks of the sharded stream (k), CPU processes")
    where.add_argument("--devices", default=None, metavar="LIST",
                       help=f"one rank per device instead of --procs CPU processes: {DEVICES_HELP}")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per configuration")
    parser.add_argument("--cost", default="measured", choices=COST_KINDS,
                        help="how block costs for the cuts are found")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def ranks(args: argparse.Namespace) -> tuple[str, ...]:
    """One device per rank: ``--devices``, or ``--procs`` CPU processes; ``ValueError`` naming the flag."""
    if args.devices is not None:
        from engine.parallel.replicas import parse_devices

        devices = parse_devices(args.devices)
        if len(devices) < 2:
            raise ValueError(f"--devices {args.devices!r}: a sharded stream needs at least 2 devices")
        return devices
    if args.procs < 2:
        raise ValueError(f"--procs {args.procs}: a sharded stream needs at least 2 ranks")
    return ("cpu",) * args.procs


def stream_config(args: argparse.Namespace, t_index_list: tuple[int, ...]) -> StreamConfig:
    return StreamConfig(t_index_list=t_index_list, width=args.size, height=args.size, cfg_type="self",
                        guidance_scale=1.2, prompt="a watercolour painting of a harbour")


def rank_dtype(devices: tuple[str, ...]) -> str:
    """What one device and the ranks compute in: fp16 on CUDA, fp32 on a CPU (as one device would)."""
    import torch

    return "float16" if torch.device(devices[0]).type == "cuda" else "float32"


def one_device(args: argparse.Namespace, devices: tuple[str, ...], t_index_list: tuple[int, ...],
               frames: list) -> tuple[Row, list]:
    import torch

    from engine.backends import torch_unet
    from engine.models import ModelSpec, load_components
    from engine.stream import StreamDiffusion

    torch.set_num_threads(args.threads)
    spec = ModelSpec(model=args.model, lcm_lora="none", device=devices[0], dtype=rank_dtype(devices))
    components = load_components(spec)
    config = stream_config(args, t_index_list)
    steps = len(t_index_list)
    untimed = steps + 1
    if components.device.type == "cuda":  # as the ranks run: replayed from CUDA graphs, not launch-bound eager
        stream, stage = _captured(components, config)
        outputs, seconds, _ = timed(stream, frames, untimed)
    else:
        unet = UNetTimer(torch_unet(components.unet))
        stream = StreamDiffusion(components, config, unet)
        first: list[int] = []
        outputs, seconds, _ = timed(stream, frames, untimed, lambda: first.append(len(unet.seconds)))
        stage = statistics.fmean(unet.seconds[first[0]:])
    del stream, components
    if torch.device(devices[0]).type == "cuda":  # rank 0 shares this GPU: leave it the memory
        gc.collect()
        torch.cuda.empty_cache()
    found = row("one device", steps, 1, seconds, 0, outputs[untimed:], outputs[untimed:])
    columns = {"component_s": (stage,), "wait_s": (0.0,), "unet_s": stage, "unet_waits_s": stage}
    return Row(**{**asdict(found), **columns}), outputs


def _captured(components, config: StreamConfig) -> tuple[object, float]:
    """One device as the sharded ranks run on CUDA: the stream, its whole call replayed from a CUDA graph, and the
    seconds of its UNet call alone, replayed from a graph too (eager, a UNet's time is mostly launches)."""
    import torch

    from engine.backends import BackendOptions, prepare_backend
    from engine.graphs import prepared_runner
    from engine.parallel.bench_components import timed_as_ranks_run
    from engine.slots import StreamSlots
    from engine.step import step_models
    from engine.stream import StreamDiffusion

    prepared, unet = prepare_backend("torch", components, config, BackendOptions(release=False, call_graphs=True))
    runner = prepared_runner(step_models(prepared, unet), StreamSlots.for_config(prepared, config), 1, graphs=True,
                             compiled=False)
    rows, device, dtype = config.unet_batch_size, prepared.device, prepared.dtype
    sample = torch.zeros(rows, prepared.latent_channels, *config.latent_size, device=device, dtype=dtype)
    text = torch.zeros(rows, prepared.tokenizer.model_max_length, prepared.unet.config.cross_attention_dim,
                       device=device, dtype=dtype)
    timesteps = torch.full((rows,), 500, device=device, dtype=torch.long)
    seconds = timed_as_ranks_run(unet, (sample, timesteps, text), device, 20, "UNet")
    return StreamDiffusion(prepared, config, runner=runner), seconds


class UNetTimer:
    """A UNet function that keeps each call's seconds (on CUDA, synchronised around the call: the device's time)."""

    def __init__(self, unet: UNetFn) -> None:
        self.unet = unet
        self.seconds: list[float] = []

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        _synchronize(sample.device)
        start = time.perf_counter()
        prediction = self.unet(sample, timesteps, encoder_hidden_states)
        _synchronize(sample.device)
        self.seconds.append(time.perf_counter() - start)
        return prediction


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def sharded(args: argparse.Namespace, devices: tuple[str, ...], t_index_list: tuple[int, ...], frames: list,
            reference: list) -> list[Row]:
    from engine.parallel.sharded import ShardedStream

    rows, steps, k = [], len(t_index_list), len(devices)
    with ShardedStream(args.model, stream_config(args, t_index_list), devices=devices, cost=args.cost,
                       dtype=rank_dtype(devices), threads=args.threads) as stream:
        untimed = untimed_calls(steps, k)  # the timed calls are all of one kind
        for mode, every, run in (("sharded-sync", 1, timed), ("sharded-async", None, timed),
                                 ("sharded-async, 2 in flight", None, timed_in_flight)):
            stream.resync_every = every
            stream.reset()
            marks: list[list[StageTimes]] = []
            outputs, seconds, latency = run(stream, frames, untimed, lambda: marks.append(stream.stage_times()))
            stages = [after.since(before) for after, before in zip(stream.stage_times(), marks[0])]
            stale = 0 if every == 1 else k - 1
            found = row(mode, steps, k, seconds, stale, outputs[untimed:], reference[untimed:],
                        stream.bytes_per_call)
            rows.append(Row(**{**asdict(found), "latency_s": found.latency_s + latency, "bounds": stream.bounds,
                               **stage_columns(every == 1, stages)}))
    return rows


def stage_columns(synchronous: bool, stages: list[StageTimes]) -> dict:
    """A sharded mode's UNet-stage columns from each rank's times over the timed calls (module docstring)."""
    compute = tuple(s.compute_per_call for s in stages)
    waits = tuple(s.wait_per_call for s in stages)
    return {"component_s": compute, "wait_s": waits, "unet_s": sum(compute) if synchronous else max(compute),
            "unet_waits_s": max(c + w for c, w in zip(compute, waits))}


def untimed_calls(steps: int, k: int) -> int:
    """Calls before the timed ones: the stream batch full and the sharded stream's default warm-up
    (``n + k − 2`` synchronous calls) over, so that every mode times ``--calls`` calls of one kind."""
    return max(steps + 1, steps + k - 2)


def timed(stream, frames: list, untimed: int, mark: Callable[[], object] = lambda: None
          ) -> tuple[list, list[float], float]:
    """One call at a time: each call's seconds (frame in to frame out), and no extra latency.
    ``mark()`` runs just before the first timed call."""
    outputs, seconds = [], []
    for index, frame in enumerate(frames):
        if index == untimed:
            mark()
        start = time.perf_counter()
        outputs.append(stream(frame))
        if index >= untimed:
            seconds.append(time.perf_counter() - start)
    return outputs, seconds, 0.0


def timed_in_flight(stream: ShardedStream, frames: list, untimed: int, mark: Callable[[], object] = lambda: None
                    ) -> tuple[list, list[float], float]:
    """The next call submitted before the last one's result is taken: seconds between results, and the
    extra latency (a frame waits for the call before it: submit to result takes two periods, not one).
    ``mark()`` runs when the timing starts (the first timed call is already in flight)."""
    outputs, seconds, waits = [], [], []
    submitted = [time.perf_counter()]
    stream.submit([frames[0]])
    last = time.perf_counter()
    for index in range(len(frames)):
        if index == untimed:
            mark()
        if index + 1 < len(frames):
            submitted.append(time.perf_counter())
            stream.submit([frames[index + 1]])
        result = stream.result()
        outputs.append(None if result is None else result[0])
        now = time.perf_counter()
        if index >= untimed:
            seconds.append(now - last)
            waits.append(now - submitted[index])
        last = now
    return outputs, seconds, statistics.median(waits) - statistics.median(seconds)


def row(mode: str, steps: int, procs: int, seconds: list[float], stale: int, outputs: list, reference: list,
        bytes_per_call: int = 0) -> Row:
    from engine.parallel.fidelity import psnr

    call_s = statistics.median(seconds)
    scores = [psnr(a, b) for a, b in zip(outputs, reference) if a is not None]
    return Row(mode, steps, procs, 1.0 / call_s, call_s, steps - 1, steps * call_s, stale,
               statistics.fmean(scores), min(scores), bytes_per_call=bytes_per_call)


def table(rows: list[Row]) -> str:
    from engine.parallel.fidelity import MAX_PSNR

    lines = ["| mode | steps | procs | frames/s | call (s) | speedup | latency (calls / s) | stale (calls) "
             "| PSNR mean / min (dB) | sent per call | UNet per rank (s) | UNet stage (s) | with waits (s) "
             "| stage speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr_text = "exact" if r.psnr_min >= MAX_PSNR else f"{r.psnr_mean:.1f} / {r.psnr_min:.1f}"
        sent = f"{r.bytes_per_call / 1024:.0f} KiB" if r.bytes_per_call else "–"
        lines.append(f"| {r.mode} | {r.steps} | {r.procs} | {r.fps:.2f} | {r.call_s:.3f} | {r.speedup:.2f}× "
                     f"| {r.latency_calls} / {r.latency_s:.2f} | {r.stale_calls} | {psnr_text} | {sent} "
                     f"| {stage_text(r)} |")
    return "\n".join(lines)


def stage_text(r: Row) -> str:
    """The UNet-stage cells of a row: per rank, period, period with waits, speedup."""
    if not r.component_s:
        return "– | – | – | –"
    per_rank = " / ".join(f"{c:.3f}" for c in r.component_s)
    return f"{per_rank} | {r.unet_s:.3f} | {r.unet_waits_s:.3f} | {r.unet_speedup:.2f}×"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before torch loads: --help and bad flags answer at once
    import torch

    from engine.synthetic import moving_frame

    quiet_libraries()
    try:
        refuse_torchrun("python -m engine.parallel.bench_stream")
        devices, configurations = ranks(args), schedules(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    k = len(devices)
    cores = say_free_cores(k) if torch.device(devices[0]).type == "cpu" else None
    rows: list[Row] = []
    for t_index_list in configurations:
        count = untimed_calls(len(t_index_list), k) + args.calls
        frames = [moving_frame(i, args.size, args.size) for i in range(count)]
        base, reference = one_device(args, devices, t_index_list, frames)
        rows.append(base)
        for found in sharded(args, devices, t_index_list, frames, reference):
            rows.append(Row(**{**asdict(found), "speedup": base.call_s / found.call_s,
                               "unet_speedup": base.unet_s / found.unet_s}))
        print(table(rows), file=sys.stderr, flush=True)
    print(table(rows))
    write_json(args.json, {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                           "cpus": os.cpu_count(), "free_cores": cores, "devices": list(devices), "args": vars(args),
                           "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
