"""The app benchmark's windows (:mod:`app.bench`): the app around an engine with a WebRTC client in another
process, and the same engine fed directly, alternating on one engine."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import uvicorn

from app.serve import SHUTDOWN_SECONDS, engine_app
from engine.bench_runtime import StreamStats, runtime_window
from engine.config import StreamConfig
from engine.runtime import Engine, EngineConfig
from engine.synthetic import moving_frames


async def app_window(engine: Engine, fps: float, warmup: float, seconds: float, barcode: bool, ui: bool) -> dict:
    """The app around ``engine`` on 127.0.0.1 and a client streaming to it from another process, niced.

    The client stands in for a browser on another machine: run niced, its encoder and decoder
    only take CPU the server leaves idle, as they would not be on the server at all.
    """
    config = engine.config.stream
    app = engine_app(engine, ui=ui, start_engine=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "client.json"
        command = [sys.executable, "-m", "app.client", "--url", f"http://127.0.0.1:{port}", "--fps", str(fps),
                   "--size", str(config.width), "--warmup", str(warmup), "--seconds", str(seconds),
                   "--json", str(out), *(["--barcode"] if barcode else [])]
        try:
            client = await asyncio.create_subprocess_exec(*command, preexec_fn=lambda: os.nice(19),
                                                          stdout=asyncio.subprocess.DEVNULL)
            server_latency = await _watch_latency(engine, client, warmup + seconds + 60)
            result = json.loads(out.read_text())
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 20)
    if "error" in result:
        raise RuntimeError(f"the benchmark client failed: {result['error']}")
    return {**result, "server_latency_ms_p50": server_latency.get("p50")}


async def _watch_latency(engine: Engine, client: asyncio.subprocess.Process, timeout: float) -> dict:
    """Wait for the client to finish; meanwhile keep the session's latest submit-to-output latency."""
    latest: dict = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while client.returncode is None:
        sessions = engine.snapshot()["sessions"]
        if sessions:
            latest = next(iter(sessions.values()))["latency_ms"]
        if loop.time() > deadline:
            client.kill()
            raise RuntimeError("the benchmark client did not finish in time")
        try:
            await asyncio.wait_for(client.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
    return latest


async def runtime_alone(engine: Engine, fps: float, warmup: float, seconds: float) -> dict:
    config = engine.config.stream
    session = await engine.open_session()
    try:
        frames = [moving_frames(30, config.height, config.width)]
        stats, _ = await runtime_window(engine, [session], frames, fps, warmup, seconds)
    finally:
        session.close()
    st: StreamStats = stats[0]
    return {"fps": st.outputs / seconds, "latencies": st.latencies}


async def measure(engine: Engine, fps: float, args: argparse.Namespace, barcode: bool) -> dict:
    """App and runtime-alone windows, alternating, on ONE engine: both see the same compiled, captured model."""
    async with engine:
        return await _alternate(engine, fps, args, barcode)


async def _alternate(engine: Engine, fps: float, args: argparse.Namespace, barcode: bool) -> dict:
    app_fps, runtime_fps, app_lat, runtime_lat, server_lat = [], [], [], [], []
    for round_index in range(args.rounds):
        warmup = 3.0 if round_index == 0 else 2.0
        app = await app_window(engine, fps, warmup, args.window, barcode, args.ui)
        alone = await runtime_alone(engine, fps, warmup, args.window)
        print(f"  round {round_index + 1}: app {app['fps']:.1f} fps, runtime {alone['fps']:.1f} fps", file=sys.stderr)
        app_fps.append(app["fps"])
        runtime_fps.append(alone["fps"])
        app_lat += app.get("latencies", [])
        runtime_lat += alone["latencies"]
        server_lat.append(app["server_latency_ms_p50"])
    result = {"app_fps": float(np.mean(app_fps)), "runtime_fps": float(np.mean(runtime_fps)),
              "runtime_latency_ms_p50": _p(runtime_lat, 50), "runtime_latency_ms_p95": _p(runtime_lat, 95),
              "app_server_latency_ms_p50": float(np.mean([x for x in server_lat if x is not None] or [0]))}
    result["app_over_runtime"] = result["app_fps"] / result["runtime_fps"]
    if barcode:
        result["glass_to_glass_ms_p50"] = _p(app_lat, 50)
        result["glass_to_glass_ms_p95"] = _p(app_lat, 95)
        result["added_latency_ms_p50"] = result["glass_to_glass_ms_p50"] - result["runtime_latency_ms_p50"]
    return result


def _p(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.array(values) * 1000, q)) if values else None


def single_stream(config: StreamConfig, **options) -> EngineConfig:
    return EngineConfig(stream=config, max_sessions=1, idle_timeout=30, shutdown_timeout=SHUTDOWN_SECONDS, **options)
