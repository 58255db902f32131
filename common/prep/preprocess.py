"""Deterministic preprocessing: the only implementation in the project.

Everything that turns a raw OpenEDS-style frame and label into training targets lives here:
precompute, training on raw/legacy data, inference and the notebooks all call these functions.
All functions are pure numpy/OpenCV/scipy and work on one frame at a time. They reproduce the
original precompute that wrote the published dataset ``Conner/sddec25-01``
(``tests/fixtures/original_precompute_goldens.npz`` holds that code's outputs).

Pipeline order (``process_sample``):
    binarize -> skip empty masks -> gamma -> CLAHE -> ellipse -> spatial weights -> distance maps

Conventions
    * frames are grayscale uint8 of shape (H, W); OpenEDS is (400, 640);
    * labels: 0 background, 1 sclera, 2 iris, 3 pupil; the pupil mask is ``label == 3``;
    * gamma: LUT ``floor(255 * (v / 255) ** 0.8)`` (truncation), then CLAHE 1.5 / 8x8;
    * ellipse: cx = x / W, cy = y / H, rx = semi-axis 1 / R, ry = semi-axis 2 / R with
      R = sqrt(W^2 + H^2) / 2 (377.36 at 400x640) and the semi-axes in ``cv2.fitEllipse``'s own
      order; ``angle`` is fitEllipse's angle (degrees) for that order, 0 for the circle fallback.
      ``pixels_to_normalized`` / ``normalized_to_pixels`` are the only conversions;
    * spatial weights: Gaussian (sigma 5) of the 1-iteration morphological gradient (3x3 cross);
    * distance maps: per class (0 background, 1 pupil) EDT(outside) - EDT(inside) divided by the
      image diagonal, so class pixels on the boundary are -1 / diagonal; an absent class is zeros.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import cv2
import numpy as np
from scipy import ndimage

GAMMA = 0.8
CLAHE_CLIP_LIMIT = 1.5
CLAHE_TILE_GRID = (8, 8)
PUPIL_CLASS = 3
NUM_OPENEDS_CLASSES = 4
# Spatial weights: scipy.ndimage.gaussian_filter(sigma=5, truncate=4) of the boundary band.
BOUNDARY_SIGMA = 5.0
BOUNDARY_TRUNCATE = 4.0
# cv2.fitEllipse is trusted only for contours with at least MIN_FIT_POINTS points and MIN_FIT_AREA
# area, x and y spreads of at least MIN_FIT_SPREAD px at most MAX_FIT_SPREAD_RATIO apart, and a
# point covariance whose eigenvalues are >= MIN_FIT_EIGENVALUE at most MAX_FIT_EIGENVALUE_RATIO
# apart; other contours get the circle of equal area (``fit_ellipse``).
MIN_FIT_POINTS = 5
MIN_FIT_AREA = 10.0
MIN_FIT_SPREAD = 2.0
MAX_FIT_SPREAD_RATIO = 50.0
MIN_FIT_EIGENVALUE = 5.0
MAX_FIT_EIGENVALUE_RATIO = 100.0


def preprocessing_params() -> dict:
    """The parameters that define the preprocessing, recorded in every dataset manifest."""
    return {
        "gamma": GAMMA,
        "clahe_clip_limit": CLAHE_CLIP_LIMIT,
        "clahe_tile_grid": list(CLAHE_TILE_GRID),
        "pupil_class": PUPIL_CLASS,
        "gamma_lut": "floor",
        "ellipse": "fitEllipse order; cx/W, cy/H, rx/R, ry/R with R = half diagonal; "
                   "equal-area circle fallback",
        "spatial_weights": f"gaussian sigma {BOUNDARY_SIGMA} of the 3x3-cross morphological gradient",
        "dist_map": "EDT(outside) - EDT(inside) / image diagonal; channels (background, pupil)",
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
    """256-entry uint8 lookup table: floor(255 * (v / 255) ** gamma), truncated as the original."""
    values = np.arange(256, dtype=np.float64) / 255.0
    return np.floor(255.0 * values**gamma).astype(np.uint8)


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
def half_diagonal(height: int, width: int) -> float:
    """R = sqrt(H^2 + W^2) / 2, the unit of the normalized radii (377.36 at 400x640)."""
    return math.hypot(height, width) / 2.0


def pixels_to_normalized(x, y, semi_axis_1, semi_axis_2, height: int, width: int):
    """Pixel ellipse -> normalized (cx, cy, rx, ry) = (x / W, y / H, a / R, b / R).

    Element-wise, so it takes floats, numpy arrays or tensors alike.
    """
    radius_unit = half_diagonal(height, width)
    return x / width, y / height, semi_axis_1 / radius_unit, semi_axis_2 / radius_unit


def normalized_to_pixels(cx, cy, rx, ry, height: int, width: int):
    """Normalized (cx, cy, rx, ry) -> pixel (x, y, semi_axis_1, semi_axis_2); inverse of the above."""
    radius_unit = half_diagonal(height, width)
    return cx * width, cy * height, rx * radius_unit, ry * radius_unit


def ellipse_from_pixels(center, axes, angle: float, height: int, width: int) -> Ellipse:
    """Pixel ellipse (centre xy, semi-axes in the caller's order, degrees) -> normalized Ellipse."""
    values = pixels_to_normalized(center[0], center[1], axes[0], axes[1], height, width)
    return Ellipse(*(float(v) for v in values), float(angle))


def ellipse_to_pixels(ellipse: Ellipse, height: int, width: int):
    """Normalized Ellipse -> ((x, y), (semi_axis_1, semi_axis_2), angle) in pixels."""
    x, y, a, b = normalized_to_pixels(ellipse.cx, ellipse.cy, ellipse.rx, ellipse.ry, height, width)
    return (x, y), (a, b), ellipse.angle


def draw_ellipse(ellipse: Ellipse, height: int, width: int) -> np.ndarray:
    """Rasterize a normalized ellipse (with its angle) to a uint8 0/1 mask (H, W)."""
    mask = np.zeros((height, width), np.uint8)
    if ellipse.rx <= 0 or ellipse.ry <= 0:
        return mask
    (x, y), (a, b), angle = ellipse_to_pixels(ellipse, height, width)
    # cv2.ellipse with a RotatedRect takes full axis lengths and fitEllipse's angle convention.
    cv2.ellipse(mask, ((x, y), (2.0 * a, 2.0 * b), angle), color=1, thickness=-1)
    return mask


def _needs_circle(points: np.ndarray, area: float) -> bool:
    """True when a contour (N, 2) is too small or thin for ``cv2.fitEllipse`` to be trusted."""
    if len(points) < MIN_FIT_POINTS or area < MIN_FIT_AREA:
        return True
    spread_x, spread_y = np.ptp(points, axis=0)
    if (min(spread_x, spread_y) < MIN_FIT_SPREAD
            or max(spread_x, spread_y) / min(spread_x, spread_y) > MAX_FIT_SPREAD_RATIO):
        return True
    eigenvalues = np.linalg.eigvalsh(np.cov(points.T))  # unbiased covariance of the points, ascending
    return eigenvalues[0] < MIN_FIT_EIGENVALUE or eigenvalues[1] / eigenvalues[0] > MAX_FIT_EIGENVALUE_RATIO


def _fit_or_none(contour: np.ndarray):
    """``cv2.fitEllipse`` of a contour, or None when it fails or returns an unusable size."""
    try:
        (x, y), (width, height), angle = cv2.fitEllipse(contour)
    except cv2.error:
        return None
    if not all(math.isfinite(v) for v in (x, y, width, height)) or width <= 0 or height <= 0:
        return None
    return (x, y), (width / 2.0, height / 2.0), angle


def _equal_area_circle(contour: np.ndarray, area: float):
    """Circle at the contour's centroid with the contour's area; None when its area is 0."""
    moments = cv2.moments(contour)
    if moments["m00"] == 0:
        return None
    radius = math.sqrt(area / math.pi)
    return (moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]), (radius, radius), 0.0


def fit_ellipse(mask: np.ndarray) -> Ellipse | None:
    """The pupil ellipse of a 0/1 mask (H, W), as the original precompute fits it; None if none.

    The largest external contour (``CHAIN_APPROX_SIMPLE``, by ``cv2.contourArea``) is fitted with
    ``cv2.fitEllipse``; its (width / 2, height / 2) become (rx, ry) in fitEllipse's own order, with
    its angle. A contour that is small or thin (``_needs_circle``), or whose fit fails, gets the
    circle of equal area at its centroid instead, with angle 0. No contour, or a contour of zero
    area (a single pixel, a 1 px line), gives None; the dataset stores that as (0, 0, 0, 0).
    """
    height, width = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)  # the first of equal areas, as the original
    area = cv2.contourArea(largest)
    points = largest.reshape(-1, 2).astype(np.float64)  # (N, 2) xy
    pixel_ellipse = None if _needs_circle(points, area) else _fit_or_none(largest)
    pixel_ellipse = pixel_ellipse or _equal_area_circle(largest, area)
    if pixel_ellipse is None:
        return None
    center, axes, angle = pixel_ellipse
    return ellipse_from_pixels(center, axes, angle, height, width)


def pupil_ellipse(mask: np.ndarray) -> Ellipse:
    """The ellipse a dataset row stores for a 0/1 mask (H, W): ``fit_ellipse``, or all zeros if none.

    Precompute and the loader (for datasets without ellipse columns) both call this, so an ellipse
    computed at load time equals the one precompute would have written.
    """
    return fit_ellipse(mask) or EMPTY_ELLIPSE


# ----------------------------------------------------------------------------- loss targets
_CROSS = ndimage.generate_binary_structure(2, 1)  # 3x3 cross, 4-connected


def spatial_weights(mask: np.ndarray) -> np.ndarray:
    """Boundary weights (H, W) float32: Gaussian (sigma 5) of the mask's morphological gradient.

    The gradient is binary dilation minus binary erosion, one iteration with the 3x3 cross; pixels
    outside the frame count as background. The Gaussian is scipy's (truncated at 4 sigma, reflect
    border), computed in float64 and stored as float32. The loss weights each pixel by (1 + weight).
    """
    pupil = mask.astype(bool)
    boundary = (ndimage.binary_dilation(pupil, _CROSS).astype(np.float64)
                - ndimage.binary_erosion(pupil, _CROSS))
    weights = ndimage.gaussian_filter(boundary, sigma=BOUNDARY_SIGMA, truncate=BOUNDARY_TRUNCATE,
                                      mode="reflect")
    return weights.astype(np.float32)


def _distance_to(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float64 exact Euclidean distance of every pixel to the nearest pixel of ``pixels``.

    OpenCV's DIST_MASK_PRECISE is the exact transform (as scipy's ``distance_transform_edt``, to
    float32 rounding) and several times faster. Its last float32 bit depends on where its output
    buffer starts (vectorized and scalar code round differently), so the output always starts on
    a 64-byte boundary: the same mask then gives the same bits in every run and process.
    """
    distances = _aligned_float32(pixels.shape)
    cv2.distanceTransform((~pixels).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE, dst=distances)
    return distances.astype(np.float64)


def _aligned_float32(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialized (H, W) float32 C-contiguous array whose data starts on a 64-byte boundary."""
    count = shape[0] * shape[1]
    storage = np.empty(count + 16, np.float32)  # 16 float32 = 64 bytes of slack
    start = (-storage.ctypes.data % 64) // 4
    return storage[start : start + count].reshape(shape)


def signed_distance(class_mask: np.ndarray) -> np.ndarray:
    """EDT(not class) - EDT(class) (H, W) float64 in pixels for one class; zeros if it is absent.

    Outside pixels hold their distance to the class (positive); class pixels hold minus their
    distance to the nearest non-class pixel, so class pixels on the boundary are -1, not 0.
    """
    inside = class_mask.astype(bool)
    if not inside.any():
        return np.zeros(class_mask.shape, np.float64)
    if inside.all():  # no other pixel to measure against: no boundary, as an absent class
        return np.zeros(class_mask.shape, np.float64)
    return _distance_to(inside) - _distance_to(~inside)


def distance_maps(mask: np.ndarray) -> np.ndarray:
    """(2, H, W) float32 signed distances for (background, pupil), divided by the image diagonal."""
    diagonal = math.hypot(*mask.shape)
    pupil = mask.astype(bool)
    return (np.stack([signed_distance(~pupil), signed_distance(pupil)]) / diagonal).astype(np.float32)


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
    ellipse = pupil_ellipse(mask)
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
