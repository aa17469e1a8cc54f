"""``python -m trt_build``: export the UNet and VAE to ONNX, check them, build the TensorRT engines.

    python -m trt_build --model stabilityai/sd-turbo --max-sessions 4      # engines into the cache
    python -m trt_build --model tiny --onnx-only --out onnx/ --check       # no GPU needed

Without ``--onnx-only`` it needs TensorRT 10+ and a CUDA GPU, and says so when either is missing.
``python app/main.py --trt`` runs the same steps (cached engines are reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.cli import HelpFormatter, add_model_arguments, model_spec
from engine.config import CFG_TYPES, StreamConfig, parse_t_index_list
from engine.models import ModelUnavailableError, load_components
from engine.presets import PRESETS
from engine.quiet import quiet_libraries
from engine.runtime import EngineConfig
from trt_build.cache import EngineCache
from trt_build.check import compare_with_torch
from trt_build.pipeline import (BuildPlan, build_engines, onnx_tools_missing, prepare_onnx,
                                tensorrt_missing)
from trt_build.shapes import Range, ShapeProfile

CHECK_TOLERANCE = 1e-3  # relative to the output's largest magnitude; fp32 exports agree to ~1e-6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trt_build", description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(parser.add_argument_group("model"))
    shape = parser.add_argument_group("shapes (must match how the app will run)")
    shape.add_argument("--width", type=int, default=None, help="output width in pixels (default: 512, or a preset's own)")
    shape.add_argument("--height", type=int, default=None, help="output height (default: 512, or a preset's own)")
    shape.add_argument("--t-index-list", default="32,45", help="denoising steps; only their count matters here")
    shape.add_argument("--cfg-type", default="self", choices=CFG_TYPES, help="residual CFG variant (sets UNet rows)")
    shape.add_argument("--max-sessions", type=int, default=4, help="streams sharing one UNet call, at most")
    shape.add_argument("--min-size", type=int, default=None, help="smallest side for a dynamic-resolution engine")
    shape.add_argument("--max-size", type=int, default=None, help="largest side for a dynamic-resolution engine")
    out = parser.add_argument_group("output")
    out.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export (no TensorRT needed)")
    out.add_argument("--out", default="onnx", help="folder for the ONNX files with --onnx-only")
    out.add_argument("--check", action="store_true", help="compare each ONNX graph with torch on onnxruntime")
    out.add_argument("--cache", default=None, help="engine cache folder (default: $DIFFCAM_CACHE/engines or "
                                                  "~/.cache/diffcam/engines)")
    out.add_argument("--fp32", action="store_true", help="build fp32 engines (default: fp16)")
    out.add_argument("--json", default=None, help="also write the report as JSON here")
    return parser


def profile_from_args(args: argparse.Namespace) -> tuple[StreamConfig, ShapeProfile]:
    size = PRESETS[args.model].default_size if args.model in PRESETS else 512
    config = StreamConfig(t_index_list=parse_t_index_list(args.t_index_list), cfg_type=args.cfg_type,
                          width=args.width or size, height=args.height or size)
    if (args.min_size is None) != (args.max_size is None):
        raise ValueError("--min-size and --max-size go together (a dynamic-resolution engine needs both)")
    sides = {}
    if args.min_size is not None:
        for name in ("height", "width"):
            sides[name] = Range(args.min_size, getattr(config, name), args.max_size)
    # streams per call exactly as --trt counts them, so it finds these engines in the cache
    sessions = EngineConfig(stream=config, max_sessions=args.max_sessions).sessions_per_call
    return config, ShapeProfile.for_stream(config, sessions, **sides)


def export_all(plan: BuildPlan, folder: Path, check: bool) -> list[dict]:
    """Export and clean every part into ``folder``; with ``check``, compare each with torch."""
    rows = []
    for part, spec in plan.specs().items():
        started = time.perf_counter()
        report = prepare_onnx(spec, folder / f"{part}.onnx", plan.components.device)
        row = {"part": part, "onnx": str(report.path), "nodes_exported": report.nodes_before,
               "nodes_cleaned": report.nodes_after, "seconds": time.perf_counter() - started}
        if check:
            agreements = compare_with_torch(spec, report.path)
            row["max_relative_error"] = max(a.relative_error for a in agreements)
            row["shapes_checked"] = [a.shape for a in agreements]
        rows.append(row)
        print(_row_text(row), file=sys.stderr)
    return rows


def _row_text(row: dict) -> str:
    text = f"  {row['part']:<12} {row['nodes_exported']:>5} → {row['nodes_cleaned']:>5} nodes  {row['seconds']:6.1f} s"
    if "max_relative_error" in row:
        text += f"  max rel. error vs torch {row['max_relative_error']:.1e} ({'/'.join(row['shapes_checked'])})"
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config, profile = profile_from_args(args)
        if args.onnx_only and (missing := onnx_tools_missing()) is not None:
            raise ValueError(f"exporting needs {missing}")
        if not args.onnx_only and (missing := tensorrt_missing()) is not None:
            raise ValueError(f"building engines needs {missing}; --onnx-only exports without them")
        quiet_libraries()
        components = load_components(model_spec(args))
        plan = BuildPlan(components, profile, model=args.model, lora=args.lcm_lora, fp16=not args.fp32,
                         cache=EngineCache(Path(args.cache) if args.cache else None))
        plan.specs()  # validates the sizes against the model before any work
    except (ValueError, ModelUnavailableError) as error:
        print(f"trt_build: {error}", file=sys.stderr)
        return 2
    print(f"{components.name}: {profile.describe()}, {plan.precision}", file=sys.stderr)
    report: dict = {"model": args.model, "profile": profile.describe(), "precision": plan.precision}
    if args.onnx_only:
        report["parts"] = export_all(plan, Path(args.out), args.check)
        failed = [r["part"] for r in report["parts"] if r.get("max_relative_error", 0) > CHECK_TOLERANCE]
    else:
        engines = build_engines(plan, progress=lambda stage: print(f"  {stage}", file=sys.stderr))
        report["engines"] = {part: str(path) for part, path in engines.items()}
        print("\n".join(f"  {part:<12} {path}" for part, path in engines.items()))
        failed = []
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if failed:
        print(f"trt_build: {failed} differ from torch by more than {CHECK_TOLERANCE:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
