"""Deterministic preprocessing: the only implementation in the project.

Everything that turns a raw OpenEDS-style frame and label into training targets lives here:
precompute, training on raw/legacy data, inference and the notebooks all call these functions.
All functions are pure numpy/OpenCV and work on one frame at a time.

Pipeline order (``process_sample``):
    binarize -> skip empty masks -> gamma -> CLAHE -> ellipse -> spatial weights -> distance maps

Conventions
    * frames are grayscale uint8 of shape (H, W); OpenEDS is (400, 640);
    * labels: 0 background, 1 sclera, 2 iris, 3 pupil; the pupil mask is ``label == 3``;
    * ellipse: cx = x / W, cy = y / H, rx = semi-axis 1 / W, ry = semi-axis 2 / H, angle in
      degrees in ``cv2.fitEllipse``'s convention (rotation of semi-axis 1), written in the
      canonical form with angle in [-45, 45) (see ``ellipse_from_pixels``).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import cv2
import numpy as np

GAMMA = 0.8
CLAHE_CLIP_LIMIT = 1.5
CLAHE_TILE_GRID = (8, 8)
PUPIL_CLASS = 3
NUM_OPENEDS_CLASSES = 4
# Spatial weights: morphological gradient (dilation - erosion) of the pupil mask with a 5x5
# elliptical kernel, i.e. a band about 4 px wide straddling the pupil edge. Pixels in the band get
# BOUNDARY_WEIGHT_SCALE, all others 0; the loss weights each pixel by (1 + weight).
BOUNDARY_KERNEL_SIZE = 5
BOUNDARY_WEIGHT_SCALE = 1.0
# A fitted ellipse may cover at most this multiple of the visible contour area. A pupil half hidden
# by an eyelid fits at about 2x; a thin sliver at the border would extrapolate wildly.
MAX_FIT_TO_CONTOUR_AREA = 4.0


def preprocessing_params() -> dict:
    """The parameters that define the preprocessing, recorded in every dataset manifest."""
    return {
        "gamma": GAMMA,
        "clahe_clip_limit": CLAHE_CLIP_LIMIT,
        "clahe_tile_grid": list(CLAHE_TILE_GRID),
        "pupil_class": PUPIL_CLASS,
        "boundary_kernel": f"ellipse {BOUNDARY_KERNEL_SIZE}x{BOUNDARY_KERNEL_SIZE}",
        "boundary_weight_scale": BOUNDARY_WEIGHT_SCALE,
        "dist_map": "signed euclidean / image diagonal; channels (background, pupil)",
        "order": "binarize, skip-empty, gamma, clahe, ellipse, spatial_weights, dist_map",
    }


class SkipSample(ValueError):
    """Raised for a sample that cannot be used; the message is the recorded reason."""


@dataclass(frozen=True)
class Ellipse:
    """Pupil ellipse in the normalized convention of the module docstring."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        return astuple(self)


EMPTY_ELLIPSE = Ellipse(0.0, 0.0, 0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- validation / labels
def check_frame(image: np.ndarray, expected_shape: tuple[int, int] | None = None) -> None:
    """Raise SkipSample unless ``image`` is a 2-D uint8 frame (of ``expected_shape`` if given)."""
    if image.ndim != 2:
        raise SkipSample(f"image has shape {image.shape}; expected a single-channel (H, W) frame")
    if image.dtype != np.uint8:
        raise SkipSample(f"image dtype is {image.dtype}; expected uint8")
    if expected_shape is not None and image.shape != tuple(expected_shape):
        raise SkipSample(f"image shape {image.shape} != expected {tuple(expected_shape)}")


def check_label(label: np.ndarray, image_shape: tuple[int, int]) -> None:
    """Raise SkipSample unless ``label`` is an integer OpenEDS label map matching the image."""
    if label.shape != tuple(image_shape):
        raise SkipSample(f"label shape {label.shape} != image shape {tuple(image_shape)}")
    if not np.issubdtype(label.dtype, np.integer):
        raise SkipSample(f"label dtype is {label.dtype}; expected an integer class map")
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= NUM_OPENEDS_CLASSES:
        raise SkipSample(f"label values span {low}..{high}; expected classes 0..3")


def binarize_pupil(label: np.ndarray, pupil_class: int = PUPIL_CLASS) -> np.ndarray:
    """4-class OpenEDS label (H, W) -> uint8 pupil mask (H, W) with values 0/1."""
    return (label == pupil_class).astype(np.uint8)


# ----------------------------------------------------------------------------- intensity
def gamma_lut(gamma: float = GAMMA) -> np.ndarray:
    """256-entry uint8 lookup table: round(255 * (v / 255) ** gamma)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    return np.clip(np.round(255.0 * values**gamma), 0, 255).astype(np.uint8)


_GAMMA_LUT = gamma_lut()


def gamma_correct(image: np.ndarray, gamma: float = GAMMA) -> np.ndarray:
    """Gamma correction of a uint8 frame through a LUT (gamma < 1 brightens dark regions)."""
    lut = _GAMMA_LUT if gamma == GAMMA else gamma_lut(gamma)
    return cv2.LUT(image, lut)


def apply_clahe(image: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalization, clipLimit 1.5, 8x8 tiles."""
    clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILE_GRID)
    return clahe.apply(image)


def enhance_frame(image: np.ndarray) -> np.ndarray:
    """Intensity preprocessing shared by training and inference: gamma, then CLAHE."""
    return apply_clahe(gamma_correct(image))


# ----------------------------------------------------------------------------- ellipse
def ellipse_from_pixels(center, axes, angle: float, height: int, width: int) -> Ellipse:
    """Pixel ellipse (centre xy, semi-axes, degrees) -> normalized, canonical Ellipse.

    The same ellipse can be written as (a, b, angle) or (b, a, angle + 90). We keep the form whose
    first semi-axis is the more horizontal one, i.e. angle in [-45, 45), so that rx / ry are
    close to the horizontal / vertical extent the 4-value ellipse regressor predicts.
    """
    a, b = float(axes[0]), float(axes[1])
    angle = float(angle) % 180.0
    if 45.0 <= angle < 135.0:
        a, b, angle = b, a, angle - 90.0
    elif angle >= 135.0:
        angle -= 180.0
    return Ellipse(float(center[0]) / width, float(center[1]) / height, a / width, b / height, angle)


def ellipse_to_pixels(ellipse: Ellipse, height: int, width: int):
    """Normalized Ellipse -> ((x, y), (semi_axis_1, semi_axis_2), angle) in pixels."""
    center = (ellipse.cx * width, ellipse.cy * height)
    axes = (ellipse.rx * width, ellipse.ry * height)
    return center, axes, ellipse.angle


def draw_ellipse(ellipse: Ellipse, height: int, width: int) -> np.ndarray:
    """The inverse of ``fit_ellipse``: rasterize a normalized ellipse to a uint8 0/1 mask (H, W)."""
    mask = np.zeros((height, width), np.uint8)
    if ellipse.rx <= 0 or ellipse.ry <= 0:
        return mask
    (x, y), (a, b), angle = ellipse_to_pixels(ellipse, height, width)
    # cv2.ellipse with a RotatedRect takes full axis lengths and fitEllipse's angle convention.
    cv2.ellipse(mask, ((x, y), (2.0 * a, 2.0 * b), angle), color=1, thickness=-1)
    return mask


def _moment_ellipse(points: np.ndarray) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Ellipse with the same centroid and second moments as a set of (N, 2) xy pixel points.

    A uniform filled ellipse with semi-axis a has variance a^2 / 4 along that axis, hence
    a = 2 * sqrt(eigenvalue). Semi-axes are floored at 0.5 px (one pixel has no spread).
    """
    pts = points.astype(np.float64)
    center = pts.mean(axis=0)
    cov = np.cov(pts.T) if len(pts) > 1 else np.zeros((2, 2))
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    semi = np.maximum(2.0 * np.sqrt(np.maximum(eigvals[::-1], 0.0)), 0.5)  # (major, minor)
    major = eigvecs[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0])) % 180.0
    return (float(center[0]), float(center[1])), (float(semi[0]), float(semi[1])), angle


def _fit_is_plausible(fit, contour_area: float, height: int, width: int) -> bool:
    (x, y), (w, h), _ = fit
    if not all(math.isfinite(v) for v in (x, y, w, h)) or min(w, h) <= 0:
        return False
    if not (0 <= x < width and 0 <= y < height):
        return False
    fitted_area = math.pi * w * h / 4.0
    return fitted_area <= MAX_FIT_TO_CONTOUR_AREA * max(contour_area, 1.0)


def fit_ellipse(mask: np.ndarray) -> Ellipse | None:
    """Fit the pupil ellipse to the largest contour of a 0/1 mask (H, W); None if empty.

    ``cv2.fitEllipse`` is used when the largest contour has at least 5 points and non-zero area
    and the fit is plausible (finite, centre inside the image, area at most
    ``MAX_FIT_TO_CONTOUR_AREA`` times the contour's). Otherwise (tiny blobs, lines, slivers at
    the border) the ellipse with the same second moments as the blob's pixels is returned.
    """
    height, width = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    largest = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    area = cv2.contourArea(largest)
    if len(largest) >= 5 and area > 0:
        fit = cv2.fitEllipse(largest)
        if _fit_is_plausible(fit, area, height, width):
            (x, y), (w, h), angle = fit
            return ellipse_from_pixels((x, y), (w / 2.0, h / 2.0), angle, height, width)
    blob = np.zeros_like(mask, dtype=np.uint8)
    cv2.drawContours(blob, [largest], -1, color=1, thickness=-1)
    pixels = blob & (mask > 0)  # the filled contour, without holes the mask has inside it
    ys, xs = np.nonzero(pixels if pixels.any() else blob)
    center, axes, angle = _moment_ellipse(np.stack([xs, ys], axis=1))
    return ellipse_from_pixels(center, axes, angle, height, width)


# ----------------------------------------------------------------------------- loss targets
def spatial_weights(mask: np.ndarray) -> np.ndarray:
    """Boundary weights (H, W) float32: BOUNDARY_WEIGHT_SCALE on the morphological-gradient band."""
    kernel = cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (BOUNDARY_KERNEL_SIZE, BOUNDARY_KERNEL_SIZE)
    )
    band = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, kernel)
    return (band > 0).astype(np.float32) * np.float32(BOUNDARY_WEIGHT_SCALE)


def signed_distance(class_mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance (H, W) float32 in pixels for one class.

    Positive outside the class (distance to the nearest class pixel), negative inside
    (minus the distance to the nearest non-class pixel, less one), so class pixels on the boundary
    are exactly 0. A class that is absent, or that fills the whole frame, has no boundary: zeros.
    """
    inside = class_mask.astype(bool)
    if not inside.any() or inside.all():
        return np.zeros(class_mask.shape, np.float32)
    outside_dist = cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    inside_dist = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(inside, -(inside_dist - 1.0), outside_dist).astype(np.float32)


def distance_maps(mask: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 signed distances for (background, pupil), divided by the diagonal."""
    diagonal = math.hypot(*mask.shape)
    pupil = mask.astype(bool)
    maps = [signed_distance(~pupil), signed_distance(pupil)]
    return (np.stack(maps) / np.float32(diagonal)).astype(np.float32)


# ----------------------------------------------------------------------------- whole sample
def process_sample(
    image: np.ndarray,
    label: np.ndarray,
    expected_shape: tuple[int, int] | None = None,
    pupil_class: int = PUPIL_CLASS,
    keep_empty: bool = False,
) -> dict:
    """Raw frame (H, W) uint8 + class label (H, W) -> one dataset row (without the filename).

    Raises SkipSample with the reason when the sample is unusable or its pupil mask is empty
    (unless ``keep_empty``, which keeps it with a zero ellipse as a negative example).
    """
    check_frame(image, expected_shape)
    check_label(label, image.shape)
    mask = binarize_pupil(label, pupil_class)
    if not mask.any() and not keep_empty:
        raise SkipSample("empty pupil mask")
    enhanced = enhance_frame(image)
    ellipse = fit_ellipse(mask) or EMPTY_ELLIPSE
    return {
        "image": enhanced,
        "label": mask,
        "spatial_weights": spatial_weights(mask),
        "dist_map": distance_maps(mask),
        "cx": ellipse.cx,
        "cy": ellipse.cy,
        "rx": ellipse.rx,
        "ry": ellipse.ry,
        "angle": ellipse.angle,
        "preprocessed": True,
    }


# ----------------------------------------------------------------------------- model input / size
INPUT_SCALE = 127.5  # uint8 / INPUT_SCALE - 1 maps [0, 255] onto the model's [-1, 1]


def normalize_frame(image: np.ndarray) -> np.ndarray:
    """uint8 frame (H, W) -> float32 (H, W) in [-1, 1], the model's input range."""
    return image.astype(np.float32) / np.float32(INPUT_SCALE) - np.float32(1.0)


@dataclass(frozen=True)
class Letterbox:
    """How a frame of (orig_h, orig_w) was scaled by ``scale`` and padded into the target size."""

    orig_h: int
    orig_w: int
    scale: float
    pad_top: int
    pad_left: int
    out_h: int
    out_w: int

    @property
    def new_size(self) -> tuple[int, int]:
        """(h, w) of the resized frame inside the padding."""
        return round(self.orig_h * self.scale), round(self.orig_w * self.scale)


def letterbox_geometry(orig_h: int, orig_w: int, out_h: int, out_w: int) -> Letterbox:
    """Largest aspect-preserving scale that fits (orig_h, orig_w) into (out_h, out_w), centred."""
    scale = min(out_h / orig_h, out_w / orig_w)
    new_h, new_w = round(orig_h * scale), round(orig_w * scale)
    return Letterbox(orig_h, orig_w, scale, (out_h - new_h) // 2, (out_w - new_w) // 2, out_h, out_w)


def letterbox(image: np.ndarray, out_h: int, out_w: int, is_mask: bool = False):
    """Resize keeping the aspect ratio and zero-pad to (out_h, out_w).

    Images use area interpolation (anti-aliased downscaling), masks nearest so class values stay
    exact. Returns (array (out_h, out_w), Letterbox).
    """
    box = letterbox_geometry(image.shape[0], image.shape[1], out_h, out_w)
    new_h, new_w = box.new_size
    interpolation = cv2.INTER_NEAREST if is_mask else cv2.INTER_AREA
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    out = np.zeros((out_h, out_w), dtype=image.dtype)
    out[box.pad_top : box.pad_top + new_h, box.pad_left : box.pad_left + new_w] = resized
    return out, box


def unletterbox_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """Letterboxed mask (out_h, out_w) -> mask in the original frame (orig_h, orig_w)."""
    new_h, new_w = box.new_size
    crop = mask[box.pad_top : box.pad_top + new_h, box.pad_left : box.pad_left + new_w]
    return cv2.resize(crop, (box.orig_w, box.orig_h), interpolation=cv2.INTER_NEAREST)


def unletterbox_ellipse(ellipse: Ellipse, box: Letterbox) -> Ellipse:
    """Ellipse normalized to the letterboxed frame -> ellipse normalized to the original frame."""
    (x, y), (a, b), angle = ellipse_to_pixels(ellipse, box.out_h, box.out_w)
    new_h, new_w = box.new_size
    sx, sy = new_w / box.orig_w, new_h / box.orig_h  # exact per-axis scale after rounding
    center = ((x - box.pad_left) / sx, (y - box.pad_top) / sy)
    axes = (a / sx, b / sy)
    return ellipse_from_pixels(center, axes, angle, box.orig_h, box.orig_w)
