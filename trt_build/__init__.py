"""TensorRT acceleration: the UNet and the VAE halves exported to ONNX and built into cached engines.

The path, one module a step: :mod:`.shapes` (the batch and resolution ranges a stream needs),
:mod:`.export` (ONNX, opset 17, real stream-batch shapes), :mod:`.optimize` (constant folding
and clean-up), :mod:`.check` (the graph against torch on onnxruntime), :mod:`.cache` (engines
on disk under a key of everything they depend on), :mod:`.builder` (TensorRT build),
:mod:`.runtime` (TensorRT 10 tensor API, CUDA graphs), :mod:`.adapters` (back into the
engine's UNet/VAE interfaces), and :mod:`.pipeline` tying them together for ``--trt``.
``python -m trt_build --help`` runs the steps by hand.
"""
