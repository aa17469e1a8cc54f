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
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from engine.config import StreamConfig
from engine.models import ModelSpec, load_components
from engine.parallel.fidelity import MAX_PSNR, psnr
from engine.parallel.sharded import ShardedStream
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frame

T_INDEX = {1: (30,), 2: (20, 35), 4: (10, 20, 30, 40)}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.parallel.bench_stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="tiny, small, or any model spec")
    parser.add_argument("--size", type=int, default=256, help="square frame size")
    parser.add_argument("--steps", default="1,4", help="denoising steps per frame, comma-separated (1, 2 or 4)")
    parser.add_argument("--procs", type=int, default=2, help="ranks of the sharded stream (k)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per configuration")
    parser.add_argument("--cost", default="measured", help="how block costs for the cuts are found")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def stream_config(args: argparse.Namespace, steps: int) -> StreamConfig:
    return StreamConfig(t_index_list=T_INDEX[steps], width=args.size, height=args.size, cfg_type="self",
                        guidance_scale=1.2, prompt="a watercolour painting of a harbour")


def one_device(args: argparse.Namespace, steps: int, frames: list) -> tuple[Row, list]:
    torch.set_num_threads(1)
    components = load_components(ModelSpec(model=args.model, lcm_lora="none", device="cpu"))
    stream = StreamDiffusion(components, stream_config(args, steps))
    untimed = steps + 1
    outputs, seconds, _ = timed(stream, frames, untimed)
    return row("one device", steps, 1, seconds, 0, outputs[untimed:], outputs[untimed:]), outputs


def sharded(args: argparse.Namespace, steps: int, frames: list, reference: list) -> list[Row]:
    rows = []
    with ShardedStream(args.model, stream_config(args, steps), procs=args.procs, cost=args.cost) as stream:
        warmup = stream.warmup_calls
        for mode, every, run in (("sharded-sync", 1, timed), ("sharded-async", None, timed),
                                 ("sharded-async, 2 in flight", None, timed_in_flight)):
            stream.resync_every = every
            stream.reset()
            untimed = max(steps + 1, warmup)  # the timed calls are all of one kind
            outputs, seconds, latency = run(stream, frames, untimed)
            stale = 0 if every == 1 else args.procs - 1
            found = row(mode, steps, args.procs, seconds, stale, outputs[untimed:], reference[untimed:],
                        stream.bytes_per_call)
            rows.append(Row(**{**asdict(found), "latency_s": found.latency_s + latency, "bounds": stream.bounds}))
    return rows
    return rows


def timed(stream, frames: list, untimed: int) -> tuple[list, list[float], float]:
    """One call at a time: each call's seconds (frame in to frame out), and no extra latency."""
    outputs, seconds = [], []
    for index, frame in enumerate(frames):
        start = time.perf_counter()
        outputs.append(stream(frame))
        if index >= untimed:
            seconds.append(time.perf_counter() - start)
    return outputs, seconds, 0.0


def timed_in_flight(stream: ShardedStream, frames: list, untimed: int) -> tuple[list, list[float], float]:
    """The next call submitted before the last one's result is taken: seconds between results, and the
    extra latency (a frame waits for the call before it: submit to result takes two periods, not one)."""
    outputs, seconds, waits = [], [], []
    submitted = [time.perf_counter()]
    stream.submit([frames[0]])
    last = time.perf_counter()
    for index in range(len(frames)):
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
    call_s = statistics.median(seconds)
    scores = [psnr(a, b) for a, b in zip(outputs, reference) if a is not None]
    return Row(mode, steps, procs, 1.0 / call_s, call_s, steps - 1, steps * call_s, stale,
               statistics.fmean(scores), min(scores), bytes_per_call=bytes_per_call)


def _spin(iterations: int = 5_000_000) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(iterations):
        total += i
    return time.perf_counter() - start


def free_cores(procs: int) -> float:
    """How many cores ``procs`` busy processes get here (``procs`` on an idle machine): a shared machine check."""
    context = multiprocessing.get_context("fork")  # before any model or thread exists: cheap and safe
    with ProcessPoolExecutor(procs, mp_context=context) as pool:
        alone = min(pool.submit(_spin).result() for _ in range(2))
        together = max(pool.map(_spin, [5_000_000] * procs))
    return procs * alone / together


def table(rows: list[Row]) -> str:
    lines = ["| mode | steps | procs | frames/s | call (s) | speedup | latency (calls / s) | stale (calls) "
             "| PSNR mean / min (dB) | sent per call |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr_text = "exact" if r.psnr_min >= MAX_PSNR else f"{r.psnr_mean:.1f} / {r.psnr_min:.1f}"
        sent = f"{r.bytes_per_call / 1024:.0f} KiB" if r.bytes_per_call else "–"
        lines.append(f"| {r.mode} | {r.steps} | {r.procs} | {r.fps:.2f} | {r.call_s:.3f} | {r.speedup:.2f}× "
                     f"| {r.latency_calls} / {r.latency_s:.2f} | {r.stale_calls} | {psnr_text} | {sent} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = free_cores(args.procs)
    print(f"{args.procs} busy processes get {cores:.2f} cores here"
          + ("" if cores > 0.8 * args.procs else ": the machine is shared, parallel modes cannot show their speed"),
          file=sys.stderr, flush=True)
    rows: list[Row] = []
    for steps in (int(s) for s in args.steps.split(",")):
        frames = [moving_frame(i, args.size, args.size) for i in range(args.calls + steps + 4)]
        base, reference = one_device(args, steps, frames)
        rows.append(base)
        for found in sharded(args, steps, frames, reference):
            rows.append(Row(**{**asdict(found), "speedup": base.call_s / found.call_s}))
        print(table(rows), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        record = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                  "cpus": os.cpu_count(), "free_cores": cores, "args": vars(args), "rows": [asdict(r) for r in rows]}
        with open(args.json, "w") as out:
            json.dump(record, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
