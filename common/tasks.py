"""What is optimized and measured for each kind of model; the engine is the same for both.

A task turns model outputs and a device batch into loss terms (0-dim tensors, never synced) and
accumulates its metrics on the device. ``best_metric`` names the validation scalar that picks the
best model.

Both tasks report, as the original scripts did, ``iou`` = mIoU (the mean of background and pupil
IoU), with ``pupil_iou`` and ``background_iou`` beside it; the best checkpoint is the one with the
highest validation mIoU.
"""

from __future__ import annotations

import torch

from common.losses import alpha_schedule, ellipse_loss, segmentation_loss
from common.metrics import EllipseMetrics, SegmentationMetrics


class SegmentationTask:
    """Logits (B, 2, H, W): CE + alpha * Dice + (1 - alpha) * surface; IoU from confusion counts."""

    name = "segmentation"
    targets = ("spatial_weights", "dist_map")  # batch keys besides image/label; no ellipse needed
    loss_terms = ("loss", "ce", "dice", "surface")
    best_metric = "iou"  # validation mIoU picks the best checkpoint

    def __init__(self, epochs: int, image_size: tuple[int, int], device: torch.device):
        self.epochs = epochs
        self.metrics = SegmentationMetrics(num_classes=2, device=device)

    def alpha(self, epoch: int) -> float:
        return alpha_schedule(epoch, self.epochs)

    def loss(self, outputs: torch.Tensor, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        return segmentation_loss(outputs, batch["label"], batch["spatial_weights"], batch["dist_map"],
                                 self.alpha(epoch))

    def update_metrics(self, outputs: torch.Tensor, batch: dict) -> None:
        self.metrics.update(outputs.detach(), batch["label"])

    def compute_metrics(self) -> dict[str, float]:
        values = self.metrics.compute()
        return {"iou": values["miou"], "pupil_iou": values["pupil_iou"],
                "background_iou": values["background_iou"]}

    def epoch_extras(self, epoch: int) -> dict[str, float]:
        return {"alpha": self.alpha(epoch)}


class EllipseTask:
    """(B, 4) ellipse in (0, 1): SmoothL1 on centre and radii; errors in px and drawn-ellipse IoUs."""

    name = "ellipse"
    targets = ("ellipse",)  # fitted to the mask at load time when the dataset stores none
    loss_terms = ("loss", "center", "radius")
    best_metric = "iou"  # mIoU of the drawn predicted ellipse with the pupil mask

    def __init__(self, epochs: int, image_size: tuple[int, int], device: torch.device):
        self.metrics = EllipseMetrics(*image_size, device=device)

    def loss(self, outputs: torch.Tensor, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        has_pupil = batch["label"].flatten(1).any(dim=1)  # negatives (--keep-empty) have no ellipse
        return ellipse_loss(outputs, batch["ellipse"], has_pupil=has_pupil)

    def update_metrics(self, outputs: torch.Tensor, batch: dict) -> None:
        self.metrics.update(outputs.detach().float(), batch["ellipse"], batch["label"])

    def compute_metrics(self) -> dict[str, float]:
        return self.metrics.compute()

    def epoch_extras(self, epoch: int) -> dict[str, float]:
        return {}


TASKS = {"segmentation": SegmentationTask, "ellipse": EllipseTask}
