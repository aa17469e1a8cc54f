"""ONNX clean-up before TensorRT: fold constants, drop dead nodes, infer shapes.

The exported graph still holds the tracer's shape arithmetic (``Shape → Gather → Unsqueeze →
Concat`` chains for every reshape) and constant sub-graphs (the timestep embedding's
frequencies). Polygraphy folds them with onnxruntime, onnx-graphsurgeon removes what no output
needs and sorts the nodes, and ONNX shape inference annotates every tensor, which is what
TensorRT's parser and optimizer work best from. Graphs over 2 GB (an fp32 SD UNet) keep
their weights in one external data file beside the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class CleanReport:
    """Node counts before and after, and where the cleaned model went."""

    path: Path
    nodes_before: int
    nodes_after: int
    external_data: bool


def clean_onnx(source: Path, target: Path) -> CleanReport:
    """Fold, prune and shape-infer ``source`` into ``target`` (may be the same path)."""
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # its per-pass node counts are noise in a progress bar
    onnxruntime.set_default_logger_severity(3)  # and so are onnxruntime's notes on nodes it keeps
    model = onnx.load(str(source))
    before = len(model.graph.node)
    model = fold_constants(model, num_passes=3, do_shape_inference=True, error_ok=True, copy=False,
                           allow_onnxruntime_shape_inference=True)
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    large = _too_large(model)
    if not large:  # shape inference on a >2 GB proto must go through a file; TensorRT infers what is missing
        model = onnx.shape_inference.infer_shapes(model)
    save_onnx(model, target, external_data=large)
    return CleanReport(target, before, len(model.graph.node), large)


def _too_large(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001 - protobuf refuses even to measure a message past 2 GB
        return True


def save_onnx(model: onnx.ModelProto, path: Path, *, external_data: bool) -> None:
    """Write ``model``; with ``external_data`` its weights go to ``<name>.data`` beside it."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def onnx_summary(path: Path) -> dict[str, object]:
    """Opset, inputs and outputs of an ONNX file (without loading its weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "nodes": len(model.graph.node),
    }
