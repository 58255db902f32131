"""Pupil prediction on raw eye frames of any size, from a ``.pt`` checkpoint or an ``.onnx`` file.

Per frame (``PupilPredictor.predict``):
    validate (2-D uint8) -> letterbox to the model's input size (only if the size differs)
    -> gamma + CLAHE (``preprocess.enhance_frame``) -> [-1, 1] -> model
    -> segmentation: argmax (or pupil probability > threshold) -> mask, ellipse fitted to the mask
       ellipse regression: (cx, cy, rx, ry) with angle 0 -> ellipse, mask drawn from it
    -> mask and ellipse mapped back to the original frame.

The letterbox comes before the enhancement so that CLAHE's 8x8 tiles cover the same number of
model pixels as in training; a frame already at the model size takes exactly the training path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from common import export, preprocess
from common.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from common.errors import ConfigurationError, UserError
from common.preprocess import Ellipse, Letterbox

MASK_COLOR_BGR = (0, 200, 0)
ELLIPSE_COLOR_BGR = (0, 0, 255)


class InputError(UserError):
    """A frame or image file the predictor cannot use."""

    exit_code = 2


@dataclass(frozen=True)
class Prediction:
    """Result for one frame, in the original frame's coordinates.

    mask: (H, W) uint8 0/1 pupil mask (for the ellipse regressor: the predicted ellipse, filled).
    ellipse: normalized to the original frame (see ``common.preprocess``), None if no pupil.
    """

    mask: np.ndarray
    ellipse: Ellipse | None

    def ellipse_pixels(self):
        """((x, y), (semi_axis_1, semi_axis_2), angle_deg) in original-frame pixels, or None."""
        if self.ellipse is None:
            return None
        height, width = self.mask.shape
        return preprocess.ellipse_to_pixels(self.ellipse, height, width)


def as_grayscale_frame(frame) -> np.ndarray:
    """Validate a raw frame: (H, W) or (H, W, 1) uint8 -> (H, W) uint8; InputError otherwise."""
    if not isinstance(frame, np.ndarray):
        raise InputError(f"expected a numpy array frame, got {type(frame).__name__}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim != 2:
        raise InputError(f"expected a single-channel grayscale frame, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise InputError(f"expected a uint8 frame, got dtype {frame.dtype}")
    if frame.size == 0:
        raise InputError(f"frame is empty (shape {frame.shape})")
    return frame


def read_frame(path: str | os.PathLike, grayscale: bool = False) -> np.ndarray:
    """Read an 8-bit image file as an (H, W) uint8 frame.

    Colour files are refused unless ``grayscale`` is set, in which case they are converted
    (BGR or BGRA -> gray), so a colour image is never silently fed to a grayscale model.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image")
    if not path.is_file():
        raise InputError(f"input not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot read image {path}: not an image file OpenCV can decode")
    if grayscale and image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        image = cv2.cvtColor(image, code)
    try:
        return as_grayscale_frame(image)
    except InputError as exc:
        hint = " (pass --grayscale to convert colour images)" if image.ndim == 3 else ""
        raise InputError(f"{path}: {exc}{hint}") from None


# ----------------------------------------------------------------------------- model back ends
class _TorchBackend:
    def __init__(self, path: Path, device: str, expected_model: str | None):
        checkpoint = load_checkpoint(path)
        self.device = torch.device(device)
        self.model = model_from_checkpoint(checkpoint, path, self.device, expected_model)
        self.name = checkpoint["model_config"]["name"]
        self.task = getattr(self.model, "task", "segmentation")
        self.input_size = tuple(int(v) for v in checkpoint["model_config"]["input_size"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, H, W) float32 -> model output as float32 numpy ((B, 2, H, W) or (B, 4))."""
        with torch.inference_mode():
            output = self.model(torch.from_numpy(batch).to(self.device))
        return output.float().cpu().numpy()  # host sync: the result is needed on the CPU


class _OnnxBackend:
    def __init__(self, path: Path, device: str, expected_model: str | None):
        import onnxruntime as ort  # only needed for .onnx files

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.input_size = tuple(export.onnx_input_size(path))
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load ONNX model {path}: {message}") from None
        self.input_name = self.session.get_inputs()[0].name
        output = self.session.get_outputs()[0]  # "logits" (B, 2, H, W) or "ellipse" (B, 4)
        self.task = "ellipse" if output.name == "ellipse" or len(output.shape) == 2 else "segmentation"
        self.name = self.session.get_modelmeta().custom_metadata_map.get("model_name")
        if expected_model is not None and self.name != expected_model:
            held = f"a '{self.name}' model" if self.name else "no model_name metadata"
            raise CheckpointError(f"{path}: ONNX file holds {held}, expected '{expected_model}'")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32)


def _check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigurationError(f"device '{device}' requested but CUDA is not available")


# ----------------------------------------------------------------------------- predictor
class PupilPredictor:
    """Predict the pupil mask and ellipse of raw grayscale frames with a trained model.

    Args:
        model_path: a checkpoint (``.pt``) from ``common.checkpoint`` or an exported ``.onnx``.
        device: torch device for checkpoints; "cuda" selects onnxruntime's CUDA provider.
        threshold: for segmentation models, pupil where softmax probability > threshold
            (None: argmax of the two logits, i.e. 0.5).
        expected_model: if given, refuse a model file of another architecture (CheckpointError).
    """

    def __init__(self, model_path, device: str = "cpu", threshold: float | None = None,
                 expected_model: str | None = None):
        path = Path(model_path)
        if not path.is_file():
            raise CheckpointError(f"model file not found: {path}")
        _check_device(str(device))
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {threshold}")
        backend = _OnnxBackend if path.suffix.lower() == ".onnx" else _TorchBackend
        self.backend = backend(path, str(device), expected_model)
        self.threshold = threshold

    @property
    def task(self) -> str:
        return self.backend.task

    @property
    def model_name(self) -> str | None:
        return self.backend.name

    @property
    def input_size(self) -> tuple[int, int]:
        return self.backend.input_size

    def predict(self, frame: np.ndarray) -> Prediction:
        """One raw (H, W) uint8 frame of any size -> Prediction at that size."""
        return self.predict_batch([frame])[0]

    def predict_batch(self, frames) -> list[Prediction]:
        """Several raw frames (any sizes) -> Predictions, with one model call for the batch."""
        prepared = [self._prepare(frame) for frame in frames]
        if not prepared:
            return []
        batch = np.stack([model_input for model_input, _ in prepared])[:, None]  # (B, 1, h, w)
        outputs = self.backend(batch)
        return [self._postprocess(output, box) for output, (_, box) in zip(outputs, prepared)]

    def _prepare(self, frame) -> tuple[np.ndarray, Letterbox]:
        """Raw frame -> ((h, w) float32 model input, Letterbox mapping it back)."""
        frame = as_grayscale_frame(frame)
        height, width = self.input_size
        if frame.shape == (height, width):
            boxed, box = frame, preprocess.letterbox_geometry(height, width, height, width)
        else:
            boxed, box = preprocess.letterbox(frame, height, width)
        return preprocess.normalize_frame(preprocess.enhance_frame(boxed)), box

    def _postprocess(self, output: np.ndarray, box: Letterbox) -> Prediction:
        if self.task == "ellipse":
            cx, cy, rx, ry = (float(v) for v in output[:4])  # normalized to the model input
            ellipse = preprocess.unletterbox_ellipse(Ellipse(cx, cy, rx, ry, 0.0), box)
            return Prediction(preprocess.draw_ellipse(ellipse, box.orig_h, box.orig_w), ellipse)
        mask = self._segment(output)  # (h, w) uint8 at model size
        # The zero padding is darker than any pupil; never let it count as one.
        new_h, new_w = box.new_size
        content = np.zeros_like(mask)
        content[box.pad_top : box.pad_top + new_h, box.pad_left : box.pad_left + new_w] = 1
        mask &= content
        fitted = preprocess.fit_ellipse(mask)
        ellipse = None if fitted is None else preprocess.unletterbox_ellipse(fitted, box)
        return Prediction(preprocess.unletterbox_mask(mask, box), ellipse)

    def _segment(self, logits: np.ndarray) -> np.ndarray:
        """(2, h, w) logits -> (h, w) uint8 0/1 pupil mask."""
        if self.threshold is None:
            return (logits[1] > logits[0]).astype(np.uint8)
        # softmax(l)[1] > t  <=>  l1 - l0 > log(t / (1 - t))
        margin = np.log(self.threshold / (1.0 - self.threshold))
        return (logits[1] - logits[0] > margin).astype(np.uint8)


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
