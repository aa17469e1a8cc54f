"""The command-line entry points run end to end on the tiny preset and fail cleanly."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from app import stylize
from engine import bench


def test_stylize_writes_every_frame(tmp_path, capsys) -> None:
    output = tmp_path / "out.avi"
    code = stylize.main(["--model", "tiny", "--width", "64", "--height", "64", "--frames", "12",
                         "--t-index-list", "20,35,45", "--output", str(output)])
    assert code == 0
    capture = cv2.VideoCapture(str(output))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 12, "the frames still in flight at the end are drained"
    assert frames[0].shape == (64, 64, 3) and np.std(frames[0]) > 1
    assert "wrote 12 frames" in capsys.readouterr().out


def test_stylize_reads_a_video_file(tmp_path) -> None:
    source = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 60))
    for i in range(5):
        writer.write(np.full((60, 80, 3), i * 40, np.uint8))
    writer.release()
    assert stylize.main(["--model", "tiny", "--input", str(source), "--width", "64", "--height", "64",
                         "--output", str(tmp_path / "out.avi"), "--strength", "0.5"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--input", "/definitely/not/here.mp4"], "does not exist"),
    (["--width", "100"], "width=100 must be a multiple of 8"),
    (["--t-index-list", "5,3"], "strictly increasing"),
    (["--strength", "2"], "strength=2.0 is out of range"),
])
def test_stylize_bad_arguments_exit_2_with_one_line(argv, message, capsys) -> None:
    assert stylize.main(["--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and "\n" not in err


def test_bench_writes_the_documented_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--size", "64", "--frames", "3", "--rounds", "1",
                       "--t-index-list", "10,40", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("stream_fps", "floor_fps", "sequential_fps", "diffusers_same_vae_fps",
                "stream_over_floor", "stream_over_sequential", "stream_over_diffusers_same_vae"):
        assert result[key] > 0, key
    assert result["environment"]["threads"] >= 1 and result["config"]["t_index_list"] == [10, 40]


def test_runtime_bench_writes_the_documented_json(tmp_path) -> None:
    out = tmp_path / "runtime.json"
    assert bench.main(["--runtime", "--preset", "tiny", "--size", "64", "--t-index-list", "20,40",
                       "--sessions", "1,2", "--duration", "1", "--warmup", "0.5", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["sessions"] for r in results] == [1, 2]
    for r in results:
        for key in ("runtime_fps", "floor_fps", "min_session_fps", "max_session_fps",
                    "latency_ms_p50", "latency_ms_p95"):
            assert r[key] > 0, key
        assert 0 <= r["drop_rate"] <= 1


def test_runtime_bench_stopped_part_way_keeps_the_session_counts_it_measured(tmp_path, monkeypatch) -> None:
    """gpu-check's time limit may stop it after a few S: those S are in the JSON already, fewest streams first."""
    from engine import bench_runtime

    class Stopped(Exception):
        pass

    measured = bench_runtime.measure

    async def measure_until_two(engine, args, streams: int) -> dict:
        if streams == 2:
            raise Stopped
        return await measured(engine, args, streams)

    monkeypatch.setattr(bench_runtime, "measure", measure_until_two)
    out = tmp_path / "runtime.json"
    with pytest.raises(Stopped):
        bench.main(["--runtime", "--preset", "tiny", "--size", "64", "--t-index-list", "20,40",
                    "--sessions", "2,1", "--duration", "1", "--warmup", "0.5", "--json", str(out)])
    record = json.loads(out.read_text())
    assert [r["sessions"] for r in record["results"]] == [1]
    assert record["start_seconds"] > 0 and record["config"]["backend"] == "torch"
