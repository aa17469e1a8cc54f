"""Does an exported graph compute what the torch module computes? Checked on onnxruntime (CPU).

Runs both on seeded inputs at the profile's min, opt and max shapes and reports the largest
absolute difference relative to the output's scale. This is the check that everything up to
the TensorRT build is right, on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trt_build.export import ExportSpec

SHAPES = {0: "min", 1: "opt", 2: "max"}


@dataclass(frozen=True)
class Agreement:
    """How far onnxruntime's output was from torch's, at one shape."""

    part: str
    shape: str
    input_shapes: dict[str, tuple[int, ...]]
    max_abs_error: float
    output_scale: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / max(self.output_scale, 1e-12)


def compare_with_torch(spec: ExportSpec, onnx_path: Path, shape_indices: tuple[int, ...] = (0, 1, 2),
                       seed: int = 1) -> list[Agreement]:
    """Run ``spec``'s module and its ONNX graph on the same inputs at each of the given shapes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    device = next(spec.module.parameters()).device
    results: list[Agreement] = []
    for index in shape_indices:
        inputs = spec.sample_inputs(device, index, seed)
        shapes = {name: tuple(value.shape) for name, value in inputs.items()}
        if any(seen.input_shapes == shapes for seen in results):
            continue  # a static profile's min, opt and max are one shape
        with torch.inference_mode():
            expected = spec.module.eval()(*inputs.values()).float().cpu().numpy()
        feed = {name: value.cpu().numpy() for name, value in inputs.items()}
        got = session.run([spec.output], feed)[0].astype(np.float32)
        if got.shape != expected.shape:
            raise AssertionError(f"{spec.part}: onnxruntime gave shape {got.shape}, torch {expected.shape}")
        results.append(Agreement(spec.part, SHAPES[index], shapes,
                                 float(np.abs(got - expected).max()), float(np.abs(expected).max())))
    return results
