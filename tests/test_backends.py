"""Every backend gives the torch backend's pictures: the same tests, for each one available here.

``compile`` runs on this CPU (inductor's C++ kernels; the first frame of each shape compiles,
about half a minute for the tiny UNet); ``trt`` needs TensorRT and a GPU and says so when skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends import BACKENDS, backend_missing, prepare_backend
from engine.config import StreamConfig
from engine.runtime import Engine, EngineConfig
from engine.stream import StreamDiffusion
from tests.test_runtime import lockstep, solo

CONFIG = StreamConfig(t_index_list=(10, 30, 45), width=64, height=64, cfg_type="self", prompt="a red fox")
CPU = torch.device("cpu")


def frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(count)]


def backend_or_skip(name: str) -> str:
    missing = backend_missing(name, CPU)
    if missing is not None:
        pytest.skip(f"the {name} backend needs {missing}")
    return name


@pytest.fixture(params=sorted(BACKENDS), scope="module")
def prepared(request, tiny):
    name = backend_or_skip(request.param)
    yield name, prepare_backend(name, tiny, CONFIG)
    if name == "compile":  # inductor's compile workers would otherwise take CPU from the tests after these
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()


def test_each_backend_streams_the_torch_backends_pictures(tiny, prepared) -> None:
    _, (components, unet) = prepared
    inputs = frames(6)
    stream = StreamDiffusion(components, CONFIG, unet=unet)
    got = [out for out in (stream(frame) for frame in inputs) if out is not None]
    want = solo(tiny, CONFIG, inputs)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # fused kernels round differently, not more


async def test_the_engine_runs_each_backend_by_name(tiny, prepared) -> None:
    name, _ = prepared
    inputs = frames(4)
    async with Engine(EngineConfig(stream=CONFIG, backend=name, max_sessions=1), components=tiny) as engine:
        outputs = await lockstep(await engine.open_session(), inputs)
    want = solo(tiny, CONFIG, inputs)
    assert len(outputs) == len(want) == 2
    for output, frame in zip(outputs, want):
        assert np.abs(output.frame.astype(int) - frame.astype(int)).max() <= 2


def test_an_unknown_backend_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"backend='onnx' is unknown; available: \['auto', 'torch', 'compile', 'trt'\]"):
        EngineConfig(backend="onnx")


def test_a_backend_that_cannot_run_says_what_it_lacks(tiny, monkeypatch) -> None:
    import engine.compiled

    monkeypatch.setattr(engine.compiled.shutil, "which", lambda name: None)
    assert "C++ compiler" in backend_missing("compile", CPU)
    with pytest.raises(RuntimeError, match="the compile backend needs a C\\+\\+ compiler"):
        prepare_backend("compile", tiny, CONFIG)


def test_the_compile_backend_compiles_every_shape_before_streams_start(tiny) -> None:
    """A second session must not freeze the first while its batch shape compiles: every call size
    the worker can send (1 to ``sessions`` streams, VAE and UNet) compiles before streams start."""
    import torch._dynamo.utils

    from engine.batch import FrameJob, run_jobs
    from engine.graphs import CallRunner
    from engine.slots import StreamSlots
    from engine.step import step_models

    backend_or_skip("compile")
    components, unet = prepare_backend("compile", tiny, CONFIG)
    runner = CallRunner(step_models(components, unet), StreamSlots.for_config(components, CONFIG, 3), 3)
    runner.warm_up()
    compiled_at_start = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    streams = [StreamDiffusion(components, CONFIG.with_updates(prompt=p), runner=runner) for p in ("ink", "neon", "oil")]
    for k, picture in enumerate(frames(5)):
        jobs = [FrameJob(stream, picture) for stream in streams[: 1 + k % 3]]  # 1, 2, 3, 1, 2 streams per call
        sizes = run_jobs(jobs, runner)
        assert sizes["unet_streams"] == len(jobs) and all(job.error is None for job in jobs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_at_start, "a shape compiled mid-stream"


async def test_auto_falls_back_to_eager_torch_when_compiling_fails(tiny, monkeypatch) -> None:
    """auto promises a backend that serves: if the compiled one fails to start, eager torch serves instead."""
    import engine.runtime

    real_prepare = engine.runtime.prepare_backend

    def prepare(name, components, config, options):
        if name == "compile":
            raise RuntimeError("triton: no C compiler found")
        return real_prepare(name, components, config, options)

    monkeypatch.setattr(engine.runtime, "resolve_backend", lambda name, device: "compile" if name == "auto" else name)
    monkeypatch.setattr(engine.runtime, "prepare_backend", prepare)
    inputs = frames(3)
    async with Engine(EngineConfig(stream=CONFIG, backend="auto", max_sessions=1), components=tiny) as engine:
        assert engine.backend == "torch"
        outputs = await lockstep(await engine.open_session(), inputs)
    assert len(outputs) == 1
    with pytest.raises(RuntimeError, match="no C compiler"):  # asked for by name, it fails loudly
        async with Engine(EngineConfig(stream=CONFIG, backend="compile", max_sessions=1), components=tiny):
            pass
