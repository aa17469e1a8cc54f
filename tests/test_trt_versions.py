"""Which TensorRT the build accepts, and the precision each model dtype's engines are keyed by (no TensorRT needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import StreamConfig
from trt_build import pipeline
from trt_build.cache import EngineCache
from trt_build.export import export_specs
from trt_build.pipeline import BuildPlan
from trt_build.shapes import ShapeProfile


@pytest.mark.parametrize(("version", "refused"), [("10.1.0.27", False), ("10.13.3", False), ("10.0.1.6", True),
                                                  ("9.3.0", True), ("11.0.0.1", True)])
def test_tensorrt_10_from_10_1_is_accepted(monkeypatch, version: str, refused: bool) -> None:
    """10.0 lacks ``device_memory_size_v2`` (the runtime's), 11 removed the FP16 builder flag (fp32 models')."""
    monkeypatch.setattr(pipeline, "tensorrt_version", lambda: version)
    monkeypatch.setattr(pipeline, "onnx_tools_missing", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    missing = pipeline.tensorrt_missing()
    if refused:
        assert missing is not None and f"found {version}" in missing and "'tensorrt>=10.1,<11'" in missing
    else:
        assert missing is None


@pytest.mark.parametrize(("dtype", "fp16", "precision"), [(torch.float16, True, "fp16"),
                                                          (torch.bfloat16, True, "bf16"),
                                                          (torch.float32, True, "fp16"),
                                                          (torch.float32, False, "fp32")])
def test_engines_are_keyed_by_the_models_precision(tiny, tmp_path, dtype: torch.dtype, fp16: bool,
                                                   precision: str) -> None:
    components = dataclasses.replace(tiny, dtype=dtype)
    config = StreamConfig(t_index_list=(32,), width=64, height=64)
    plan = BuildPlan(components, ShapeProfile.for_stream(config), model="tiny", fp16=fp16, cache=EngineCache(tmp_path))
    spec = next(iter(export_specs(components, plan.profile).values()))
    assert plan.key(spec, "10.1.0", ("9.0", "NVIDIA H100")).precision == precision
