"""``python -m app.stylize`` on real little clips made with PyAV: whole input, browser codecs, audio, sizes, errors."""

from __future__ import annotations

import contextlib
import io
from collections import deque
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import av
import numpy as np
import pytest

from app import media, stylize, stylizer

FPS, WIDTH, HEIGHT, FRAMES, SAMPLE_RATE = 10, 96, 64, 8, 16000


def level(index: int) -> int:
    """Frame ``index``'s grey level: far enough apart to tell frames apart after lossy coding."""
    return 20 + 25 * index


def write_clip(path: Path, *, frames: int = FRAMES, audio: str | None = "aac", rotation: int = 0,
               video: str = "libx264") -> Path:
    """A ``WIDTH×HEIGHT`` clip at ``FPS``: frame i grey ``level(i)`` with a white top-left quadrant, and
    (unless ``audio`` is None) a 440 Hz tone exactly as long as the video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(video, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        sound = container.add_stream(audio, rate=SAMPLE_RATE, layout="mono") if audio else None
        for index in range(frames):
            image = np.full((HEIGHT, WIDTH, 3), level(index), np.uint8)
            image[:HEIGHT // 2, :WIDTH // 2] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if sound is not None:
            _write_tone(container, sound, frames / FPS)
    return path


def _write_tone(container: av.container.OutputContainer, sound: av.AudioStream, seconds: float) -> None:
    samples = int(SAMPLE_RATE * seconds)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / SAMPLE_RATE)).astype(np.float32)[None]
    for start in range(0, samples, 1024):
        frame = av.AudioFrame.from_ndarray(tone[:, start:start + 1024], format="flt", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, start
        container.mux(sound.encode(frame))
    container.mux(sound.encode())


def run(*argv: str) -> tuple[int, str, str]:
    """``main(argv)`` on the tiny model: exit code, stdout, stderr (where the progress bar goes)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = stylize.main(["--model", "tiny", *argv])
    return code, out.getvalue(), err.getvalue()


def probe(path: Path) -> SimpleNamespace:
    """What a player sees in ``path``: video frames (as arrays and times), codecs and audio length."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = list(container.decode(video))
        found = SimpleNamespace(
            codec=video.codec_context.name, pix_fmt=video.codec_context.pix_fmt, rate=video.average_rate,
            size=(video.width, video.height), times=[frame.time for frame in frames],
            images=[frame.to_ndarray(format="rgb24") for frame in frames], audio_codec=None, audio_seconds=0.0)
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            found.audio_codec = audio.codec_context.name
            found.audio_seconds = sum(frame.samples for frame in container.decode(audio)) / audio.rate
    return found


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "in.mp4")


@pytest.fixture(scope="module")
def stylized(clip, tmp_path_factory) -> SimpleNamespace:
    """The whole clip stylized once with the defaults, for the tests that only look at the result."""
    output = tmp_path_factory.mktemp("out") / "out.mp4"
    code, out, err = run("--input", str(clip), "--output", str(output), "--size", "96")
    assert code == 0, err
    return SimpleNamespace(path=output, out=out, err=err, found=probe(output), source=probe(clip))


# ------------------------------------------------------------------- the whole input, as browsers play it


def test_every_input_frame_comes_out_at_its_own_time(stylized) -> None:
    assert len(stylized.found.times) == FRAMES, "the whole input, the frames in flight drained at the end"
    assert stylized.found.times == stylized.source.times
    assert stylized.found.rate == FPS
    assert f"wrote {FRAMES} frames" in stylized.out


def test_the_output_is_h264_yuv420p_with_its_index_up_front(stylized) -> None:
    assert (stylized.found.codec, stylized.found.pix_fmt) == ("h264", "yuv420p")
    head = stylized.path.read_bytes()
    assert 0 <= head.find(b"moov") < head.find(b"mdat"), "faststart: a browser plays before the download ends"


def test_the_output_keeps_the_input_aspect_ratio(stylized) -> None:
    assert stylized.found.size == (96, 64)


def test_the_audio_is_copied_through_whole(stylized) -> None:
    assert stylized.found.audio_codec == "aac" and "aac (copied)" in stylized.out
    assert stylized.found.audio_seconds == pytest.approx(stylized.source.audio_seconds, abs=0.01)
    assert stylized.found.audio_seconds == pytest.approx(FRAMES / FPS, abs=0.07)


def test_the_progress_bar_counts_the_input_frames(stylized) -> None:
    assert f"{FRAMES}/{FRAMES}" in stylized.err and "/120" not in stylized.err


# ------------------------------------------------------------------- flags


def test_frames_caps_the_video_and_the_audio_with_it(clip, tmp_path) -> None:
    output = tmp_path / "out.mp4"
    code, _, err = run("--input", str(clip), "--output", str(output), "--size", "96", "--frames", "3")
    assert code == 0, err
    found = probe(output)
    assert len(found.times) == 3 and "3/3" in err
    assert found.audio_seconds == pytest.approx(0.3, abs=0.07), "the audio ends with the last picture"


def test_an_input_without_audio_gives_no_audio_track(tmp_path) -> None:
    source, output = write_clip(tmp_path / "silent.mp4", frames=3, audio=None), tmp_path / "out.mp4"
    code, out, err = run("--input", str(source), "--output", str(output), "--size", "96")
    assert code == 0, err
    found = probe(output)
    assert found.audio_codec is None and "no audio" in out and len(found.times) == 3


def test_width_and_height_give_exactly_that_size(clip, tmp_path) -> None:
    output = tmp_path / "out.mp4"
    code, _, err = run("--input", str(clip), "--output", str(output), "--width", "64", "--height", "64",
                       "--frames", "2")
    assert code == 0, err
    assert probe(output).size == (64, 64)


def test_audio_mp4_cannot_hold_is_reencoded_to_aac(tmp_path) -> None:
    source, output = write_clip(tmp_path / "pcm.mkv", frames=3, audio="pcm_s16le"), tmp_path / "out.mp4"
    code, out, err = run("--input", str(source), "--output", str(output), "--size", "96")
    assert code == 0, err
    found = probe(output)
    assert found.audio_codec == "aac" and "aac (re-encoded)" in out
    assert found.audio_seconds == pytest.approx(0.3, abs=0.1)


def test_webm_gets_vp9_and_opus(clip, tmp_path) -> None:
    output = tmp_path / "out.webm"
    code, _, err = run("--input", str(clip), "--output", str(output), "--size", "96", "--frames", "2")
    assert code == 0, err
    found = probe(output)
    assert (found.codec, found.audio_codec, len(found.times)) == ("vp9", "opus", 2)


def test_the_similarity_filter_loses_no_frame(tmp_path) -> None:
    """A still picture: the filter skips most frames, also while the pipeline warms up."""
    source, output = tmp_path / "still.mp4", tmp_path / "out.mp4"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = WIDTH, HEIGHT
        for index in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((HEIGHT, WIDTH, 3), 128, np.uint8), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    code, _, err = run("--input", str(source), "--output", str(output), "--size", "96", "--similarity-filter",
                       "--similarity-threshold", "0.5", "--t-index-list", "20,35,45")
    assert code == 0, err
    assert probe(output).times == [index / FPS for index in range(6)]


# ------------------------------------------------------------------- order and timing, without a model


class DelayLine:
    """StreamDiffusion's contract without a model: a picture comes back ``steps - 1`` calls later (None
    until then). With the filter on, the calls numbered in ``skip`` and repeated pictures are skipped: they
    re-show the last output."""

    def __init__(self, steps: int, skip: frozenset[int] = frozenset()) -> None:
        self.steps, self.skip, self.calls, self.seen = steps, skip, 0, 0
        self.config = SimpleNamespace(similarity_filter=bool(skip))
        self.in_flight: deque[np.ndarray] = deque()
        self.last: np.ndarray | None = None
        self.previous: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        self.seen, repeated, self.previous = self.seen + 1, image is self.previous, image
        if self.config.similarity_filter and (self.seen - 1 in self.skip or repeated):
            return self.last
        self.calls += 1
        self.in_flight.append(image)
        if len(self.in_flight) < self.steps:
            return None
        self.last = self.in_flight.popleft()
        return self.last

    def update(self, similarity_filter: bool) -> None:
        self.config = SimpleNamespace(similarity_filter=similarity_filter)


@pytest.mark.parametrize("skip,shown", [
    (frozenset(), list(range(FRAMES))),
    (frozenset({1, 4, 5}), [0, 0, 2, 3, 3, 3, 6, 7]),  # a skipped frame shows the one before it
])
def test_output_frame_i_is_input_frame_i(clip, tmp_path, skip, shown) -> None:
    source = media.FileClip(str(clip))
    output = tmp_path / "out.mp4"
    try:
        with media.ClipWriter(output, media.FORMATS[".mp4"], WIDTH, HEIGHT, source.rate, source.time_base,
                                source.audio) as writer:
            written = stylizer.stylize(DelayLine(steps=3, skip=skip), source.items(WIDTH, HEIGHT, False, None),
                                      writer)
    finally:
        source.close()
    found = probe(output)
    assert written == FRAMES and found.times == [index / FPS for index in range(FRAMES)]
    greys = [int(image[HEIGHT - 8:, WIDTH - 8:].mean()) for image in found.images]  # away from the white corner
    assert greys == pytest.approx([level(index) for index in shown], abs=6)


# ------------------------------------------------------------------- sizes and pictures


@pytest.mark.parametrize("shown,argv,size", [
    ((1920, 1080), {}, (512, 288)),
    ((1080, 1920), {}, (288, 512)),
    ((96, 64), {"size": 96}, (96, 64)),
    ((640, 360), {"size": 300}, (304, 168)),  # sides rounded to multiples of 8
    ((96, 64), {"width": 128}, (128, 88)),
    ((96, 64), {"height": 128}, (192, 128)),
    ((96, 64), {"width": 64, "height": 64}, (64, 64)),
    ((4000, 100), {}, (512, 64)),  # never below the model's smallest side
])
def test_output_size_follows_the_aspect_ratio(shown, argv, size) -> None:
    assert stylize.output_size(shown, **{"size": 512, **argv}) == size


def _frame(grey: int = 200) -> av.VideoFrame:
    image = np.full((HEIGHT, WIDTH, 3), grey, np.uint8)
    image[:HEIGHT // 2, :WIDTH // 2] = 255
    return av.VideoFrame.from_ndarray(image, format="rgb24")


def test_another_aspect_ratio_is_letterboxed_unless_cropped() -> None:
    boxed = media.picture(_frame(), 64, 64)
    assert boxed.shape == (64, 64, 3)
    assert boxed[:8].max() == 0 and boxed[-8:].max() == 0, "black bars above and below"
    assert boxed[32, 40].min() > 150, "the picture in between"
    cropped = media.picture(_frame(), 64, 64, crop=True)
    assert cropped.shape == (64, 64, 3) and cropped.min() > 150, "covered: no bars"


def test_a_rounding_difference_is_stretched_not_boxed() -> None:
    image = media.picture(_frame(), 96, 72)  # 96×64 → 96×72 is more than rounding: bars
    assert image[:2].max() == 0
    image = media.picture(_frame(), 96, 68)  # under 8 pixels off: stretched, no bars
    assert image.min() > 150


def test_a_rotated_video_is_turned_upright(tmp_path) -> None:
    source = media.FileClip(str(write_clip(tmp_path / "turned.mp4", frames=1, audio=None, rotation=90)))
    try:
        assert source.shown_size == (HEIGHT, WIDTH)
        first = next(source.items(HEIGHT, WIDTH, False, 1))
    finally:
        source.close()
    image = first.image
    assert image.shape == (WIDTH, HEIGHT, 3)
    # turned a quarter counterclockwise, the white top-left quadrant is now bottom-left
    assert image[-8:, :8].min() > 200 and image[:8, -8:].max() < 100


# ------------------------------------------------------------------- the progress bar's total


def test_the_frame_count_comes_from_the_header_or_the_duration(clip, tmp_path) -> None:
    no_count = write_clip(tmp_path / "in.mkv", audio=None, video="libvpx-vp9")  # Matroska stores no count
    for path in (clip, no_count):
        with av.open(str(path)) as container:
            assert media.frame_count(container.streams.video[0], container.duration) == FRAMES, path.name


def test_the_progress_total_is_what_will_be_stylized() -> None:
    assert media.progress_total(FRAMES, None) == FRAMES
    assert media.progress_total(FRAMES, 5) == 5
    assert media.progress_total(FRAMES, 50) == FRAMES
    assert media.progress_total(None, 5) == 5
    assert media.progress_total(None, None) is None


def test_the_synthetic_clip_runs_for_its_default_length_or_frames() -> None:
    assert media.open_clip("synthetic").frame_count == media.SYNTHETIC_FRAMES
    pictures = list(media.open_clip("synthetic", 3).items(64, 64, False, None))
    assert [picture.time for picture in pictures] == [Fraction(0), Fraction(1, 30), Fraction(2, 30)]


# ------------------------------------------------------------------- errors and help


@pytest.fixture
def not_a_video(tmp_path) -> Path:
    path = tmp_path / "notes.mp4"
    path.write_text("these are not the frames you are looking for\n")
    return path


@pytest.fixture
def audio_only(tmp_path) -> Path:
    path = tmp_path / "sound.m4a"
    with av.open(str(path), "w", format="mp4") as container:
        _write_tone(container, container.add_stream("aac", rate=SAMPLE_RATE, layout="mono"), 0.2)
    return path


@pytest.mark.parametrize("argv,message", [
    (["--input", "/definitely/not/here.mp4"], "does not exist"),
    (["--input", "{not_a_video}"], "is not a video PyAV can read"),
    (["--input", "{audio_only}"], "has no video stream"),
    (["--output", "out.gif"], "the extension must be one of .mp4"),
    (["--size", "10"], "--size=10 is out of range"),
    (["--size", "100000"], "--size=100000 is out of range"),
    (["--width", "4", "--height", "4"], "width=4 is out of range"),
    (["--width", "100000"], "width=100000 is out of range"),
    (["--frames", "0"], "--frames=0 must be at least 1"),
    (["--crop"], "--crop needs both --width and --height"),
])
def test_bad_input_exits_2_with_one_line(argv, message, not_a_video, audio_only) -> None:
    argv = [arg.format(not_a_video=not_a_video, audio_only=audio_only) for arg in argv]
    code, out, err = run(*argv)
    assert code == 2
    assert err.startswith("error:") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_help_describes_every_flag_with_its_default(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        stylize.parse_args(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    undescribed = [action.option_strings for action in stylize.build_parser()._actions if not action.help]
    assert undescribed == []
    assert "(default: 512)" in text and "the whole input; 120 for the synthetic clip" in text
    assert "black bars" in text and "(default: out/stylized.mp4)" in text


# ------------------------------------------------------------------- several devices (--devices, --parallel)


def test_all_synchronous_on_two_cpu_processes_equals_one_device(clip, stylized, tmp_path) -> None:
    """``--devices cpu,cpu``: the sharded stream, two calls in flight; ``--resync-every 1`` makes every call
    synchronous, which runs the same operations as one device, so every frame comes out as one device's, at
    its own time. The tiny model's frames differ little from one to the next, so "in place" is checked
    against the same comparison shifted by one frame."""
    output = tmp_path / "sharded.mp4"
    code, out, err = run("--input", str(clip), "--output", str(output), "--size", "96", "--devices", "cpu,cpu",
                         "--resync-every", "1")
    assert code == 0, err
    assert "sharded over cpu,cpu" in out and "--parallel asyncdiff: 2 UNet components" in out
    found, one = probe(output), stylized.found
    assert len(found.times) == FRAMES and found.times == one.times
    same = [_distance(a, b) for a, b in zip(found.images, one.images)]
    shifted = [_distance(a, b) for a, b in zip(found.images, one.images[1:])]
    assert max(same) < 0.5, same
    assert sum(same) < 0.25 * sum(shifted), ("frame i must be one device's frame i, not its neighbour", same, shifted)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two pictures, in 8-bit levels."""
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


class FakeSharded:
    """:class:`ShardedStream`'s driver contract without processes: ``submit`` then ``result``, a picture out
    ``steps - 1`` results after it went in (None until then), at most two calls in flight."""

    instances: ClassVar[list[FakeSharded]] = []

    def __init__(self, model: str = "tiny", config=None, *, devices=("cpu", "cpu"), steps: int = 2,
                 fail_at: int | None = None, **options: object) -> None:
        self.config = config or SimpleNamespace(similarity_filter=False)
        self.model, self.options = model, options
        self.devices, self.steps, self.fail_at = tuple(devices), steps, fail_at
        self.components, self.warmup_calls, self.resync_every = len(self.devices), 2, None
        self.submitted: deque[np.ndarray] = deque()
        self.in_flight = self.most_in_flight = self.results = 0
        self.closed = False
        FakeSharded.instances.append(self)

    def submit(self, frames: list[np.ndarray]) -> None:
        assert len(frames) == 1 and self.in_flight < 2 and not self.closed
        self.submitted.append(frames[0])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def result(self) -> list[np.ndarray] | None:
        from engine.parallel.launch import RankFailed

        assert self.in_flight > 0
        if self.results == self.fail_at:
            raise RankFailed("rank 1 (cpu) died: killed by signal 9", rank=1)
        self.in_flight -= 1
        self.results += 1
        return None if self.results < self.steps else [self.submitted.popleft()]

    def update(self, **changes: object) -> None:
        raise AssertionError("the sharded stream is never updated while stylizing")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_two_in_flight_keeps_output_frame_i_at_input_frame_i(clip, tmp_path, steps) -> None:
    """Through the adapter a picture comes back one call later than on one device; the times still match."""
    source, output = media.FileClip(str(clip)), tmp_path / "out.mp4"
    sharded = FakeSharded(steps=steps)
    try:
        with media.ClipWriter(output, media.FORMATS[".mp4"], WIDTH, HEIGHT, source.rate, source.time_base,
                              source.audio) as writer:
            written = stylizer.stylize(stylizer.TwoInFlight(sharded), source.items(WIDTH, HEIGHT, False, None), writer)
    finally:
        source.close()
    found = probe(output)
    assert written == FRAMES and found.times == [index / FPS for index in range(FRAMES)]
    greys = [int(image[HEIGHT - 8:, WIDTH - 8:].mean()) for image in found.images]
    assert greys == pytest.approx([level(index) for index in range(FRAMES)], abs=6)
    assert sharded.most_in_flight == 2, "the next picture goes in before the last one comes out"


@pytest.fixture
def fake_sharded(monkeypatch):
    FakeSharded.instances.clear()
    monkeypatch.setattr(stylizer, "ShardedStream", FakeSharded)
    return FakeSharded.instances


def test_the_device_processes_load_the_model_the_flags_name(clip, tmp_path, fake_sharded) -> None:
    code, _, err = run("--input", str(clip), "--output", str(tmp_path / "out.mp4"), "--size", "96", "--frames", "2",
                       "--devices", "cpu,cpu", "--model", "tiny", "--lcm-lora", "none", "--vae", "full")
    assert code == 0, err
    (sharded,) = fake_sharded
    assert sharded.model == "tiny" and sharded.options["lcm_lora"] == "none" and sharded.options["vae"] == "full"
    assert sharded.options["dtype"] == "float32"


def test_the_sharded_stream_is_closed_after_success(clip, tmp_path, fake_sharded) -> None:
    code, out, err = run("--input", str(clip), "--output", str(tmp_path / "out.mp4"), "--size", "96",
                         "--devices", "cpu,cpu", "--frames", "3")
    assert code == 0, err
    assert [s.closed for s in fake_sharded] == [True] and "sharded over cpu,cpu" in out


def test_the_sharded_stream_is_closed_when_the_output_cannot_be_written(clip, tmp_path, fake_sharded) -> None:
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run("--input", str(clip), "--output", str(tmp_path / "file" / "out.mp4"), "--devices", "cpu,cpu")
    assert code == 2 and err.startswith("error:")
    assert [s.closed for s in fake_sharded] == [True]


def test_a_rank_that_dies_is_reported_and_the_stream_closed(clip, tmp_path, monkeypatch, fake_sharded) -> None:
    monkeypatch.setattr(stylizer, "ShardedStream", lambda *a, **k: FakeSharded(*a, fail_at=2, **k))
    code, _, err = run("--input", str(clip), "--output", str(tmp_path / "out.mp4"), "--devices", "cpu,cpu")
    assert code == 1 and "error: rank 1 (cpu) died" in err and "Traceback" not in err
    assert [s.closed for s in fake_sharded] == [True]


@pytest.mark.parametrize("argv,message", [
    (["--devices", "cpu,cpu", "--parallel", "replicas"], "--parallel replicas spreads several live streams"),
    (["--parallel", "replicas"], "use --parallel asyncdiff"),
    (["--devices", "cpu,cpu", "--similarity-filter"], "--similarity-filter does not work with --parallel asyncdiff"),
    (["--devices", "cpu,cpu", "--backend", "compile"], "--backend compile does not work with --parallel asyncdiff"),
    (["--devices", "cpu,cpu", "--backend", "trt"], "run eager torch"),
    (["--parallel", "asyncdiff"], "give --devices with two or more"),
    (["--devices", "cpu", "--parallel", "asyncdiff"], "give --devices with two or more"),
    (["--resync-every", "2"], "--resync-every applies to --parallel asyncdiff"),
    (["--devices", "cpu,cpu", "--resync-every", "0"], "--resync-every=0 must be at least 1"),
    (["--devices", "cpu,cuda:0"], "must be all cpu or all CUDA devices"),
    (["--devices", "cuda:98,cuda:99"], "this torch build sees"),
])
def test_what_several_devices_cannot_do_exits_2_before_loading(argv, message, clip, monkeypatch) -> None:
    def load(*_: object, **__: object):
        raise AssertionError("nothing may load before the flags are checked")

    monkeypatch.setattr(stylizer, "ShardedStream", load)
    monkeypatch.setattr(stylizer, "load_components", load)
    code, _, err = run("--input", str(clip), *argv)
    assert code == 2
    assert err.startswith("error:") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_help_names_the_parallel_modes(capsys) -> None:
    with pytest.raises(SystemExit):
        stylize.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--devices LIST" in text and "{asyncdiff,replicas}" in text and "--resync-every N" in text
    assert "asyncdiff, the default with several --devices" in text and "a file is one stream" in text
