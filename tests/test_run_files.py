"""Per-run files: the training curves drawn from the metrics history."""

from types import SimpleNamespace

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from common.train.engine import NonFiniteWatch, _finish_epoch, epoch_row
from common.train.run_files import plot_curves
from common.train.tasks import TASKS

CPU = torch.device("cpu")

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


def engine_rows(task_name: str, epochs: int = 3) -> list[dict]:
    """Per-epoch rows as the engine builds them (``_finish_epoch`` of a real task for both splits,
    then ``epoch_row``), from small hand-made predictions that change every epoch."""
    size = (16, 24)
    task = TASKS[task_name](epochs, size, CPU)
    label = torch.zeros(2, *size, dtype=torch.int64)
    label[:, 5:11, 8:16] = 1  # (B, H, W) a pupil in every frame
    target = torch.tensor([[0.5, 0.5, 0.1, 0.08]] * 2)  # (B, 4) normalized ellipses
    args, optimizer = SimpleNamespace(epochs=epochs), SimpleNamespace(param_groups=[{"lr": 1e-3}])
    rows = []
    for epoch in range(epochs):
        splits = {}
        for offset, split in enumerate(("train", "valid")):
            task.metrics.reset()
            shift = 3 - epoch - offset  # predictions improve with the epoch; valid is a step ahead
            if task_name == "segmentation":
                pupil = torch.roll(label, shift, dims=2).float()
                task.update_metrics(torch.stack([1 - pupil, pupil], dim=1), {"label": label})
            else:
                task.update_metrics(target + 0.02 * shift, {"ellipse": target, "label": label})
            terms = torch.arange(1.0, len(task.loss_terms) + 1, dtype=torch.float64)
            sums = terms * (epochs - epoch + offset)  # losses fall with the epoch
            splits[split] = _finish_epoch(task, sums, 2, split, NonFiniteWatch(CPU), epoch)
        rows.append(epoch_row(epoch, args, splits["train"], splits["valid"], task, optimizer, 1.0))
    return rows


@pytest.mark.parametrize("task_name", ["segmentation", "ellipse"])
def test_curves_draw_every_metric_of_the_rows_the_engine_writes(task_name, tmp_path, monkeypatch):
    rows = engine_rows(task_name)
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (figures.append(figure), close(figure)))
    path = plot_curves(tmp_path, rows)
    assert path.is_file() and len(figures) == 1
    drawn = {line.get_label(): line for axis in figures[0].axes for line in axis.get_lines()}
    terms = TASKS[task_name].loss_terms[1:]  # ce, dice, surface | center, radius
    expected = {"train loss": "train_loss", "valid loss": "valid_loss",
                **{term: f"{term}_loss" for term in terms}}
    for split in ("train", "valid"):
        expected.update({f"{split} mIoU": f"{split}_iou", f"{split} pupil": f"{split}_pupil_iou",
                         f"{split} background": f"{split}_background_iou"})
    if task_name == "ellipse":
        expected.update({f"{split}_{kind}_error": f"{split}_{kind}_error_px"
                         for split in ("train", "valid") for kind in ("center", "radius")})
    assert set(drawn) == set(expected)
    assert len(figures[0].axes) == (3 if task_name == "ellipse" else 2)
    for label, key in expected.items():
        np.testing.assert_array_equal(drawn[label].get_xdata(), [1, 2, 3], err_msg=label)
        np.testing.assert_array_equal(drawn[label].get_ydata(), [row[key] for row in rows], err_msg=label)
        assert len(set(drawn[label].get_ydata())) > 1, label  # the rows differ: a mixed-up key would show


def test_a_history_without_a_drawn_metric_leaves_no_picture(tmp_path):
    history = [{"epoch": 1, **{k: v for k, v in SEGMENTATION_ROW.items() if k != "valid_iou"}}]
    with pytest.raises(KeyError, match="valid_iou"):
        plot_curves(tmp_path, history)
    assert not list(tmp_path.iterdir())  # neither a picture nor a temporary file
    assert plt.get_fignums() == []  # and no figure left open


def test_a_metric_that_starts_later_is_drawn_from_where_it_starts(tmp_path, monkeypatch):
    """A run resumed across a change of metrics: the first row lacks the ellipse errors."""
    history = [{"epoch": epoch, **{k: v * epoch for k, v in ELLIPSE_ROW.items()}} for epoch in (1, 2, 3)]
    del history[0]["valid_center_error_px"], history[0]["valid_pupil_iou"]
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (figures.append(figure), close(figure)))
    plot_curves(tmp_path, history)
    drawn = {line.get_label(): line.get_ydata() for axis in figures[0].axes for line in axis.get_lines()}
    np.testing.assert_array_equal(drawn["valid_center_error"], [np.nan, 4.0 * 2, 4.0 * 3])
    np.testing.assert_array_equal(drawn["valid pupil"], [np.nan, 0.3 * 2, 0.3 * 3])
