"""ONNX export with batch norm folded, plus a parity check against PyTorch.

The exported file is one self-contained ``.onnx`` (no external-data sidecar) with input ``image``
of shape (batch, 1, H, W) where only the batch axis is dynamic, and output ``logits``
(batch, 2, H, W) for segmentation models or ``ellipse`` (batch, 4) for the ellipse regressor.
The model name is stored in the metadata property ``model_name``; reduced-precision files
(``common.infer.quantize``) add ``precision`` and ``quantization``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from common.files import atomic_path
from common.models import fuse_model, unwrap
from common.specs import DEFAULT_SIZE

OPSET = 18
INPUT_NAME = "image"


class ExportError(RuntimeError):
    """The model could not be exported to a valid ONNX file."""


def _output_name(model: nn.Module) -> str:
    return "ellipse" if getattr(model, "task", "segmentation") == "ellipse" else "logits"


def _export_to(model: nn.Module, path: Path, input_size: tuple[int, int], dynamo: bool) -> None:
    """torch.onnx.export with only the batch axis dynamic.

    The TorchScript exporter (default) is about 5x faster to run and emits a compact graph: the
    models turn H and W into Python ints (``static_hw``), so window arithmetic is folded into
    constants. The dynamo exporter gives an equivalent graph but tags every node with
    stack-trace metadata (3-4x the file size), which ``_finalize`` strips.
    """
    height, width = input_size
    dummy = torch.zeros(1, 1, height, width)  # (B, 1, H, W): H rows, W columns, as in training
    output_name = _output_name(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter, not actionable here
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[output_name],
                dynamic_shapes={"x": {0: batch}}, opset_version=OPSET, dynamo=True, external_data=False,
                optimize=True, verbose=False,
            )
        else:
            torch.onnx.export(
                model, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[output_name],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )


def _finalize(path: Path, model_name: str | None) -> None:
    """Check the graph, refuse leftover BatchNormalization nodes and record the model name."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    batch_norms = [node.name for node in proto.graph.node if node.op_type == "BatchNormalization"]
    if batch_norms:
        raise ExportError(f"exported graph still has BatchNormalization nodes: {batch_norms}")
    for node in proto.graph.node:
        del node.metadata_props[:]  # dynamo's per-node stack traces: bulk, no runtime use
    if model_name:
        _set_metadata(proto, {"model_name": model_name})
    onnx.save_model(proto, str(path), save_as_external_data=False)


def _set_metadata(proto: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set the model-level metadata properties ``entries`` (replacing those keys)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(path) -> dict[str, str]:
    """The model-level metadata properties of an ONNX file (``model_name``, ``precision``, ...)."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def add_metadata(path, entries: dict[str, str]) -> None:
    """Set metadata properties of the ONNX file ``path`` in place (a temporary: not atomic)."""
    proto = onnx.load(str(path))
    _set_metadata(proto, entries)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def export_onnx(model: nn.Module, path, input_size=DEFAULT_SIZE, *, dynamo: bool = False) -> Path:
    """Export ``model`` (any wrappers allowed) to one ONNX file with batch norm folded.

    Args:
        model: a model from ``common.models.build_model`` (possibly compiled / DDP-wrapped).
        path: destination ``.onnx``; written atomically (temp file in the same folder, then rename).
        input_size: (H, W) baked into the graph; the batch axis stays dynamic.
        dynamo: use the ``torch.export``-based exporter instead of the TorchScript one.

    Returns:
        the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = unwrap(model)
    fused = fuse_model(base).cpu().float()
    with atomic_path(path) as tmp, torch.no_grad():  # permissions from the umask, like a plain write
        _export_to(fused, tmp, tuple(int(v) for v in input_size), dynamo)
        _finalize(tmp, getattr(base, "model_name", None))
    return path


def onnx_input_size(path) -> tuple[int, int]:
    """Static (H, W) of the first graph input of an exported model.

    Raises:
        ExportError: the input has no static 4-D shape.
    """
    proto = onnx.load(str(path), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not (dims[2].HasField("dim_value") and dims[3].HasField("dim_value")):
        raise ExportError(f"{path}: input is not (batch, C, H, W) with static H and W")
    return int(dims[2].dim_value), int(dims[3].dim_value)


def verify_onnx(model: nn.Module, path, batch: int = 2, input_size=DEFAULT_SIZE, seed: int = 0) -> float:
    """Max absolute difference between ONNX Runtime (CPU) and PyTorch (eval) on random inputs in [-1, 1]."""
    import onnxruntime as ort

    reference = copy.deepcopy(unwrap(model)).cpu().float().eval()  # leave the caller's model untouched
    generator = torch.Generator().manual_seed(seed)
    height, width = input_size
    x = torch.rand(batch, 1, height, width, generator=generator) * 2 - 1  # (B, 1, H, W)
    with torch.no_grad():
        expected = reference(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX output shape {actual.shape} != PyTorch output shape {expected.shape}")
    return float(np.max(np.abs(actual - expected)))
