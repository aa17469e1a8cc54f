"""Stylize a video file (or a synthetic clip) headlessly: ``python -m app.stylize --help``.

The path of a frame: :mod:`app.media` reads the input (turned upright, sized for the model,
keeping its aspect ratio); the stream stylizes it (:mod:`app.stylizer`); :mod:`app.media` writes
it at the input's timestamp in a codec browsers play, with the input's audio copied through.

With ``--devices`` naming several (``--parallel asyncdiff``), the stream is a
:class:`~engine.parallel.sharded.ShardedStream`, its UNet cut over one process per device, driven
two calls deep (:class:`~app.stylizer.TwoInFlight`); the frames still come out in order, each at
its own time.

This module is the command line: it reads and checks the flags before torch, diffusers and PyAV
load, so ``--help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from app.formats import FORMATS, MULTIPLE, SYNTHETIC_FRAMES, OutputFormat
from engine.cli import HelpFormatter, add_backend_argument, add_model_arguments
from engine.config import MAX_SIZE, MIN_SIZE, StreamConfig, parse_t_index_list, strength_to_t_index_list
from engine.parallel.flags import add_parallel_arguments
from engine.parallel.torchrun import refuse_torchrun
from engine.quiet import quiet_libraries

if TYPE_CHECKING:  # torch, diffusers and PyAV load once the flags are checked: --help answers before them
    from app.media import Clip, ClipWriter
    from app.stylizer import TwoInFlight
    from engine.stream import StreamDiffusion


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.stylize",
        description="Run a video through diffcam's stream-batch img2img and write the stylized video, "
                    "with the input's audio and timing.",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    add_backend_argument(parser)
    parser.add_argument("--input", default="synthetic", help="a video file, or 'synthetic' for a generated clip")
    parser.add_argument("--output", default="out/stylized.mp4",
                        help="where to write the result; the extension picks the format: .mp4, .mov, .mkv "
                             "(H.264; .mp4 plays in every browser), .webm (VP9), .avi (H.264, for old players) "
                             "(default: %(default)s)")
    parser.add_argument("--frames", type=int, default=None,
                        help=f"stop after this many input frames (default: the whole input; "
                             f"{SYNTHETIC_FRAMES} for the synthetic clip)")
    size = parser.add_argument_group("output size", "By default the output keeps the input's aspect ratio, "
                                     "its longer side --size pixels; sides are multiples of 8.")
    size.add_argument("--size", type=int, default=512, help="the longer side of the output, in pixels (rounded to a multiple of 8)")
    size.add_argument("--width", type=int, default=None,
                      help="exact output width (alone: the height follows the input's aspect ratio)")
    size.add_argument("--height", type=int, default=None,
                      help="exact output height (alone: the width follows the input's aspect ratio)")
    size.add_argument("--crop", action="store_true",
                      help="with --width and --height of another aspect ratio: scale the input to cover "
                           "that size and cut the centre out (default: scale it to fit inside, black bars "
                           "on the sides left over)")
    parser.add_argument("--prompt", default="a watercolor painting, vivid colors", help="what the video should become")
    parser.add_argument("--negative-prompt", default="blurry, low quality",
                        help="what to steer away from (with --cfg-type full or initialize)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--strength", type=float, default=None,
                       help="0 keeps the input, 1 re-imagines it (replaces --t-index-list)")
    steps.add_argument("--t-index-list", default="32,45", help="steps out of --num-inference-steps, e.g. 0,16,32,45")
    parser.add_argument("--num-inference-steps", type=int, default=50,
                        help="length of the schedule that --t-index-list picks from")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps when --strength is given")
    parser.add_argument("--cfg-type", default="self", choices=["none", "full", "self", "initialize"],
                        help="guidance: none, full (a negative-prompt pass), self (residual CFG), "
                             "initialize (residual CFG with a one-time negative pass)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (RCFG applies above 1)")
    parser.add_argument("--delta", type=float, default=1.0, help="RCFG stock-noise multiplier")
    parser.add_argument("--seed", type=int, default=2, help="seeds the stream's fixed noise")
    parser.add_argument("--similarity-filter", action="store_true",
                        help="skip near-duplicate frames (a skipped frame repeats the last stylized one)")
    parser.add_argument("--similarity-threshold", type=float, default=0.98,
                        help="how alike (cosine similarity) frames must be before the filter may skip one")
    several = parser.add_argument_group("several devices")
    add_parallel_arguments(several, devices="stylize on several devices, one process each (one alone: the same "
                                            "as --device)",
                           default="asyncdiff, the default with several --devices, is the one a file can use: a "
                                   "file is one stream (replicas serve several live streams: python app/main.py)")
    several.add_argument("--resync-every", type=int, default=None, metavar="N",
                         help="with --parallel asyncdiff: every N-th call runs synchronously again (the components "
                              "one after the other on fresh activations: exact, no faster than one device); 1 "
                              "makes every call synchronous, equal to one device (default: only the warm-up calls "
                              "at the start)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> OutputFormat:
    """Refuse what cannot work before anything slow starts; returns the output's format."""
    from app.media import can_encode

    if args.frames is not None and args.frames < 1:
        raise ValueError(f"--frames={args.frames} must be at least 1")
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        raise ValueError(f"--size={args.size} is out of range; allowed: [{MIN_SIZE}, {MAX_SIZE}]")
    if args.crop and (args.width is None or args.height is None):
        raise ValueError("--crop needs both --width and --height (otherwise the aspect ratio is kept)")
    suffix = Path(args.output).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--output {args.output!r}: the extension must be one of {', '.join(FORMATS)}")
    output_format = FORMATS[suffix]
    for codec in (output_format.video, output_format.audio):
        if not can_encode(codec):
            raise ValueError(f"this PyAV build cannot encode {codec} (needed for {suffix}); choose another "
                             f"--output extension")
    return output_format


def check_devices(args: argparse.Namespace) -> tuple[str, ...]:
    """``--devices`` as names, after refusing the combinations the sharded stream cannot run."""
    from engine.parallel.replicas import check_present, parse_devices

    refuse_torchrun("python -m app.stylize")
    devices = parse_devices(args.devices) if args.devices else ()
    if args.parallel == "replicas":
        raise ValueError("--parallel replicas spreads several live streams over the devices (python app/main.py "
                         "--devices ...); a file is one stream whose frames depend on each other through the "
                         "stream batch: use --parallel asyncdiff")
    if len(devices) < 2:
        if args.parallel is not None:
            raise ValueError(f"--parallel {args.parallel} splits the UNet over several devices: give --devices "
                             f"with two or more (e.g. cpu,cpu or 0,1)")
        if args.resync_every is not None:
            raise ValueError("--resync-every applies to --parallel asyncdiff: give --devices with two or more")
        return devices
    _check_sharded(args)
    check_present(devices)
    return devices


def _check_sharded(args: argparse.Namespace) -> None:
    if args.similarity_filter:
        raise ValueError("--similarity-filter does not work with --parallel asyncdiff yet (the sharded stream "
                         "runs every frame): leave it out")
    if args.backend not in ("auto", "torch"):
        raise ValueError(f"--backend {args.backend} does not work with --parallel asyncdiff (its device processes "
                         f"run eager torch): leave --backend out or give torch")
    if args.resync_every is not None and args.resync_every < 1:
        raise ValueError(f"--resync-every={args.resync_every} must be at least 1 (leave it out: never)")


def output_size(shown: tuple[int, int], size: int, width: int | None = None,
                height: int | None = None) -> tuple[int, int]:
    """``(width, height)`` for the model: given sides as they are, the others from the aspect of ``shown``."""
    shown_width, shown_height = shown
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, _multiple(width * shown_height / shown_width)
    if height is not None:
        return _multiple(height * shown_width / shown_height), height
    scale = _multiple(size) / max(shown_width, shown_height)
    return _multiple(shown_width * scale), _multiple(shown_height * scale)


def stream_config(args: argparse.Namespace, width: int, height: int) -> StreamConfig:
    if args.strength is not None:
        t_index_list = strength_to_t_index_list(args.strength, args.steps, args.num_inference_steps)
    else:
        t_index_list = parse_t_index_list(args.t_index_list)
    return StreamConfig(
        t_index_list=t_index_list, num_inference_steps=args.num_inference_steps, width=width,
        height=height, cfg_type=args.cfg_type, guidance_scale=args.guidance, delta=args.delta,
        seed=args.seed, prompt=args.prompt, negative_prompt=args.negative_prompt,
        similarity_filter=args.similarity_filter, similarity_threshold=args.similarity_threshold,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # before torch, diffusers and PyAV load: --help and bad flags answer at once
    from app.media import open_clip

    quiet_libraries()
    try:
        output_format = check_args(args)
        devices = check_devices(args)
        clip = open_clip(args.input, args.frames)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error)
    try:
        return _run(args, clip, output_format, devices)
    finally:
        clip.close()


def _run(args: argparse.Namespace, clip: Clip, output_format: OutputFormat, devices: tuple[str, ...]) -> int:
    from app.stylizer import open_stream
    from engine.models import ModelUnavailableError

    try:
        width, height = output_size(clip.shown_size, args.size, args.width, args.height)
        stream = open_stream(args, stream_config(args, width, height), devices)
    except (ValueError, RuntimeError, OSError, ModelUnavailableError) as error:
        return _fail(error)
    try:
        return _write(args, clip, output_format, stream)
    finally:
        stream.close()


def _write(args: argparse.Namespace, clip: Clip, output_format: OutputFormat,
           stream: StreamDiffusion | TwoInFlight) -> int:
    import av

    from app.media import ClipWriter, progress_total
    from app.stylizer import stylize
    from engine.parallel.launch import RankFailed

    output, width, height = Path(args.output), stream.config.width, stream.config.height
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        writer = ClipWriter(output, output_format, width, height, clip.rate, clip.time_base, clip.audio)
    except (ValueError, OSError, av.FFmpegError) as error:
        return _fail(error)
    print(_summary(stream, args, writer))
    started = time.perf_counter()
    try:
        total = progress_total(clip.frame_count, args.frames)
        with writer, tqdm(total=total, unit="frame", desc="stylizing") as progress:
            written = stylize(stream, clip.items(width, height, args.crop, args.frames), writer, progress)
    except (av.FFmpegError, RankFailed) as error:
        return _fail(error, code=1)
    except KeyboardInterrupt:  # the writer has closed the file: what was written plays
        print(f"stopped: wrote {writer.frames} frames to {output}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    print(f"wrote {written} frames to {output} ({written / max(elapsed, 1e-9):.1f} frames/s)")
    return 0


def _summary(stream: StreamDiffusion | TwoInFlight, args: argparse.Namespace, writer: ClipWriter) -> str:
    from app.stylizer import where

    config = stream.config
    audio = "no audio" if writer.audio is None else \
        f"audio {writer.audio.codec_context.name} ({'copied' if writer.audio_copied else 're-encoded'})"
    return (f"{where(stream, args)}, {config.width}x{config.height}, "
            f"t_index_list={config.t_index_list}, cfg={config.cfg_type}; "
            f"video {writer.video.codec_context.name} at {writer.video.codec_context.framerate} fps, {audio}")


def _fail(error: BaseException, code: int = 2) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code


def _multiple(value: float) -> int:
    """``value`` rounded to a multiple of 8, at least the model's smallest side."""
    return max(MIN_SIZE, MULTIPLE * round(value / MULTIPLE))



if __name__ == "__main__":
    sys.exit(main())
