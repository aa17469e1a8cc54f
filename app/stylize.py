"""Stylize a video file (or a synthetic clip) headlessly: ``python -m app.stylize --help``.

The path of a frame: PyAV demuxes and decodes the input; each picture is turned upright and
resized to the model's size here (keeping its aspect ratio), so the engine's own fit has
nothing left to do; the stream stylizes it; PyAV encodes it at the input's timestamp (H.264 in
MP4/MOV/MKV/AVI, VP9 in WebM). Audio packets are copied through untouched when the output
container takes their codec, and re-encoded otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain, takewhile
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Union, cast

import av
import numpy as np
from tqdm import tqdm

from engine.backends import backend_missing, resolve_backend
from engine.cli import HelpFormatter, add_backend_argument, add_model_arguments, model_spec
from engine.components import Components
from engine.config import MAX_SIZE, MIN_SIZE, StreamConfig, parse_t_index_list, strength_to_t_index_list
from engine.graphs import stream_runner
from engine.models import ModelUnavailableError, load_components
from engine.quiet import quiet_libraries
from engine.stream import StreamDiffusion
from engine.synthetic import moving_frame

SYNTHETIC_FRAMES = 120
SYNTHETIC_RATE = Fraction(30)
SYNTHETIC_SIZE = (512, 512)
#: the model works on multiples of 8 pixels (the VAE downsamples by 8)
MULTIPLE = 8


@dataclass(frozen=True)
class OutputFormat:
    """How one output extension is written: codecs browsers (or at least players) read."""

    video: str
    audio: str  # the encoder for audio of other codecs
    audio_copied: frozenset[str]  # audio codecs copied as they are
    video_options: tuple[tuple[str, str], ...] = ()
    container_options: tuple[tuple[str, str], ...] = ()
    constant_rate: bool = False  # the container stores a frame rate, not timestamps


_FASTSTART = (("movflags", "+faststart"),)  # the index up front: browsers play before the download ends
_VP9 = (("deadline", "good"), ("cpu-used", "4"), ("row-mt", "1"), ("crf", "32"), ("b", "0"))
_BROWSER_AUDIO = frozenset({"aac", "mp3", "opus", "flac"})
_ANY_AUDIO = _BROWSER_AUDIO | {"vorbis", "alac", "ac3", "eac3", "dts", "truehd", "pcm_s16le", "pcm_s24le",
                               "pcm_f32le"}
FORMATS: dict[str, OutputFormat] = {
    ".mp4": OutputFormat("libx264", "aac", _BROWSER_AUDIO, container_options=_FASTSTART),
    ".mov": OutputFormat("libx264", "aac", _BROWSER_AUDIO, container_options=_FASTSTART),
    ".mkv": OutputFormat("libx264", "aac", _ANY_AUDIO),
    ".webm": OutputFormat("libvpx-vp9", "libopus", frozenset({"opus", "vorbis"}), video_options=_VP9),
    ".avi": OutputFormat("libx264", "libmp3lame", frozenset({"mp3", "ac3", "pcm_s16le"}),
                         video_options=(("bf", "0"),), constant_rate=True),
}


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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> OutputFormat:
    """Refuse what cannot work before anything slow starts; returns the output's format."""
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
        if not _can_encode(codec):
            raise ValueError(f"this PyAV build cannot encode {codec} (needed for {suffix}); choose another "
                             f"--output extension")
    return output_format


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


# ------------------------------------------------------------------------ pictures


def picture(frame: av.VideoFrame, width: int, height: int, *, crop: bool = False,
            pixel_aspect: Fraction = Fraction(1)) -> np.ndarray:
    """``frame`` as an upright ``height×width`` RGB array: scaled to fit inside and letterboxed, or with
    ``crop`` scaled to cover and centre-cropped. Off by under 8 pixels (rounding), it is stretched instead."""
    turns = round(frame.rotation / 90) % 4  # the display matrix turns the picture counterclockwise
    target_width, target_height = (height, width) if turns % 2 else (width, height)
    shown_width = frame.width * pixel_aspect
    fits = (target_width / shown_width, Fraction(target_height, frame.height))
    scale = max(fits) if crop else min(fits)
    scaled = max(1, round(shown_width * scale)), max(1, round(frame.height * scale))
    if abs(scaled[0] - target_width) < MULTIPLE and abs(scaled[1] - target_height) < MULTIPLE:
        scaled = target_width, target_height
    image = frame.to_ndarray(width=scaled[0], height=scaled[1], format="rgb24", interpolation="AREA")
    return centred(np.rot90(image, turns), width, height)


def centred(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` centred on a black ``height×width`` canvas: what sticks out is cut, what is missing is black."""
    rows, cols = image.shape[:2]
    top, left = max((rows - height) // 2, 0), max((cols - width) // 2, 0)
    inside = image[top:top + height, left:left + width]
    if inside.shape[:2] == (height, width):
        return np.ascontiguousarray(inside)
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - inside.shape[0]) // 2, (width - inside.shape[1]) // 2
    canvas[top:top + inside.shape[0], left:left + inside.shape[1]] = inside
    return canvas


# ------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Picture:
    """One input picture, ready for the model, and when it is shown (seconds from the start of the clip)."""

    image: np.ndarray
    time: Fraction


Item = Union[Picture, av.Packet]


class Clip(Protocol):
    """A source of pictures and audio packets, in time order."""

    shown_size: tuple[int, int]  # (width, height) as a player shows it: pixel aspect and rotation applied
    rate: Fraction
    time_base: Fraction
    frame_count: int | None  # None: not known ahead
    audio: av.AudioStream | None

    def items(self, width: int, height: int, crop: bool, limit: int | None) -> Iterator[Item]: ...

    def close(self) -> None: ...


class SyntheticClip:
    """The moving colour field of :mod:`engine.synthetic`, ``length`` frames of it: no file, no audio."""

    shown_size = SYNTHETIC_SIZE
    rate = SYNTHETIC_RATE
    time_base = 1 / SYNTHETIC_RATE
    audio: av.AudioStream | None = None

    def __init__(self, length: int = SYNTHETIC_FRAMES) -> None:
        self.frame_count: int | None = length

    def items(self, width: int, height: int, crop: bool, limit: int | None) -> Iterator[Item]:
        for index in range(progress_total(self.frame_count, limit) or 0):
            yield Picture(moving_frame(index, height, width), index / self.rate)

    def close(self) -> None:
        pass


class FileClip:
    """A video file read with PyAV: its first video stream and its first audio stream, if any.

    The first picture is decoded on opening, so an unreadable file fails before a model loads and
    the picture's rotation is known when the output size is chosen.
    """

    def __init__(self, path: str) -> None:
        if not Path(path).exists():
            raise FileNotFoundError(f"input video {path!r} does not exist")
        try:
            self.container = av.open(path)
        except av.FFmpegError as error:
            raise ValueError(f"input {path!r} is not a video PyAV can read ({error})") from None
        try:
            self._open_streams(path)
        except av.FFmpegError as error:
            self.container.close()
            raise ValueError(f"input {path!r} cannot be decoded ({error})") from None
        except BaseException:
            self.container.close()
            raise

    def _open_streams(self, path: str) -> None:
        if not self.container.streams.video:
            raise ValueError(f"input {path!r} has no video stream")
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"
        self.audio = self.container.streams.audio[0] if self.container.streams.audio else None
        self.rate = self.video.average_rate or self.video.guessed_rate or SYNTHETIC_RATE
        self.time_base = self.video.time_base or 1 / self.rate
        self.frame_count = frame_count(self.video, self.container.duration)
        starts = [_start(stream) for stream in (self.video, self.audio) if stream is not None]
        self.start = min((start for start in starts if start is not None), default=Fraction(0))
        self._decoded = self._demuxed()
        self._peeked: list[av.VideoFrame | av.Packet] = []
        first: av.VideoFrame | None = None
        for item in self._decoded:  # the audio before the first picture, and the picture
            self._peeked.append(item)
            if isinstance(item, av.VideoFrame):
                first = item
                break
        if first is None:
            raise ValueError(f"input {path!r} has no video frame that can be decoded")
        self.pixel_aspect = self.video.sample_aspect_ratio or Fraction(1)
        width, height = round(first.width * self.pixel_aspect), first.height
        self.shown_size = (height, width) if round(first.rotation / 90) % 2 else (width, height)

    def items(self, width: int, height: int, crop: bool, limit: int | None) -> Iterator[Item]:
        """Pictures for the model and audio packets, each packet once the video has reached its time.

        With ``limit``, the audio stops where the last picture ends.
        """
        held: deque[av.Packet] = deque()
        shown, now = 0, None
        for item in chain(self._peeked, self._decoded):
            if isinstance(item, av.Packet):
                held.append(item)
            else:
                now, shown = self._time(item, now), shown + 1
                yield Picture(picture(item, width, height, crop=crop, pixel_aspect=self.pixel_aspect), now)
            while held and now is not None and _packet_time(held[0]) <= now:
                yield held.popleft()
            if shown == limit and now is not None:
                yield from self._audio_until(now + 1 / self.rate, held)
                return
        yield from held

    def close(self) -> None:
        self.container.close()

    def _demuxed(self) -> Iterator[av.VideoFrame | av.Packet]:
        """Decoded video frames and audio packets (timestamps from the start of the clip), in file order."""
        streams = [stream for stream in (self.video, self.audio) if stream is not None]
        for packet in self.container.demux(*streams):
            if packet.stream.type == "video":
                yield from self.video.decode(packet)
            elif packet.dts is not None:  # None: the demuxer's end-of-stream marker
                yield _shifted(packet, self.start)

    def _audio_until(self, end: Fraction, held: Iterable[av.Packet]) -> Iterator[av.Packet]:
        """The held audio packets, then the rest of the audio stream, up to ``end``."""
        if self.audio is None:
            return iter(())
        more = (_shifted(packet, self.start) for packet in self.container.demux(self.audio) if packet.dts is not None)
        return takewhile(lambda packet: _packet_time(packet) < end, chain(held, more))

    def _time(self, frame: av.VideoFrame, previous: Fraction | None) -> Fraction:
        if frame.pts is None or frame.time_base is None:
            return Fraction(0) if previous is None else previous + 1 / self.rate
        return frame.pts * frame.time_base - self.start


def open_clip(source: str, frames: int | None = None) -> Clip:
    """``synthetic`` (``frames`` long: it has no natural end), or a video file.

    Raises FileNotFoundError or ValueError with a message for the user.
    """
    if source == "synthetic":
        return SyntheticClip(frames or SYNTHETIC_FRAMES)
    return FileClip(source)


def frame_count(video: av.VideoStream, container_duration: int | None) -> int | None:
    """How many frames the stream holds: as its header says, else estimated from its duration and rate."""
    if video.frames:
        return video.frames
    rate = video.average_rate or video.guessed_rate
    if rate is None:
        return None
    if video.duration is not None and video.time_base is not None:
        return round(video.duration * video.time_base * rate)
    if container_duration is not None:
        return round(Fraction(container_duration, av.time_base) * rate)
    return None


def progress_total(clip_frames: int | None, limit: int | None) -> int | None:
    """The progress bar's total: the frames that will be stylized, where that is known."""
    known = [count for count in (clip_frames, limit) if count is not None]
    return min(known, default=None)


def _start(stream: av.VideoStream | av.AudioStream) -> Fraction | None:
    """When ``stream`` starts, in seconds, where the container says."""
    if stream.start_time is None or stream.time_base is None:
        return None
    return stream.start_time * stream.time_base


def _packet_time(packet: av.Packet) -> Fraction:
    ticks = packet.pts if packet.pts is not None else packet.dts
    if ticks is None or packet.time_base is None:  # not from a demuxer: treat as due at once
        return Fraction(0)
    return ticks * packet.time_base


def _shifted(packet: av.Packet, start: Fraction) -> av.Packet:
    """``packet`` with its timestamps counted from ``start`` (seconds)."""
    if packet.time_base is not None and packet.dts is not None:
        ticks = round(start / packet.time_base)
        packet.dts -= ticks
        if packet.pts is not None:
            packet.pts -= ticks
    return packet


# ------------------------------------------------------------------------ writing


class ClipWriter:
    """Encodes stylized pictures at their times, and copies (or re-encodes) the input's audio."""

    def __init__(self, path: Path, output_format: OutputFormat, width: int, height: int, rate: Fraction,
                 time_base: Fraction, audio: av.AudioStream | None) -> None:
        self.container = av.open(str(path), "w", container_options=dict(output_format.container_options))
        time_base = 1 / rate if output_format.constant_rate else time_base
        try:
            self.video = cast(av.VideoStream, self.container.add_stream(
                output_format.video, rate=rate, time_base=time_base, options=dict(output_format.video_options)))
            self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
            self.audio_copied = audio is not None and audio.codec_context.name in output_format.audio_copied
            #: the input's audio stream when its packets are decoded and encoded again
            self.reencoded = None if self.audio_copied else audio
            self.audio = self._audio_stream(audio, output_format.audio)
        except BaseException:
            self.container.close()
            raise
        self.frames = 0
        self._last_pts: int | None = None

    def _audio_stream(self, audio: av.AudioStream | None, encoder: str) -> av.AudioStream | None:
        """A copy of ``audio`` when the container takes its codec; else a new ``encoder`` stream."""
        if audio is None:
            return None
        if self.audio_copied:
            return cast(av.AudioStream, self.container.add_stream_from_template(audio))
        rates = av.Codec(encoder, "w").audio_rates
        rate = audio.rate if not rates or audio.rate in rates else max(rates)
        layout = "mono" if audio.channels == 1 else "stereo"
        return cast(av.AudioStream, self.container.add_stream(encoder, rate=rate, layout=layout))

    def write_picture(self, image: np.ndarray, at: Fraction) -> None:
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        pts = round(at / self.video.codec_context.time_base)
        # a broken input may repeat a timestamp; an encoder refuses that
        frame.pts = pts if self._last_pts is None or pts > self._last_pts else self._last_pts + 1
        frame.time_base = self.video.codec_context.time_base
        self.container.mux(self.video.encode(frame))
        self.frames, self._last_pts = self.frames + 1, frame.pts

    def write_audio(self, packet: av.Packet) -> None:
        if self.audio is None:
            return
        if self.reencoded is None:
            packet.stream = self.audio
            self.container.mux(packet)
            return
        for frame in self.reencoded.decode(packet):
            self.container.mux(self.audio.encode(frame))

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Finish the file, also after an error (what was written stays playable); the first error wins."""
        try:
            self.close()
        except av.FFmpegError:
            if kind is None:
                raise

    def close(self) -> None:
        """Flush the encoders and finish the file."""
        try:
            self.container.mux(self.video.encode(None))
            if self.audio is not None and self.reencoded is not None:
                for frame in self.reencoded.decode(None):
                    self.container.mux(self.audio.encode(frame))
                self.container.mux(self.audio.encode(None))
        finally:
            self.container.close()


# ------------------------------------------------------------------------ stylizing


def stylize(stream: StreamDiffusion, items: Iterable[Item], writer: ClipWriter, progress: tqdm | None = None) -> int:
    """Write each input picture's stylized picture at its time, in order; audio goes straight through.

    A picture comes back ``n - 1`` calls after it went in, so the times of those in flight wait
    in ``pending``; at the end the last picture is fed again until they are all out. A picture
    the similarity filter skips shows what the picture before it shows. Returns frames written.
    """
    pending: deque[list[Fraction]] = deque()
    last: np.ndarray | None = None
    for item in items:
        if isinstance(item, av.Packet):
            writer.write_audio(item)
            continue
        last = item.image
        _feed(stream, item, pending, writer)
        if progress is not None:
            progress.update()
    if stream.config.similarity_filter:
        stream.update(similarity_filter=False)  # the filter would skip the repeated last picture
    while pending and last is not None:
        _emit(_call(stream, last), pending, writer)
    return writer.frames


def _feed(stream: StreamDiffusion, item: Picture, pending: deque[list[Fraction]], writer: ClipWriter) -> None:
    calls = stream.calls
    output = _call(stream, item.image)
    if stream.calls > calls:
        pending.append([item.time])
        _emit(output, pending, writer)
    elif pending:  # skipped, its predecessor still in flight
        pending[-1].append(item.time)
    elif output is not None:  # skipped: the stream re-shows its predecessor's picture
        writer.write_picture(output, item.time)


def _call(stream: StreamDiffusion, image: np.ndarray) -> np.ndarray | None:
    """One call of the stream: an array in, an array (or None while warming up) out."""
    return cast("np.ndarray | None", stream(image))


def _emit(output: np.ndarray | None, pending: deque[list[Fraction]], writer: ClipWriter) -> None:
    if output is None:  # still warming up
        return
    for at in pending.popleft():
        writer.write_picture(output, at)


def fast_stream(components: Components, config: StreamConfig, backend: str) -> StreamDiffusion:
    """The stream on ``backend``, its call captured as a CUDA graph on a GPU (this one thread owns the device)."""
    runner = stream_runner(components, config, resolve_backend(backend, components.device),
                           graphs=components.device.type == "cuda")
    return StreamDiffusion(components, config, runner=runner)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        output_format = check_args(args)
        clip = open_clip(args.input, args.frames)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error)
    try:
        return _run(args, clip, output_format)
    finally:
        clip.close()


def _run(args: argparse.Namespace, clip: Clip, output_format: OutputFormat) -> int:
    output = Path(args.output)
    try:
        width, height = output_size(clip.shown_size, args.size, args.width, args.height)
        config = stream_config(args, width, height)
        missing = backend_missing(args.backend, model_spec(args).resolved_device())
        if missing is not None:
            raise ValueError(f"--backend {args.backend} needs {missing}")
        stream = fast_stream(load_components(model_spec(args)), config, args.backend)
        output.parent.mkdir(parents=True, exist_ok=True)
        writer = ClipWriter(output, output_format, width, height, clip.rate, clip.time_base, clip.audio)
    except (ValueError, RuntimeError, OSError, ModelUnavailableError, av.FFmpegError) as error:
        return _fail(error)
    print(_summary(stream, args.backend, writer))
    started = time.perf_counter()
    try:
        total = progress_total(clip.frame_count, args.frames)
        with writer, tqdm(total=total, unit="frame", desc="stylizing") as progress:
            written = stylize(stream, clip.items(width, height, args.crop, args.frames), writer, progress)
    except av.FFmpegError as error:
        return _fail(error, code=1)
    except KeyboardInterrupt:  # the writer has closed the file: what was written plays
        print(f"stopped: wrote {writer.frames} frames to {output}", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    print(f"wrote {written} frames to {output} ({written / max(elapsed, 1e-9):.1f} frames/s)")
    return 0


def _summary(stream: StreamDiffusion, backend: str, writer: ClipWriter) -> str:
    components, config = stream.components, stream.config
    audio = "no audio" if writer.audio is None else \
        f"audio {writer.audio.codec_context.name} ({'copied' if writer.audio_copied else 're-encoded'})"
    return (f"model {components.name} on {components.device} ({components.dtype}), "
            f"backend {resolve_backend(backend, components.device)}, {config.width}x{config.height}, "
            f"t_index_list={config.t_index_list}, cfg={config.cfg_type}; "
            f"video {writer.video.codec_context.name} at {writer.video.codec_context.framerate} fps, {audio}")


def _fail(error: BaseException, code: int = 2) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code


def _multiple(value: float) -> int:
    """``value`` rounded to a multiple of 8, at least the model's smallest side."""
    return max(MIN_SIZE, MULTIPLE * round(value / MULTIPLE))


def _can_encode(codec: str) -> bool:
    try:
        av.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
