"""What is optimized and measured for each kind of model; the engine is the same for both.

A task turns model outputs and a device batch into loss terms (0-dim tensors, never synced) and
accumulates its metrics on the device. ``best_metric`` names the validation scalar that picks the
best model.

Both tasks report, as the original scripts did, ``iou`` = mIoU (the mean of background and pupil
IoU), with ``pupil_iou`` and ``background_iou`` beside it; the best checkpoint is the one with the
highest validation mIoU. An evaluation pass (validation, ``evaluate.py``) also fills the per-frame
table (``metrics.FrameMetrics``: centre error, detection rate, per-frame IoU distribution); the
training pass does not, as its frames are augmented.
"""

from __future__ import annotations

import torch

from common.train.losses import ALPHA_FLOOR, alpha_schedule, ellipse_loss, segmentation_loss
from common.train.metrics import EllipseMetrics, FrameMetrics, SegmentationMetrics, frame_iou


class _Task:
    """Metric bookkeeping both tasks share: the running metrics and the per-frame table."""

    name: str
    metrics: SegmentationMetrics | EllipseMetrics

    def __init__(self, image_size: tuple[int, int], device: torch.device):
        self.image_size, self.device = tuple(image_size), torch.device(device)
        self.frames: FrameMetrics | None = None  # allocated by the first evaluation pass
        self.per_frame = False  # whether the current pass fills ``frames``

    def reset_metrics(self, frames: int | None = None) -> None:
        """Start a pass: zero the metrics; ``frames`` (the split's length) also starts the
        per-frame table of an evaluation pass (allocated once, zeroed afterwards)."""
        self.metrics.reset()
        self.per_frame = frames is not None
        if not self.per_frame:
            return
        if self.frames is None or self.frames.rows != frames:
            self.frames = FrameMetrics(frames, *self.image_size, self.device,
                                       masks=self.name == "segmentation")
        else:
            self.frames.reset()

    def metric_state(self) -> list[torch.Tensor]:
        """Every tensor of this pass's metrics, to be summed over DDP processes before computing."""
        return [self.metrics.totals, *(self.frames.state() if self.per_frame else [])]

    def compute_metrics(self) -> dict[str, float]:
        values = self.pass_metrics()
        if self.per_frame:
            values.update(self.frames.compute())  # the validation centre error comes from the table
        return values


class SegmentationTask(_Task):
    """Logits (B, 2, H, W): CE + alpha * Dice + (1 - alpha) * surface; IoU from confusion counts.
    ``alpha`` falls from 1 to ``alpha_floor`` (``losses.alpha_schedule``; --alpha-floor)."""

    name = "segmentation"
    targets = ("spatial_weights", "dist_map")  # batch keys besides image/label; no ellipse needed
    eval_targets = (*targets, "ellipse")  # the true centre of the per-frame metrics
    loss_terms = ("loss", "ce", "dice", "surface")
    best_metric = "iou"  # validation mIoU picks the best checkpoint

    def __init__(self, epochs: int, image_size: tuple[int, int], device: torch.device,
                 alpha_floor: float = ALPHA_FLOOR):
        super().__init__(image_size, device)
        self.epochs, self.alpha_floor = epochs, alpha_floor
        self.metrics = SegmentationMetrics(num_classes=2, device=device)

    def alpha(self, epoch: int) -> float:
        return alpha_schedule(epoch, self.epochs, self.alpha_floor)

    def loss(self, outputs: torch.Tensor, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        return segmentation_loss(outputs, batch["label"], batch["spatial_weights"], batch["dist_map"],
                                 self.alpha(epoch))

    def update_metrics(self, outputs: torch.Tensor, batch: dict, rows: torch.Tensor | None = None) -> None:
        """``rows`` (B,): the batch's rows in the split, for the per-frame table of an evaluation pass."""
        pred = outputs.detach().argmax(dim=1)  # (B, H, W); ties go to background, as inference.segment
        self.metrics.update(pred, batch["label"])
        if self.per_frame:
            mask, truth = pred.bool(), batch["label"].bool()
            self.frames.update(rows, frame_iou(mask, truth, self.frames.table.dtype), batch["ellipse"], truth,
                               pred_mask=mask)

    def pass_metrics(self) -> dict[str, float]:
        values = self.metrics.compute()
        return {"iou": values["miou"], "pupil_iou": values["pupil_iou"],
                "background_iou": values["background_iou"]}

    def epoch_extras(self, epoch: int) -> dict[str, float]:
        return {"alpha": self.alpha(epoch)}


class EllipseTask(_Task):
    """(B, 4) ellipse in (0, 1): SmoothL1 on centre and radii; errors in px and drawn-ellipse IoUs."""

    name = "ellipse"
    targets = ("ellipse",)  # fitted to the mask at load time when the dataset stores none
    eval_targets = targets
    loss_terms = ("loss", "center", "radius")
    best_metric = "iou"  # mIoU of the drawn predicted ellipse with the pupil mask

    def __init__(self, epochs: int, image_size: tuple[int, int], device: torch.device):
        super().__init__(image_size, device)
        self.metrics = EllipseMetrics(*image_size, device=device)

    def loss(self, outputs: torch.Tensor, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        has_pupil = batch["label"].flatten(1).any(dim=1)  # negatives (--keep-empty) have no ellipse
        return ellipse_loss(outputs, batch["ellipse"], has_pupil=has_pupil)

    def update_metrics(self, outputs: torch.Tensor, batch: dict, rows: torch.Tensor | None = None) -> None:
        """``rows`` (B,): the batch's rows in the split, for the per-frame table of an evaluation pass."""
        pred = outputs.detach().float()
        pupil_iou = self.metrics.update(pred, batch["ellipse"], batch["label"])  # (B,)
        if self.per_frame:
            self.frames.update(rows, pupil_iou, batch["ellipse"], batch["label"], pred_ellipse=pred)

    def pass_metrics(self) -> dict[str, float]:
        return self.metrics.compute()

    def epoch_extras(self, epoch: int) -> dict[str, float]:
        return {}


TASKS = {"segmentation": SegmentationTask, "ellipse": EllipseTask}
