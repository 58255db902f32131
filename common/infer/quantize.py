"""Reduced-precision ONNX files (static INT8, fp16), each scored against fp32 before it is kept.

Every function here takes plain arrays: preprocessed uint8 frames (N, H, W), as a dataset stores
them (the model input is ``frame / 127.5 - 1``), and 0/1 pupil masks (N, H, W). Reading them from a
dataset is the training side's job (``common.train.data``); ``export.py`` wires the two together.

INT8 (``quantize_int8``): onnxruntime's static quantization in the QDQ format, after its
``quant_pre_process`` (shape inference and graph optimization; the QDQ file is 10-20% smaller for the
same scores). Weights are int8, symmetric, per output channel; activations uint8 with ranges
calibrated on a few hundred training frames. The ranges come from the 99.999th percentile of each
tensor's absolute values (onnxruntime's Percentile calibration, symmetric), not from its extremes:
on the original project's released model (400x640, 200 demo frames) MinMax ranges, stretched by
rare outliers in the token MLP and attention outputs, lost 0.016 mean pupil IoU, Entropy 0.014,
asymmetric percentiles 0.006, and the symmetric percentile 0.003; excluding the five noisiest nodes
from MinMax still lost 0.010. On the tiny demo models every method stays within 0.005. MinMax and
Entropy remain available (``method``).

Which layers are INT8 (``layers``): by default ``"linear"``, the layers that multiply activations by
weights one pixel or token at a time (1x1 convolutions, fully connected MatMul/Gemm): most of the
weights, and the only layers onnxruntime's CPU kernels run no slower in INT8 than in float32 for these
thin networks. The rest stays float32 between the QDQ pairs: the first convolution (one input
channel), depthwise and other spatial convolutions, the attention's softmax and its products of two
activations, and the elementwise ops. Measured on TinyEfficientViT-Micro at 400x640, one thread of
this project's 2-core x86 machine (AVX-512 VNNI): the model stage took 11.7 ms with every layer INT8
and 8.8 ms with the linear ones only (fp32: 7.4 ms), because the INT8 kernels of the 1-channel stem
convolution (1.4 ms against 0.3), the depthwise convolutions (about 3x), the softmax (3x) and the
attention's products (2x) are slower, and each one adds layout transposes. ``"all"`` quantizes every
op onnxruntime can, for runtimes and accelerators that execute a whole QDQ graph in integers.
Calibration runs STRIDE frames at a time, so its memory stays bounded for any frame count, and its
augmented model lives in onnxruntime's own temporary folder.

fp16 (``convert_fp16``): every float tensor in half precision with the graph's input and output
kept float32 (Cast nodes at both ends), so callers feed and read float32 as before. onnxruntime's
CPU provider runs it (in float32 where it has no half kernel); it is meant for GPU runtimes.

``export_precision`` is the whole flow: export fp32 to a temporary folder, derive the reduced file,
score both on the validation frames through the one decoder (``score_models``), refuse a drop of
more than ``max_drop`` mean pupil IoU in one line naming the layers whose outputs differ most
(``worst_layers``, onnxruntime's QDQ debugging helpers), and only then move the file into place.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from torch import nn

from common.errors import UserError
from common.files import atomic_path
from common.infer.export import add_metadata, export_onnx, verify_onnx
from common.infer.inference import decode_output, mask_iou
from common.models import unwrap
from common.prep.preprocess import fit_ellipse, normalize_frame

PRECISIONS = ("fp32", "int8", "fp16")
CALIBRATION_METHODS = ("percentile", "minmax", "entropy")
INT8_LAYERS = ("linear", "all")
MAX_PUPIL_IOU_DROP = 0.01
STRIDE = 8  # calibration frames per collection round (bounds the memory of the histogram methods)
DEBUG_FRAMES = 4  # frames run through both models to find the layers that differ most
WORST_LAYERS = 3
# Ops that only move or select values: their outputs differ exactly as much as their inputs do.
DATA_MOVEMENT = {"Reshape", "Transpose", "Split", "Slice", "Concat", "Gather", "Squeeze", "Unsqueeze",
                 "Flatten", "Identity", "Pad", "DepthToSpace", "SpaceToDepth", "Cast"}


class PrecisionError(UserError):
    """A reduced-precision file scores too far below fp32; nothing was written."""

    exit_code = 1


# ----------------------------------------------------------------------------- frames
def model_input(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (B, H, W) -> the model input (B, 1, H, W) float32 in [-1, 1] (elementwise, as
    ``normalize_frame`` maps one frame)."""
    return normalize_frame(frames)[:, None]


class FrameReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over uint8 frames (N, H, W), one frame a call.

    ``set_range`` and ``len`` serve strided calibration (``CalibStridedMinMax``); iterating serves
    ``qdq_loss_debug.collect_activations``.
    """

    def __init__(self, input_name: str, frames: np.ndarray):
        self.input_name, self.frames = input_name, frames
        self.set_range(0, len(frames))

    def __len__(self) -> int:
        return len(self.frames)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.frames))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        frame = self.frames[self.position : self.position + 1]  # (1, H, W)
        self.position += 1
        return {self.input_name: model_input(frame)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.get_next, None)


def _stride(count: int) -> int:
    """The largest number of frames <= STRIDE that divides ``count`` (onnxruntime requires it)."""
    return next(step for step in range(min(STRIDE, count), 0, -1) if count % step == 0)


def _input_name(path: Path) -> str:
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


# ----------------------------------------------------------------------------- conversions
def linear_layers(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes of ``graph`` that multiply an activation by a weight at each pixel or token:
    1x1 convolutions of group 1, and MatMul/Gemm whose second input is an initializer."""
    weights = {tensor.name: tensor for tensor in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            groups = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
            if groups == 1 and list(weights[node.input[1]].dims[2:]) == [1, 1]:
                names.append(node.name)
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            names.append(node.name)
    return names


def _layer_choice(graph: onnx.GraphProto, layers: str) -> dict:
    """quantize_static's op_types_to_quantize / nodes_to_exclude for ``layers`` (see INT8_LAYERS)."""
    if layers == "all":
        return {}
    if layers != "linear":
        raise ValueError(f"layers must be one of {INT8_LAYERS}, got {layers!r}")
    chosen = set(linear_layers(graph))
    if not chosen:
        raise UserError("the model has no 1x1 convolution or fully connected layer to quantize; "
                        "use --int8-layers all")
    kinds = ("Conv", "MatMul", "Gemm")
    return {"op_types_to_quantize": list(kinds),
            "nodes_to_exclude": [n.name for n in graph.node if n.op_type in kinds and n.name not in chosen]}


def quantize_int8(fp32_path: Path, destination: Path, frames: np.ndarray, method: str = "percentile",
                  layers: str = "linear") -> dict:
    """Static INT8 (QDQ) quantization of ``fp32_path`` calibrated on ``frames`` (N, H, W) uint8;
    ``layers`` chooses which layers are INT8 (module docstring).

    Returns the settings, for the file's metadata.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if frames is None or len(frames) == 0:
        raise UserError("INT8 calibration needs at least one frame")
    prepared = destination.with_name(f"{destination.stem}.prepared.onnx")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    try:
        # Symbolic shape inference stops at the windowed attention's reshapes; ONNX's own shape
        # inference and onnxruntime's graph optimizations still run.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        choice = _layer_choice(onnx.load(str(prepared), load_external_data=False).graph, layers)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(
                str(prepared), str(destination), FrameReader(_input_name(prepared), frames),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=calibrate,
                # A LayerNormalization's scale is 1-D: its channel axis is 0, not onnxruntime's default 1.
                extra_options={"CalibStridedMinMax": _stride(len(frames)),
                               "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0}},
                **choice,
            )
    except ValueError as exc:  # numpy's histogram, inside onnxruntime's Percentile/Entropy calibrators
        if "bins" not in str(exc):
            raise
        raise UserError(f"INT8 calibration ({method}) failed: a layer's output is the same on every "
                        "calibration frame (an untrained model, or identical frames); calibrate on more "
                        "varied frames or use --calibration-method minmax") from None
    finally:
        prepared.unlink(missing_ok=True)
    return {"format": "QDQ", "weights": "int8 symmetric per-channel", "activations": "uint8",
            "layers": layers, "calibration_method": method, "calibration_frames": len(frames)}


def convert_fp16(fp32_path: Path, destination: Path) -> dict:
    """fp16 copy of ``fp32_path`` whose graph input and output stay float32; returns its settings."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save_model(proto, str(destination), save_as_external_data=False)
    return {"format": "float16 tensors, float32 input and output"}


# ----------------------------------------------------------------------------- scoring
@dataclass
class Score:
    """Mean pupil IoU and ellipse-centre error of one model over the validation frames.

    center_error_px: mean distance (model pixels) between the ellipses fitted to the predicted and
        the true mask, over frames where both exist; ``missed`` counts frames with a true pupil and
        no predicted ellipse.
    """

    frames: int = 0
    iou_sum: float = 0.0
    center_errors: list = field(default_factory=list)
    missed: int = 0

    @property
    def pupil_iou(self) -> float:
        return self.iou_sum / self.frames if self.frames else math.nan

    @property
    def center_error_px(self) -> float:
        return float(np.mean(self.center_errors)) if self.center_errors else math.nan

    def add(self, output: np.ndarray, truth: np.ndarray, task: str) -> None:
        """One model output ((2, H, W) logits or (4,) ellipse) against its true (H, W) 0/1 mask."""
        height, width = truth.shape
        mask, ellipse = decode_output(output, task, (height, width))
        expected = fit_ellipse(truth)
        self.frames += 1
        self.iou_sum += mask_iou(mask, truth)
        if expected is not None and ellipse is None:
            self.missed += 1
        elif expected is not None:
            self.center_errors.append(math.hypot((ellipse.cx - expected.cx) * width,
                                                 (ellipse.cy - expected.cy) * height))


def score_models(paths: dict[str, Path], batches: Iterable[tuple[np.ndarray, np.ndarray]], task: str,
                 providers=("CPUExecutionProvider",)) -> dict[str, Score]:
    """Score every ONNX file of ``paths`` (label -> path) on ``batches`` of (uint8 frames (B, H, W),
    0/1 masks (B, H, W)), read once for all models."""
    import onnxruntime as ort

    sessions = {label: ort.InferenceSession(str(path), providers=list(providers))
                for label, path in paths.items()}
    scores = {label: Score() for label in paths}
    for frames, masks in batches:
        x = model_input(frames)  # (B, 1, H, W)
        for label, session in sessions.items():
            outputs = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float32)
            for output, truth in zip(outputs, masks):
                scores[label].add(output, truth, task)
    return scores


# ----------------------------------------------------------------------------- diagnosis
def worst_layers(reference: Path, reduced: Path, frames: np.ndarray, workdir: Path,
                 count: int = WORST_LAYERS) -> list[tuple[str, float]]:
    """The ``count`` computing nodes of ``reference`` whose outputs in ``reduced`` differ most from
    fp32 on ``frames``, as (node name, SQNR in dB), lowest SQNR first.

    A QDQ file is matched tensor by tensor with ``qdq_loss_debug.create_activation_matching`` (the
    dequantized activation against the float one); an fp16 file by tensor name.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    activations = {}
    for label, path in (("float", reference), ("reduced", reduced)):
        augmented = workdir / f"{label}.augmented.onnx"
        modify_model_output_intermediate_tensors(str(path), str(augmented))
        activations[label] = collect_activations(str(augmented), FrameReader(_input_name(path), frames))
    graph = onnx.load(str(reduced), load_external_data=False).graph
    if any(node.op_type == "QuantizeLinear" for node in graph.node):
        matched = create_activation_matching(activations["reduced"], activations["float"])
        errors = compute_activation_error({name: m for name, m in matched.items() if "float" in m})
        sqnr = {name: error["xmodel_err"] for name, error in errors.items()}
    else:
        shared = activations["float"].keys() & activations["reduced"].keys()
        sqnr = {name: compute_signal_to_quantization_noice_ratio(
            [np.asarray(a, np.float32) for a in activations["float"][name]],
            [np.asarray(a, np.float32) for a in activations["reduced"][name]]) for name in shared}
    producers = {output: node for node in onnx.load(str(reference)).graph.node for output in node.output}
    ranked = sorted((value, producers[name].name) for name, value in sqnr.items()
                    if name in producers and producers[name].op_type not in DATA_MOVEMENT)
    return [(name, value) for value, name in ranked[:count]]


# ----------------------------------------------------------------------------- the flow
@dataclass
class PrecisionReport:
    precision: str
    path: Path
    sizes: dict[str, int]  # label -> bytes
    scores: dict[str, Score]  # label -> Score; empty without validation frames
    max_difference: float  # fp32 ONNX vs PyTorch on random inputs

    def lines(self) -> list[str]:
        kb = {label: f"{size / 1024:.1f} KB" for label, size in self.sizes.items()}
        head = (f"wrote {self.path} ({self.precision}, {kb[self.precision]}; fp32 {kb['fp32']}; "
                f"fp32 ONNX vs PyTorch max |diff| {self.max_difference:.1e})")
        scores = [f"{label:>5}: mean pupil IoU {score.pupil_iou:.4f}, centre error "
                  f"{_px(score.center_error_px)}, no pupil found in {score.missed} of {score.frames} "
                  f"validation frames, {kb[label]}" for label, score in self.scores.items()]
        return [*scores, head]


def _px(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} px"


def export_precision(model: nn.Module, destination, precision: str = "fp32", *, input_size,
                     calibration: np.ndarray | None = None,
                     validation: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None,
                     method: str = "percentile", int8_layers: str = "linear",
                     max_drop: float = MAX_PUPIL_IOU_DROP, metadata: dict | None = None) -> PrecisionReport:
    """Export ``model`` at ``precision`` to ``destination``, checked before it is written.

    Args:
        calibration: uint8 frames (N, H, W) for INT8 (required there).
        method, int8_layers: INT8's calibration method and the layers it quantizes (``quantize_int8``).
        validation: returns fresh (frames, masks) batches; with it, fp32 and the file are scored,
            and a loss of more than ``max_drop`` mean pupil IoU raises PrecisionError.
        metadata: extra ONNX metadata (e.g. the calibration data's source) for reduced files.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    destination = Path(destination)
    task = getattr(unwrap(model), "task", "segmentation")
    with tempfile.TemporaryDirectory(prefix="export-") as folder:
        work = Path(folder)
        files = {"fp32": export_onnx(model, work / "fp32.onnx", input_size=input_size)}
        difference = verify_onnx(model, files["fp32"], batch=1, input_size=input_size)
        if precision != "fp32":
            files[precision] = work / f"{precision}.onnx"
            if precision == "int8":
                settings = quantize_int8(files["fp32"], files[precision], calibration, method, int8_layers)
            else:
                settings = convert_fp16(files["fp32"], files[precision])
            add_metadata(files[precision], {"precision": precision,
                                            "quantization": json.dumps({**settings, **(metadata or {})})})
        scores = score_models(files, validation(), task) if validation is not None else {}
        if precision != "fp32" and scores:
            check_drop(scores, precision, max_drop, files, validation, work)
        with atomic_path(destination) as tmp:
            shutil.copyfile(files[precision], tmp)
        sizes = {label: path.stat().st_size for label, path in files.items()}
    return PrecisionReport(precision, destination, sizes, scores, difference)


def check_drop(scores: dict[str, Score], precision: str, max_drop: float, files: dict[str, Path],
               validation: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], work: Path) -> None:
    """PrecisionError (one line, naming the worst layers on the first validation frames) when
    ``precision`` loses more than ``max_drop`` mean pupil IoU against fp32."""
    reference, reduced = scores["fp32"].pupil_iou, scores[precision].pupil_iou
    drop = reference - reduced
    if not drop > max_drop:
        return
    frames = next(iter(validation()))[0][:DEBUG_FRAMES]  # (n, H, W)
    worst = worst_layers(files["fp32"], files[precision], frames, work)
    layers = ", ".join(f"{name} (SQNR {value:.1f} dB)" for name, value in worst)
    raise PrecisionError(
        f"{precision} loses {drop:.4f} mean pupil IoU on the validation split (fp32 {reference:.4f}, "
        f"{precision} {reduced:.4f}; at most {max_drop} allowed); the layers whose outputs differ most "
        f"from fp32: {layers}; nothing was written")
