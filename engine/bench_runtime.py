"""Runtime benchmark: ``python -m engine.bench --runtime --preset small --sessions 1,2,4 --json out.json``.

For each session count S, S synthetic streams each offer frames at ``--offer-fps`` to one
:class:`engine.runtime.Engine` while consumers read the outputs. Reported per S: aggregate
output fps, per-session fps (min/max), submit-to-output latency p50/p95, drop rate, and the
floor: the same calls (S streams each) run back to back on the device's worker with no
runtime around them, through the same backend and graphs. Runtime windows and floor chunks
alternate so machine drift hits both alike, and the floor is warmed up before its first
chunk. Latency counts only frames submitted inside a window.

One engine serves every S (loaded, compiled and captured once, for up to the largest S
streams per call), fewest streams first; ``--json`` is rewritten after each S, so a run stopped
part-way keeps what it measured. Offer far more frames than the model can take
(``--offer-fps 400`` on a GPU) to measure capacity rather than the offered rate.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from engine.batch import FrameJob, run_jobs
from engine.bench import bench_config, environment
from engine.config import StreamConfig
from engine.models import ModelSpec
from engine.parallel.flags import write_json
from engine.runtime import Engine, EngineConfig
from engine.session import Session
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frames
from engine.worker import DeviceModel

ROUNDS = 2  # each S: (runtime window, floor chunk) x ROUNDS


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


async def fill(sessions: list[Session], frames: list[list[np.ndarray]], fps: float, timeout: float = 300.0) -> None:
    """Stream until every session has delivered an output: its pipeline (``n - 1`` calls) is full.

    A fixed warm-up is too short where calls are slow, and the first window would then count
    the filling as lost output.
    """
    until = time.monotonic() + timeout
    offering = [asyncio.create_task(offer(s, f, fps, until)) for s, f in zip(sessions, frames)]
    try:
        await asyncio.wait_for(asyncio.gather(*(s.next_output() for s in sessions)), timeout)
    finally:
        for task in offering:
            task.cancel()
        await asyncio.gather(*offering, return_exceptions=True)


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


async def measure(engine: Engine, args: argparse.Namespace, streams: int) -> dict:
    config, size = engine.config.stream, engine.config.stream.width
    frames = [moving_frames(60, size, size)[s * 7:] + moving_frames(60, size, size)[: s * 7] for s in range(streams)]
    floor_input = [own[: args.floor_calls] for own in frames]
    totals = [StreamStats() for _ in range(streams)]
    runtime_seconds, offered, dropped, floor_frames, floor_seconds = 0.0, 0, 0, 0, 0.0
    calls_before = dict(engine.snapshot()["batch_size_histogram"])
    await engine.run_on_device(floor_calls(config, floor_input, calls=2))  # warm-up: first calls of a size are slow
    sessions = [await engine.open_session(prompt=f"style {s}", seed=s) for s in range(streams)]
    try:
        await fill(sessions, frames, args.offer_fps)
        window = args.duration / ROUNDS
        for round_index in range(ROUNDS):
            warmup = args.warmup if round_index == 0 else min(1.0, args.warmup)
            stats, counts = await runtime_window(engine, sessions, frames, args.offer_fps, warmup, window)
            runtime_seconds += window
            offered, dropped = offered + counts["offered"], dropped + counts["dropped"]
            for total, st in zip(totals, stats):
                total.outputs += st.outputs
                total.latencies += st.latencies
            while not engine.idle:  # the floor must not share the device with a round still running
                await asyncio.sleep(0.01)
            elapsed = await engine.run_on_device(floor_calls(config, floor_input, args.floor_calls))
            floor_frames, floor_seconds = floor_frames + streams * args.floor_calls, floor_seconds + elapsed
    finally:
        for session in sessions:
            session.close()
    histogram = {k: v - calls_before.get(k, 0) for k, v in engine.snapshot()["batch_size_histogram"].items()}
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
        "batch_size_histogram": {k: v for k, v in histogram.items() if v},
    }
    result["runtime_over_floor"] = result["runtime_fps"] / result["floor_fps"]
    result["min_session_over_fair_share"] = result["min_session_fps"] / (result["runtime_fps"] / streams)
    return result


def floor_calls(config: StreamConfig, frames: list[list[np.ndarray]], calls: int) -> Callable[[DeviceModel], float]:
    """A worker request: ``calls`` calls of ``len(frames)`` streams of its own, back to back; the seconds they took."""
    def run(model: DeviceModel) -> float:
        streams = [StreamDiffusion(model.components, config.with_updates(prompt=f"style {s}", seed=s),
                                   runner=model.runner, prompts=model.prompts) for s in range(len(frames))]
        try:
            started = time.perf_counter()
            for k in range(calls):
                run_jobs([FrameJob(stream, own[k % len(own)]) for stream, own in zip(streams, frames)], model.runner)
            return time.perf_counter() - started  # every call ends with its outputs on the host: no sync missing
        finally:
            for stream in streams:
                stream.close()

    return run


def engine_for(args: argparse.Namespace, config: StreamConfig, streams: int) -> Engine:
    """One engine for every session count: up to ``streams`` per call, and slots for the floor's streams too."""
    spec = ModelSpec(model=args.preset, device=args.device)
    return Engine(EngineConfig(model=spec, stream=config, backend=args.backend, max_sessions=2 * streams,
                               max_batch=streams, idle_timeout=60),
                  progress=lambda stage: print(f"  {stage}", file=sys.stderr))


async def measure_all(args: argparse.Namespace, config: StreamConfig, counts: list[int]) -> dict:
    """The record of every S in ``counts``, measured in that order on one engine. ``--json`` is rewritten once the
    engine is ready and after each S, so a run cut short (gpu-check's time limits) keeps the S it measured."""
    engine = engine_for(args, config, max(counts))
    started = time.perf_counter()
    await asyncio.to_thread(engine.load)  # load, compile every call size, capture: what a user waits for
    start_seconds = time.perf_counter() - started
    print(f"engine ready in {start_seconds:.1f} s", file=sys.stderr)
    async with engine:
        results: list[dict] = []
        summary = {
            "results": results,
            "config": {**asdict(config), "preset": args.preset, "offer_fps": args.offer_fps,
                       "duration": args.duration, "backend": engine.backend},
            "start_seconds": start_seconds,
            "environment": environment(engine.components.device),
        }
        write_json(args.json, summary)
        for streams in counts:
            print(f"measuring S={streams} for {args.duration:.0f} s ...", file=sys.stderr)
            results.append(await measure(engine, args, streams))
            write_json(args.json, summary)
        return summary


def print_table(summary: dict) -> None:
    print(f"\n{'S':>2} {'runtime fps':>11} {'floor fps':>9} {'÷ floor':>7} {'session min/max':>15} "
          f"{'lat p50/p95 ms':>15} {'drops':>6}")
    print("-" * 72)
    for r in summary["results"]:
        p50, p95 = (f"{r[key]:.0f}" if r[key] is not None else "-" for key in ("latency_ms_p50", "latency_ms_p95"))
        print(f"{r['sessions']:>2} {r['runtime_fps']:>11.2f} {r['floor_fps']:>9.2f} {r['runtime_over_floor']:>7.2f} "
              f"{r['min_session_fps']:>7.2f}/{r['max_session_fps']:<7.2f} {p50:>7}/{p95:<7} {r['drop_rate']:>6.0%}")
    env, config = summary["environment"], summary["config"]
    print(f"\n{config['preset']} {config['width']}x{config['height']} t_index_list={config['t_index_list']} "
          f"cfg={config['cfg_type']}, backend {config['backend']} (ready in {summary['start_seconds']:.0f} s), "
          f"{config['offer_fps']:.0f} fps offered per stream | "
          f"torch {env['torch']} on {env['device']}, {env['threads']} threads")


def main(args: argparse.Namespace) -> int:
    config = bench_config(args)
    counts = sorted({int(x) for x in args.sessions.split(",") if x.strip()})  # fewest first: cheapest, and S=1 leads
    print_table(asyncio.run(measure_all(args, config, counts)))
    return 0
