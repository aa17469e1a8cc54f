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
import sys

from engine.cli import add_backend_argument
from engine.config import StreamConfig, parse_t_index_list
from engine.parallel.flags import write_json
from engine.quiet import quiet_libraries


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # the flags' values, checked before anything heavy loads
        ceiling_config = StreamConfig(t_index_list=(49,), width=args.ceiling_size, height=args.ceiling_size,
                                      cfg_type="none", prompt="")
        model_config = StreamConfig(t_index_list=parse_t_index_list(args.t_index_list), width=args.size,
                                    height=args.size, cfg_type="none", prompt="a watercolor painting")
        if min(args.ceiling_fps, args.offer_fps, args.window) <= 0 or args.rounds < 1:
            raise ValueError("--ceiling-fps, --offer-fps and --window must be positive, --rounds at least 1")
    except ValueError as error:
        print(f"python -m app.bench: error: {error}", file=sys.stderr)
        return 2
    quiet_libraries()
    from app.bench_windows import measure, single_stream  # the media stack and torch: after the flags are read
    from engine.bench import environment
    from engine.models import ModelSpec
    from engine.null_model import build_null
    from engine.runtime import Engine

    device = ModelSpec(device=args.device).resolved_device()
    ceiling = None
    if not args.skip_ceiling:
        print(f"transport ceiling: null model at {args.ceiling_size}², {args.ceiling_fps:.0f} fps offered",
              file=sys.stderr)
        # no model work to speed up: the ceiling stays on eager torch
        null = Engine(single_stream(ceiling_config, backend="torch", graphs=False), components=build_null(device))
        ceiling = asyncio.run(measure(null, args.ceiling_fps, args, barcode=True))
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
