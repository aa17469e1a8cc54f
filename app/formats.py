"""What :mod:`app.stylize` reads and writes, as data: the output formats by extension, the synthetic
clip, and the multiple the model's sides come in. Free of PyAV, so the command line answers
``--help`` before it loads; :mod:`app.media` does the reading and writing.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

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
