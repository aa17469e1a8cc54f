"""TensorRT engine build (TensorRT 10+): ONNX in, a serialized engine out, with a progress bar.

One optimization profile covers the whole :class:`trt_build.shapes.ShapeProfile`: every input
gets its (min, opt, max) shapes, TensorRT tunes kernels for ``opt`` and accepts anything in
between. A graph exported in fp16 (the model loaded in fp16 on a GPU) is built *strongly typed*:
TensorRT keeps the types the graph has, so the timestep embedding stays in fp32 as in torch
instead of losing its phase at t≈999. An fp32 graph can be built weakly typed with fp16 allowed.

Typed against ``tensorrt-stubs``; runs only where TensorRT and a CUDA GPU are.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import tensorrt as trt
from tqdm import tqdm

from trt_build.shapes import ShapeTriple

WORKSPACE_BYTES = 4 << 30  # ample for SD 2.1's UNet at 512x512 with every tactic on
_LOGGER = trt.Logger(trt.Logger.WARNING)


class BuildError(RuntimeError):
    """The engine could not be built; the message carries TensorRT's own reasons."""


class ProgressBars(trt.IProgressMonitor):
    """TensorRT's build phases as tqdm bars (the top-level phase only: nested ones flicker past)."""

    def __init__(self, description: str) -> None:
        trt.IProgressMonitor.__init__(self)
        self.description = description
        self._bars: dict[str, tqdm] = {}
        self._lock = threading.Lock()  # TensorRT reports from several threads

    def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
        if parent_phase:
            return
        with self._lock:
            self._bars[phase_name] = tqdm(total=num_steps, desc=f"{self.description}: {phase_name}",
                                          unit="step", file=sys.stderr, leave=False)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase_name, None)
        if bar is not None:
            bar.close()


def build_engine(onnx_path: Path, shapes: dict[str, ShapeTriple], *, fp16: bool = True, strongly_typed: bool = False,
                 workspace_bytes: int = WORKSPACE_BYTES, description: str = "building") -> bytes:
    """A serialized engine for ``onnx_path`` accepting ``shapes`` (per input: min, opt, max).

    ``strongly_typed`` keeps the graph's own types (``fp16`` is then ignored); otherwise ``fp16``
    lets TensorRT pick fp16 kernels for an fp32 graph.
    """
    builder = trt.Builder(_LOGGER)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    _check_inputs(network, shapes, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    config.add_optimization_profile(profile)
    monitor = ProgressBars(description)
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build {onnx_path.name} (its log above says why)")
    return bytes(memoryview(serialized))


def write_engine(onnx_path: Path, shapes: dict[str, ShapeTriple], target: Path, *, fp16: bool = True,
                 strongly_typed: bool = False, description: str = "building") -> None:
    """Build and write the engine to ``target`` (for :meth:`trt_build.cache.EngineCache.put`)."""
    target.write_bytes(build_engine(onnx_path, shapes, fp16=fp16, strongly_typed=strongly_typed,
                                    description=description))


def _check_inputs(network: trt.INetworkDefinition, shapes: dict[str, ShapeTriple], onnx_path: Path) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(shapes):
        raise BuildError(f"{onnx_path.name} has inputs {sorted(names)}, the profile gives {sorted(shapes)}")
