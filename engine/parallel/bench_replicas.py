"""Replicas against one process: the frames per second S live streams get, all together.

    python -m engine.parallel.bench_replicas --json out/replicas.json

For each number of streams S, the same streams run on one :class:`~engine.runtime.Engine` in this
process (its worker batches them into shared calls) and on a
:class:`~engine.parallel.replicas.ReplicaEngine` with one process per ``--devices`` entry, each
with ``--threads`` torch threads (this process gets as many, so that on a CPU each process
stands for one device). Every stream is offered frames as a camera offers them (``--offer-fps``,
30 by default), faster than it is served on a CPU (the newest wins), so the count of outputs in
the timed window is the capacity; a warm-up window first fills every pipeline and the first
calls of each size. On a GPU, raise ``--offer-fps`` above what one stream gets.

One device batches S streams into one call; a replica batches only its share. So the one process
also runs each replica's share of streams, and the **ceiling** is what k replicas would give were
each exactly as fast as one process serving its share: Σ fps(one process, share) ÷ fps(one
process, S). What replicas reach of that ceiling is what the processes cost (the frames through
shared memory, the pipes, the front); what the ceiling lacks of k is what batching gives one device.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from typing import TYPE_CHECKING, Any

from engine.config import StreamConfig
from engine.parallel.flags import DEVICES_HELP, add_steps_arguments, bench_parser, say_free_cores, schedules, write_json
from engine.parallel.torchrun import refuse_torchrun
from engine.quiet import quiet_libraries

if TYPE_CHECKING:  # torch and the engine load in the functions that use them: --help answers before they do
    from engine.parallel.replicas import ReplicaEngine
    from engine.runtime import Engine


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("engine.parallel.bench_replicas", __doc__, size=128)
    add_steps_arguments(parser, default=None)  # neither given: t_index_list 32,45 (two steps), as before
    parser.add_argument("--sessions", default="2,4", help="stream counts to measure")
    parser.add_argument("--devices", default="cpu,cpu", metavar="LIST",
                        help=f"one replica process each: {DEVICES_HELP}")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per row")
    parser.add_argument("--warmup", type=float, default=8.0, help="untimed seconds first")
    parser.add_argument("--offer-fps", type=float, default=30.0,
                        help="frames offered to each stream per second, as a camera would (above what a stream gets)")
    return parser


async def drive(engine: Engine | ReplicaEngine, streams: int, size: int, warmup: float, seconds: float,
                offer_fps: float) -> dict:
    """``streams`` sessions offered ``offer_fps`` frames a second; their outputs counted over ``seconds`` after
    ``warmup``."""
    import numpy as np

    from engine.synthetic import moving_frames

    sessions = [await engine.open_session(prompt=f"style {s}", seed=s) for s in range(streams)]
    frames = moving_frames(30, size, size)
    start = time.monotonic()
    counting_from, until = start + warmup, start + warmup + seconds
    counts = [0] * streams
    latencies: list[float] = []  # seconds from a frame's submission to its stylized frame, timed window

    async def offer(session: Any, offset: int) -> None:
        index = offset
        while time.monotonic() < until:
            session.submit(frames[index % len(frames)])
            index += 1
            await asyncio.sleep(1.0 / offer_fps)

    async def consume(session: Any, which: int) -> None:
        while time.monotonic() < until:
            try:
                output = await asyncio.wait_for(session.next_output(), max(0.01, until - time.monotonic()))
            except asyncio.TimeoutError:
                return
            if time.monotonic() >= counting_from:
                counts[which] += 1
                latencies.append(output.latency)

    try:
        await asyncio.gather(*(offer(s, 7 * i) for i, s in enumerate(sessions)),
                             *(consume(s, i) for i, s in enumerate(sessions)))
    finally:
        for session in sessions:
            session.close()
    per_stream = [count / seconds for count in counts]
    p50, p95 = (1e3 * float(np.percentile(latencies, q)) if latencies else float("nan") for q in (50, 95))
    return {"fps": sum(per_stream), "min_stream_fps": min(per_stream), "max_stream_fps": max(per_stream),
            "latency_ms_p50": p50, "latency_ms_p95": p95}


async def measure(args: argparse.Namespace, engine: Engine | ReplicaEngine, counts: list[int]) -> list[dict]:
    rows = []
    async with engine:
        for streams in counts:
            print(f"  {type(engine).__name__}, {streams} streams, {args.warmup + args.seconds:.0f} s ...",
                  file=sys.stderr)
            rows.append({"streams": streams, **await drive(engine, streams, args.size, args.warmup, args.seconds,
                                                        args.offer_fps)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before torch loads: --help and bad flags answer at once
    import torch

    from engine.parallel.replicas import parse_devices

    quiet_libraries()
    try:
        refuse_torchrun("python -m engine.parallel.bench_replicas")
        devices = parse_devices(args.devices)
        counts = [int(part) for part in args.sessions.split(",")]
        configs = [StreamConfig(t_index_list=t, width=args.size, height=args.size, cfg_type="self",
                                guidance_scale=1.2) for t in schedules(args, fallback=(32, 45))]
        if not 0 < args.offer_fps <= 1000:
            raise ValueError(f"--offer-fps {args.offer_fps} is out of range; allowed: (0, 1000]")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cores = say_free_cores(len(devices)) if torch.device(devices[0]).type == "cpu" else None
    torch.set_num_threads(args.threads)
    rows = []
    for config in configs:
        rows += compare(args, config, devices, counts)
    print("\n" + table(rows, len(devices)))
    print(f"\n{args.model} {args.size}x{args.size}, {args.threads} thread(s) per process, devices "
          f"{','.join(devices)}, {args.offer_fps:g} fps offered per stream, torch {torch.__version__}")
    write_json(args.json, {"args": vars(args), "free_cores": cores, "rows": rows})
    return 0


def compare(args: argparse.Namespace, config: StreamConfig, devices: tuple[str, ...], counts: list[int]) -> list[dict]:
    """One process against one replica per device, on ``config``, for each stream count."""
    import torch

    from engine.models import ModelSpec
    from engine.parallel.replicas import ReplicaEngine
    from engine.runtime import Engine, EngineConfig

    biggest = max(counts)
    spec = ModelSpec(model=args.model, device=devices[0])  # the one process on the first replica's device
    one = Engine(EngineConfig(model=spec, stream=config, max_sessions=biggest, max_batch=biggest, idle_timeout=60))
    many = ReplicaEngine(EngineConfig(model=spec, stream=config, max_sessions=biggest * len(devices),
                                      max_batch=biggest, idle_timeout=60, devices=devices), threads=args.threads)
    print(f"t_index_list={list(config.t_index_list)}:", file=sys.stderr)
    k = len(devices)
    one_counts = sorted(set(counts) | {share for streams in counts for share in replica_shares(streams, k)})
    one.load()
    single = {row["streams"]: row for row in asyncio.run(measure(args, one, one_counts))}
    del one  # its model, graphs and compiled code: replica 0 loads on the same device next
    if torch.device(devices[0]).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    many.load()
    replicated = asyncio.run(measure(args, many, counts))
    rows = []
    for b in replicated:
        a = single[b["streams"]]
        ideal = sum(single[share]["fps"] for share in replica_shares(b["streams"], k))
        rows.append({"steps": config.denoising_steps, "t_index_list": list(config.t_index_list),
                     "streams": b["streams"], "one": a, "replicas": b, "ideal_fps": ideal,
                     "speedup": _ratio(b["fps"], a["fps"]), "ceiling": _ratio(ideal, a["fps"]),
                     "of_ceiling": _ratio(b["fps"], ideal)})
    return rows


def replica_shares(streams: int, k: int) -> list[int]:
    """How many of ``streams`` each of ``k`` replicas serves (the engine spreads them evenly); no zeros."""
    return [n for n in (streams // k + (i < streams % k) for i in range(k)) if n]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(rows: list[dict], replicas: int) -> str:
    lines = [f"| steps | streams | one process fps | {replicas} replicas fps | speedup | ceiling | of ceiling "
             "| replica streams min / max fps | latency p50 one / replicas (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["one"], r["replicas"]
        lines.append(f"| {r['steps']} | {r['streams']} | {a['fps']:.2f} | {b['fps']:.2f} | {r['speedup']:.2f}× "
                     f"| {r['ceiling']:.2f}× | {r['of_ceiling']:.0%} "
                     f"| {b['min_stream_fps']:.2f} / {b['max_stream_fps']:.2f} "
                     f"| {a['latency_ms_p50']:.0f} / {b['latency_ms_p50']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
