"""Running TensorRT engines from torch (TensorRT 10+ tensor API).

:class:`TrtEngine` binds torch CUDA tensors to an engine's named inputs and outputs. Buffers
are allocated once per input shape and reused; the stream batch calls the UNet with the same
shapes frame after frame, so each shape is also captured once as a CUDA graph and replayed
(one launch instead of hundreds). Inputs are copied into the bound buffers (and cast to the
engine's dtype on the way); outputs are copied out, so a result stays valid after the next call.

A :class:`TrtEngine` is called like the adapters in :mod:`trt_build.adapters` expect: a dict of
named tensors in, a dict of named tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tensorrt as trt
import torch

from engine.graphs import record_on

_LOGGER = trt.Logger(trt.Logger.WARNING)

TORCH_DTYPES: dict[trt.DataType, torch.dtype] = {
    trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
    trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
    trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool,
}

ShapeKey = tuple[tuple[int, ...], ...]


@dataclass
class Binding:
    """One set of input shapes: its own execution context, its buffers, and its CUDA graph once captured.

    A context per shape (not one context re-pointed at each shape) because a captured graph is
    only valid for the context state it was captured with; the contexts share one block of
    activation memory, which is safe because they all run in order on one stream.
    """

    context: trt.IExecutionContext
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    calls: int = field(default=0)


class TrtEngine:
    """One deserialized engine on ``device``; a context and buffers per input shape, made on first use."""

    def __init__(self, plan: Path, device: torch.device, *, cuda_graphs: bool = True) -> None:
        self.device = device
        self.cuda_graphs = cuda_graphs
        engine = trt.Runtime(_LOGGER).deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not load {plan} (built by another TensorRT version or GPU?); "
                               "delete it and it will be rebuilt")
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.stream = torch.cuda.Stream(device)
        # the largest activation memory any shape in the profile needs, shared by every context (TensorRT >= 10.1)
        self._scratch = torch.empty(engine.device_memory_size_v2, dtype=torch.uint8, device=device)
        self._bindings: dict[ShapeKey, Binding] = {}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = tuple(tuple(inputs[name].shape) for name in self.input_names)
        binding = self._bindings.get(key) or self._bind(key)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name, buffer in binding.inputs.items():
                buffer.copy_(inputs[name], non_blocking=True)
            self._run(binding)
            outputs = {name: buffer.clone() for name, buffer in binding.outputs.items()}
        caller.wait_stream(self.stream)
        return outputs

    def _bind(self, key: ShapeKey) -> Binding:
        """A context for these input shapes, with buffers bound; TensorRT says the output shapes."""
        context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        inputs = {}
        for name, shape in zip(self.input_names, key):
            if not context.set_input_shape(name, trt.Dims(list(shape))):
                raise ValueError(f"input {name!r} of shape {shape} is outside the engine's profile; "
                                 "rebuild the engine for this size or batch")
            inputs[name] = torch.empty(shape, dtype=self._dtype(name), device=self.device)
        outputs = {name: torch.empty(_shape(context.get_tensor_shape(name)), dtype=self._dtype(name),
                                     device=self.device) for name in self.output_names}
        for name, tensor in {**inputs, **outputs}.items():
            context.set_tensor_address(name, tensor.data_ptr())
        self._bindings[key] = Binding(context, inputs, outputs)
        return self._bindings[key]

    def _run(self, binding: Binding) -> None:
        if binding.graph is not None:
            binding.graph.replay()
            return
        self._execute(binding.context)
        binding.calls += 1
        if self.cuda_graphs and binding.calls == 2:  # the first call let TensorRT finish its lazy set-up
            binding.graph = self._capture(binding.context)

    def _execute(self, context: trt.IExecutionContext) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine (its log above says why)")

    def _capture(self, context: trt.IExecutionContext) -> torch.cuda.CUDAGraph | None:
        try:
            graph, _ = record_on(self.stream, lambda: self._execute(context))
        except RuntimeError:  # some engines (data-dependent shapes) cannot be captured: stay eager
            return None
        return graph

    def _dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self.engine.get_tensor_dtype(name)]


def _shape(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))
