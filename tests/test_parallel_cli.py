"""``--devices`` / ``--parallel`` on the benchmarks: ``engine.bench`` hands several devices to the parallel
benchmark of the mode, with the flags they share, and the parallel benchmarks keep their documented flags.

Most tests catch the hand-over (the parallel benchmark's ``main`` replaced by a recorder) and parse what
was handed over with the real parser; one runs the whole chain on the tiny preset with two CPU processes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from engine import bench, bench_methods
from engine.parallel import bench as bench_asyncdiff
from engine.parallel import bench_replicas, bench_stream
from engine.parallel.flags import schedules
from engine.parallel.fidelity import MAX_PSNR
from engine.parallel.flags import bench_parser, given_flags, write_json


@pytest.fixture
def handed(monkeypatch) -> dict[str, list[str]]:
    """What ``engine.bench`` hands each parallel benchmark (they record instead of running)."""
    calls: dict[str, list[str]] = {}

    def recorder(name: str):
        def main(argv: list[str]) -> int:
            calls[name] = list(argv)
            return 0
        return main

    for name, module in (("asyncdiff", bench_stream), ("replicas", bench_replicas)):
        monkeypatch.setattr(module, "main", recorder(name))
    return calls


def run(main, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------- engine.bench hands several devices over


def test_several_devices_run_the_sharded_stream_benchmark_with_the_shared_flags(handed) -> None:
    code, _, err = run(bench.main, "--devices", "cpu,cpu", "--preset", "tiny", "--size", "64",
                       "--t-index-list", "20,35", "--frames", "2", "--threads", "1", "--json", "out/x.json")
    assert code == 0, err
    assert handed == {"asyncdiff": ["--devices", "cpu,cpu", "--model", "tiny", "--size", "64", "--t-index-list",
                                    "20,35", "--threads", "1", "--json", "out/x.json", "--calls", "2"]}
    assert "--parallel asyncdiff: python -m engine.parallel.bench_stream" in err
    args = bench_stream.parse_args(handed["asyncdiff"])
    assert (args.devices, args.model, args.size, args.t_index_list, args.calls) == ("cpu,cpu", "tiny", 64, "20,35", 2)


def test_flags_not_given_keep_the_parallel_benchmarks_defaults(handed) -> None:
    code, _, err = run(bench.main, "--devices", "0,1")
    assert code == 0, err
    assert handed == {"asyncdiff": ["--devices", "cuda:0,cuda:1"]}
    args = bench_stream.parse_args(handed["asyncdiff"])
    assert (args.model, args.size, args.steps, args.calls) == ("small", 256, "1,4", 10)


def test_the_runtime_benchmark_on_several_devices_is_the_replicas_benchmark(handed) -> None:
    code, _, err = run(bench.main, "--runtime", "--devices", "cpu,cpu", "--preset", "tiny", "--sessions", "2",
                       "--dur", "3", "--warmup", "1.5")  # an abbreviation counts as given
    assert code == 0, err
    assert handed == {"replicas": ["--devices", "cpu,cpu", "--model", "tiny", "--sessions", "2", "--seconds", "3.0",
                                   "--warmup", "1.5"]}
    args = bench_replicas.build_parser().parse_args(handed["replicas"])
    assert (args.sessions, args.seconds, args.warmup, args.size) == ("2", 3.0, 1.5, 128)


def test_parallel_replicas_without_runtime_runs_the_replicas_benchmark(handed) -> None:
    code, _, err = run(bench.main, "--devices", "cpu,cpu", "--parallel", "replicas", "--size", "64")
    assert code == 0, err
    assert handed == {"replicas": ["--devices", "cpu,cpu", "--size", "64"]}


def test_one_device_is_the_one_device_benchmark_on_it(handed, monkeypatch) -> None:
    class Loaded(Exception):
        pass

    specs = []

    def load(spec):
        specs.append(spec)
        raise Loaded

    monkeypatch.setattr(bench_methods, "load_components", load)
    with pytest.raises(Loaded):
        bench.main(["--devices", "cpu", "--preset", "tiny", "--skip-diffusers"])
    assert handed == {} and [(s.model, s.device) for s in specs] == [("tiny", "cpu")]


@pytest.mark.parametrize("argv,message", [
    (["--devices", "cpu,cpu", "--runtime", "--parallel", "asyncdiff"], "--runtime drives several streams"),
    (["--devices", "cpu,cpu", "--backend", "compile"], "--backend compile: the parallel benchmarks' device processes"),
    (["--devices", "cpu,cpu", "--rounds", "3", "--cfg-type", "self"], "--rounds, --cfg-type would do nothing"),
    (["--devices", "cpu,cpu", "--sessions", "2"], "--sessions would do nothing with --parallel asyncdiff"),
    (["--devices", "cpu,cpu", "--parallel", "replicas", "--frames", "5"], "--frames would do nothing"),
    (["--devices", "cpu", "--parallel", "asyncdiff"], "give --devices with two or more"),
    (["--parallel", "replicas"], "give --devices with two or more"),
    (["--devices", "cpu,cuda:0"], "must be all cpu or all CUDA devices"),
])
def test_what_cannot_be_handed_over_exits_2_with_one_line(handed, argv, message) -> None:
    code, _, err = run(bench.main, *argv)
    assert code == 2 and handed == {}
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err


def test_bench_help_names_the_modes_and_what_is_passed_on(capsys) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--devices LIST" in text and "{asyncdiff,replicas}" in text
    assert "replicas with --runtime" in text and "--frames (as --calls)" in text


# ------------------------------------------------------------------- the parallel benchmarks' own flags


def test_the_documented_defaults_still_hold() -> None:
    """BENCHMARKS.md records each parallel benchmark's defaults beside its table."""
    asyncdiff = bench_asyncdiff.parse_args([])
    assert (asyncdiff.model, asyncdiff.size, asyncdiff.steps, asyncdiff.configs, asyncdiff.warmup_steps,
            asyncdiff.guidance_scale, asyncdiff.threads, asyncdiff.devices) == ("small", 256, "25,50", "2x1,2x2", 1,
                                                                               7.5, 1, None)
    stream = bench_stream.parse_args([])
    assert (stream.model, stream.size, stream.steps, stream.procs, stream.calls, stream.cost, stream.threads,
            stream.devices, stream.t_index_list) == ("small", 256, "1,4", 2, 10, "measured", 1, None, None)
    replicas = bench_replicas.build_parser().parse_args([])
    assert (replicas.model, replicas.size, replicas.sessions, replicas.devices, replicas.threads, replicas.seconds,
            replicas.warmup, replicas.offer_fps) == ("small", 128, "2,4", "cpu,cpu", 1, 15.0, 8.0, 30.0)
    assert schedules(replicas, fallback=(32, 45)) == [(32, 45)]  # neither --steps nor --t-index-list: as documented
    assert schedules(bench_replicas.build_parser().parse_args(["--steps", "1,4"]), fallback=(32, 45)) == \
        [(30,), (10, 20, 30, 40)]


def test_the_sharded_stream_benchmark_reads_its_ranks_and_schedules() -> None:
    assert bench_stream.ranks(bench_stream.parse_args([])) == ("cpu", "cpu")
    assert bench_stream.ranks(bench_stream.parse_args(["--procs", "3"])) == ("cpu",) * 3
    assert bench_stream.ranks(bench_stream.parse_args(["--devices", "0,1"])) == ("cuda:0", "cuda:1")
    assert bench_stream.schedules(bench_stream.parse_args([])) == [(30,), (10, 20, 30, 40)]
    assert bench_stream.schedules(bench_stream.parse_args(["--t-index-list", "20,35"])) == [(20, 35)]
    for argv, message in ((["--devices", "cpu"], "at least 2 devices"), (["--procs", "1"], "at least 2 ranks")):
        with pytest.raises(ValueError, match=message):
            bench_stream.ranks(bench_stream.parse_args(argv))
    with pytest.raises(ValueError, match=r"--steps 3: \[3\] not among"):
        bench_stream.schedules(bench_stream.parse_args(["--steps", "3"]))
    with pytest.raises(SystemExit):  # one or the other, as argparse says
        bench_stream.parse_args(["--procs", "3", "--devices", "cpu,cpu"])


def test_the_asyncdiff_benchmark_refuses_too_few_devices_before_starting() -> None:
    code, _, err = run(bench_asyncdiff.main, "--devices", "cpu,cpu", "--configs", "2x1,2x2")
    assert code == 2 and "--configs 2x1,2x2 needs 3" in err
    args = bench_asyncdiff.parse_args(["--devices", "cpu,cpu,cpu"])
    configs = [bench_asyncdiff.Config(1, 1), bench_asyncdiff.Config(2, 2)]
    assert bench_asyncdiff.named_devices(args, configs) == ("cpu",) * 3


TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "test", "RANK": "1", "WORLD_SIZE": "2"}


@pytest.mark.parametrize("module", ["app.main", "app.stylize", "engine.bench", "engine.parallel.bench",
                                    "engine.parallel.bench_stream", "engine.parallel.bench_replicas"])
def test_commands_that_start_their_own_processes_refuse_torchrun(module, monkeypatch, capsys) -> None:
    """N copies started by torchrun would each spawn a process per device (and the app would fight over its
    port): each exits 2 before loading anything, naming the command to run instead."""
    import importlib

    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    argv = ["--input", "in.mp4", "--output", "out.mp4"] if module == "app.stylize" else []
    assert importlib.import_module(module).main(argv) == 2
    error = capsys.readouterr().err
    assert "was started by torchrun (rank 1 of 2)" in error and "--devices 0,1" in error


def test_given_flags_are_what_the_command_line_names() -> None:
    parser = bench_parser("x", None, size=64)
    parser.add_argument("--verbose", action="store_true")
    assert given_flags(parser, []) == set()
    assert given_flags(parser, ["--size", "64", "--verb"]) == {"size", "verbose"}
    assert given_flags(parser, ["--model=tiny", "--json", "a.json"]) == {"model", "json"}


def test_write_json_makes_the_folder(tmp_path, capsys) -> None:
    path = tmp_path / "deep" / "er" / "out.json"
    write_json(str(path), {"rows": [1, 2]})
    write_json(None, {"rows": []})  # no path: nothing written
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert capsys.readouterr().out == f"wrote {path}\n"


def test_every_parallel_benchmark_starts_from_the_shared_parser() -> None:
    parsers: list[argparse.ArgumentParser] = [bench_asyncdiff.build_parser(), bench_stream.build_parser(),
                                              bench_replicas.build_parser()]
    for parser in parsers:
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert {"--model", "--size", "--threads", "--json", "--devices"} <= flags, parser.prog
        assert [action.option_strings for action in parser._actions if not action.help] == [], parser.prog


# ------------------------------------------------------------------- the whole chain, tiny


@pytest.mark.slow
def test_engine_bench_on_two_cpu_processes_runs_the_sharded_stream_benchmark(tmp_path) -> None:
    """Tiny preset, 64×64, one timed call per mode: the table and the JSON come out, and every-call-synchronous
    frames equal one device's."""
    path = tmp_path / "sharded.json"
    code, out, err = run(bench.main, "--devices", "cpu,cpu", "--preset", "tiny", "--size", "64",
                         "--t-index-list", "20,35", "--frames", "1", "--json", str(path))
    assert code == 0, err
    record = json.loads(path.read_text())
    assert record["devices"] == ["cpu", "cpu"] and record["args"]["calls"] == 1
    rows = {row["mode"]: row for row in record["rows"]}
    assert list(rows) == ["one device", "sharded-sync", "sharded-async", "sharded-async, 2 in flight"]
    assert rows["sharded-sync"]["psnr_min"] >= MAX_PSNR and rows["sharded-sync"]["procs"] == 2
    assert "| sharded-async, 2 in flight | 2 | 2 |" in out


def test_replica_shares_spread_streams_as_the_engine_does() -> None:
    assert bench_replicas.replica_shares(1, 2) == [1] and bench_replicas.replica_shares(4, 2) == [2, 2]
    assert bench_replicas.replica_shares(5, 3) == [2, 2, 1]


@pytest.mark.slow
def test_the_replicas_benchmark_measures_each_share_for_its_ceiling(tmp_path, one_thread) -> None:
    """Tiny preset, two replica processes, 1 and 3 streams: the one process also runs each replica's share (1, 2),
    and the ceiling is their sum over one process's rate at S."""
    path = tmp_path / "replicas.json"
    code, out, err = run(bench_replicas.main, "--model", "tiny", "--size", "64", "--steps", "1", "--sessions", "1,3",
                         "--seconds", "1.5", "--warmup", "1.5", "--json", str(path))
    assert code == 0, err
    rows = {row["streams"]: row for row in json.loads(path.read_text())["rows"]}
    assert sorted(rows) == [1, 3] and all(row["replicas"]["fps"] > 0 for row in rows.values())
    one = rows[1]["one"]["fps"]
    assert rows[1]["ideal_fps"] == pytest.approx(one) and rows[1]["ceiling"] == pytest.approx(1.0)
    three = rows[3]
    assert three["ceiling"] == pytest.approx(three["ideal_fps"] / three["one"]["fps"])
    assert three["of_ceiling"] == pytest.approx(three["replicas"]["fps"] / three["ideal_fps"])
    assert "| ceiling | of ceiling |" in out


def test_the_components_benchmark_times_each_part_and_prices_the_links(tmp_path) -> None:
    """``engine.parallel.bench_components`` on the tiny preset: k parts timed, links sized, the model on paper."""
    import json

    from engine.parallel import bench_components

    out = tmp_path / "components.json"
    assert bench_components.main(["--model", "tiny", "--size", "64", "--steps", "32;20,35", "--k", "2,3",
                                  "--repeats", "3", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [(r["steps"], r["k"]) for r in record["rows"]] == [(1, 2), (1, 3), (2, 2), (2, 3)]
    for r in record["rows"]:
        assert len(r["component_ms"]) == r["k"] == r["cuts"].count("|") + 1
        assert all(ms > 0 for ms in r["component_ms"]) and r["whole_ms"] > 0
        assert 0 < r["largest_link_mib"] <= r["all_links_mib"]
        for name, rate in bench_components.LINKS.items():
            link_ms = 1e3 * r["largest_link_mib"] * 2**20 / rate
            assert abs(r["link_ms"][name] - link_ms) < 1e-9
            period = max(max(r["component_ms"]), link_ms)
            assert abs(r["predicted_speedup"][name] - r["whole_ms"] / period) < 1e-6
    assert bench_components.main(["--model", "tiny", "--k", "1"]) == 2
