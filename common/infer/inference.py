"""Pupil prediction on raw eye frames of any size, from a ``.pt`` checkpoint or an ``.onnx`` file.

Per frame (``PupilPredictor.predict``):
    validate (2-D uint8) -> letterbox to the model's input size (only if the size differs)
    -> gamma + CLAHE (``preprocess.enhance_frame``) -> [-1, 1] -> model
    (``predict_prepared`` and ``outputs_prepared`` start here with frames a built dataset already
    holds at the model's size, enhanced, so they are not enhanced twice)
    -> segmentation: argmax (or pupil probability > threshold) -> mask, ellipse fitted to the mask
       ellipse regression: (cx, cy, rx, ry) with angle 0 -> ellipse, mask drawn from it
    -> mask and ellipse mapped back to the original frame, with a confidence (``pupil_confidence``).

The letterbox comes before the enhancement so that CLAHE's 8x8 tiles cover the same number of
model pixels as in training; a frame already at the model size takes exactly the training path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from common.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from common.device import resolve_device
from common.errors import InputError
from common.images import as_grayscale_frame
from common.infer import export
from common.prep import preprocess
from common.prep.preprocess import Ellipse, Letterbox

# onnxruntime's CPU layouts: "blocked" is its default (every graph optimization, convolutions in a
# channel-blocked layout, 8 or 16 channels wide by CPU); "plain" keeps every optimization but that
# one, which is faster for networks whose layers are thinner than the block (TinyEfficientViT-Micro's
# 8 to 18 channels: README, "A whole frame"); "auto" times both on the loaded file and keeps the faster.
ORT_LAYOUTS = ("blocked", "plain", "auto")
LAYOUT_TRIALS = 10  # timed runs per layout for "auto", alternating, after one untimed run each
MASK_COLOR_BGR = (0, 200, 0)
ELLIPSE_COLOR_BGR = (0, 0, 255)


@dataclass(frozen=True)
class Prediction:
    """Result for one frame, in the original frame's coordinates.

    mask: (H, W) uint8 0/1 pupil mask (for the ellipse regressor: the predicted ellipse, filled).
    ellipse: normalized to the original frame (see ``common.prep.preprocess``), None if no pupil.
    confidence: in [0, 1], how sure the model is that there is a pupil where it says
        (``pupil_confidence``); None where it was not computed.
    """

    mask: np.ndarray
    ellipse: Ellipse | None
    confidence: float | None = None

    def ellipse_pixels(self):
        """((x, y), (semi_axis_1, semi_axis_2), angle_deg) in original-frame pixels, or None."""
        if self.ellipse is None:
            return None
        height, width = self.mask.shape
        return preprocess.ellipse_to_pixels(self.ellipse, height, width)


# ----------------------------------------------------------------------------- decoding
def segment(logits: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """(2, h, w) logits -> (h, w) uint8 0/1 pupil mask: argmax (ties to background), or pupil
    probability > ``threshold``."""
    if threshold is None:
        return (logits[1] > logits[0]).view(np.uint8)  # bool is one byte of 0 or 1: no copy
    # softmax(l)[1] > t  <=>  l1 - l0 > log(t / (1 - t))
    margin = np.log(threshold / (1.0 - threshold))
    return (logits[1] - logits[0] > margin).view(np.uint8)


def decode_output(output: np.ndarray, task: str, size: tuple[int, int], threshold: float | None = None,
                  region: np.ndarray | None = None) -> tuple[np.ndarray, Ellipse | None]:
    """One model output -> ((h, w) uint8 0/1 pupil mask, normalized ellipse or None), at ``size``.

    segmentation: (2, h, w) logits -> mask (``segment``), restricted to ``region`` (a 0/1 mask of
        the pixels that hold the frame, e.g. inside a letterbox) -> ellipse fitted to it;
    ellipse: (4,) normalized (cx, cy, rx, ry) -> axis-aligned ellipse (angle 0), mask drawn from it.
    """
    if task == "ellipse":
        cx, cy, rx, ry = (float(v) for v in output[:4])
        ellipse = Ellipse(cx, cy, rx, ry, 0.0)
        return preprocess.draw_ellipse(ellipse, *size), ellipse
    mask = segment(output, threshold)
    if region is not None:
        mask &= region
    return mask, preprocess.fit_ellipse(mask)


def pupil_confidence(output: np.ndarray, task: str, mask: np.ndarray, ellipse: Ellipse | None,
                     model_input: np.ndarray, region: np.ndarray) -> float:
    """How sure the model is of the pupil it reports, in [0, 1], at the model's input size (h, w).

    segmentation: the mean pupil probability (softmax of the (2, h, w) logits) over the predicted
        mask's pixels; 0.0 for an empty mask.
    ellipse: the regressor gives no probability, so the proxy is how much darker the predicted
        ellipse is than the ring around it (out to 1.5 times its semi-axes) in the preprocessed
        (h, w) uint8 ``model_input`` (the enhanced frame), as a fraction of the whole intensity
        range, clipped to [0, 1]: about 0 where the ellipse is no darker than its surroundings (no
        pupil, e.g. a closed eye), larger the darker the pupil stands out.
    Only pixels inside ``region`` (the frame, without letterbox padding) count.
    """
    inside = np.flatnonzero(np.logical_and(mask, region))  # (n,) flat indices of the pupil
    if ellipse is None or not inside.size:
        return 0.0
    if task == "ellipse":
        grown = Ellipse(ellipse.cx, ellipse.cy, 1.5 * ellipse.rx, 1.5 * ellipse.ry, ellipse.angle)
        ring = np.logical_and(preprocess.draw_ellipse(grown, *mask.shape), region)
        ring.flat[inside] = False
        if not ring.any():
            return 0.0
        contrast = (model_input[ring].mean(dtype=np.float64)
                    - model_input.ravel()[inside].mean(dtype=np.float64)) / 255.0
        return float(np.clip(contrast, 0.0, 1.0))
    margin = output[1].ravel()[inside] - output[0].ravel()[inside]  # (n,) pupil minus background logit
    return float(np.mean(0.5 * (1.0 + np.tanh(margin / 2.0))))  # the sigmoid, without overflow


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two (H, W) 0/1 masks; 1.0 when both are empty (no pupil predicted where there is
    none), the convention ``common.train.metrics`` uses for every per-frame IoU."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    union = np.count_nonzero(pred | truth)
    return np.count_nonzero(pred & truth) / union if union else 1.0


# ----------------------------------------------------------------------------- model back ends
class _TorchBackend:
    def __init__(self, path: Path, device: torch.device, expected_model: str | None,
                 threads: int | None = None, layout: str = "blocked"):
        checkpoint = load_checkpoint(path)
        self.layout, self.layout_ms = None, {}  # onnxruntime's choice; PyTorch has none to make
        self.device = device
        self.model = model_from_checkpoint(checkpoint, path, self.device, expected_model)
        self.name = checkpoint["model_config"]["name"]
        self.task = getattr(self.model, "task", "segmentation")
        self.input_size = tuple(int(v) for v in checkpoint["model_config"]["input_size"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, H, W) float32 -> model output as float32 numpy ((B, 2, H, W) or (B, 4))."""
        with torch.inference_mode():
            output = self.model(torch.from_numpy(batch).to(self.device))
        return output.float().cpu().numpy()  # host sync: the result is needed on the CPU


def session_options(threads: int | None, layout: str):
    """onnxruntime SessionOptions for ``threads`` intra-op threads (None: all cores) and the CPU
    ``layout`` ("blocked" or "plain")."""
    import onnxruntime as ort  # only needed for .onnx files

    options = ort.SessionOptions()  # every graph optimization, onnxruntime's default
    if layout == "plain":  # all but the layout transformation, the only one past "extended"
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return options


def _onnx_session(path: Path, providers: list[str], threads: int | None, layout: str):
    """An onnxruntime session of ``path`` with the CPU ``layout`` ("blocked" or "plain")."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, layout), providers=providers)


def _faster_session(sessions: dict, batch: np.ndarray) -> tuple[str, dict[str, float]]:
    """The layout of ``sessions`` (layout -> session) that runs ``batch`` faster: the fastest of
    LAYOUT_TRIALS alternating runs each, after one untimed run (the fastest run is the one least
    disturbed by whatever else the machine does). Returns (layout, {layout: ms})."""
    feeds = {layout: {session.get_inputs()[0].name: batch} for layout, session in sessions.items()}
    times = {layout: [] for layout in sessions}
    for trial in range(LAYOUT_TRIALS + 1):
        for layout, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[layout])
            if trial:
                times[layout].append((time.perf_counter() - start) * 1e3)
    fastest = {layout: min(values) for layout, values in times.items()}
    return min(fastest, key=fastest.get), fastest


def _check_interface(session, path: Path) -> None:
    """CheckpointError unless the session takes float (batch, 1, H, W) frames and gives (batch, 2,
    H, W) logits or (batch, 4) ellipses, the interface ``export.export_onnx`` writes."""
    image, output = session.get_inputs()[0], session.get_outputs()[0]
    if image.type != "tensor(float)" or len(image.shape) != 4 or image.shape[1] != 1:
        raise CheckpointError(f"{path}: its input '{image.name}' is {image.type} {image.shape}; expected "
                              "float (batch, 1, H, W) frames, as export.py writes")

    def fits(per_frame) -> bool:  # the dimensions after the batch; a named (symbolic) one can be anything
        dims = output.shape[1:]
        return len(dims) == len(per_frame) and all(
            not isinstance(dim, int) or dim == want for dim, want in zip(dims, per_frame))

    if output.type != "tensor(float)" or not (fits([2, *image.shape[2:]]) or fits([4])):
        raise CheckpointError(f"{path}: its output '{output.name}' is {output.type} {output.shape}; "
                              "expected float (batch, 2, H, W) logits or (batch, 4) ellipses")


class _OnnxBackend:
    def __init__(self, path: Path, device: torch.device, expected_model: str | None,
                 threads: int | None = None, layout: str = "blocked"):
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
            layout = "blocked"  # the CPU's layout choice means nothing to the GPU's kernels
        trials = ("blocked", "plain") if layout == "auto" else (layout,)
        try:
            sessions = {trial: _onnx_session(path, providers, threads, trial) for trial in trials}
            self.input_size = tuple(export.onnx_input_size(path))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load ONNX model {path}: {message}") from None
        first = next(iter(sessions.values()))
        _check_interface(first, path)
        self.input_name = first.get_inputs()[0].name
        output = first.get_outputs()[0]  # "logits" (B, 2, H, W) or "ellipse" (B, 4)
        self.task = "ellipse" if output.name == "ellipse" or len(output.shape) == 2 else "segmentation"
        self.name = first.get_modelmeta().custom_metadata_map.get("model_name")
        if expected_model is not None and self.name != expected_model:
            held = f"a '{self.name}' model" if self.name else "no model_name metadata"
            raise CheckpointError(f"{path}: ONNX file holds {held}, expected '{expected_model}'")
        self.layout_ms = {}
        if len(sessions) > 1:
            zeros = np.zeros((1, 1, *self.input_size), np.float32)  # (1, 1, h, w); values barely matter
            layout, self.layout_ms = _faster_session(sessions, zeros)
        self.layout, self.session = layout, sessions[layout]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- predictor
class PupilPredictor:
    """Predict the pupil mask and ellipse of raw grayscale frames with a trained model.

    Args:
        model_path: a checkpoint (``.pt``) from ``common.checkpoint`` or an exported ``.onnx``.
        device: torch device for checkpoints; "cuda" selects onnxruntime's CUDA provider.
        threshold: for segmentation models, pupil where softmax probability > threshold
            (None: argmax of the two logits, i.e. 0.5).
        expected_model: if given, refuse a model file of another architecture (CheckpointError).
        threads: ONNX Runtime's intra-op threads for an ``.onnx`` file (None: all cores); an
            edge device's one core is ``threads=1``.
        layout: ONNX Runtime's CPU layout for an ``.onnx`` file, one of ``ORT_LAYOUTS``; "auto"
            times both on the file at load (22 model runs) and keeps the faster, as
            ``layout`` says afterwards (``layout_ms`` holds each one's fastest run).
    """

    def __init__(self, model_path, device: str = "cpu", threshold: float | None = None,
                 expected_model: str | None = None, threads: int | None = None, layout: str = "blocked"):
        path = Path(model_path)
        if not path.is_file():
            raise CheckpointError(f"model file not found: {path}")
        device = resolve_device(str(device))
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {threshold}")
        if layout not in ORT_LAYOUTS:
            raise InputError(f"layout must be one of {', '.join(ORT_LAYOUTS)}, got {layout!r}")
        backend = _OnnxBackend if path.suffix.lower() == ".onnx" else _TorchBackend
        self.backend = backend(path, device, expected_model, threads, layout)
        self.threshold = threshold

    @property
    def task(self) -> str:
        return self.backend.task

    @property
    def model_name(self) -> str | None:
        return self.backend.name

    @property
    def layout(self) -> str | None:
        """The ONNX Runtime CPU layout in use ("blocked" or "plain"); None for a PyTorch checkpoint."""
        return self.backend.layout

    @property
    def layout_ms(self) -> dict[str, float]:
        """{layout: fastest trial run in ms} of ``layout="auto"``; empty when nothing was timed."""
        return self.backend.layout_ms

    @property
    def input_size(self) -> tuple[int, int]:
        return self.backend.input_size

    def predict(self, frame: np.ndarray, timings: dict | None = None) -> Prediction:
        """One raw (H, W) uint8 frame of any size -> Prediction at that size."""
        return self.predict_batch([frame], timings)[0]

    def predict_batch(self, frames, timings: dict | None = None) -> list[Prediction]:
        """Several raw frames (any sizes) -> Predictions, with one model call for the batch.

        ``timings``, if given, gets the seconds spent in each stage added to its "preprocess",
        "model" and "decode" (mask, ellipse and confidence) entries.
        """
        start = time.perf_counter()
        prepared = [self._prepare(frame) for frame in frames]
        if not prepared:
            return []
        start = _add_time(timings, "preprocess", start)
        # host arrays: the model's time ends here
        outputs = self.outputs_prepared(np.stack([ready for ready, _ in prepared]))
        start = _add_time(timings, "model", start)
        predictions = [self.postprocess(output, box, ready)
                       for output, (ready, box) in zip(outputs, prepared)]
        _add_time(timings, "decode", start)
        return predictions

    def predict_prepared(self, frames: np.ndarray) -> list[Prediction]:
        """Model-ready frames (see ``outputs_prepared``) -> Predictions at the model's input size."""
        return [Prediction(*decode_output(output, self.task, self.input_size, self.threshold))
                for output in self.outputs_prepared(frames)]

    def outputs_prepared(self, frames: np.ndarray) -> np.ndarray:
        """Raw model outputs for frames that are already model-ready: (B, h, w) uint8 at the model's
        input size with gamma + CLAHE applied, as a built dataset stores them (they are not enhanced
        again). Returns (B, 2, h, w) logits or (B, 4) ellipses, float32."""
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.dtype != np.uint8 or frames.shape[1:] != tuple(self.input_size):
            raise InputError(f"model-ready frames must be (B, {self.input_size[0]}, {self.input_size[1]}) "
                             f"uint8; got {frames.shape} {frames.dtype}")
        return self.backend(preprocess.normalize_frame(frames)[:, None])  # (B, 1, h, w) in [-1, 1]

    def _prepare(self, frame) -> tuple[np.ndarray, Letterbox]:
        """Raw frame -> ((h, w) uint8 model-ready frame: letterboxed, enhanced; Letterbox mapping it back)."""
        boxed, box = self.letterboxed(frame)
        return preprocess.enhance_frame(boxed), box  # gamma + CLAHE once, at the model's size

    def letterboxed(self, frame) -> tuple[np.ndarray, Letterbox]:
        """Raw frame -> ((h, w) uint8 at the model's input size, Letterbox mapping it back); a frame
        already of that size is used as it is."""
        frame = as_grayscale_frame(frame)
        height, width = self.input_size
        if frame.shape == (height, width):
            return frame, preprocess.letterbox_geometry(height, width, height, width)
        return preprocess.letterbox(frame, height, width)

    def postprocess(self, output: np.ndarray, box: Letterbox, model_input: np.ndarray) -> Prediction:
        """Model output -> Prediction in the original frame (the letterbox's padding is never pupil:
        the zero padding is darker than any pupil). ``model_input`` (h, w) uint8 is the enhanced frame."""
        new_h, new_w = box.new_size
        region = np.zeros(self.input_size, np.uint8)  # (h, w): 1 where the frame lies
        region[box.pad_top : box.pad_top + new_h, box.pad_left : box.pad_left + new_w] = 1
        mask, ellipse = decode_output(output, self.task, self.input_size, self.threshold, region)
        confidence = pupil_confidence(output, self.task, mask, ellipse, model_input, region)
        if ellipse is not None:
            ellipse = preprocess.unletterbox_ellipse(ellipse, box)
        if self.task == "ellipse":  # drawn again in the original frame, where its pixels are exact
            return Prediction(preprocess.draw_ellipse(ellipse, box.orig_h, box.orig_w), ellipse, confidence)
        return Prediction(preprocess.unletterbox_mask(mask, box), ellipse, confidence)


def _add_time(timings: dict | None, stage: str, since: float) -> float:
    """Add the seconds since ``since`` to ``timings[stage]`` (if timings is given); returns now."""
    now = time.perf_counter()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + now - since
    return now


def overlay(frame: np.ndarray, prediction: Prediction, alpha: float = 0.4) -> np.ndarray:
    """Grayscale frame (H, W) + prediction -> (H, W, 3) BGR uint8: tinted mask, ellipse outline."""
    frame = as_grayscale_frame(frame)
    image = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    pupil = prediction.mask.astype(bool)
    tint = np.array(MASK_COLOR_BGR, np.float32)
    image[pupil] = ((1.0 - alpha) * image[pupil] + alpha * tint).round().astype(np.uint8)
    pixels = prediction.ellipse_pixels()
    if pixels is not None:
        (x, y), (a, b), angle = pixels
        thickness = max(1, round(min(frame.shape) / 200))
        # cv2.ellipse with a RotatedRect takes full axis lengths, as in preprocess.draw_ellipse.
        cv2.ellipse(image, ((x, y), (2.0 * a, 2.0 * b), angle), ELLIPSE_COLOR_BGR, thickness)
    return image
