"""The GPU check's one table: how each step ended, the numbers the GPU-path issue targets, and the rest.

``python3 .ci/gpu_table.py gpu-out`` reads what ``.ci/gpu-check`` left there; exits non-zero when a
step failed (a missed speed target is reported, not an error: targets are for people to read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def steps(folder: Path) -> list[tuple[str, int, int]]:
    path = folder / "steps.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(name, int(rc), int(seconds)) for name, rc, seconds in (line.split() for line in lines)]


def rows(folder: Path) -> list[tuple[str, str, str]]:
    """(what, measured, target) rows from whichever benchmarks produced results."""
    out: list[tuple[str, str, str]] = []
    runtime = load(folder, "bench-runtime.json")
    if runtime:
        by_s = {r["sessions"]: r for r in runtime["results"]}
        out.append(("engine start (load, compile, capture)", f"{runtime['start_seconds']:.0f} s", ""))
        for s, r in sorted(by_s.items()):
            out.append((f"runtime, {s} stream(s), {runtime['config']['backend']}",
                        f"{r['runtime_fps']:.1f} fps (floor {r['floor_fps']:.1f}, min share "
                        f"{r['min_session_over_fair_share']:.2f}, p50 {r['latency_ms_p50'] or 0:.0f} ms)",
                        {1: ">= 150 fps", 8: ">= 300 fps, share >= 0.8"}.get(s, "")))
    app = load(folder, "bench-app.json")
    if app:
        m = app["model"]
        out.append((f"app over WebRTC, 1 stream, {m['backend']}",
                    f"{m['app_fps']:.1f} fps = {m['app_over_runtime']:.2f} x runtime {m['runtime_fps']:.1f}",
                    ">= 0.85 x runtime"))
    for name, label in (("bench-stream-1.json", "1 step"), ("bench-stream-4.json", "4 steps")):
        stream = load(folder, name)
        if stream:
            methods = [k[: -len("_fps")] for k in stream if k.endswith("_fps")]
            cells = ", ".join(f"{m} {stream[f'{m}_fps']:.1f}" for m in methods)
            out.append((f"stream, {label}", cells + " fps", "record" if label == "4 steps" else ""))
    components = load(folder, "bench-components.json")
    if components:
        for r in components["rows"]:
            per = " / ".join(f"{ms:.2f}" for ms in r["component_ms"])
            predicted = ", ".join(f"{name} {x:.2f}x" for name, x in r["predicted_speedup"].items())
            out.append((f"UNet cut in {r['k']}, {r['steps']} step(s)",
                        f"whole {r['whole_ms']:.2f} ms, parts {per} ms; predicted on {r['k']} GPUs: {predicted}",
                        "record"))
    return out


def main(folder: Path) -> int:
    device = (folder / "device.txt").read_text().strip() if (folder / "device.txt").exists() else "unknown device"
    ran = steps(folder)
    print(f"\n=== GPU check: {device}")
    print("steps: " + ", ".join(f"{n} {'ok' if rc == 0 else 'TIMED OUT' if rc in (124, 137) else f'FAILED ({rc})'}"
                                f" {s} s" for n, rc, s in ran))
    table = rows(folder)
    width = max([len(what) for what, _, _ in table] + [10])
    for what, measured, target in table:
        print(f"{what:<{width}}  {measured}" + (f"   [target {target}]" if target else ""))
    return 0 if ran and all(rc == 0 for _, rc, _ in ran) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-out")))
