"""Evaluation metrics accumulated on the model's device without a host sync per batch.

``update()`` only launches device work into preallocated accumulators: it never calls ``.item()``,
``.cpu()``, ``.tolist()`` or branches on a tensor value, so the evaluation loop never waits for
the device. ``compute()`` makes the single device-to-host transfer and returns Python floats.

Distributed evaluation: each metric keeps all of its state in one tensor, ``self.totals``, of sums
and counts. Summing ``totals`` over processes gives the totals of the whole data set, so a caller
can run ``torch.distributed.all_reduce(metric.totals)`` (default op SUM) before ``compute()``.
``merge(other)`` does the same between two local instances.

Per-frame metrics (``FrameMetrics``, validation and ``evaluate.py``): each frame's values are
written at the frame's row of the split in preallocated (N, ...) tensors, zeros elsewhere, so
summing them over processes gives every row exactly once. ``summarize_frames`` turns that table
into the eye-tracking figures (centre error, detection rate, per-frame IoU distribution) on the
host, after the one transfer.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from common.prep.preprocess import ellipse_to_pixels, fit_ellipse, normalized_to_pixels


def accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps long sums exact enough; MPS has no float64, float32 suffices there.
    return torch.float32 if device.type == "mps" else torch.float64


class _Accumulator:
    """Shared ``totals`` handling: reset, merge, device checks."""

    totals: torch.Tensor

    def reset(self) -> None:
        """Zero the accumulators (start of an evaluation pass)."""
        self.totals.zero_()

    def merge(self, other: "_Accumulator") -> None:
        """Add another instance's totals into this one (same metric, same settings)."""
        if type(other) is not type(self) or other.totals.shape != self.totals.shape:
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self.totals += other.totals.to(self.totals.device)

    def _check_device(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            if tensor.device != self.totals.device:
                raise ValueError(
                    f"{type(self).__name__} accumulates on {self.totals.device} but got a tensor on "
                    f"{tensor.device}; create it with device=... matching the model"
                )


class SegmentationMetrics(_Accumulator):
    """Per-class IoU, mean IoU and pixel accuracy from an accumulated confusion matrix.

    ``totals`` is the flattened (C * C) int64 confusion matrix, row = target class, column =
    predicted class. A class absent from both the predictions and the targets of everything seen
    has no defined IoU: it is reported as NaN and left out of ``miou``. Before any update every
    value is NaN.

    Args:
        num_classes: number of classes C.
        device: where accumulation happens; inputs to ``update`` must live there.
        class_names: names used in the ``<name>_iou`` keys; default ("background", "pupil") for
            two classes, otherwise "class0", "class1", ...
    """

    def __init__(self, num_classes: int = 2, device="cpu", class_names: Sequence[str] | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2; got {num_classes}")
        if class_names is None:
            two = num_classes == 2
            class_names = ("background", "pupil") if two else [f"class{k}" for k in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.totals = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch to the confusion matrix (device work only, no host sync).

        Labels must lie in 0..C-1; checking that here would need a sync, so it is the caller's
        contract (``common.prep.preprocess`` masks are 0/1, predictions come from argmax).

        Shape:
            pred (B, C, H, W) logits or probabilities, or (B, H, W) class labels;
            target (B, H, W) class labels.
        """
        if pred.ndim == 4:
            pred = pred.argmax(dim=1)  # (B, H, W)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        self._check_device(pred, target)
        cell = target.long() * self.num_classes + pred.long()  # (B, H, W) confusion cell per pixel
        # One count per cell instead of torch.bincount / index_put_: bincount on CUDA reads max()
        # back to the host to size its output, and some versions range-check indices the same
        # way. C * C comparisons are cheap for our C = 2, exact, deterministic and sync-free.
        counts = torch.stack([(cell == code).sum() for code in range(self.totals.numel())])
        self.totals += counts

    def confusion_matrix(self) -> torch.Tensor:
        """The (C, C) confusion matrix as a view of ``totals`` (row target, column prediction)."""
        return self.totals.view(self.num_classes, self.num_classes)

    def compute(self) -> dict:
        """{"iou": [per class], "<name>_iou" per class, "miou", "pixel_acc"} as Python floats.

        ``miou`` is the mean over classes of IoU accumulated over everything seen (the original's
        ``iou``: with 2 classes, the mean of background and pupil IoU).
        """
        confusion = self.confusion_matrix().cpu().double()  # the one device-to-host transfer
        true_positive = confusion.diagonal()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positive
        iou = (true_positive / union).tolist()  # 0 / 0 -> NaN for a class never seen
        seen = [value for value in iou if not math.isnan(value)]
        total = confusion.sum().item()
        result = {"iou": iou}
        result.update({f"{name}_iou": value for name, value in zip(self.class_names, iou)})
        result["miou"] = sum(seen) / len(seen) if seen else math.nan
        result["pixel_acc"] = true_positive.sum().item() / total if total else math.nan
        return result


class EllipseMetrics(_Accumulator):
    """Centre and radius errors in pixels, and IoU of the drawn ellipse with the pupil mask.

    Per frame, with (cx, cy, rx, ry) normalized as in ``common.prep.preprocess`` (pixels: cx * W,
    cy * H, radii rx * R, ry * R with R the half diagonal, through ``normalized_to_pixels``):

    * centre error: Euclidean distance of the centres in pixels;
    * radius error: ``(|rx' - rx| + |ry' - ry|) * R / 2`` pixels;
    * the predicted ellipse drawn axis-aligned (the regressor outputs 4 values, no angle) and
      compared with the ground-truth mask: pupil IoU, background IoU, and their mean.

    As in the original ellipse script, IoUs are computed per frame and averaged over frames, and
    ``iou`` (mIoU) is the mean of the background and pupil IoU.

    Rasterization follows OpenCV's pixel convention, the one ``fit_ellipse`` and ``draw_ellipse``
    use: pixel (row y, column x) has its centre at (x, y). ``fit_ellipse`` fits the centres of the
    outermost mask pixels, which lie half a pixel inside the mask's edge, so a pixel belongs to the
    drawn ellipse with pixel centre (x0, y0) and radii (a, b) when

        ((x - x0) / (a + 0.5)) ** 2 + ((y - y0) / (b + 0.5)) ** 2 <= 1.

    For angle 0 this matches ``draw_ellipse`` up to a one-pixel band along the edge. A radius
    <= 0 draws nothing.

    Frames with an empty ground-truth mask have no target ellipse: they are left out of the
    centre and radius errors, and their pupil IoU is 1 if nothing is drawn, 0 otherwise.

    ``totals`` (float64; float32 on MPS) holds [centre error sum, radius error sum, frames with
    a pupil, pupil IoU sum, background IoU sum, frames]. ``compute()`` reports NaN for a mean over
    zero frames.

    Args:
        height, width: frame size H, W the normalized values refer to.
        device: where accumulation happens; inputs to ``update`` must live there.
    """

    def __init__(self, height: int, width: int, device="cpu"):
        self.height, self.width = int(height), int(width)
        device = torch.device(device)
        self.totals = torch.zeros(6, dtype=accumulator_dtype(device), device=device)
        # pixel-centre coordinates, broadcast against (B, 1, 1) ellipse parameters
        self._xs = torch.arange(self.width, dtype=torch.float32, device=device).view(1, 1, -1)  # (1, 1, W)
        self._ys = torch.arange(self.height, dtype=torch.float32, device=device).view(1, -1, 1)  # (1, H, 1)

    def to_pixels(self, ellipses: torch.Tensor) -> torch.Tensor:
        """(B, 4) normalized (cx, cy, rx, ry) -> (B, 4) pixel (x, y, a, b) for this frame size."""
        return torch.stack(normalized_to_pixels(*ellipses.float().unbind(1), self.height, self.width), dim=1)

    def draw(self, ellipses: torch.Tensor) -> torch.Tensor:
        """Rasterize axis-aligned normalized ellipses (B, 4) into boolean masks (B, H, W)."""
        x, y, a, b = self.to_pixels(ellipses).view(-1, 4, 1, 1).unbind(1)  # each (B, 1, 1) pixels
        a, b = a.clamp_min(0), b.clamp_min(0)  # a negative radius draws nothing, like 0
        inside = ((self._xs - x) / (a + 0.5)) ** 2 + ((self._ys - y) / (b + 0.5)) ** 2 <= 1.0
        return inside & (a > 0) & (b > 0)  # (B, H, W)

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Add one batch (device work only, no host sync); returns the per-frame pupil IoU (B,) of
        the drawn ellipse, for ``FrameMetrics``.

        Shape:
            pred (B, 4) and target (B, 4) normalized (cx, cy, rx, ry); mask (B, H, W) 0/1
            ground-truth pupil mask.
        """
        if pred.ndim != 2 or pred.shape[1] != 4 or target.shape != pred.shape:
            raise ValueError(
                f"expected pred and target (B, 4); got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if mask.shape != (pred.shape[0], self.height, self.width):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} != (B, H, W) = {(pred.shape[0], self.height, self.width)}"
            )
        self._check_device(pred, target, mask)
        pred_px, target_px = self.to_pixels(pred), self.to_pixels(target)  # (B, 4) pixels each
        center_error = center_distances(pred_px[:, :2], target_px[:, :2])  # (B,)
        radius_error = 0.5 * (pred_px[:, 2:] - target_px[:, 2:]).abs().sum(dim=1)  # (B,)
        truth = mask.bool()  # (B, H, W)
        has_pupil = truth.flatten(1).any(dim=1)  # (B,)
        drawn = self.draw(pred)  # (B, H, W)
        pupil_iou = frame_iou(drawn, truth, self.totals.dtype)  # (B,)
        background_iou = frame_iou(~drawn, ~truth, self.totals.dtype)
        weight = has_pupil.to(center_error.dtype)
        batch = torch.stack([
            (center_error * weight).sum(), (radius_error * weight).sum(), weight.sum(),
            pupil_iou.sum(), background_iou.sum(), torch.full((), float(pred.shape[0]), device=pred.device),
        ])  # torch.full fills on the device; torch.tensor(...) would copy from the host
        self.totals += batch.to(self.totals.dtype)
        return pupil_iou

    def compute(self) -> dict:
        """{"center_error_px", "radius_error_px", "iou", "pupil_iou", "background_iou", "negatives"}
        as floats; ``negatives`` counts the frames without a pupil (left out of the errors)."""
        # one transfer
        center_sum, radius_sum, pupils, pupil_sum, background_sum, frames = self.totals.tolist()

        def mean(total: float, count: float) -> float:
            return total / count if count else math.nan

        pupil_iou, background_iou = mean(pupil_sum, frames), mean(background_sum, frames)
        return {
            "center_error_px": mean(center_sum, pupils),
            "radius_error_px": mean(radius_sum, pupils),
            "iou": (pupil_iou + background_iou) / 2,
            "pupil_iou": pupil_iou,
            "background_iou": background_iou,
            "negatives": frames - pupils,
        }


def frame_iou(pred: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-frame IoU (B,) of boolean masks (B, H, W) in ``dtype``; 1 where both are empty.

    The device-side, batched form of ``common.infer.inference.mask_iou``: the same convention, so a
    picture's caption and the logged metrics agree (tests/test_pictures.py checks both)."""
    intersection = (pred & truth).flatten(1).sum(dim=1).to(dtype)  # (B,)
    union = (pred | truth).flatten(1).sum(dim=1).to(dtype)
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


# ----------------------------------------------------------------------------- per-frame metrics
DETECTION_RADIUS_PX = 5.0  # the detection rate's threshold, as in the ElSe, ExCuSe and PuRe papers
# One row per frame of the split; has_* are 0/1. Centres are in pixels of the model's frame.
FRAME_COLUMNS = ("pupil_iou", "true_x", "true_y", "has_true", "pred_x", "pred_y", "has_pred")
_BITS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' order: the first pixel is the high bit


def center_distances(pred_xy, true_xy):
    """Euclidean distance between centres: (..., 2) -> (...), tensors or numpy arrays alike.

    The one centre-error formula: the ellipse regressor's running error, the per-frame table and
    ``evaluate.py`` all call it.
    """
    difference = pred_xy - true_xy
    return (difference[..., 0] ** 2 + difference[..., 1] ** 2) ** 0.5


class FrameMetrics:
    """Per-frame pupil IoU and pupil centres of one pass over a split of ``rows`` frames.

    Conventions (README, "Metrics"; the same in training and ``evaluate.py``, which both fill this):

    * true centre: the ellipse precompute fits to the label (``preprocess.pupil_ellipse``: the
      stored ``cx, cy``) in pixels. A frame has a true pupil when its label mask is not empty and
      that ellipse exists (a label of one pixel or a 1 px line has none);
    * predicted centre: segmentation, the centre of ``preprocess.fit_ellipse`` of the predicted
      mask (argmax, ties to background: the mask and fit of ``inference.decode_output``), none
      when the mask is empty; ellipse regressor, its (cx, cy), a pupil when rx and ry are > 0;
    * pupil IoU per frame: ``frame_iou`` (1 when prediction and label are both empty).

    ``update`` is device work only. Segmentation masks are kept bit-packed, (N, H, ceil(W / 8))
    uint8, and fitted on the host in ``compute`` (once per pass, after the all-reduce).

    Args:
        rows: frames in the split (every process holds the whole split's buffers).
        height, width: frame size H, W.
        device: where the buffers live (the model's device).
        masks: keep predicted masks (segmentation) instead of predicted ellipses.
    """

    def __init__(self, rows: int, height: int, width: int, device="cpu", masks: bool = False):
        device = torch.device(device)
        self.rows, self.height, self.width = int(rows), int(height), int(width)
        self.table = torch.zeros(self.rows, len(FRAME_COLUMNS), dtype=accumulator_dtype(device),
                                 device=device)
        packed_shape = (self.rows, self.height, -(-self.width // 8))
        self.packed = torch.zeros(packed_shape, dtype=torch.uint8, device=device) if masks else None
        self._bits = torch.tensor(_BITS, dtype=torch.uint8, device=device)
        self.frames: torch.Tensor | None = None  # the host table after ``compute``

    def reset(self) -> None:
        for tensor in self.state():
            tensor.zero_()
        self.frames = None

    def state(self) -> list[torch.Tensor]:
        """The tensors to sum over processes before ``compute`` (rows each process did not see are 0)."""
        return [self.table] if self.packed is None else [self.table, self.packed]

    def pack(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool -> (B, H, ceil(W / 8)) uint8, 8 pixels a byte, first pixel in the high bit."""
        pad = -self.width % 8
        bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).unflatten(-1, (-1, 8))  # (B, H, W8, 8)
        return (bits * self._bits).sum(dim=-1, dtype=torch.uint8)

    def update(self, rows: torch.Tensor, pupil_iou: torch.Tensor, true_ellipse: torch.Tensor,
               truth: torch.Tensor, pred_ellipse: torch.Tensor | None = None,
               pred_mask: torch.Tensor | None = None) -> None:
        """Write one batch's frames at their rows (device work only, no host sync).

        Shape:
            rows (B,) int64 row indices in the split, on the device; pupil_iou (B,);
            true_ellipse (B, 4) normalized (cx, cy, rx, ry); truth (B, H, W) 0/1 label;
            pred_ellipse (B, 4) normalized (ellipse regressor) or pred_mask (B, H, W) bool.
        """
        size = (self.height, self.width)
        true_x, true_y, true_a, true_b = normalized_to_pixels(*true_ellipse.float().unbind(1), *size)
        has_true = truth.flatten(1).any(dim=1) & (true_a > 0) & (true_b > 0)  # (B,)
        if pred_ellipse is not None:
            pred_x, pred_y, pred_a, pred_b = normalized_to_pixels(*pred_ellipse.float().unbind(1), *size)
            predicted = [pred_x, pred_y, (pred_a > 0) & (pred_b > 0)]
        else:  # fitted on the host in compute()
            self.packed.index_copy_(0, rows, self.pack(pred_mask))
            predicted = [torch.zeros_like(true_x)] * 3
        columns = [pupil_iou, true_x, true_y, has_true, *predicted]
        self.table.index_copy_(0, rows, torch.stack([c.to(self.table.dtype) for c in columns], dim=1))

    def compute(self) -> dict[str, float]:
        """``summarize_frames`` of the pass; the host table stays in ``frames`` (N, len(FRAME_COLUMNS))."""
        table = self.table.to("cpu", torch.float64, copy=True)  # the one device-to-host transfer of the table
        if self.packed is not None:
            table[:, 4:] = torch.from_numpy(mask_centers(self.packed.cpu().numpy(), self.width))
        self.frames = table
        return summarize_frames(table)


def mask_centers(packed: np.ndarray, width: int) -> np.ndarray:
    """Bit-packed masks (N, H, ceil(W / 8)) -> (N, 3) float64 (x, y, found): the centre of each
    mask's ``fit_ellipse`` in pixels, (0, 0, 0) where it has none."""
    centers = np.zeros((len(packed), 3))
    for row, bits in enumerate(packed):
        if not bits.any():
            continue
        mask = np.unpackbits(bits, axis=-1, count=width)  # (H, W) uint8 0/1
        ellipse = fit_ellipse(mask)
        if ellipse is not None:
            (x, y), _, _ = ellipse_to_pixels(ellipse, *mask.shape)
            centers[row] = (x, y, 1.0)
    return centers


def frame_outcomes(table: torch.Tensor, radius: float = DETECTION_RADIUS_PX) -> dict[str, torch.Tensor]:
    """Per frame of a host table (N, len(FRAME_COLUMNS)): ``center_error`` (N,) px, NaN unless
    both a true and a predicted pupil exist; ``has_true``, ``has_pred`` and ``detected`` (N,) bool,
    detected = a true pupil, a predicted one, and a centre error <= ``radius``."""
    has_true, has_pred = table[:, 3] > 0, table[:, 6] > 0
    located = has_true & has_pred
    errors = center_distances(table[:, 4:6], table[:, 1:3])
    errors = torch.where(located, errors, torch.full_like(errors, math.nan))
    return {"center_error": errors, "has_true": has_true, "has_pred": has_pred,
            "detected": located & (errors <= radius)}


def summarize_frames(table: torch.Tensor) -> dict[str, float]:
    """The per-frame figures of a host table (N, len(FRAME_COLUMNS)), as Python floats.

    ``pupil_iou_mean``, ``pupil_iou_median``, ``pupil_iou_p10``: over every frame (quantiles
    interpolate linearly, as numpy's); ``center_error_px`` (mean) and ``center_error_median_px``
    over the frames with both a true and a predicted pupil; ``detection_rate_5px``: frames with a
    true pupil whose predicted centre is within 5 px, over all frames with a true pupil (a frame
    where no pupil is predicted counts as a miss); ``missed``: frames with a true pupil and none
    predicted; ``negatives``: frames without a true pupil, left out of the centre error and
    detection rate; ``false_pupils``: those among them where a pupil is predicted. NaN for a
    statistic over no frames.
    """
    outcome = frame_outcomes(table)
    iou, errors = table[:, 0], outcome["center_error"]
    located = errors[~errors.isnan()]
    pupils = int(outcome["has_true"].sum())

    def stat(values: torch.Tensor, q: float | None = None) -> float:
        if not len(values):
            return math.nan
        return float(values.mean() if q is None else torch.quantile(values, q))

    return {
        "pupil_iou_mean": stat(iou), "pupil_iou_median": stat(iou, 0.5), "pupil_iou_p10": stat(iou, 0.1),
        "center_error_px": stat(located), "center_error_median_px": stat(located, 0.5),
        "detection_rate_5px": int(outcome["detected"].sum()) / pupils if pupils else math.nan,
        "missed": float((outcome["has_true"] & ~outcome["has_pred"]).sum()),
        "negatives": float(len(table) - pupils),
        "false_pupils": float((~outcome["has_true"] & outcome["has_pred"]).sum()),
    }
