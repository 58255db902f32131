"""Per-run files: the training curves drawn from the metrics history."""

import cv2
import pytest

from common.history import plot_curves

SEGMENTATION_ROW = {"train_loss": 1.0, "valid_loss": 1.1, "ce_loss": 0.5, "dice_loss": 0.3,
                    "surface_loss": 0.2, "train_iou": 0.5, "valid_iou": 0.6, "train_pupil_iou": 0.2,
                    "valid_pupil_iou": 0.3,
                    "train_background_iou": 0.9, "valid_background_iou": 0.95}
ELLIPSE_ROW = {"train_loss": 1.0, "valid_loss": 1.1, "center_loss": 0.5, "radius_loss": 0.5,
               "train_iou": 0.5, "valid_iou": 0.6, "valid_pupil_iou": 0.3, "valid_center_error_px": 4.0,
               "valid_radius_error_px": 2.0}


@pytest.mark.parametrize("row, panels", [(SEGMENTATION_ROW, 2), (ELLIPSE_ROW, 3)])
def test_curves_have_a_panel_per_kind_of_metric(row, panels, tmp_path):
    history = [{"epoch": epoch, **{k: v * epoch for k, v in row.items()}} for epoch in (1, 2, 3)]
    path = plot_curves(tmp_path, history)
    image = cv2.imread(str(path))
    assert image.shape[:2] == (400, 500 * panels)  # 5 x 4 inches per panel at 100 dpi
    assert not list(tmp_path.glob(".tmp-*"))


def test_curves_need_the_metrics_they_draw(tmp_path):
    history = [{"epoch": 1, **{k: v for k, v in SEGMENTATION_ROW.items() if k != "valid_iou"}}]
    with pytest.raises(KeyError, match="valid_iou"):
        plot_curves(tmp_path, history)
