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
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import torch

from engine.config import StreamConfig, parse_t_index_list
from engine.models import ModelSpec
from engine.parallel.flags import DEVICES_HELP, bench_parser, say_free_cores, write_json
from engine.parallel.replicas import ReplicaEngine, parse_devices
from engine.quiet import quiet_libraries
from engine.runtime import Engine, EngineConfig
from engine.synthetic import moving_frames

def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("engine.parallel.bench_replicas", __doc__, size=128)
    parser.add_argument("--t-index-list", default="32,45", help="denoising steps out of 50")
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
    sessions = [await engine.open_session(prompt=f"style {s}", seed=s) for s in range(streams)]
    frames = moving_frames(30, size, size)
    start = time.monotonic()
    counting_from, until = start + warmup, start + warmup + seconds
    counts = [0] * streams

    async def offer(session: Any, offset: int) -> None:
        index = offset
        while time.monotonic() < until:
            session.submit(frames[index % len(frames)])
            index += 1
            await asyncio.sleep(1.0 / offer_fps)

    async def consume(session: Any, which: int) -> None:
        while time.monotonic() < until:
            try:
                await asyncio.wait_for(session.next_output(), max(0.01, until - time.monotonic()))
            except asyncio.TimeoutError:
                return
            if time.monotonic() >= counting_from:
                counts[which] += 1

    try:
        await asyncio.gather(*(offer(s, 7 * i) for i, s in enumerate(sessions)),
                             *(consume(s, i) for i, s in enumerate(sessions)))
    finally:
        for session in sessions:
            session.close()
    per_stream = [count / seconds for count in counts]
    return {"fps": sum(per_stream), "min_stream_fps": min(per_stream), "max_stream_fps": max(per_stream)}


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
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        devices = parse_devices(args.devices)
        counts = [int(part) for part in args.sessions.split(",")]
        config = StreamConfig(t_index_list=parse_t_index_list(args.t_index_list), width=args.size,
                              height=args.size, cfg_type="self", guidance_scale=1.2)
        if not 0 < args.offer_fps <= 1000:
            raise ValueError(f"--offer-fps {args.offer_fps} is out of range; allowed: (0, 1000]")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cores = say_free_cores(len(devices)) if torch.device(devices[0]).type == "cpu" else None
    torch.set_num_threads(args.threads)
    biggest = max(counts)
    spec = ModelSpec(model=args.model, device=str(torch.device(devices[0]).type))
    one = Engine(EngineConfig(model=spec, stream=config, max_sessions=biggest, max_batch=biggest, idle_timeout=60))
    many = ReplicaEngine(EngineConfig(model=spec, stream=config, max_sessions=biggest * len(devices),
                                      max_batch=biggest, idle_timeout=60, devices=devices), threads=args.threads)
    one.load()
    single = asyncio.run(measure(args, one, counts))
    many.load()
    replicated = asyncio.run(measure(args, many, counts))

    rows = []
    print(f"\n{'streams':>7} {'one process fps':>15} {f'{len(devices)} replicas fps':>16} {'speedup':>7} "
          f"{'replica stream min/max':>22}")
    print("-" * 72)
    for a, b in zip(single, replicated):
        speedup = b["fps"] / a["fps"] if a["fps"] else float("nan")
        rows.append({"streams": a["streams"], "one": a, "replicas": b, "speedup": speedup})
        print(f"{a['streams']:>7} {a['fps']:>15.2f} {b['fps']:>16.2f} {speedup:>6.2f}x "
              f"{b['min_stream_fps']:>10.2f}/{b['max_stream_fps']:<10.2f}")
    print(f"\n{args.model} {args.size}x{args.size} t_index_list={args.t_index_list}, {args.threads} thread(s) per "
          f"process, devices {','.join(devices)}, torch {torch.__version__}")
    write_json(args.json, {"args": vars(args), "free_cores": cores, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
