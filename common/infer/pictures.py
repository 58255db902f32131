"""Prediction pictures: a small grid of frames with the true and the predicted pupil.

The training engine writes one every ``PICTURE_EVERY`` epochs and after the last one, as
``predictions_<model>_epoch_{n}.png``, of the same validation rows each time (``picture_rows``),
so pictures of one run compare across epochs.

Each tile is one frame (the preprocessed image the model sees), shrunk to at most
``TILE_MAX_WIDTH`` pixels wide, drawn with ``inference.overlay`` from the model output decoded by
``inference.decode_output`` (the decoder ``predict.py`` uses):
    segmentation  predicted pupil (argmax of the logits) tinted green, its fitted ellipse in red;
    ellipse       predicted ellipse (axis-aligned, radii rx*R, ry*R) tinted green, outlined red;
and the true pupil (the label mask) outlined in yellow on top. A caption names the frame and
gives its pupil IoU at full resolution (``inference.mask_iou``); a strip under the grid is the
legend. Everything here takes plain arrays: the caller runs the model.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from common.images import write_image
from common.infer.inference import (
    ELLIPSE_COLOR_BGR,
    MASK_COLOR_BGR,
    Prediction,
    decode_output,
    mask_iou,
    overlay,
)

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


def save_predictions(path, frames: np.ndarray, labels: np.ndarray, outputs: np.ndarray, names: list[str],
                     task: str) -> Path:
    """Write the grid of ``frames`` (B, H, W) uint8 with 0/1 ``labels`` (B, H, W) and the model's
    ``outputs`` ((B, 2, H, W) logits or (B, 4) ellipses), one tile per frame captioned with its name."""
    tiles = [draw_tile(frame, label, output, task, name)
             for frame, label, output, name in zip(frames, labels.astype(np.uint8), outputs, names)]
    return write_image(Path(path), grid(tiles, legend(task)))


def tile_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, TILE_MAX_WIDTH / width)
    return round(height * scale), round(width * scale)


def draw_tile(frame: np.ndarray, label: np.ndarray, output: np.ndarray, task: str, name: str) -> np.ndarray:
    """(H, W) uint8 frame and 0/1 label + one model output -> (h, w, 3) BGR tile."""
    height, width = frame.shape
    mask, ellipse = decode_output(output, task, (height, width))
    iou = mask_iou(mask, label)
    h, w = tile_size(height, width)
    small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    truth = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    # the ellipse is normalized, so it is drawn at the tile's size as it is
    prediction = Prediction(cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST), ellipse)
    image = overlay(small, prediction)
    contours, _ = cv2.findContours(truth, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, TRUE_COLOR_BGR, 1)
    put_text(image, f"{name} pupil IoU {iou:.2f}", (3, 13), (255, 255, 255))
    return image


def put_text(image: np.ndarray, text: str, origin: tuple[int, int], color) -> None:
    """Small text on a black box, readable on bright and dark frames alike."""
    (width, height), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    x, y = origin
    cv2.rectangle(image, (x - 2, y - height - 2), (x + width + 1, y + baseline - 1), (0, 0, 0), -1)
    cv2.putText(image, text, origin, FONT, FONT_SCALE, color, 1, cv2.LINE_AA)


def legend(task: str) -> list[tuple[str, tuple[int, int, int]]]:
    """(text, BGR colour) entries; each entry is written in the colour it explains."""
    return [("true pupil", TRUE_COLOR_BGR), ("predicted pupil", MASK_COLOR_BGR),
            ("predicted ellipse", ELLIPSE_COLOR_BGR)]


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
