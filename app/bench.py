"""App benchmark: ``python -m app.bench --json out.json``.

Two measurements, each alternating app windows (a real aiortc client streaming to the
server over loopback WebRTC) with runtime-alone windows (the same engine fed directly):

- transport ceiling: the ``null`` model (no model work, see :mod:`engine.null_model`) at
  512×512 — fps through decode → engine plumbing → encode, and the glass-to-glass latency
  read from a frame-index barcode that survives the null model;
- the ``small`` preset at 256×256: app fps versus runtime fps, and latency.

The app runs without the Gradio page (``--no-ui``, the default here: the client only needs
``/offer``), so the benchmark runs where Gradio is not installed. On a GPU, for example::

    python -m app.bench --skip-ceiling --model sd-turbo-random --device cuda --size 512 --t-index-list 32,45
"""

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
from engine.bench import environment
from engine.bench_runtime import StreamStats, runtime_window
from engine.cli import add_backend_argument
from engine.config import StreamConfig
from engine.models import ModelSpec
from engine.null_model import build_null
from engine.parallel.flags import write_json
from engine.quiet import quiet_libraries
from engine.runtime import Engine, EngineConfig
from engine.synthetic import moving_frames

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ceiling-size", type=int, default=512)
    parser.add_argument("--ceiling-fps", type=float, default=90.0, help="frames/s the client offers for the ceiling")
    parser.add_argument("--model", default="small", help="preset for the app-vs-runtime measurement")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    add_backend_argument(parser)
    parser.add_argument("--ui", action=argparse.BooleanOptionalAction, default=False,
                        help="mount the Gradio page too (default --no-ui: the client only needs /offer)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--t-index-list", default="0,16,32,45")
    parser.add_argument("--offer-fps", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=8.0, help="seconds per measured window")
    parser.add_argument("--rounds", type=int, default=2, help="app/runtime window pairs per measurement")
    parser.add_argument("--skip-ceiling", action="store_true", help="only the app-vs-runtime measurement")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    from engine.config import parse_t_index_list

    device = ModelSpec(device=args.device).resolved_device()
    ceiling_config = StreamConfig(t_index_list=(49,), width=args.ceiling_size, height=args.ceiling_size,
                                  cfg_type="none", prompt="")
    ceiling = None
    if not args.skip_ceiling:
        print(f"transport ceiling: null model at {args.ceiling_size}², {args.ceiling_fps:.0f} fps offered",
              file=sys.stderr)
        # no model work to speed up: the ceiling stays on eager torch
        null = Engine(single_stream(ceiling_config, backend="torch", graphs=False), components=build_null(device))
        ceiling = asyncio.run(measure(null, args.ceiling_fps, args, barcode=True))
    model_config = StreamConfig(t_index_list=parse_t_index_list(args.t_index_list), width=args.size,
                                height=args.size, cfg_type="none", prompt="a watercolor painting")
    model = Engine(single_stream(model_config, model=ModelSpec(model=args.model, device=args.device),
                                 backend=args.backend), progress=lambda stage: print(f"  {stage}", file=sys.stderr))
    print(f"app vs runtime: {args.model} at {args.size}² on {device}, backend {args.backend}, "
          f"{args.offer_fps:.0f} fps offered (loading and preparing first)", file=sys.stderr)
    with_model = asyncio.run(measure(model, args.offer_fps, args, barcode=False))
    summary = {"transport_ceiling": ceiling and {**ceiling, "size": args.ceiling_size, "offered_fps": args.ceiling_fps},
               "model": {**with_model, "preset": args.model, "size": args.size, "offered_fps": args.offer_fps,
                         "t_index_list": args.t_index_list, "backend": model.backend},
               "window_s": args.window, "rounds": args.rounds, "environment": environment(device)}
    print_table(summary)
    write_json(args.json, summary)
    return 0


def print_table(summary: dict) -> None:
    """One row per measurement: fps through the app and the runtime alone, and where latency goes."""
    rows = []
    c, m = summary["transport_ceiling"], summary["model"]
    if c:
        rows.append((f"null {c['size']}² @{c['offered_fps']:.0f}", c["app_fps"], c["runtime_fps"],
                     c["app_over_runtime"], c["app_server_latency_ms_p50"], c["runtime_latency_ms_p50"],
                     c["glass_to_glass_ms_p50"]))
    rows.append((f"{m['preset']} {m['size']}² @{m['offered_fps']:.0f}", m["app_fps"], m["runtime_fps"],
                 m["app_over_runtime"], m["app_server_latency_ms_p50"], m["runtime_latency_ms_p50"], None))
    header = ("model, offered fps", "app fps", "runtime fps", "app÷rt", "server p50 ms", "runtime p50 ms",
              "glass p50 ms")
    print("\n" + "  ".join(f"{h:>14}" if i else f"{h:<22}" for i, h in enumerate(header)))
    for name, *values in rows:
        cells = [f"{v:>14.2f}" if i < 3 else f"{'-' if v is None else f'{v:.0f}':>14}" for i, v in enumerate(values)]
        print(f"{name:<22}  " + "  ".join(cells))
    env = summary["environment"]
    print(f"torch {env['torch']} on {env['device']}, {env['threads']} threads, backend {m['backend']}; "
          "server p50: submit to output inside the app; glass: camera to client screen (barcoded frames)")

if __name__ == "__main__":
    sys.exit(main())
