"""Everything up to the TensorRT build, on the CPU: shapes, ONNX export checked on onnxruntime, clean-up,
the exported contract driving the real stream, and the engine cache."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine.backends import torch_unet
from engine.config import StreamConfig
from engine.runtime import Engine, EngineConfig
from engine.stream import StreamDiffusion
from tests.test_runtime import wait_until
from trt_build.adapters import EngineUNet, EngineVae
from trt_build.cache import EngineCache, EngineKey, weights_fingerprint
from trt_build.check import compare_with_torch
from trt_build.export import OPSET, export_specs
from trt_build.pipeline import BuildPlan, build_engines, prepare_onnx
from trt_build.shapes import Range, ShapeProfile

pytest.importorskip("onnxruntime", reason="needs onnxruntime (test extra)")
pytest.importorskip("polygraphy", reason="needs polygraphy (test extra)")

CONFIG = StreamConfig(t_index_list=(10, 30, 45), width=64, height=64, cfg_type="self", prompt="a red fox")
DYNAMIC = ShapeProfile.for_stream(CONFIG, sessions=3, height=Range(32, 64, 96), width=Range(32, 64, 96))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> dict[str, tuple]:
    folder = tmp_path_factory.mktemp("onnx")
    specs = export_specs(tiny, DYNAMIC)
    return {part: (spec, prepare_onnx(spec, folder / f"{part}.onnx", tiny.device)) for part, spec in specs.items()}


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
async def test_the_unet_profile_covers_the_rows_the_runtime_really_sends(tiny, cfg_type) -> None:
    config = StreamConfig(t_index_list=(20, 40), width=64, height=64, cfg_type=cfg_type)
    profile = ShapeProfile.for_stream(config, sessions=3)
    plain_unet, seen, gate = torch_unet(tiny.unet), [], threading.Event()

    def gated_unet(sample, timesteps, embeds):  # holds the first call until every session has a frame waiting
        gate.wait(10)
        seen.append(sample.shape[0])
        return plain_unet(sample, timesteps, embeds)

    frame = np.zeros((64, 64, 3), np.uint8)
    async with Engine(EngineConfig(stream=config, max_sessions=3), components=tiny, unet=gated_unet) as engine:
        sessions = [await engine.open_session() for _ in range(3)]
        sessions[0].submit(frame)
        await asyncio.sleep(0.5)  # the worker takes it and waits at the gate
        for session in sessions:
            session.submit(frame)
        gate.set()
        await wait_until(lambda: [s.metrics.processed for s in sessions] == [2, 1, 1])
    assert seen == [profile.unet_batch.opt, profile.unet_batch.max], (seen, profile)


def test_shape_ranges_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Range(4, 2, 8)
    with pytest.raises(ValueError, match="positive"):
        Range(0, 1, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        ShapeProfile.for_stream(CONFIG, height=Range(60, 64, 96))
    with pytest.raises(ValueError, match="sessions"):
        ShapeProfile.for_stream(CONFIG, sessions=0)
    with pytest.raises(ValueError, match="at most 2048"):
        ShapeProfile.for_stream(CONFIG, width=Range(64, 64, 4096))


def test_sizes_the_unet_cannot_downsample_are_refused(tiny) -> None:
    odd = ShapeProfile.for_stream(StreamConfig(width=72, height=64))  # tiny halves the latent once: 16 px steps
    with pytest.raises(ValueError, match="width 72 px: this model needs every bound to be a multiple of 16"):
        export_specs(tiny, odd)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("part", ["unet", "vae_encoder", "vae_decoder"])
def test_each_part_matches_torch_on_onnxruntime_across_the_profile(exported, part) -> None:
    spec, report = exported[part]
    agreements = compare_with_torch(spec, report.path)
    assert {a.shape for a in agreements} == {"min", "opt", "max"}
    for agreement in agreements:
        assert agreement.output_scale > 0.1, "a zero output would make the comparison meaningless"
        assert agreement.relative_error < 1e-4, agreement


def test_graphs_are_opset_17_with_named_dynamic_axes(exported) -> None:
    spec, report = exported["unet"]
    model = onnx.load(str(report.path), load_external_data=False)
    assert model.opset_import[0].version == OPSET
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"sample": ["batch", 4, "latent_height", "latent_width"], "timestep": ["batch"],
                      "encoder_hidden_states": ["batch", 77, 32]}
    assert report.nodes_after < report.nodes_before, "clean-up folds the tracer's shape arithmetic"


def test_a_static_profile_gives_static_graphs(tiny, tmp_path) -> None:
    spec = export_specs(tiny, ShapeProfile.for_stream(CONFIG, sessions=2))["vae_decoder"]  # batch 1..2, 64 px
    report = prepare_onnx(spec, tmp_path / "decoder.onnx", tiny.device)
    model = onnx.load(str(report.path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, 8, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"], "the raw export is removed"


def ort_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]

    def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = session.run(outputs, {k: v.detach().cpu().numpy() for k, v in inputs.items()})
        return {name: torch.from_numpy(array) for name, array in zip(outputs, arrays)}

    return run


def test_the_exported_graphs_drive_the_real_stream_like_torch_does(tiny, exported) -> None:
    """The contract the TensorRT backend relies on: same adapters, graphs run by onnxruntime."""
    from dataclasses import replace

    vae = EngineVae(ort_runner(exported["vae_encoder"][1].path), ort_runner(exported["vae_decoder"][1].path),
                    tiny.dtype)
    onnx_stream = StreamDiffusion(replace(tiny, vae=vae), CONFIG, unet=EngineUNet(ort_runner(exported["unet"][1].path)))
    torch_stream = StreamDiffusion(tiny, CONFIG)
    frames = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(k)) for k in range(5)]
    outputs = [(onnx_stream(f), torch_stream(f)) for f in frames]
    finished = [(a, b) for a, b in outputs if a is not None]
    assert len(finished) == 3
    for from_onnx, from_torch in finished:
        assert (from_onnx - from_torch).abs().max() < 1e-4
    assert (finished[0][1] - finished[-1][1]).abs().max() > 1e-2, "the frames differ, so the check means something"


# ------------------------------------------------------------------ cache


def key(**changes) -> EngineKey:
    fields = dict(part="unet", model="tiny", weights="abc", lora=None, profile=DYNAMIC, precision="fp16",
                  tensorrt="10.13.0", compute_capability="9.0", gpu="NVIDIA H100 80GB HBM3", opset=OPSET)
    return EngineKey(**{**fields, **changes})


KEY_CHANGES = [
    {"part": "vae_decoder"}, {"model": "other"}, {"weights": "abd"}, {"lora": "latent-consistency/lcm-lora-sdv1-5"},
    {"profile": ShapeProfile.for_stream(CONFIG, sessions=4)}, {"precision": "fp32"}, {"tensorrt": "10.14.0"},
    {"compute_capability": "8.9"}, {"gpu": "NVIDIA L4"}, {"opset": 18}, {"format": 2},
]


@pytest.mark.parametrize("change", KEY_CHANGES)
def test_every_field_of_the_key_names_another_engine(change) -> None:
    assert key(**change).digest() != key().digest()
    assert key().digest() == key().digest()


def test_the_key_test_covers_every_field() -> None:
    import dataclasses

    assert {name for change in KEY_CHANGES for name in change} == {f.name for f in dataclasses.fields(EngineKey)}


def test_weights_fingerprint_follows_the_weights(tiny) -> None:
    from engine.presets import build_preset

    assert weights_fingerprint(tiny.unet) == weights_fingerprint(build_preset("tiny").unet)
    changed = build_preset("tiny").unet
    with torch.no_grad():
        largest = max(changed.parameters(), key=lambda p: p.numel())
        largest.view(-1)[1] += 1e-3  # one value of the largest tensor: still another engine
    assert weights_fingerprint(changed) != weights_fingerprint(tiny.unet)
    rescaled = build_preset("tiny").vae
    rescaled.register_to_config(scaling_factor=0.5)  # baked into the exported VAE graphs, not a weight
    assert weights_fingerprint(rescaled) != weights_fingerprint(tiny.vae)


def test_the_cache_finds_what_it_stored_and_nothing_else(tmp_path) -> None:
    cache = EngineCache(tmp_path)
    assert cache.get(key()) is None
    built = []
    path, fresh = cache.get_or_build(key(), lambda target: built.append(target.write_bytes(b"plan")))
    assert fresh and path.read_bytes() == b"plan"
    again, fresh = cache.get_or_build(key(), lambda target: built.append(target.write_bytes(b"other")))
    assert again == path and not fresh and len(built) == 1
    assert json.loads(path.with_suffix(".json").read_text())["compute_capability"] == "9.0"
    assert cache.get(key(tensorrt="11.0")) is None
    path.with_suffix(".json").write_text("{}")  # a sidecar that disagrees: never trust the file
    assert cache.get(key()) is None


def test_a_build_that_fails_leaves_nothing_behind(tmp_path) -> None:
    def failing(target: Path) -> None:
        target.write_bytes(b"half an engine")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        EngineCache(tmp_path).put(key(), failing)
    assert list(tmp_path.iterdir()) == []


class Progress:
    """A progress callback that keeps its lines; ``waiting`` is set once one says it waits for another build."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.waiting = threading.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("waiting for another process building"):
            self.waiting.set()


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_two_builders_of_one_engine_build_it_once_and_the_second_says_it_waits(tmp_path) -> None:
    """Replicas starting together: the second waits on the engine's lock (each thread opens the lock file
    itself, so they exclude each other as two processes do), then loads what the first built."""
    cache, release, progress = EngineCache(tmp_path), threading.Event(), Progress()
    builds, results = [], {}

    def slow_build(target: Path) -> None:
        builds.append(target)
        assert release.wait(60)
        target.write_bytes(b"plan")

    def want(name: str, progress) -> None:
        results[name] = cache.get_or_build(key(), slow_build, progress)

    first = threading.Thread(target=want, args=("first", Progress()))
    first.start()
    assert wait_for(lambda: builds)
    second = threading.Thread(target=want, args=("second", progress))
    second.start()
    assert progress.waiting.wait(60)
    release.set()
    for thread in (first, second):
        thread.join(60)
    path = cache.path(key())
    assert results == {"first": (path, True), "second": (path, False)} and len(builds) == 1
    assert progress.lines == [f"waiting for another process building {path.name}"]
    assert path.read_bytes() == b"plan"


HOLD_THE_BUILD = """
import pickle, sys, time
from pathlib import Path
from trt_build.cache import EngineCache

root, key = pickle.loads(sys.stdin.buffer.read())
def build(target):
    Path(root, "building").touch()
    time.sleep(120)
EngineCache(Path(root)).get_or_build(key, build)
"""


def test_a_builder_killed_half_way_lets_the_waiting_process_build(tmp_path) -> None:
    """Another process holds the build; this one waits, saying so, and builds as soon as that one dies
    (the kernel drops a dead process's lock: no stale lock file to clear by hand)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_BUILD], stdin=subprocess.PIPE)
    holder.stdin.write(pickle.dumps((str(tmp_path), key())))
    holder.stdin.close()
    cache, progress, results = EngineCache(tmp_path), Progress(), []
    waiter = threading.Thread(target=lambda: results.append(
        cache.get_or_build(key(), lambda target: target.write_bytes(b"plan"), progress)))
    try:
        assert wait_for(lambda: (tmp_path / "building").exists() or holder.poll() is not None, timeout=120)
        assert holder.poll() is None, "the other process failed before building"
        waiter.start()
        assert progress.waiting.wait(60)
        assert not results, "it waits while the other process builds"
    finally:
        holder.kill()
        holder.wait(60)
    waiter.join(60)
    path = cache.path(key())
    assert results == [(path, True)] and path.read_bytes() == b"plan"
    assert progress.lines == [f"waiting for another process building {path.name}"]


# ------------------------------------------------------------------ building, without TensorRT


STATIC = ShapeProfile.for_stream(CONFIG, sessions=2)


class CpuBuilder:
    """Stands in for :mod:`trt_build.builder`: reads the ONNX file it is given, as TensorRT's parser would,
    and checks it is unchanged after ``while_parsing`` (another build running meanwhile) has run."""

    def __init__(self) -> None:
        self.parsed: list[Path] = []
        self.while_parsing = lambda onnx_path: None

    def write_engine(self, onnx_path: Path, shapes, target: Path, **options) -> None:
        graph = onnx_path.read_bytes()
        self.parsed.append(onnx_path)
        self.while_parsing(onnx_path)
        assert onnx_path.read_bytes() == graph, "another build changed the file under the parser"
        target.write_bytes(onnx.load_from_string(graph).graph.name.encode())


@pytest.fixture
def cpu_builder(monkeypatch) -> CpuBuilder:
    """``build_engines`` on the CPU: a made-up GPU, :class:`CpuBuilder` for TensorRT, and the VAE halves
    only (exporting the UNet takes the most time and adds nothing here)."""
    import types

    builder, module = CpuBuilder(), types.ModuleType("trt_build.builder")
    module.write_engine = builder.write_engine
    monkeypatch.setitem(sys.modules, "trt_build.builder", module)
    monkeypatch.setattr(BuildPlan, "specs", lambda plan: {part: spec for part, spec in
                                                          export_specs(plan.components, plan.profile).items()
                                                          if part != "unet"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    return builder


def test_builds_at_once_never_share_an_onnx_file(tiny, tmp_path, cpu_builder) -> None:
    """Two engine keys over one set of weights (two GPU kinds, or one model under two names) building at
    once: the second export must neither overwrite nor delete the file the first one's parser reads."""
    cache = EngineCache(tmp_path)

    def build_the_other_name(onnx_path: Path) -> None:
        cpu_builder.while_parsing = lambda onnx_path: None
        build_engines(BuildPlan(tiny, STATIC, model="tiny under another name", cache=cache))

    cpu_builder.while_parsing = build_the_other_name
    build_engines(BuildPlan(tiny, STATIC, model="tiny", cache=cache))
    assert len(set(cpu_builder.parsed)) == 4
    assert list((tmp_path / "onnx").iterdir()) == [], "each build removes its ONNX files"


def test_what_a_killed_build_left_goes_with_the_next_build(tiny, tmp_path, cpu_builder) -> None:
    """A build killed outright (the OOM killer, SIGKILL) leaves its ONNX files (GBs for a UNet) in its engine's
    folder; the next build of that engine empties it before exporting, and removes it after."""
    cache = EngineCache(tmp_path)
    seen: list[list[str]] = []
    cpu_builder.while_parsing = lambda onnx_path: seen.append(sorted(p.name for p in onnx_path.parent.iterdir()))
    plan = BuildPlan(tiny, STATIC, model="tiny", cache=cache)
    leftovers = []
    for spec in plan.specs().values():  # what a killed build of each engine left
        key = plan.key(spec, "none", ("9.0", "NVIDIA H100 80GB HBM3"))  # no TensorRT here: its version "none"
        folder = tmp_path / "onnx" / Path(key.filename).stem
        folder.mkdir(parents=True)
        (folder / "unet.onnx.data").write_bytes(b"weights of a build that was killed")
        leftovers.append(folder)
    build_engines(plan)
    assert [p.parent for p in cpu_builder.parsed] == leftovers, "each engine's build used its own folder"
    assert all("unet.onnx.data" not in names for names in seen), "the leftovers were still there"
    assert list((tmp_path / "onnx").iterdir()) == []


def test_a_second_start_waits_for_the_engines_the_first_builds(tiny, tmp_path, cpu_builder) -> None:
    """Replicas starting together: each part is exported and built once, and both get the same engines."""
    cache, progress, results = EngineCache(tmp_path), Progress(), []
    second = threading.Thread(target=lambda: results.append(
        build_engines(BuildPlan(tiny, STATIC, model="tiny", cache=cache), progress)))

    def start_the_second(onnx_path: Path) -> None:
        cpu_builder.while_parsing = lambda onnx_path: None
        second.start()
        assert progress.waiting.wait(60)

    cpu_builder.while_parsing = start_the_second
    first = build_engines(BuildPlan(tiny, STATIC, model="tiny", cache=cache))
    second.join(120)
    assert results == [first]
    assert sorted(path.name for path in cpu_builder.parsed) == ["vae_decoder.onnx", "vae_encoder.onnx"]
    assert f"waiting for another process building {first['vae_encoder'].name}" in progress.lines


# ------------------------------------------------------------------ the command


def test_the_command_exports_and_checks_three_graphs(tmp_path) -> None:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "trt_build", "--model", "tiny", "--width", "64", "--height", "64", "--onnx-only",
         "--check", "--out", str(tmp_path / "onnx"), "--json", str(report)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    parts = json.loads(report.read_text())["parts"]
    assert [p["part"] for p in parts] == ["unet", "vae_encoder", "vae_decoder"]
    assert all(p["max_relative_error"] < 1e-4 and Path(p["onnx"]).is_file() for p in parts)


def test_building_without_tensorrt_says_what_is_missing() -> None:
    from trt_build.pipeline import tensorrt_missing

    if tensorrt_missing() is None:
        pytest.skip("TensorRT and a GPU are here: the GPU tests build for real")
    result = subprocess.run([sys.executable, "-m", "trt_build", "--model", "tiny"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"trt_build: building engines needs {tensorrt_missing()}; --onnx-only exports without them"


def test_graphs_past_the_protobuf_limit_keep_their_weights_in_one_file_beside_them(tiny, tmp_path,
                                                                                     monkeypatch) -> None:
    """An fp32 SD UNet is 3.4 GB, past protobuf's 2 GB: the same path, forced here with a tiny limit."""
    import trt_build.optimize

    monkeypatch.setattr(trt_build.optimize, "PROTOBUF_LIMIT", 1000)
    spec = export_specs(tiny, DYNAMIC)["unet"]
    report = prepare_onnx(spec, tmp_path / "unet.onnx", tiny.device)
    assert report.external_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert (tmp_path / "unet.onnx").stat().st_size < (tmp_path / "unet.onnx.data").stat().st_size
    assert all(a.relative_error < 1e-4 for a in compare_with_torch(spec, report.path))
