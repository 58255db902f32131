"""Evaluation metrics accumulated on the model's device without a host sync per batch.

``update()`` only launches device work into preallocated accumulators: it never calls ``.item()``,
``.cpu()``, ``.tolist()`` or branches on a tensor value, so the evaluation loop never waits for
the device. ``compute()`` makes the single device-to-host transfer and returns Python floats.

Distributed evaluation: each metric keeps all of its state in one tensor, ``self.totals``, of sums
and counts. Summing ``totals`` over processes gives the totals of the whole data set, so a caller
can run ``torch.distributed.all_reduce(metric.totals)`` (default op SUM) before ``compute()``.
``merge(other)`` does the same between two local instances.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from common.preprocess import normalized_to_pixels


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
        contract (``common.preprocess`` masks are 0/1, predictions come from argmax).

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

    Per frame, with (cx, cy, rx, ry) normalized as in ``common.preprocess`` (pixels: cx * W,
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

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one batch (device work only, no host sync).

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
        diff = (self.to_pixels(pred) - self.to_pixels(target)).abs()  # (B, 4) pixels
        center_error = torch.hypot(diff[:, 0], diff[:, 1])  # (B,)
        radius_error = 0.5 * (diff[:, 2] + diff[:, 3])  # (B,)
        truth = mask.bool()  # (B, H, W)
        has_pupil = truth.flatten(1).any(dim=1)  # (B,)
        drawn = self.draw(pred)  # (B, H, W)
        pupil_iou = _frame_iou(drawn, truth, self.totals.dtype)  # (B,)
        background_iou = _frame_iou(~drawn, ~truth, self.totals.dtype)
        weight = has_pupil.to(center_error.dtype)
        batch = torch.stack([
            (center_error * weight).sum(), (radius_error * weight).sum(), weight.sum(),
            pupil_iou.sum(), background_iou.sum(), torch.full((), float(pred.shape[0]), device=pred.device),
        ])  # torch.full fills on the device; torch.tensor(...) would copy from the host
        self.totals += batch.to(self.totals.dtype)

    def compute(self) -> dict:
        """{"center_error_px", "radius_error_px", "iou", "pupil_iou", "background_iou", "negatives"}
        as floats; ``negatives`` counts the frames without a pupil (left out of the errors)."""
        center_sum, radius_sum, pupils, pupil_sum, background_sum, frames = self.totals.tolist()  # one transfer

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


def _frame_iou(pred: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-frame IoU (B,) of boolean masks (B, H, W) in ``dtype``; 1 where both are empty."""
    intersection = (pred & truth).flatten(1).sum(dim=1).to(dtype)  # (B,)
    union = (pred | truth).flatten(1).sum(dim=1).to(dtype)
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
