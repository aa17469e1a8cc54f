"""Stylize a video file (or a synthetic clip) headlessly: ``python -m app.stylize --help``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from tqdm import tqdm

from engine.quiet import quiet_libraries
from engine.config import StreamConfig, parse_t_index_list, strength_to_t_index_list
from engine.backends import backend_missing, resolve_backend
from engine.components import Components
from engine.graphs import stream_runner
from engine.cli import add_backend_argument, add_model_arguments, model_spec
from engine.models import ModelUnavailableError, load_components
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frame


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.stylize",
        description="Run a video through diffcam's stream-batch img2img and write the stylized video.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    add_backend_argument(parser)
    parser.add_argument("--input", default="synthetic", help="a video file, or 'synthetic' for a generated clip")
    parser.add_argument("--output", default="out/stylized.mp4", help="where to write the result (.mp4 or .avi)")
    parser.add_argument("--frames", type=int, default=120, help="stop after this many input frames")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--prompt", default="a watercolor painting, vivid colors")
    parser.add_argument("--negative-prompt", default="blurry, low quality")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--strength", type=float, default=None, help="0 keeps the input, 1 re-imagines it")
    steps.add_argument("--t-index-list", default="32,45", help="steps out of --num-inference-steps, e.g. 0,16,32,45")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps when --strength is given")
    parser.add_argument("--cfg-type", default="self", choices=["none", "full", "self", "initialize"])
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (RCFG applies above 1)")
    parser.add_argument("--delta", type=float, default=1.0, help="RCFG stock-noise multiplier")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--similarity-filter", action="store_true", help="skip near-duplicate frames")
    parser.add_argument("--similarity-threshold", type=float, default=0.98)
    return parser.parse_args(argv)


def stream_config(args: argparse.Namespace) -> StreamConfig:
    if args.strength is not None:
        t_index_list = strength_to_t_index_list(args.strength, args.steps, args.num_inference_steps)
    else:
        t_index_list = parse_t_index_list(args.t_index_list)
    return StreamConfig(
        t_index_list=t_index_list, num_inference_steps=args.num_inference_steps, width=args.width,
        height=args.height, cfg_type=args.cfg_type, guidance_scale=args.guidance, delta=args.delta,
        seed=args.seed, prompt=args.prompt, negative_prompt=args.negative_prompt,
        similarity_filter=args.similarity_filter, similarity_threshold=args.similarity_threshold,
    )


def read_frames(source: str, limit: int, height: int, width: int) -> tuple[Iterator[np.ndarray], float]:
    """RGB frames from a video file, or the synthetic clip; and the frame rate."""
    if source == "synthetic":
        return (moving_frame(i, height, width) for i in range(limit)), 30.0
    if not Path(source).is_file():
        raise FileNotFoundError(f"input video {source!r} does not exist")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise ValueError(f"input {source!r} is not a video OpenCV can read")
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0

    def frames() -> Iterator[np.ndarray]:
        try:
            for _ in range(limit):
                ok, bgr = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return frames(), fps


def stylize(stream: StreamDiffusion, frames: Iterator[np.ndarray], writer: cv2.VideoWriter, total: int) -> int:
    """Feed every frame, then drain the ``n - 1`` frames still in flight; returns frames written."""
    written, last = 0, None
    for frame in tqdm(frames, total=total, unit="frame", desc="stylizing"):
        last = frame
        written += _write(writer, stream(frame))
    for _ in range(stream.steps - 1 if last is not None else 0):
        written += _write(writer, stream(last))
    return written


def fast_stream(components: Components, config: StreamConfig, backend: str) -> StreamDiffusion:
    """The stream on ``backend``, its call captured as a CUDA graph on a GPU (this one thread owns the device)."""
    runner = stream_runner(components, config, resolve_backend(backend, components.device),
                           graphs=components.device.type == "cuda")
    return StreamDiffusion(components, config, runner=runner)


def _write(writer: cv2.VideoWriter, frame: np.ndarray | None) -> int:
    if frame is None:
        return 0
    writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        config = stream_config(args)
        frames, fps = read_frames(args.input, args.frames, args.height, args.width)
        missing = backend_missing(args.backend, model_spec(args).resolved_device())
        if missing is not None:
            raise ValueError(f"--backend {args.backend} needs {missing}")
        stream = fast_stream(load_components(model_spec(args)), config, args.backend)
    except (ValueError, RuntimeError, FileNotFoundError, ModelUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    components = stream.components
    print(f"model {components.name} on {components.device} ({components.dtype}), "
          f"backend {resolve_backend(args.backend, components.device)}, "
          f"{config.width}x{config.height}, "
          f"t_index_list={config.t_index_list}, cfg={config.cfg_type}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fourcc = cv2.VideoWriter_fourcc(*("mp4v" if output.suffix == ".mp4" else "MJPG"))
    writer = cv2.VideoWriter(str(output), fourcc, fps, (config.width, config.height))
    started = time.perf_counter()
    try:
        written = stylize(stream, frames, writer, args.frames)
    finally:
        writer.release()
    elapsed = time.perf_counter() - started
    print(f"wrote {written} frames to {output} ({written / max(elapsed, 1e-9):.1f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
