"""Prediction pictures (drawn by common.infer.pictures from the model run by the engine): layout, colours
where the true and predicted pupils are, ellipses, schedule, and the per-frame IoU convention."""

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from common.infer import pictures
from common.infer.inference import ELLIPSE_COLOR_BGR, mask_iou
from common.prep.preprocess import half_diagonal
from common.train.engine import save_prediction_picture
from common.train.metrics import frame_iou
from common.train.runtime import Runtime

CPU = Runtime(device=torch.device("cpu"), amp=False, compile=False, channels_last=False, pin_memory=False)
GRAY = 100
YELLOW = (0, 255, 255)  # BGR
GREEN_TINT = (60, 140, 60)  # gray 100 under overlay's 0.4 tint of (0, 200, 0)


class Frames:
    """Stands in for ``ArrowBatches``: rows of flat gray frames whose true pupil is a disk."""

    def __init__(self, length, height, width, center, radius):
        self.length, self.height, self.width = length, height, width
        self.label = np.zeros((height, width), np.uint8)
        cv2.circle(self.label, center, radius, 1, -1)
        self.requested = None

    def __len__(self):
        return self.length

    def __getitem__(self, rows):
        self.requested = list(rows)
        image = np.full((len(rows), self.height, self.width), GRAY, np.uint8)
        return {"image": torch.from_numpy(image),
                "label": torch.from_numpy(np.repeat(self.label[None], len(rows), axis=0))}


class BoxSegmenter(nn.Module):
    """Logits (B, 2, H, W) saying pupil inside a fixed box; records the mode it was called in."""

    task = "segmentation"

    def __init__(self, box):
        super().__init__()
        self.box, self.called_in_training = box, None

    def forward(self, image):  # (B, 1, H, W)
        self.called_in_training = self.training
        y0, y1, x0, x1 = self.box
        pupil = torch.zeros_like(image[:, 0])
        pupil[:, y0:y1, x0:x1] = 1.0
        return torch.stack([1.0 - 2.0 * pupil, 2.0 * pupil - 1.0], dim=1)  # (B, 2, H, W)


class FixedEllipse(nn.Module):
    task = "ellipse"

    def __init__(self, ellipse):
        super().__init__()
        self.ellipse = torch.tensor(ellipse)

    def forward(self, image):
        return self.ellipse.expand(image.shape[0], 4)  # (B, 4) normalized cx, cy, rx, ry


def tile(picture, index, height, width):
    """Tile ``index`` of a grid of (height, width) tiles."""
    top = (index // pictures.GRID_COLUMNS) * (height + pictures.GAP)
    left = (index % pictures.GRID_COLUMNS) * (width + pictures.GAP)
    return picture[top : top + height, left : left + width]


def legend_strip(picture):
    return picture[-pictures.LEGEND_HEIGHT :]


def is_color(pixels, color):
    return np.all(pixels.reshape(-1, 3) == np.array(color, np.uint8), axis=1)


def test_segmentation_grid_has_the_layout_and_colours(tmp_path):
    frames = Frames(10, 96, 160, center=(40, 48), radius=15)
    model = BoxSegmenter(box=(30, 70, 100, 140)).train()
    path = save_prediction_picture(tmp_path / "predictions_epoch_5.png", model, frames, "segmentation", CPU)
    picture = cv2.imread(str(path))
    assert picture.shape == (2 * 96 + 2 + pictures.LEGEND_HEIGHT, 4 * 160 + 3 * 2, 3)
    assert frames.requested == [0, 1, 3, 4, 5, 6, 8, 9]  # spread over the split, fixed
    assert model.called_in_training is False and model.training  # eval for the picture, then restored
    for index in range(8):
        image = tile(picture, index, 96, 160)
        assert tuple(image[48, 55]) == YELLOW                # right edge of the true disk
        assert tuple(image[48, 40]) == (GRAY,) * 3           # inside the truth: outline only
        assert tuple(image[50, 120]) == GREEN_TINT           # inside the predicted box
        assert tuple(image[85, 80]) == (GRAY,) * 3           # neither
        assert not is_color(image[:, 90:], YELLOW).any()     # no truth drawn near the prediction
    assert is_color(legend_strip(picture), ELLIPSE_COLOR_BGR).any()  # the fitted ellipse, as predict.py draws
    assert not list(tmp_path.glob(".tmp-*"))


def test_ellipse_grid_draws_the_predicted_ellipse(tmp_path):
    height, width = 96, 160
    radius_unit = half_diagonal(height, width)
    frames = Frames(3, height, width, center=(30, 48), radius=12)
    model = FixedEllipse((0.5, 0.5, 30 / radius_unit, 15 / radius_unit))  # centre (80, 48), radii 30, 15 px
    path = save_prediction_picture(tmp_path / "p.png", model, frames, "ellipse", CPU)
    picture = cv2.imread(str(path))
    assert picture.shape == (height + pictures.LEGEND_HEIGHT, 3 * width + 2 * 2, 3)
    for index in range(3):
        image = tile(picture, index, height, width)
        assert is_color(image[47:50, 108:112], ELLIPSE_COLOR_BGR).any()  # right end of the ellipse, x = 110
        assert is_color(image[32:35, 78:83], ELLIPSE_COLOR_BGR).any()    # top, y = 33 (axis-aligned)
        assert not is_color(image[20:30, 105:115], ELLIPSE_COLOR_BGR).any()  # no rotation, no circle
        assert tuple(image[48, 80]) == GREEN_TINT
        assert tuple(image[48, 42]) == YELLOW
    assert is_color(legend_strip(picture), ELLIPSE_COLOR_BGR).any()


def test_large_frames_are_shrunk_to_small_tiles(tmp_path):
    frames = Frames(8, 400, 640, center=(160, 200), radius=60)
    path = save_prediction_picture(tmp_path / "p.png", BoxSegmenter((100, 300, 400, 560)), frames,
                                   "segmentation", CPU)
    picture = cv2.imread(str(path))
    assert picture.shape == (2 * 200 + 2 + pictures.LEGEND_HEIGHT, 4 * 320 + 3 * 2, 3)
    image = tile(picture, 7, 200, 320)
    assert tuple(image[100, 110]) == YELLOW  # disk edge (x 220, y 200) at half size
    assert tuple(image[100, 240]) == GREEN_TINT


@pytest.mark.parametrize("epochs, due", [(12, [5, 10, 12]), (10, [5, 10]), (3, [3]), (1, [1])])
def test_pictures_every_five_epochs_and_at_the_end(epochs, due):
    assert [e for e in range(1, epochs + 1) if pictures.picture_due(e, epochs)] == due


@pytest.mark.parametrize("length, rows", [(3, [0, 1, 2]), (8, list(range(8))),
                                          (15, [0, 2, 4, 6, 8, 10, 12, 14])])
def test_picture_rows_are_fixed_and_spread(length, rows):
    assert pictures.picture_rows(length) == rows


@pytest.mark.parametrize("pred, truth, expected", [
    (np.zeros((4, 4)), np.zeros((4, 4)), 1.0),  # no pupil predicted where there is none
    (np.eye(4), np.zeros((4, 4)), 0.0),
    (np.eye(4), np.eye(4), 1.0),
    (np.triu(np.ones((4, 4))), np.eye(4), 0.4),  # 4 shared of 10
])
def test_one_iou_convention_for_pictures_and_training_metrics(pred, truth, expected):
    assert mask_iou(pred.astype(np.uint8), truth.astype(np.uint8)) == pytest.approx(expected)
    batched = frame_iou(torch.from_numpy(pred[None] > 0), torch.from_numpy(truth[None] > 0), torch.float64)
    assert batched.tolist() == pytest.approx([expected])
