"""Runtime benchmark: ``python -m engine.bench --runtime --preset small --sessions 1,2,4 --json out.json``.

For each session count S, S synthetic streams each offer frames at ``--offer-fps`` to one
:class:`engine.runtime.Engine` while consumers read the outputs. Reported per S: aggregate
output fps, per-session fps (min/max), submit-to-output latency p50/p95, drop rate, and the
bare-model floor for the same frames (S frames per UNet call, no runtime). Runtime windows
and floor chunks alternate so machine drift hits both alike. Latency counts only frames
submitted inside a window (frames left in flight across a floor chunk would count the pause).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.bench import Bench, bench_config, environment, write_json
from engine.models import ModelSpec, load_components
from engine.runtime import Engine, EngineConfig
from engine.session import Session
from engine.synthetic import moving_frames

ROUNDS = 2  # each S: (runtime window, floor chunk) x ROUNDS
FLOOR_CALLS = 4  # UNet calls per floor chunk


@dataclass
class StreamStats:
    outputs: int = 0
    latencies: list[float] = field(default_factory=list)


async def offer(session: Session, frames: list[np.ndarray], fps: float, until: float) -> None:
    """Submit frames at ``fps`` on a fixed schedule (no drift), until ``until``."""
    start, k = time.monotonic(), 0
    while time.monotonic() < until:
        session.submit(frames[k % len(frames)], pts=k)
        k += 1
        await asyncio.sleep(max(0.0, start + k / fps - time.monotonic()))


async def consume(session: Session, stats: StreamStats, counting_from: float, until: float) -> None:
    while time.monotonic() < until:
        try:
            output = await asyncio.wait_for(session.next_output(), timeout=max(0.01, until - time.monotonic()))
        except asyncio.TimeoutError:
            return
        now = time.monotonic()
        if now >= counting_from:
            stats.outputs += 1
            if now - output.latency >= counting_from:
                stats.latencies.append(output.latency)


async def runtime_window(engine: Engine, sessions: list[Session], frames: list[list[np.ndarray]],
                         fps: float, warmup: float, seconds: float) -> tuple[list[StreamStats], dict]:
    """Run all streams for ``warmup + seconds``; stats cover the last ``seconds`` only."""
    before = {s.id: (s.metrics.frames_in, s.metrics.dropped) for s in sessions}
    start = time.monotonic()
    counting_from, until = start + warmup, start + warmup + seconds
    stats = [StreamStats() for _ in sessions]
    await asyncio.gather(*(offer(s, f, fps, until) for s, f in zip(sessions, frames)),
                         *(consume(s, st, counting_from, until) for s, st in zip(sessions, stats)))
    offered = sum(s.metrics.frames_in - before[s.id][0] for s in sessions)
    dropped = sum(s.metrics.dropped - before[s.id][1] for s in sessions)
    return stats, {"offered": offered, "dropped": dropped}


async def measure(bench: Bench, components, args: argparse.Namespace, streams: int) -> dict:
    config = EngineConfig(model=ModelSpec(args.preset), stream=bench.config, max_sessions=streams, backend=args.backend,
                          max_batch=streams, idle_timeout=60)
    size = bench.config.width
    frames = [moving_frames(60, size, size)[s * 7:] + moving_frames(60, size, size)[: s * 7] for s in range(streams)]
    totals = [StreamStats() for _ in range(streams)]
    runtime_seconds, offered, dropped, floor_frames, floor_seconds = 0.0, 0, 0, 0, 0.0
    async with Engine(config, components=components) as engine:
        sessions = [await engine.open_session(prompt=f"style {s}", seed=s) for s in range(streams)]
        window = args.duration / ROUNDS
        for round_index in range(ROUNDS):
            warmup = args.warmup if round_index == 0 else min(1.0, args.warmup)
            stats, counts = await runtime_window(engine, sessions, frames, args.offer_fps, warmup, window)
            runtime_seconds += window
            offered, dropped = offered + counts["offered"], dropped + counts["dropped"]
            for total, st in zip(totals, stats):
                total.outputs += st.outputs
                total.latencies += st.latencies
            while not engine.idle:  # the floor must not share the CPU with a round still running
                await asyncio.sleep(0.01)
            floor_input = [f for group in zip(*frames) for f in group][: streams * FLOOR_CALLS]
            floor_frames += await asyncio.to_thread(bench.floor, floor_input, streams)
            floor_seconds += bench.last_elapsed
        histogram = engine.snapshot()["batch_size_histogram"]
    session_fps = [t.outputs / runtime_seconds for t in totals]
    latencies = np.array([x for t in totals for x in t.latencies]) * 1000
    result = {
        "sessions": streams,
        "runtime_fps": sum(session_fps),
        "floor_fps": floor_frames / floor_seconds,
        "min_session_fps": min(session_fps),
        "max_session_fps": max(session_fps),
        "latency_ms_p50": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "latency_ms_p95": float(np.percentile(latencies, 95)) if len(latencies) else None,
        "drop_rate": dropped / max(offered, 1),
        "offered_fps_per_session": args.offer_fps,
        "batch_size_histogram": histogram,
    }
    result["runtime_over_floor"] = result["runtime_fps"] / result["floor_fps"]
    result["min_session_over_fair_share"] = result["min_session_fps"] / (result["runtime_fps"] / streams)
    return result


def print_table(results: list[dict], summary: dict) -> None:
    print(f"\n{'S':>2} {'runtime fps':>11} {'floor fps':>9} {'÷ floor':>7} {'session min/max':>15} "
          f"{'lat p50/p95 ms':>15} {'drops':>6}")
    print("-" * 72)
    for r in results:
        print(f"{r['sessions']:>2} {r['runtime_fps']:>11.2f} {r['floor_fps']:>9.2f} {r['runtime_over_floor']:>7.2f} "
              f"{r['min_session_fps']:>7.2f}/{r['max_session_fps']:<7.2f} "
              f"{r['latency_ms_p50']:>7.0f}/{r['latency_ms_p95']:<7.0f} {r['drop_rate']:>6.0%}")
    env, config = summary["environment"], summary["config"]
    print(f"\n{config['preset']} {config['width']}x{config['height']} t_index_list={config['t_index_list']} "
          f"cfg={config['cfg_type']}, {config['offer_fps']:.0f} fps offered per stream | "
          f"torch {env['torch']} on {env['device']}, {env['threads']} threads")


def main(args: argparse.Namespace) -> int:
    config = bench_config(args)
    components = load_components(ModelSpec(model=args.preset, device=args.device))
    bench = Bench(components, None, config)
    counts = [int(x) for x in args.sessions.split(",") if x.strip()]
    results = []
    for streams in counts:
        print(f"measuring S={streams} for {args.duration:.0f} s ...", file=sys.stderr)
        results.append(asyncio.run(measure(bench, components, args, streams)))
    summary = {
        "results": results,
        "config": {**asdict(config), "preset": args.preset, "offer_fps": args.offer_fps, "duration": args.duration},
        "environment": environment(components.device),
    }
    print_table(results, summary)
    write_json(args.json, summary)
    return 0
