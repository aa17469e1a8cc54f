"""Video files in and out for :mod:`app.stylize`: pictures read with PyAV (turned upright, sized for the
model), and pictures written in codecs browsers play, with the input's audio copied through.

Reading: PyAV demuxes and decodes the input; each picture is turned upright and resized to the
model's size here (keeping its aspect ratio: letterboxed, or centre-cropped when asked), so the
engine's own fit has nothing left to do. Writing: H.264 in MP4/MOV/MKV/AVI, VP9 in WebM, each
picture at its input's timestamp; audio packets are copied untouched when the output container
takes their codec, and re-encoded otherwise.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain, takewhile
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Union, cast

import av
import numpy as np

from app.formats import FORMATS, MULTIPLE, SYNTHETIC_FRAMES, SYNTHETIC_RATE, SYNTHETIC_SIZE, OutputFormat
from engine.synthetic import moving_frame


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


def can_encode(codec: str) -> bool:
    try:
        av.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        return False
    return True


__all__ = ["FORMATS", "MULTIPLE", "SYNTHETIC_FRAMES", "SYNTHETIC_RATE", "SYNTHETIC_SIZE", "Clip", "ClipWriter",
           "FileClip", "Item", "OutputFormat", "Picture", "SyntheticClip", "can_encode", "centred", "frame_count",
           "open_clip", "picture", "progress_total"]
