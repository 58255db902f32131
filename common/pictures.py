"""Prediction pictures: a small grid of validation frames with the true and predicted pupil.

Written by the engine every ``PICTURE_EVERY`` epochs and after the last one, as
``predictions_<model>_epoch_{n}.png``. The frames are the same every time (``picture_rows``), so
pictures of one run compare across epochs.

Each tile is one validation frame (the preprocessed image the model sees), shrunk to at most
``TILE_MAX_WIDTH`` pixels wide, drawn with ``inference.overlay``:
    segmentation  predicted pupil (argmax of the logits) tinted green;
    ellipse       predicted ellipse (axis-aligned, radii rx*R, ry*R) tinted green, outlined red;
and the true pupil (the label mask) outlined in yellow on top. A caption gives the validation row
and the frame's pupil IoU at full resolution; a strip under the grid is the legend.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from common.data import to_device
from common.frames import write_image
from common.inference import ELLIPSE_COLOR_BGR, MASK_COLOR_BGR, Prediction, overlay
from common.preprocess import Ellipse, draw_ellipse

PICTURE_EVERY = 5        # epochs between pictures (the last epoch always gets one)
PICTURE_FRAMES = 8       # validation frames per picture
GRID_COLUMNS = 4
TILE_MAX_WIDTH = 320     # tiles of 400x640 frames are drawn at 200x320
GAP = 2                  # black pixels between tiles
LEGEND_HEIGHT = 20
TRUE_COLOR_BGR = (0, 255, 255)  # yellow: apart from the green tint and the red ellipse
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.4


def picture_due(epoch: int, epochs: int) -> bool:
    """Whether 1-based ``epoch`` of ``epochs`` gets a picture."""
    return epoch % PICTURE_EVERY == 0 or epoch == epochs


def picture_rows(length: int, count: int = PICTURE_FRAMES) -> list[int]:
    """``count`` validation rows spread evenly over the split (fixed, so epochs are comparable)."""
    if length <= count:
        return list(range(length))
    return np.linspace(0, length - 1, count).round().astype(int).tolist()


def save_predictions(path, model: torch.nn.Module, dataset, task: str, runtime) -> Path:
    """Predict the fixed validation rows of ``dataset`` (an ``ArrowBatches``) and write the grid.

    Args:
        model: the plain module (not a compiled wrapper, which would recompile for this batch size).
        task: "segmentation" or "ellipse" (``model.task``).
        runtime: the engine's Runtime (device, channels_last, autocast).
    """
    rows = picture_rows(len(dataset))
    batch = dataset[rows]  # image (B, H, W) uint8, label (B, H, W) uint8, on the CPU
    outputs = predict(model, batch, runtime)
    frames, labels = batch["image"].numpy(), batch["label"].numpy().astype(np.uint8)
    tiles = [draw_tile(frame, label, output, task, f"#{row}")
             for frame, label, output, row in zip(frames, labels, outputs, rows)]
    path = Path(path)
    write_image(path, grid(tiles, legend(task)))
    return path


@torch.no_grad()
def predict(model: torch.nn.Module, batch: dict, runtime) -> np.ndarray:
    """CPU batch -> float32 outputs on the host: (B, 2, H, W) logits or (B, 4) ellipses."""
    was_training = model.training
    model.eval()  # BatchNorm running statistics, as in validation
    inputs = {"image": batch["image"], "label": batch["label"]}
    moved = to_device(inputs, runtime.device, runtime.channels_last)
    with runtime.autocast():
        outputs = model(moved["image"])  # (B, 1, H, W) in [-1, 1] -> model output
    model.train(was_training)
    return outputs.float().cpu().numpy()  # host sync: drawing happens on the CPU


def predicted_mask(output: np.ndarray, task: str, height: int, width: int) -> np.ndarray:
    """One output -> (H, W) uint8 0/1 pupil mask at full resolution."""
    if task == "ellipse":
        return draw_ellipse(output_ellipse(output), height, width)
    return (output[1] > output[0]).astype(np.uint8)  # (2, H, W) logits -> argmax, ties to background


def output_ellipse(output: np.ndarray) -> Ellipse:
    """(4,) normalized (cx, cy, rx, ry) -> Ellipse with angle 0: the regressor's is axis-aligned."""
    cx, cy, rx, ry = (float(v) for v in output[:4])
    return Ellipse(cx, cy, rx, ry, 0.0)


def pupil_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two (H, W) 0/1 masks; NaN when both are empty."""
    union = np.count_nonzero(pred | truth)
    return np.count_nonzero(pred & truth) / union if union else math.nan


def tile_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, TILE_MAX_WIDTH / width)
    return round(height * scale), round(width * scale)


def draw_tile(frame: np.ndarray, label: np.ndarray, output: np.ndarray, task: str, name: str) -> np.ndarray:
    """(H, W) uint8 frame and 0/1 label + one model output -> (h, w, 3) BGR tile."""
    height, width = frame.shape
    iou = pupil_iou(predicted_mask(output, task, height, width), label)
    h, w = tile_size(height, width)
    small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    truth = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    if task == "ellipse":  # normalized ellipses do not depend on the drawing size
        ellipse = output_ellipse(output)
        prediction = Prediction(draw_ellipse(ellipse, h, w), ellipse)
    else:
        mask = predicted_mask(output, task, height, width)
        prediction = Prediction(cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST), None)
    image = overlay(small, prediction)
    contours, _ = cv2.findContours(truth, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, TRUE_COLOR_BGR, 1)
    caption = f"{name} pupil IoU {'-' if math.isnan(iou) else f'{iou:.2f}'}"
    put_text(image, caption, (3, 13), (255, 255, 255))
    return image


def put_text(image: np.ndarray, text: str, origin: tuple[int, int], color) -> None:
    """Small text on a black box, readable on bright and dark frames alike."""
    (width, height), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    x, y = origin
    cv2.rectangle(image, (x - 2, y - height - 2), (x + width + 1, y + baseline - 1), (0, 0, 0), -1)
    cv2.putText(image, text, origin, FONT, FONT_SCALE, color, 1, cv2.LINE_AA)


def legend(task: str) -> list[tuple[str, tuple[int, int, int]]]:
    """(text, BGR colour) entries; each entry is written in the colour it explains."""
    entries = [("true pupil", TRUE_COLOR_BGR), ("predicted pupil", MASK_COLOR_BGR)]
    if task == "ellipse":
        entries.append(("predicted ellipse", ELLIPSE_COLOR_BGR))
    return entries


def grid(tiles: list[np.ndarray], entries: list) -> np.ndarray:
    """Equal-size (h, w, 3) tiles -> one image: GRID_COLUMNS per row, GAP apart, legend strip below."""
    h, w = tiles[0].shape[:2]
    columns = min(GRID_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    image = np.zeros((rows * (h + GAP) - GAP + LEGEND_HEIGHT, columns * (w + GAP) - GAP, 3), np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (h + GAP), (index % columns) * (w + GAP)
        image[top : top + h, left : left + w] = tile
    x, baseline = 4, image.shape[0] - 6
    for text, color in entries:
        # a solid swatch: text is anti-aliased, so only the swatch shows the exact colour
        cv2.rectangle(image, (x, baseline - 8), (x + 7, baseline - 1), color, -1)
        put_text(image, text, (x + 11, baseline), color)
        x += 11 + cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0] + 12
    return image
