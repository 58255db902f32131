"""Synthetic near-infrared eye-camera frames with 4-class OpenEDS labels.

``render_sample`` draws one frame from a random eye geometry; ``generate_raw_dataset`` writes many
of them in the raw OpenEDS layout that ``precompute.py`` reads::

    root/{train,validation,test}/images/synthetic_000123.png   uint8 (H, W), grayscale
    root/{train,validation}/labels/synthetic_000123.npy        uint8 (H, W), classes 0..3

Labels: 0 background/skin, 1 sclera, 2 iris, 3 pupil. The eyelids form the eye opening; sclera,
iris and pupil exist only inside it, so ``label == 3`` is exactly the visible pupil
(pupil ellipse intersected with the opening). About 6% of frames are blinks: the lids are closed,
the label is all background and there is no pupil.

Eyelashes and corneal glints are drawn over the image but do not change the label, as in the
real OpenEDS annotations, where the pupil and iris are annotated as if the lashes were not there.

Everything is vectorized numpy/OpenCV on float32 planes; a 400x640 frame takes a few ms.
Lengths are given for a 400x640 frame and scaled with the frame size.

Domain-randomized mode (``render_randomized_sample``, ``generate_raw_dataset(family=...)``): the
same layers, with the ranges of ``RandomizedConfig`` widened to many cameras: views from a
close-up of the iris to the eye with its brow, nose side and cheek; off-axis iris and pupil
ellipses; dark and bright (on-axis) pupils down to a barely visible contrast; 0-6 glints, also on
the pupil; directional illumination, blur and noise; lids from wide open to hiding the whole
pupil, and blinks. Continuous parameters that matter for transfer (view, pupil contrast,
illumination direction and strength, noise, glint size, blur) are cut into interleaved ``Bands``
owned by two families, "train" and "heldout", whose values never overlap: train a model on one
family and test it on the other. Frames without a visible pupil (blinks, about 8%, with an
all-background label, and lids covering the whole pupil, about 5%) have no label 3: precompute
skips them as empty pupil masks (listed in its manifest) unless --keep-empty keeps them as
negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import cv2
import numpy as np

from common.files import atomic_path, remove_stale_temporaries
from common.images import write_image
from common.prep.preprocess import draw_ellipse, ellipse_from_pixels
from common.progress import progress as shown
from common.specs import SYNTHETIC_FAMILIES

ALL_SPLITS = ("train", "validation", "test")
UNLABELED_SPLITS = ("test",)
FILE_PREFIX = "synthetic_"
BLINK_PROBABILITY = 0.06
# Probability that the upper lid comes down past the pupil centre (most of the pupil hidden).
DROOP_PROBABILITY = 0.12
REFERENCE_HEIGHT, REFERENCE_WIDTH = 400, 640


@dataclass(frozen=True)
class EyeGeometry:
    """Pixel geometry of one frame. Ellipses are (cx, cy, semi_a, semi_b, angle_deg) as cv2 draws
    them: semi_a lies along the direction ``angle`` (degrees, clockwise on screen, y down)."""

    scale: float  # lengths relative to the default generator's eye in a 400x640 frame
    eye_cx: float
    half_width: float  # half the distance between the eye corners
    upper: np.ndarray  # (W,) float32: y of the upper lid edge in each column
    lower: np.ndarray  # (W,) float32: y of the lower lid edge; opening is upper < y < lower
    iris: tuple
    pupil: tuple | None  # None for blinks
    blink: bool
    eye_cy: float  # y of the corner line at eye_cx (before its tilt)


class EyeLevels(NamedTuple):
    """Grey levels (before illumination) of the sclera in the iris column, the iris and the pupil,
    and the contrast of the iris texture relative to the default generator's."""

    sclera: float
    iris: float
    pupil: float
    texture: float = 1.0


# ----------------------------------------------------------------------------- geometry
def _lid_shape(x: np.ndarray, eye_cx: float, half_width: float, skew: float) -> np.ndarray:
    """Lid profile (W,) in [0, ~1.1]: (1 - t^2)(1 + skew t), t = (x - eye_cx) / half_width, 0 off the eye."""
    t = (x - eye_cx) / half_width
    return np.maximum(1.0 - t * t, 0.0) * (1.0 + skew * t)


def _lid_height(target_y: float, base_y: float, shape_at: float) -> float:
    """Lid amplitude that puts the lid edge at ``target_y`` in a column where the shape is ``shape_at``."""
    return abs(base_y - target_y) / max(shape_at, 0.2)


def _sample_eye_ellipses(rng, s, eye_cx, eye_cy, half_width, height):
    """Iris and pupil ellipses (pixels). The gaze moves the iris and foreshortens it sideways."""
    gaze_x = rng.uniform(-0.35, 0.35)
    iris_r = s * rng.uniform(80.0, 112.0)
    iris = (eye_cx + gaze_x * half_width, eye_cy + height * rng.uniform(-0.09, 0.07),
            iris_r * (1.0 - 0.3 * abs(gaze_x)), iris_r * rng.uniform(0.96, 1.02), rng.uniform(-8, 8))
    semi_a = iris_r * rng.uniform(0.2, 0.52)
    semi_b = semi_a * rng.uniform(0.68, 1.0)
    # keep the whole pupil inside 90% of the (foreshortened) iris
    room = max(0.9 * min(iris[2], iris[3]) - semi_a, 0.0)
    offset = rng.uniform(-1.0, 1.0, size=2) * min(room, 0.08 * iris_r)
    pupil = (iris[0] + offset[0], iris[1] + offset[1], semi_a, semi_b, rng.uniform(0.0, 180.0))
    return iris, pupil


def _lid_targets(rng, iris, pupil, blink, eye_cy, height):
    """y of the upper and lower lid edges in the iris column."""
    iris_cy, iris_r = iris[1], iris[3]
    if blink:  # closed lids meet on a curve slightly below the corner line
        closed = eye_cy + height * rng.uniform(0.02, 0.08)
        return closed, closed
    mode = rng.random()
    if mode < DROOP_PROBABILITY:  # lid below the pupil centre: hides more than half of the pupil
        upper = pupil[1] + rng.uniform(0.1, 0.7) * min(pupil[2], pupil[3])
    elif mode < 0.3:  # wide open: the whole iris is visible
        upper = iris_cy - iris_r * rng.uniform(1.0, 1.25)
    else:
        upper = iris_cy - iris_r * rng.uniform(0.35, 1.0)
    lower = iris_cy + iris_r * (rng.uniform(0.45, 0.75) if rng.random() < 0.15 else rng.uniform(0.75, 1.2))
    return upper, lower


def sample_geometry(rng: np.random.Generator, height: int, width: int) -> EyeGeometry:
    """Random eye: corners, gaze, iris, pupil and lid curves for an (height, width) frame."""
    s = min(height / REFERENCE_HEIGHT, width / REFERENCE_WIDTH)
    eye_cx = width * (0.5 + rng.normal(0.0, 0.04))
    eye_cy = height * rng.uniform(0.45, 0.6)
    half_width = width * rng.uniform(0.36, 0.47)
    blink = bool(rng.random() < BLINK_PROBABILITY)
    iris, pupil = _sample_eye_ellipses(rng, s, eye_cx, eye_cy, half_width, height)
    targets = _lid_targets(rng, iris, pupil, blink, eye_cy, height)
    upper, lower = _lid_curves(rng, (eye_cx, eye_cy), half_width, iris[0], targets, blink, width)
    return EyeGeometry(s, eye_cx, half_width, upper, lower, iris, None if blink else pupil, blink, eye_cy)


def _lid_curves(rng, eye_centre, half_width: float, iris_cx: float, targets, blink: bool, width: int):
    """Upper and lower lid edges, (W,) float32 each, through ``targets`` = (upper y, lower y) in
    the iris column. The corner line is tilted and each lid is skewed at random."""
    eye_cx, eye_cy = eye_centre
    upper_y, lower_y = targets
    x = np.arange(width, dtype=np.float32)
    tilt = rng.uniform(-0.06, 0.06) * (x - eye_cx)  # (W,) the corner line is not level
    up_shape = _lid_shape(x, eye_cx, half_width, rng.uniform(-0.3, 0.3))
    lo_shape = _lid_shape(x, eye_cx, half_width, rng.uniform(-0.3, 0.3))
    col = int(np.clip(round(iris_cx), 0, width - 1))
    base = eye_cy + tilt[col]
    up_amp = _lid_height(upper_y, base, up_shape[col]) * (-1.0 if upper_y > base else 1.0)
    lo_amp = _lid_height(lower_y, base, lo_shape[col]) * (1.0 if lower_y > base else -1.0)
    upper = (eye_cy + tilt - up_amp * up_shape).astype(np.float32)
    lower = (eye_cy + tilt + lo_amp * lo_shape).astype(np.float32)
    if blink:
        lower = upper.copy()
    return upper, lower


# ----------------------------------------------------------------------------- label
def _ellipse_mask(ellipse: tuple, height: int, width: int) -> np.ndarray:
    """uint8 0/1 (H, W) raster of a pixel ellipse, in the project's ellipse convention."""
    cx, cy, a, b, angle = ellipse
    return draw_ellipse(ellipse_from_pixels((cx, cy), (a, b), angle, height, width), height, width)


def opening_mask(geometry: EyeGeometry, height: int) -> np.ndarray:
    """bool (H, W): pixels strictly between the upper and lower lid edges."""
    rows = np.arange(height, dtype=np.float32)[:, None]  # (H, 1)
    return (rows > geometry.upper[None, :]) & (rows < geometry.lower[None, :])


def render_label(geometry: EyeGeometry, height: int, width: int) -> np.ndarray:
    """OpenEDS label (H, W) uint8: sclera = opening, iris and pupil = their ellipses inside it."""
    opening = opening_mask(geometry, height)
    label = opening.astype(np.uint8)  # 1 sclera
    if geometry.blink or not opening.any():
        return label
    label[opening & (_ellipse_mask(geometry.iris, height, width) > 0)] = 2
    label[opening & (_ellipse_mask(geometry.pupil, height, width) > 0)] = 3
    return label



# ----------------------------------------------------------------------------- image layers
def _smooth_field(rng, height: int, width: int, octaves) -> np.ndarray:
    """(H, W) float32 smooth random field: a sum of coarse normal grids, each ((gh, gw), amplitude).

    Grids are upsampled with cubic interpolation to 1/8 of the frame, then linearly to full size
    (as smooth as one cubic resize, much cheaper).
    """
    small = (max(width // 8, 2), max(height // 8, 2))
    field = np.zeros(small[::-1], np.float32)
    for grid, amplitude in octaves:
        coarse = rng.standard_normal(grid, dtype=np.float32) * np.float32(amplitude)
        field += cv2.resize(coarse, small, interpolation=cv2.INTER_CUBIC)
    return cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)


def _band(dist: np.ndarray, offset: float, width: float) -> np.ndarray:
    """Bell-shaped band (peak 1, about ``width`` px wide) centred ``offset`` px from a lid.

    ``dist`` is y minus the lid's y (positive below the lid). (1 - z^2/3)^3 is close to exp(-z^2)
    and cheaper to evaluate.
    """
    z = (dist - np.float32(offset)) * np.float32(1.0 / width)
    bump = np.maximum(1.0 - z * z * np.float32(1.0 / 3.0), 0.0)
    return bump * bump * bump


def _half_res_lid_distances(geometry: EyeGeometry, height: int, width: int):
    """(y - upper lid, y - lower lid), each (ceil(H/2), ceil(W/2)) float32 in full-resolution pixels.

    Half-resolution pixel (i, j) sits at full-resolution (2j + 0.5, 2i + 0.5), which is where
    cv2.resize with linear interpolation puts it when upsampling by 2.
    """
    xs = 2.0 * np.arange((width + 1) // 2) + 0.5
    rows = (2.0 * np.arange((height + 1) // 2, dtype=np.float32) + 0.5)[:, None]  # (h, 1)
    columns = np.arange(width)
    upper = np.interp(xs, columns, geometry.upper).astype(np.float32)[None, :]  # (1, w)
    lower = np.interp(xs, columns, geometry.lower).astype(np.float32)[None, :]
    return rows - upper, rows - lower, xs.astype(np.float32)


def _skin(rng, geometry: EyeGeometry, height: int, width: int, level: float | None = None) -> np.ndarray:
    """Skin (H, W) float32: base ``level`` (default: random), blotches, fine texture, lid margins
    and the lid crease.

    Rendered at half resolution (all of it is smooth at that scale), then upsampled.
    """
    s = geometry.scale
    dist_up, dist_lo, xs = _half_res_lid_distances(geometry, height, width)
    h2, w2 = dist_up.shape
    skin = _smooth_field(rng, h2, w2, [((4, 6), 14.0), ((20, 32), 3.5)])
    skin += np.float32(rng.uniform(95.0, 160.0) if level is None else level)
    pores = rng.standard_normal((max(h2 // 2, 2), max(w2 // 2, 2)), dtype=np.float32) * np.float32(5.0)
    skin += cv2.resize(pores, (w2, h2), interpolation=cv2.INTER_LINEAR)
    t = np.abs(xs - np.float32(geometry.eye_cx)) / np.float32(geometry.half_width)  # (w,) 0 mid, 1 corner
    fade = np.clip((1.0 - t) / 0.12, 0.0, 1.0)[None, :]  # lid margins end at the eye corners
    # dark lash line above the upper lid edge; bright wet margin, then a shadow, below the lower lid
    margins = -np.float32(rng.uniform(25.0, 50.0)) * _band(dist_up, -3.0 * s, 3.5 * s)
    margins += np.float32(rng.uniform(5.0, 20.0)) * _band(dist_lo, 2.0 * s, 2.0 * s)
    margins -= np.float32(rng.uniform(5.0, 15.0)) * _band(dist_lo, 14.0 * s, 8.0 * s)
    skin += margins * fade
    crease, crease_width = rng.uniform(28.0, 60.0) * s, rng.uniform(5.0, 10.0) * s
    crease_fade = np.clip(1.0 - t * t * 0.8, 0.0, 1.0)[None, :]
    skin -= np.float32(rng.uniform(8.0, 25.0)) * _band(dist_up, -crease, crease_width) * crease_fade
    # the convex lid between lash line and crease catches more light
    skin += np.float32(rng.uniform(3.0, 12.0)) * _band(dist_up, -0.5 * crease, 0.4 * crease) * crease_fade
    return cv2.resize(skin, (width, height), interpolation=cv2.INTER_LINEAR)


def _vessels(rng, geometry: EyeGeometry, rows: tuple[int, int], width: int) -> np.ndarray:
    """(r1 - r0, W) float32 in [0, 1]: thin wandering vessels from the eye corners toward the iris."""
    layer = np.zeros((rows[1] - rows[0], width), np.uint8)
    s, iris_cx = geometry.scale, geometry.iris[0]
    lines = []
    for _ in range(rng.integers(3, 9)):
        side = rng.choice((-1.0, 1.0))
        x = geometry.eye_cx + side * geometry.half_width * rng.uniform(0.5, 0.95)
        col = int(np.clip(x, 0, width - 1))
        # where the lids cross (they may, in the randomized mode) the vessel starts on the upper lid
        y = rng.uniform(geometry.upper[col], max(geometry.lower[col] + 1.0, geometry.upper[col])) - rows[0]
        steps = rng.normal(0.0, 1.0, size=(8, 2)) * 6.0 * s
        steps[:, 0] += (iris_cx - x) / 12.0  # drift toward the iris
        lines.append(np.cumsum(np.vstack([[x, y], steps]), axis=0).astype(np.int32))
    cv2.polylines(layer, lines, False, 255, 1, cv2.LINE_AA)
    return layer.astype(np.float32) * np.float32(1.0 / 255.0)


def _sclera(rng, geometry: EyeGeometry, rows: tuple[int, int], width: int,
            level: float | None = None) -> np.ndarray:
    """Sclera in frame rows r0..r1, (r1 - r0, W) float32: ``level`` (default: random) in the iris
    column, darker toward the corners, vessels."""
    x = np.arange(width, dtype=np.float32)
    t = (x - np.float32(geometry.iris[0])) / np.float32(geometry.half_width)
    level = rng.uniform(140.0, 210.0) if level is None else level
    shading = np.float32(level) * (1.0 - np.float32(rng.uniform(0.15, 0.35)) * t * t)
    sclera = _smooth_field(rng, rows[1] - rows[0], width, [((8, 12), 6.0)]) + shading[None, :]
    sclera -= np.float32(rng.uniform(15.0, 35.0)) * _vessels(rng, geometry, rows, width)
    return sclera


IRIS_ANGLES, IRIS_RADII = 360, 48  # polar texture resolution (angle rows, radius columns)


def _iris_polar_texture(rng) -> np.ndarray:
    """(IRIS_ANGLES, IRIS_RADII + 1) float32 iris texture in polar coordinates, radius 0..1 left to right.

    Radial streaks (spokes) vary fast with the angle and slowly with the radius; the limbus at the
    outer edge is dark, the collarette a brighter ring, and crypts are dark blobs.
    """
    size = (IRIS_RADII, IRIS_ANGLES)
    fine = cv2.resize(rng.standard_normal((IRIS_ANGLES // 2, 5), dtype=np.float32), size)  # ~2 deg spokes
    coarse = cv2.resize(rng.standard_normal((IRIS_ANGLES // 6, 4), dtype=np.float32), size)  # bundles
    r = np.linspace(0.0, 1.0, IRIS_RADII, dtype=np.float32)[None, :]  # (1, R)
    streak = np.float32(rng.uniform(10.0, 20.0)) * fine + np.float32(rng.uniform(5.0, 12.0)) * coarse
    collarette = rng.uniform(0.4, 0.6)
    profile = (rng.uniform(6.0, 18.0) * np.exp(-(((r - collarette) / 0.07) ** 2))
               - rng.uniform(25.0, 50.0) * np.clip((r - 0.78) / 0.22, 0.0, 1.0) ** 1.5
               - rng.uniform(0.0, 12.0) * np.clip((0.3 - r) / 0.3, 0.0, 1.0))
    texture = streak * (0.5 + r) + profile.astype(np.float32)
    crypts = np.zeros_like(texture)
    for _ in range(rng.integers(4, 14)):
        center = (int(rng.uniform(0, IRIS_RADII)), int(rng.uniform(0, IRIS_ANGLES)))
        axes = (int(rng.uniform(2, 6)), int(rng.uniform(3, 12)))
        cv2.ellipse(crypts, center, axes, 0.0, 0.0, 360.0, float(rng.uniform(8.0, 20.0)), -1)
    texture -= cv2.GaussianBlur(crypts, (0, 0), 1.5)
    return np.concatenate([texture, texture[:, -1:]], axis=1)  # extra column: safe interpolation at r = 1


def _ellipse_coords(ellipse: tuple, xs: np.ndarray, ys: np.ndarray):
    """Normalized coordinates (u, v) of pixels in an ellipse's frame: u^2 + v^2 < 1 is inside.

    Same orientation as cv2.ellipse: semi_a along (cos angle, sin angle) in (x, y-down).
    """
    cx, cy, a, b, angle = ellipse
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    c, s = np.float32(c), np.float32(s)
    dx, dy = xs - np.float32(cx), ys - np.float32(cy)
    return (dx * c + dy * s) / np.float32(a), (dy * c - dx * s) / np.float32(b)


def _edge_alpha(radius: np.ndarray, semi_axis: float, softness: float) -> np.ndarray:
    """Coverage in [0, 1] of an ellipse edge blurred over ``softness`` px (radius 1 = on the edge)."""
    return np.clip((1.0 - radius) * np.float32(semi_axis / softness) + 0.5, 0.0, 1.0)


def _paint_iris_and_pupil(rng, eyeball: np.ndarray, first_row: int, geometry: EyeGeometry, levels,
                          texture_gain: float | None = None) -> None:
    """Paint the textured iris and the pupil, in place, into ``eyeball`` (rows, W).

    ``levels`` = (iris, pupil) grey levels; ``texture_gain`` scales the iris texture (the
    default generator's texture when None).

    ``eyeball`` holds frame rows first_row.. ; only the iris bounding box is computed.
    """
    width = eyeball.shape[1]
    iris, pupil, s = geometry.iris, geometry.pupil, geometry.scale
    reach = max(iris[2], iris[3]) + 3.0
    x0, x1 = max(int(iris[0] - reach), 0), min(int(iris[0] + reach) + 1, width)
    y0 = max(int(iris[1] - reach), first_row)
    y1 = min(int(iris[1] + reach) + 1, first_row + eyeball.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float32)[None, :]  # (1, w)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None]  # (h, 1)
    u, v = _ellipse_coords(iris, xs, ys)  # (h, w)
    radius = np.sqrt(u * u + v * v)
    map_x = np.minimum(radius, 1.0) * np.float32(IRIS_RADII)
    map_y = (np.arctan2(v, u) + np.float32(math.pi)) * np.float32(IRIS_ANGLES / (2.0 * math.pi))
    texture = cv2.remap(_iris_polar_texture(rng), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
    if texture_gain is not None:
        texture *= np.float32(texture_gain)
    patch = eyeball[y0 - first_row : y1 - first_row, x0:x1]
    iris_alpha = _edge_alpha(radius, min(iris[2], iris[3]), 3.0 * s)  # the limbus is soft
    patch += (texture + np.float32(levels[0]) - patch) * iris_alpha
    pu, pv = _ellipse_coords(pupil, xs, ys)
    pupil_alpha = _edge_alpha(np.sqrt(pu * pu + pv * pv), min(pupil[2], pupil[3]), 1.2 * s)
    patch += (np.float32(levels[1]) - patch) * pupil_alpha


def _sample_levels(rng) -> tuple[float, float]:
    """(iris, pupil) grey levels: the pupil is always clearly the darker one."""
    pupil = rng.uniform(8.0, 38.0)
    return pupil + rng.uniform(45.0, 105.0), pupil


def _eyelash_strokes(rng, geometry: EyeGeometry, lid: np.ndarray, count: int, length, down_prob: float):
    """List of (4, 2) int32 fixed-point (shift 2) curved strokes rooted on a lid curve (W,)."""
    width, s = lid.shape[0], geometry.scale
    t = rng.uniform(-0.88, 0.88, size=count)
    x = geometry.eye_cx + t * geometry.half_width
    y = lid[np.clip(x, 0, width - 1).astype(int)]
    lean = np.radians(t * rng.uniform(25.0, 55.0) + rng.normal(0.0, 8.0, size=count))  # fan outward
    sign = np.where(rng.random(count) < down_prob, 1.0, -1.0)  # +1: hangs down over the eye
    direction = np.stack([np.sin(lean), sign * np.cos(lean)], axis=1)  # (N, 2)
    curl = np.stack([direction[:, 1], -direction[:, 0]], axis=1) * rng.uniform(-0.35, 0.35, (count, 1))
    lengths = rng.uniform(length[0], length[1], size=(count, 1)) * s
    k = np.linspace(0.0, 1.0, 4, dtype=np.float64)[None, :, None]  # (1, 4, 1)
    root = np.stack([x, y], axis=1)[:, None, :]
    points = root + lengths[:, None] * (direction[:, None, :] * k + curl[:, None, :] * k * k)
    return list(np.round(points * 4.0).astype(np.int32))


def _eyelashes(rng, geometry: EyeGeometry, height: int, width: int) -> np.ndarray:
    """(H, W) float32 lash opacity in [0, 1]: many dark strokes on the upper lid, fewer on the lower."""
    layer = np.zeros((height, width), np.uint8)
    thick = max(1, int(round(2.0 * geometry.scale)))  # thin lashes are 1 px at any size
    down_prob = 0.9 if geometry.blink else rng.uniform(0.15, 0.7)
    upper = _eyelash_strokes(rng, geometry, geometry.upper, int(rng.integers(40, 110)), (14, 42), down_prob)
    split = len(upper) // 3  # a third of the lashes are thicker
    cv2.polylines(layer, upper[:split], False, 255, thick, cv2.LINE_AA, shift=2)
    cv2.polylines(layer, upper[split:], False, 255, 1, cv2.LINE_AA, shift=2)
    if not geometry.blink:
        lower = _eyelash_strokes(rng, geometry, geometry.lower, int(rng.integers(6, 22)), (5, 14), 1.0)
        cv2.polylines(layer, lower, False, 150, 1, cv2.LINE_AA, shift=2)
    return layer.astype(np.float32) * np.float32(1.0 / 255.0)


def _glint_centres(rng, geometry: EyeGeometry, label: np.ndarray) -> list[tuple[float, float]]:
    """1-4 corneal reflections of the illuminator LEDs: a small ring around a point near the pupil.

    A reflection hidden by a lid is moved onto a random visible iris or pupil pixel, so every
    glint of a non-blink frame is visible.
    """
    cx, cy, semi_a = geometry.pupil[0], geometry.pupil[1], geometry.pupil[2]
    count = int(rng.integers(1, 5))
    centre = np.array([cx, cy]) + rng.normal(0.0, 0.35 * semi_a, size=2)
    spread = rng.uniform(0.4, 1.2) * semi_a  # large spreads put glints on the pupil edge
    phases = rng.uniform(0.0, 2 * math.pi) + 2 * math.pi * np.arange(count) / count
    points = centre + spread * np.stack([np.cos(phases), np.sin(phases)], axis=1) * (count > 1)
    height, width = label.shape
    visible = None
    for i, (x, y) in enumerate(points):
        if not (0 <= x < width and 0 <= y < height and label[int(y), int(x)] >= 2):
            if visible is None:
                visible = np.flatnonzero(label >= 2)
            flat = visible[rng.integers(len(visible))] if len(visible) else np.flatnonzero(label)[0]
            points[i] = (flat % width, flat // width)
    return [(float(x), float(y)) for x, y in points]


def _glints(rng, geometry: EyeGeometry, label: np.ndarray):
    """Glint halo (H, W) float32 (saturating above 255), glint cores (H, W) bool, and the count."""
    if geometry.blink or not (label >= 2).any():
        return np.zeros(label.shape, np.float32), np.zeros(label.shape, bool), 0
    centres = _glint_centres(rng, geometry, label)
    # small next to the pupil even when the pupil is small, as the LEDs' reflections are
    largest = min(3.5 * geometry.scale, 0.2 * min(geometry.pupil[2], geometry.pupil[3]))
    radii = [max(rng.uniform(0.4, 1.0) * largest, 1.0) for _ in centres]
    halo, cores = _draw_glints(label.shape, centres, radii, 0.8 * geometry.scale + 0.3)
    return halo, cores, len(centres)


def _draw_glints(shape, centres, radii, halo_sigma: float):
    """Halo (H, W) float32 peaking above 255 (so the sensor saturates) and the cores (H, W) bool
    of glints: filled anti-aliased discs at ``centres`` (x, y) with ``radii`` (px)."""
    layer = np.zeros(shape, np.uint8)
    for (x, y), radius in zip(centres, radii):
        cv2.circle(layer, (int(round(x * 4)), int(round(y * 4))), int(round(radius * 4)),
                   255, -1, cv2.LINE_AA, shift=2)
    halo = cv2.GaussianBlur(layer, (0, 0), halo_sigma)
    return halo.astype(np.float32) * np.float32(330.0 / 255.0), layer >= 128


def _gain_field(exposure: float, vignette: float, centre, slope, height: int, width: int) -> np.ndarray:
    """(H, W) float32 illumination gain: exposure * vignetting around ``centre`` * a linear
    gradient ``slope`` = (d gain / d x, d gain / d y), x and y in [-1, 1] over the frame; built
    on a coarse grid."""
    gy, gx = np.mgrid[-1.0:1.0:12j, -1.0:1.0:20j]
    cx, cy = centre
    vignette_field = 1.0 - vignette * ((gx - cx) ** 2 + (gy - cy) ** 2) / 2.0
    gradient = 1.0 + slope[0] * gx + slope[1] * gy
    gain = (exposure * vignette_field * gradient).astype(np.float32)
    return cv2.resize(gain, (width, height), interpolation=cv2.INTER_LINEAR)


def _illumination(rng, height: int, width: int) -> np.ndarray:
    """(H, W) float32 gain: off-centre vignetting times a linear gradient (see ``_gain_field``)."""
    cy, cx = rng.normal(0.0, 0.3, size=2)
    vignette = rng.uniform(0.15, 0.45)
    slope = rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)
    return _gain_field(rng.uniform(0.8, 1.1), vignette, (cx, cy), slope, height, width)


def _sensor(rng, image: np.ndarray, glints: np.ndarray, scale: float, blur: float | None = None,
            noise: tuple[float, float] | None = None) -> np.ndarray:
    """Defocus blur, saturated glints, then shot + read noise; (H, W) float32 -> uint8.

    ``blur`` is the Gaussian sigma in px and ``noise`` (read std, shot gain): the variance is
    read^2 + shot * level. Both are random when not given.
    """
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.6) * scale + 0.1 if blur is None else blur)
    image = np.maximum(image, glints)
    read, shot = (rng.uniform(1.5, 5.0), rng.uniform(0.03, 0.2)) if noise is None else noise
    read, shot = np.float32(read), np.float32(shot)
    noise_std = np.sqrt(read * read + shot * np.maximum(image, 0.0))
    image += noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image + 0.5, 0.0, 255.0).astype(np.uint8)


def _composite_eyeball(rng, image: np.ndarray, geometry: EyeGeometry,
                       levels: EyeLevels | None = None) -> None:
    """Draw sclera, iris and pupil into ``image`` (H, W) in place, seen through the lid opening.

    ``levels`` are the grey levels (default: random). Only the rows the opening spans are
    computed. The opening's edge is anti-aliased over 1 px and the upper lid shades the eyeball
    just below it.
    """
    height, width = image.shape
    r0 = max(int(math.floor(float(geometry.upper.min()))), 0)
    r1 = min(int(math.ceil(float(geometry.lower.max()))) + 1, height)
    if r1 <= r0:
        return
    sclera_level = None if levels is None else levels.sclera
    eyeball = _sclera(rng, geometry, (r0, r1), width, sclera_level)  # (r1 - r0, W)
    iris_pupil = _sample_levels(rng) if levels is None else (levels.iris, levels.pupil)
    _paint_iris_and_pupil(rng, eyeball, r0, geometry, iris_pupil, None if levels is None else levels.texture)
    rows = np.arange(r0, r1, dtype=np.float32)[:, None]  # (r1 - r0, 1)
    dist_up, dist_lo = rows - geometry.upper[None, :], rows - geometry.lower[None, :]
    near_lid = 1.0 - np.clip(dist_up * np.float32(1.0 / (25.0 * geometry.scale)), 0.0, 1.0)
    eyeball *= 1.0 - np.float32(rng.uniform(0.1, 0.3)) * near_lid * near_lid  # (1 - d)^2 shadow
    alpha = np.clip(np.minimum(dist_up, -dist_lo) * np.float32(1.0 / geometry.scale) + 0.5, 0.0, 1.0)
    band = image[r0:r1]
    band += (eyeball - band) * alpha


# ----------------------------------------------------------------------------- one frame
def render_sample(rng: np.random.Generator, height: int = 400, width: int = 640):
    """Render one synthetic IR eye frame.

    Returns:
        image: uint8 (H, W) grayscale frame.
        label: uint8 (H, W) OpenEDS classes (0 skin, 1 sclera, 2 iris, 3 visible pupil).
        info: {"blink": bool, "pupil": (cx, cy, semi_a, semi_b, angle_deg) of the whole, unoccluded
            pupil ellipse in pixels (None for a blink), "glints": number of glints drawn,
            "iris": the iris ellipse in the same form}.
    """
    _check_frame_size(height, width)
    geometry = sample_geometry(rng, height, width)
    label = render_label(geometry, height, width)
    image = _skin(rng, geometry, height, width)
    if not geometry.blink:
        _composite_eyeball(rng, image, geometry)
    image *= 1.0 - np.float32(rng.uniform(0.55, 0.8)) * _eyelashes(rng, geometry, height, width)
    image *= _illumination(rng, height, width)
    halo, cores, glint_count = _glints(rng, geometry, label)
    image = _sensor(rng, image, halo, geometry.scale)
    image[cores] = 255  # the sensor saturates in the glints' cores
    return image, label, _frame_info(geometry, glint_count)


def _check_frame_size(height: int, width: int) -> None:
    if height < 16 or width < 16:
        raise ValueError(f"frame size {height}x{width} is too small; use at least 16x16")


def _frame_info(geometry: EyeGeometry, glint_count: int) -> dict:
    """The ``info`` dict of a rendered frame (see ``render_sample``)."""
    return {"blink": geometry.blink, "pupil": None if geometry.blink else tuple(map(float, geometry.pupil)),
            "iris": tuple(map(float, geometry.iris)), "glints": glint_count}


# ----------------------------------------------------------------------------- randomized mode
FAMILIES = SYNTHETIC_FAMILIES
# the default generator's mean eye half-width at 400x640: the randomized mode's length unit
REFERENCE_HALF_WIDTH = 0.415 * REFERENCE_WIDTH
LID_STATES = ("wide", "open", "pupil partly covered", "pupil covered")


def _family_index(family: str) -> int:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES.index(family)


@dataclass(frozen=True)
class Bands:
    """The range of one continuous rendering parameter, cut into bands that alternate between families.

    Band k is [edges[k], edges[k + 1]): even k belong to "train", odd k to "heldout", so the two
    families never share a value. A family draws one of its bands with probability proportional
    to its length (in log space when ``log``), then a value uniformly (log-uniformly) inside it.
    """

    edges: tuple[float, ...]
    log: bool = False

    def __post_init__(self):
        edges = np.asarray(self.edges, np.float64)
        if len(edges) < 3 or not (np.diff(edges) > 0).all() or (self.log and edges[0] <= 0):
            raise ValueError(f"band edges {self.edges} must be 3 or more increasing values "
                             "(> 0 for log bands)")

    def intervals(self, family: str) -> tuple[tuple[float, float], ...]:
        """The family's bands as half-open [low, high) intervals."""
        start = _family_index(family)
        return tuple((self.edges[k], self.edges[k + 1]) for k in range(start, len(self.edges) - 1, 2))

    def sample(self, rng: np.random.Generator, family: str) -> float:
        bands = self.intervals(family)
        ends = np.log(bands) if self.log else np.asarray(bands, np.float64)  # (K, 2)
        lengths = ends[:, 1] - ends[:, 0]
        k = int(rng.choice(len(bands), p=lengths / lengths.sum()))
        value = rng.uniform(ends[k, 0], ends[k, 1])
        value = math.exp(value) if self.log else value
        low, high = bands[k]
        return float(min(max(value, low), np.nextafter(high, low)))  # exp/log rounding stays in [low, high)


@dataclass(frozen=True)
class RandomizedConfig:
    """Ranges of the domain-randomized generator (``render_randomized_sample``).

    The ``Bands`` fields (``SPLIT``) are cut between the families "train" and "heldout"; the
    plain (low, high) ranges and probabilities are shared by both. Lengths are relative to the eye,
    grey levels are before illumination, on the 0..255 scale. Bands interleave, so both families
    span nearly the whole range. The first band is always train's, the last one train's when the
    number of bands is odd: train holds both extremes of the view, light strength, noise, glint
    size and blur (held-out values lie between training ones), heldout the strongest pupil
    contrasts (75-110) and the light directions 315-360 degrees.
    """

    # eye width (corner to corner) / frame width: 0.28 = the eye with its brow and some face,
    # ~0.85 = the default generator's view, 2.6 = a close-up where the iris fills the frame height
    view: Bands = Bands((0.28, 0.4, 0.55, 0.75, 1.0, 1.4, 1.9, 2.6), log=True)
    # |iris - pupil| grey levels: 6 is a barely visible pupil, 110 a black pupil in a light iris
    pupil_contrast: Bands = Bands((6.0, 12.0, 20.0, 32.0, 50.0, 75.0, 110.0))
    # direction (degrees, 0 = brighter to the right, 90 = brighter toward the bottom) and strength
    # (gain change from the centre to the frame edge) of the illumination gradient
    light_direction: Bands = Bands((0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0, 360.0))
    light_strength: Bands = Bands((0.0, 0.1, 0.2, 0.32, 0.45, 0.6))
    noise: Bands = Bands((1.0, 2.0, 3.5, 5.5, 8.0, 12.0), log=True)  # noise std at grey level 128
    glint_size: Bands = Bands((0.012, 0.02, 0.03, 0.045, 0.065, 0.09), log=True)  # radius / iris radius
    blur: Bands = Bands((0.2, 0.6, 1.0, 1.5, 2.2, 3.2))  # defocus sigma, px at 400x640
    # shared by both families
    blink_probability: float = 0.08
    bright_pupil_probability: float = 0.15  # on-axis illumination: the retina lights the pupil
    lid_probabilities: tuple[float, ...] = (0.15, 0.6, 0.2, 0.05)  # per LID_STATES entry
    pupil_ratio: tuple[float, float] = (0.15, 0.65)  # pupil radius / iris radius
    off_axis_deg: tuple[float, float] = (0.0, 55.0)  # gaze + camera angle: foreshortens iris and pupil
    glint_count: tuple[int, int] = (0, 6)  # inclusive; glints the lids hide are not drawn
    dark_pupil_level: tuple[float, float] = (4.0, 40.0)
    bright_pupil_iris_level: tuple[float, float] = (45.0, 120.0)
    sclera_over_iris: tuple[float, float] = (5.0, 100.0)
    skin_level: tuple[float, float] = (60.0, 180.0)
    exposure: tuple[float, float] = (0.7, 1.25)
    vignette: tuple[float, float] = (0.0, 0.5)
    eyebrow_probability: float = 0.85

    SPLIT: ClassVar[tuple[str, ...]] = ("view", "pupil_contrast", "light_direction", "light_strength",
                                        "noise", "glint_size", "blur")

    def split_parameters(self) -> dict[str, Bands]:
        return {name: getattr(self, name) for name in self.SPLIT}


@dataclass(frozen=True)
class SceneParams:
    """One draw of the randomized mode's scene parameters (see ``RandomizedConfig`` for units)."""

    family: str
    view: float
    pupil_contrast: float
    light_direction: float
    light_strength: float
    noise: float
    glint_size: float
    blur: float
    blink: bool
    bright_pupil: bool
    lid_state: str
    pupil_ratio: float
    off_axis_deg: float
    glint_count: int
    levels: EyeLevels
    skin_level: float
    exposure: float
    vignette: float
    read_noise_share: float  # of the noise variance at level 128; the rest is shot noise
    eyebrow: bool


def draw_scene_params(rng: np.random.Generator, family: str = "train",
                      config: RandomizedConfig | None = None) -> SceneParams:
    """Draw every scene parameter of a randomized frame: the split ones from ``family``'s bands."""
    config = config or RandomizedConfig()
    split = {name: bands.sample(rng, family) for name, bands in config.split_parameters().items()}
    bright = bool(rng.random() < config.bright_pupil_probability)
    if bright:  # the retro-reflection makes the pupil the brighter one
        iris = rng.uniform(*config.bright_pupil_iris_level)
        pupil = iris + split["pupil_contrast"]
    else:
        pupil = rng.uniform(*config.dark_pupil_level)
        iris = pupil + split["pupil_contrast"]
    # the texture's dark limbus and streaks scale with the iris level (the default's iris is
    # about 100), so a dark iris does not turn black next to its pupil
    texture = min(iris / 100.0, 1.2) * rng.uniform(0.6, 1.2)
    levels = EyeLevels(min(iris + rng.uniform(*config.sclera_over_iris), 235.0), iris, pupil, texture)
    probabilities = np.asarray(config.lid_probabilities, np.float64)
    return SceneParams(
        family=family, **split, blink=bool(rng.random() < config.blink_probability), bright_pupil=bright,
        lid_state=LID_STATES[int(rng.choice(len(LID_STATES), p=probabilities / probabilities.sum()))],
        pupil_ratio=rng.uniform(*config.pupil_ratio), off_axis_deg=rng.uniform(*config.off_axis_deg),
        glint_count=int(rng.integers(config.glint_count[0], config.glint_count[1] + 1)), levels=levels,
        skin_level=rng.uniform(*config.skin_level), exposure=rng.uniform(*config.exposure),
        vignette=rng.uniform(*config.vignette), read_noise_share=rng.uniform(0.2, 0.8),
        eyebrow=bool(rng.random() < config.eyebrow_probability))


def _randomized_ellipses(rng, params: SceneParams, centre, iris_r: float):
    """Iris and pupil ellipses (pixels), both foreshortened by the off-axis angle along a random
    direction (their semi_a), the pupil a little off the iris centre and inside 90% of it."""
    direction = rng.uniform(0.0, 180.0)
    squash = math.cos(math.radians(params.off_axis_deg))
    iris = (centre[0], centre[1], iris_r * squash, iris_r * rng.uniform(0.97, 1.02), direction)
    radius = params.pupil_ratio * iris_r
    semi_a = radius * squash * rng.uniform(0.92, 1.0)  # a pupil is not quite round
    room = min(0.9 * iris[2] - semi_a, 0.9 * iris[3] - radius, 0.08 * iris_r)
    offset = rng.uniform(-1.0, 1.0, size=2) * max(room, 0.0) / math.sqrt(2.0)
    angle = direction + rng.uniform(-10.0, 10.0)
    pupil = (centre[0] + offset[0], centre[1] + offset[1], semi_a, radius, angle)
    return iris, pupil


def _vertical_reach(ellipse: tuple) -> float:
    """Half the height of an ellipse's bounding box."""
    _, _, a, b, angle = ellipse
    return math.hypot(a * math.sin(math.radians(angle)), b * math.cos(math.radians(angle)))


def _randomized_lid_targets(rng, params: SceneParams, iris, pupil, eye_cy: float, half_width: float):
    """y of the upper and lower lid edges in the iris column, by ``params.lid_state``."""
    if params.blink:  # closed lids meet on a curve slightly below the corner line
        closed = eye_cy + half_width * rng.uniform(0.03, 0.1)
        return closed, closed
    iris_cy, iris_r, pupil_reach = iris[1], iris[3], _vertical_reach(pupil)
    state = params.lid_state
    if state == "wide":
        upper = iris_cy - iris_r * rng.uniform(1.0, 1.3)
    elif state == "open":
        upper = iris_cy - iris_r * rng.uniform(0.35, 1.0)
    elif state == "pupil partly covered":
        upper = pupil[1] + pupil_reach * rng.uniform(-0.85, 0.7)
    else:  # a squint: the lid lies below the pupil, a slit of iris and sclera stays open
        upper = pupil[1] + pupil_reach * rng.uniform(1.1, 1.5)
    lower = iris_cy + iris_r * rng.uniform(0.45, 1.25)
    return upper, max(lower, upper + iris_r * rng.uniform(0.12, 0.3))


def randomized_geometry(rng, params: SceneParams, height: int, width: int) -> EyeGeometry:
    """Eye geometry of a randomized frame: the eye's size comes from ``params.view``, the iris
    centre lies in the frame, the eye corners are placed around it by the gaze."""
    half_width = 0.5 * params.view * width
    iris_r = half_width * rng.uniform(0.34, 0.42)
    margin_x = min(max(0.8 * half_width, iris_r), 0.3 * width)
    margin_y = min(max(0.45 * half_width, 1.1 * iris_r), 0.3 * height)
    centre = rng.uniform(margin_x, width - margin_x), rng.uniform(margin_y, height - margin_y)
    iris, pupil = _randomized_ellipses(rng, params, centre, iris_r)
    eye_cx = centre[0] - half_width * rng.uniform(-0.35, 0.35)  # gaze: the iris moves between the corners
    eye_cy = centre[1] + iris_r * rng.uniform(-0.3, 0.35)
    targets = _randomized_lid_targets(rng, params, iris, pupil, eye_cy, half_width)
    upper, lower = _lid_curves(rng, (eye_cx, eye_cy), half_width, centre[0], targets, params.blink, width)
    scale = half_width / REFERENCE_HALF_WIDTH
    if not params.blink:  # beyond the corners the lids meet: part them the other way by a pixel of
        # anti-aliasing (``scale``) so that no half-covered line of eyeball runs to the frame's edge
        lower = np.where(lower > upper, lower, upper - np.float32(scale))
    return EyeGeometry(scale, eye_cx, half_width, upper, lower, iris,
                       None if params.blink else pupil, params.blink, eye_cy)


def _face_coords(geometry: EyeGeometry, height: int, width: int, step: int):
    """(u, v), each (ceil(H / step), ceil(W / step)) float32: the centres of step x step pixel
    cells in eye half-widths from the eye centre (x to the right, y down)."""
    xs = (np.arange((width + step - 1) // step, dtype=np.float32) + 0.5) * step - 0.5
    ys = (np.arange((height + step - 1) // step, dtype=np.float32) + 0.5) * step - 0.5
    inverse = np.float32(1.0 / geometry.half_width)
    u = (xs[None, :] - np.float32(geometry.eye_cx)) * inverse
    v = (ys[:, None] - np.float32(geometry.eye_cy)) * inverse
    return np.broadcast_arrays(u, v)


def _bump(z: np.ndarray) -> np.ndarray:
    return np.exp(-z * z)


def _brow_line(brow, u: np.ndarray) -> np.ndarray:
    """v of the eyebrow's centre line at ``u`` (see ``_face_coords``); brow = (height, arch, nose side)."""
    height_v, arch, nose_side = brow
    return -height_v + arch * (u + 0.25 * nose_side) ** 2  # highest toward the temple


def _face_shading(rng, geometry: EyeGeometry, brow, height: int, width: int) -> np.ndarray:
    """(H, W) float32 grey levels added to the skin around the eye: the socket's shadow, the lit
    brow bone and cheek, the side of the nose with its shadow, and the skin under the eyebrow.

    Smooth at the scale of the eye, so computed on a 1/8 grid and upsampled.
    """
    u, v = _face_coords(geometry, height, width, 8)
    nose_side = brow[2]
    nose = nose_side * rng.uniform(1.45, 1.8)  # u of the ridge of the nose
    socket = np.sqrt((u / 1.35) ** 2 + ((v + 0.1) / 0.95) ** 2)
    shade = -rng.uniform(8.0, 25.0) * _bump((socket - 0.95) / 0.35)
    shade += rng.uniform(5.0, 20.0) * _bump((v + 0.8) / 0.25) * _bump(u / 1.5)  # brow bone
    shade += rng.uniform(5.0, 20.0) * _bump((v - 1.1) / 0.45) * _bump(u / 1.8)  # cheek
    shade += rng.uniform(8.0, 25.0) * _bump((u - nose) / 0.22)  # lit ridge of the nose
    shade -= rng.uniform(10.0, 30.0) * _bump((u - 0.72 * nose) / 0.2) * _bump((v - 0.1) / 0.8)
    shade -= rng.uniform(10.0, 40.0) * np.clip((u - nose) * nose_side / 0.6, 0.0, 1.0)  # far side
    brow_v = _brow_line(brow, u)
    shade -= rng.uniform(5.0, 20.0) * _bump((v - brow_v) / 0.15) * _bump((u + 0.1 * nose_side) / 1.25)
    return cv2.resize(shade.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def _eyebrow(rng, geometry: EyeGeometry, brow, height: int, width: int) -> np.ndarray:
    """(H, W) float32 opacity in [0, 1] of eyebrow hairs: short strokes along the brow line,
    growing from the nose toward the temple, thicker at the nose end."""
    nose_side = brow[2]
    count = int(rng.integers(250, 500))
    u = nose_side * rng.uniform(-1.25, 1.05, size=count)  # nose end at u = 1.05 * nose_side
    thickness = rng.uniform(0.1, 0.2) * (1.0 + 0.5 * np.clip(u * nose_side, 0.0, 1.0))
    v = _brow_line(brow, u) + rng.uniform(-0.5, 0.5, size=count) * thickness
    angle = np.radians(rng.normal(20.0, 10.0, size=count))  # above the horizontal
    lengths = rng.uniform(0.07, 0.16, size=count) * geometry.half_width
    roots = np.stack([geometry.eye_cx + u * geometry.half_width,
                      geometry.eye_cy + v * geometry.half_width], axis=1)  # (N, 2)
    tips = roots + lengths[:, None] * np.stack([-nose_side * np.cos(angle), -np.sin(angle)], axis=1)
    strokes = np.round(np.stack([roots, tips], axis=1) * 4.0).astype(np.int32)  # (N, 2, 2) fixed point
    layer = np.zeros((height, width), np.uint8)
    cv2.polylines(layer, list(strokes), False, 255, max(1, round(1.5 * geometry.scale)), cv2.LINE_AA,
                  shift=2)
    return layer.astype(np.float32) * np.float32(rng.uniform(0.35, 0.7) / 255.0)


def _directional_illumination(rng, params: SceneParams, height: int, width: int) -> np.ndarray:
    """(H, W) float32 gain of a randomized frame: the gradient points to ``light_direction``."""
    theta = math.radians(params.light_direction)
    slope = params.light_strength * math.cos(theta), params.light_strength * math.sin(theta)
    gain = _gain_field(params.exposure, params.vignette, rng.normal(0.0, 0.3, size=2), slope, height, width)
    return np.maximum(gain, np.float32(0.05))  # a strong gradient and vignette must not go negative


def _randomized_glints(rng, params: SceneParams, geometry: EyeGeometry, label: np.ndarray):
    """Halo, cores and count (see ``_glints``) of ``params.glint_count`` LED reflections.

    The LEDs' ring, seen obliquely, is reflected near the pupil (anywhere on the cornea,
    the pupil included); a reflection outside the visible iris and pupil is not drawn. Every
    glint has the radius glint_size * iris radius (at least 1 px).
    """
    height, width = label.shape
    if params.blink or params.glint_count == 0:
        return np.zeros(label.shape, np.float32), np.zeros(label.shape, bool), 0
    iris_r = max(geometry.iris[2], geometry.iris[3])
    count = params.glint_count
    centre = np.asarray(geometry.pupil[:2]) + rng.normal(0.0, 0.25 * iris_r, size=2)
    spread = rng.uniform(0.1, 0.5) * iris_r * (count > 1)
    phases = rng.uniform(0.0, 2 * math.pi) + 2 * math.pi * np.arange(count) / count
    ring = np.stack([np.cos(phases), rng.uniform(0.5, 1.0) * np.sin(phases)], axis=1)  # (N, 2)
    points = centre + spread * ring
    cols, rows = np.round(points[:, 0]).astype(int), np.round(points[:, 1]).astype(int)
    seen = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    seen[seen] = label[rows[seen], cols[seen]] >= 2
    points = points[seen]
    if not len(points):
        return np.zeros(label.shape, np.float32), np.zeros(label.shape, bool), 0
    radius = max(params.glint_size * iris_r, 1.0)
    halo, cores = _draw_glints(label.shape, points, [radius] * len(points), 0.25 * radius + 0.3)
    return halo, cores, len(points)


def render_randomized_sample(rng: np.random.Generator, height: int = 400, width: int = 640,
                             family: str = "train", config: RandomizedConfig | None = None):
    """Render one domain-randomized IR eye frame of ``family`` ("train" or "heldout").

    Returns (image, label, info) as ``render_sample`` does; ``info`` also holds "family",
    "params" (the ``SceneParams`` drawn) and "visible_pupil" (whether the label has pupil pixels:
    False for blinks and for frames whose lids hide the whole pupil).
    """
    _check_frame_size(height, width)
    params = draw_scene_params(rng, family, config)
    geometry = randomized_geometry(rng, params, height, width)
    label = render_label(geometry, height, width)
    image = _skin(rng, geometry, height, width, level=params.skin_level)
    brow = rng.uniform(0.95, 1.3), rng.uniform(0.1, 0.3), rng.choice((-1.0, 1.0))  # height, arch, nose side
    image += _face_shading(rng, geometry, brow, height, width)
    if params.eyebrow:
        image *= 1.0 - _eyebrow(rng, geometry, brow, height, width)
    if not params.blink:
        _composite_eyeball(rng, image, geometry, params.levels)
    image *= 1.0 - np.float32(rng.uniform(0.55, 0.8)) * _eyelashes(rng, geometry, height, width)
    image *= _directional_illumination(rng, params, height, width)
    halo, cores, glint_count = _randomized_glints(rng, params, geometry, label)
    frame_scale = min(height / REFERENCE_HEIGHT, width / REFERENCE_WIDTH)
    share = params.read_noise_share  # split the variance at level 128 into read and shot noise
    noise = params.noise * math.sqrt(share), params.noise ** 2 * (1.0 - share) / 128.0
    image = _sensor(rng, image, halo, frame_scale, blur=params.blur * frame_scale, noise=noise)
    image[cores] = 255  # the sensor saturates in the glints' cores
    info = _frame_info(geometry, glint_count)
    info.update(family=family, params=params, visible_pupil=bool((label == 3).any()))
    return image, label, info


def sample_rng(seed: int, index: int, family: str | None = None) -> np.random.Generator:
    """The generator of sample ``index``: [seed, index] in the default mode, [seed, index, 1 + the
    family's index] in the randomized mode, so one seed's train and held-out sets are independent."""
    if family is None:
        return np.random.default_rng([seed, index])
    return np.random.default_rng([seed, index, 1 + _family_index(family)])


# ----------------------------------------------------------------------------- raw dataset
def split_counts(n: int, splits=ALL_SPLITS, fractions=(0.7, 0.2, 0.1)) -> dict[str, int]:
    """How many of ``n`` samples each split gets (largest remainder; each split >= 1 if n allows).

    ``fractions`` either has one entry per requested split, or three entries for
    ("train", "validation", "test") from which the requested splits' entries are taken. They are
    renormalized over the requested splits.
    """
    splits = tuple(splits)
    unknown = [s for s in splits if s not in ALL_SPLITS]
    if not splits or unknown or len(set(splits)) != len(splits):
        raise ValueError(f"splits {list(splits)} must be distinct names from {list(ALL_SPLITS)}")
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got {n}")
    if len(fractions) == len(splits):
        weights = np.asarray(fractions, np.float64)
    elif len(fractions) == len(ALL_SPLITS):
        weights = np.asarray([fractions[ALL_SPLITS.index(s)] for s in splits], np.float64)
    else:
        raise ValueError(f"{len(fractions)} fractions for {len(splits)} splits; give one per split")
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError(f"fractions {list(fractions)} must be non-negative with a positive sum")
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= len(splits):  # take from the largest split for any empty one
        for i in np.flatnonzero(counts == 0):
            counts[np.argmax(counts)] -= 1
            counts[i] = 1
    return {split: int(c) for split, c in zip(splits, counts)}


def sample_name(index: int) -> str:
    """File stem of global sample ``index``, unique over all splits."""
    return f"{FILE_PREFIX}{index:06d}"


def _write_sample(split_dir: Path, stem: str, image: np.ndarray, label: np.ndarray | None) -> None:
    """Write images/<stem>.png (and labels/<stem>.npy) atomically."""
    write_image(split_dir / "images" / f"{stem}.png", image)
    if label is not None:
        with atomic_path(split_dir / "labels" / f"{stem}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, label, allow_pickle=False)


def _remove_stale_samples(split_dir: Path, keep: set[str]) -> None:
    """Delete synthetic files of an earlier run (other n or splits) and killed writers' temporaries."""
    for folder in (split_dir / "images", split_dir / "labels"):
        if folder.is_dir():
            remove_stale_temporaries(folder)
            for path in folder.glob(f"{FILE_PREFIX}*"):
                if path.stem not in keep:
                    path.unlink()


def generate_raw_dataset(root, n: int, seed: int = 0, splits=ALL_SPLITS, fractions=(0.7, 0.2, 0.1),
                         height: int = 400, width: int = 640, progress: bool = False,
                         family: str | None = None, config: RandomizedConfig | None = None) -> dict[str, int]:
    """Write ``n`` synthetic samples under ``root`` in the raw OpenEDS layout; returns {split: count}.

    ``family`` None renders with the default generator (``render_sample``); "train" or "heldout"
    with the domain-randomized one (``render_randomized_sample`` with ``config``). Samples are
    numbered 0..n-1 over the splits in the order given (train first); sample i is rendered from
    ``sample_rng(seed, i, family)``, so it does not depend on n or on the other samples, and the
    same arguments always give byte-identical files. Synthetic files of an earlier run that are
    not part of this one are removed from the split folders; the "test" split gets no labels, as
    in OpenEDS.
    """
    counts = split_counts(n, splits, fractions)
    if family is not None:
        _family_index(family)  # an unknown family fails before anything is written
    root = Path(root)
    jobs, start = [], 0
    for split, count in counts.items():
        stems = [sample_name(i) for i in range(start, start + count)]
        split_dir = root / split
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
        if split not in UNLABELED_SPLITS:
            (split_dir / "labels").mkdir(parents=True, exist_ok=True)
        _remove_stale_samples(split_dir, set(stems))
        jobs += [(split_dir, split, start + k, stem) for k, stem in enumerate(stems)]
        start += count
    for split_dir, split, index, stem in (shown(jobs, "synthetic", unit="frame") if progress else jobs):
        rng = sample_rng(seed, index, family)
        if family is None:
            image, label, _ = render_sample(rng, height, width)
        else:
            image, label, _ = render_randomized_sample(rng, height, width, family, config)
        _write_sample(split_dir, stem, image, None if split in UNLABELED_SPLITS else label)
    return counts
