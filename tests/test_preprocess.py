"""Hand-computed checks of the shared preprocessing functions."""

import math

import cv2
import numpy as np
import pytest

from common.prep import preprocess as pp
from tests.helpers import in_order_of


def test_gamma_lut_hand_values():
    lut = pp.gamma_lut(0.8)
    # floor(255 * (v / 255) ** 0.8): 1 -> 3.03, 128 -> 146.92, 200 -> 209.96 (truncated, not rounded)
    assert (lut[0], lut[1], lut[128], lut[200], lut[255]) == (0, 3, 146, 209, 255)
    frame = np.array([[0, 1, 128, 200, 255]], np.uint8)
    assert pp.gamma_correct(frame).tolist() == [[0, 3, 146, 209, 255]]


def test_clahe_parameters_and_order():
    rng = np.random.default_rng(0)
    frame = (rng.random((64, 96)) * 60 + 40).astype(np.uint8)  # low-contrast frame
    out = pp.enhance_frame(frame)
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert out.std() > frame.std() * 1.5  # CLAHE stretched the contrast
    np.testing.assert_array_equal(out, pp.apply_clahe(pp.gamma_correct(frame)))
    assert (pp.CLAHE_CLIP_LIMIT, pp.CLAHE_TILE_GRID, pp.GAMMA) == (1.5, (8, 8), 0.8)


def test_binarize_keeps_only_pupil():
    label = np.array([[0, 1, 2, 3]], np.uint8)
    assert pp.binarize_pupil(label).tolist() == [[0, 0, 0, 1]]


def test_distance_map_sign_convention_hand_computed():
    mask = np.zeros((5, 5), np.uint8)
    mask[2, 2] = 1  # a one-pixel pupil in the centre
    diag = math.hypot(5, 5)
    background, pupil = pp.distance_maps(mask)
    # pupil channel: EDT(outside) - EDT(inside); its only pixel is 1 px from the background: -1
    assert pupil[2, 2] == pytest.approx(-1 / diag, abs=1e-7)
    assert pupil[2, 3] == pytest.approx(1 / diag, abs=1e-7)
    assert pupil[1, 1] == pytest.approx(math.sqrt(2) / diag, abs=1e-7)
    assert pupil[0, 0] == pytest.approx(math.sqrt(8) / diag, abs=1e-7)
    # background channel: the pupil pixel is outside (+1 px); background pixels are negative,
    # -1 next to the pupil, minus the distance to the pupil pixel further away
    assert background[2, 2] == pytest.approx(1 / diag, abs=1e-7)
    assert background[2, 3] == pytest.approx(-1 / diag, abs=1e-7)
    assert background[0, 0] == pytest.approx(-math.sqrt(8) / diag, abs=1e-7)
    assert background[0, 2] == pytest.approx(-2 / diag, abs=1e-7)


def test_distance_map_absent_class_is_zero():
    maps = pp.distance_maps(np.zeros((6, 8), np.uint8))
    assert maps.shape == (2, 6, 8) and maps.dtype == np.float32
    assert not maps.any()


ROUND_TRIP_CASES = [
    (0.5, 0.5, 0.05, 0.07, 0.0),
    (0.31, 0.62, 0.06, 0.05, 30.0),
    (0.7, 0.4, 0.035, 0.09, -40.0),
    (0.45, 0.55, 0.08, 0.06, 44.0),
    (0.2, 0.3, 0.034, 0.0265, 12.5),  # 12.8 x 10 px: smaller ellipses have an ill-defined angle
]


@pytest.mark.parametrize("cx,cy,rx,ry,angle", ROUND_TRIP_CASES)
def test_ellipse_round_trip_within_one_pixel(cx, cy, rx, ry, angle):
    height, width = 400, 640
    drawn = pp.draw_ellipse(pp.Ellipse(cx, cy, rx, ry, angle), height, width)
    fit = pp.fit_ellipse(drawn)
    (x0, y0), (a0, b0), _ = pp.ellipse_to_pixels(pp.Ellipse(cx, cy, rx, ry, angle), height, width)
    (x1, y1), (a1, b1), angle1 = pp.ellipse_to_pixels(fit, height, width)
    assert math.hypot(x1 - x0, y1 - y0) < 1.0
    a1, b1, angle1 = in_order_of(a0, b0, a1, b1, angle1)
    assert abs(a1 - a0) < 1.0 and abs(b1 - b0) < 1.0
    assert abs((angle1 - angle + 90.0) % 180.0 - 90.0) < 2.0  # degrees; rasterized fits wobble
    redrawn = pp.draw_ellipse(fit, height, width)
    iou = (redrawn & drawn).sum() / (redrawn | drawn).sum()
    assert iou > 0.95


def test_ellipse_normalization_hand_computed():
    # 400x640: R = sqrt(400^2 + 640^2) / 2 = 377.359...; the axes keep the caller's order
    assert pp.half_diagonal(400, 640) == pytest.approx(377.35925, abs=1e-5)
    e = pp.ellipse_from_pixels((320, 100), (37.735925, 18.8679625), 100.0, 400, 640)
    assert (e.cx, e.cy, e.rx, e.ry, e.angle) == pytest.approx((0.5, 0.25, 0.1, 0.05, 100.0))
    (x, y), (a, b), angle = pp.ellipse_to_pixels(e, 400, 640)
    assert (x, y, a, b, angle) == pytest.approx((320, 100, 37.735925, 18.8679625, 100.0))
    # the same pair converts arrays element-wise (the metrics use it on tensors)
    x, y, a, b = pp.normalized_to_pixels(np.array([0.5, 1.0]), 0.5, np.array([0.1, 0.2]), 0.0, 100, 240)
    assert x.tolist() == [120.0, 240.0] and y == 50.0 and a.tolist() == pytest.approx([13.0, 26.0]) and b == 0


def test_fit_ellipse_keeps_fitellipse_order_and_angle():
    import cv2

    mask = np.zeros((200, 300), np.uint8)
    cv2.ellipse(mask, ((150, 100), (80, 40), 30.0), color=1, thickness=-1)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    (x, y), (w, h), angle = cv2.fitEllipse(contours[0])
    fit = pp.fit_ellipse(mask)
    radius_unit = math.hypot(200, 300) / 2
    assert (fit.cx, fit.cy) == pytest.approx((x / 300, y / 200))
    assert (fit.rx, fit.ry, fit.angle) == pytest.approx((w / 2 / radius_unit, h / 2 / radius_unit, angle))


def test_fit_ellipse_empty_is_none():
    assert pp.fit_ellipse(np.zeros((40, 60), np.uint8)) is None


def _assert_sane(ellipse, mask, height, width):
    values = ellipse.as_tuple()
    assert all(math.isfinite(v) for v in values)
    (x, y), (a, b), _ = pp.ellipse_to_pixels(ellipse, height, width)
    ys, xs = np.nonzero(mask)
    assert xs.min() - 1 <= x <= xs.max() + 1 and ys.min() - 1 <= y <= ys.max() + 1
    assert 0 < a <= width and 0 < b <= height


@pytest.mark.parametrize(
    "name,region,expected",
    [
        # contours of zero area (the points are pixel centres): no ellipse, stored as 0, 0, 0, 0
        ("single pixel", (slice(20, 21), slice(30, 31)), None),
        ("1 px line", (slice(20, 21), slice(10, 50)), None),
        ("1 px line at the left border", (slice(5, 35), slice(0, 1)), None),
        # 4 contour points, area 1: the circle of area 1 at the centroid
        ("2x2 square", (slice(20, 22), slice(30, 32)), ((30.5, 20.5), math.sqrt(1 / math.pi))),
        # y spread 1 px < 2: circle of the contour's area 39 x 1
        ("sliver at the top border", (slice(0, 2), slice(20, 60)), ((39.5, 0.5), math.sqrt(39 / math.pi))),
    ],
)
def test_fit_ellipse_degenerate_contours_fall_back_to_a_circle(name, region, expected):
    mask = np.zeros((40, 64), np.uint8)
    mask[region] = 1
    fit = pp.fit_ellipse(mask)
    if expected is None:
        assert fit is None, name
        return
    (x, y), radius = expected
    _assert_sane(fit, mask, 40, 64)
    (fx, fy), (a, b), angle = pp.ellipse_to_pixels(fit, 40, 64)
    assert (fx, fy, a, b, angle) == pytest.approx((x, y, radius, radius, 0.0)), name


def test_fit_ellipse_uses_largest_contour():
    mask = np.zeros((100, 160), np.uint8)
    mask |= pp.draw_ellipse(pp.Ellipse(0.25, 0.5, 0.1, 0.2, 0.0), 100, 160)
    mask[10:13, 140:143] = 1  # a small glint-like speck elsewhere
    fit = pp.fit_ellipse(mask)
    assert fit.cx == pytest.approx(0.25, abs=1 / 160)


def _gaussian_taps(sigma: float = 5.0, radius: int = 20) -> np.ndarray:
    """Normalized 1-D Gaussian taps at offsets -radius..radius (radius = 4 sigma)."""
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    return taps / taps.sum()


def test_spatial_weights_of_one_pixel_hand_computed():
    # one pupil pixel far from the border: dilation with the 3x3 cross is a 5-pixel plus, the
    # erosion is empty, so the band is that plus; blurred with the separable Gaussian (sigma 5)
    mask = np.zeros((61, 61), np.uint8)
    mask[30, 30] = 1
    weights = pp.spatial_weights(mask)
    g = _gaussian_taps()  # g[20] is the centre tap
    centre = g[20] * g[20] + 4 * g[20] * g[21]
    assert weights.dtype == np.float32
    assert weights[30, 30] == pytest.approx(centre, rel=1e-6)
    assert weights[30, 40] == pytest.approx(g[20] * (g[30] + g[29] + g[31]) + 2 * g[21] * g[30], rel=1e-6)


def test_spatial_weights_band_and_frame_border():
    # A square touching the top border: outside the frame counts as background, so the top row of
    # the square is in the band (eroded away) although nothing lies above it.
    from scipy import ndimage

    mask = np.zeros((40, 50), np.uint8)
    mask[0:10, 20:30] = 1
    band = np.zeros((40, 50), np.float64)
    band[0:11, 19:31] = 1  # dilated by the cross: one more row below, one more column each side
    band[10, 19] = band[10, 30] = 0  # ... but not diagonally
    band[1:9, 21:29] = 0  # the eroded interior: the top row of the square is eroded too
    expected = ndimage.gaussian_filter(band, sigma=5, truncate=4, mode="reflect")
    np.testing.assert_allclose(pp.spatial_weights(mask), expected, rtol=0, atol=1e-7)


def test_process_sample_validation_errors():
    image = np.zeros((16, 32), np.uint8)
    label = np.zeros((16, 32), np.uint8)
    label[5:8, 5:9] = 3
    with pytest.raises(pp.SkipSample, match="empty"):
        pp.process_sample(image, np.zeros_like(label))
    with pytest.raises(pp.SkipSample, match="shape"):
        pp.process_sample(image, label, expected_shape=(400, 640))
    with pytest.raises(pp.SkipSample, match="0..3"):
        pp.process_sample(image, label + 2)
    with pytest.raises(pp.SkipSample, match="dtype"):
        pp.process_sample(image.astype(np.uint16), label)
    row = pp.process_sample(image, label)
    assert row["label"].sum() == 12 and row["preprocessed"] is True


def test_letterbox_round_trip_of_an_ellipse():
    height, width = 480, 480
    truth = pp.Ellipse(0.4, 0.6, 0.1, 0.08, 20.0)
    mask = pp.draw_ellipse(truth, height, width)
    boxed, box = pp.letterbox(mask, 400, 640, is_mask=True)
    assert boxed.shape == (400, 640) and box.pad_left == 120 and box.pad_top == 0
    back = pp.unletterbox_ellipse(pp.fit_ellipse(boxed), box)
    (x0, y0), (a0, b0), _ = pp.ellipse_to_pixels(truth, height, width)
    (x1, y1), (a1, b1), angle1 = pp.ellipse_to_pixels(back, height, width)
    a1, b1, _ = in_order_of(a0, b0, a1, b1, angle1)
    assert math.hypot(x1 - x0, y1 - y0) < 1.5 and abs(a1 - a0) < 1.5 and abs(b1 - b0) < 1.5
    assert pp.unletterbox_mask(boxed, box).shape == (height, width)


def test_distance_maps_are_bit_identical_from_call_to_call():
    """OpenCV's exact distance transform rounds its last bit differently with the output buffer's
    alignment; the maps must not depend on where numpy happens to allocate (a rebuilt dataset is
    then byte for byte the first one)."""
    mask = np.zeros((64, 96), np.uint8)
    cv2.ellipse(mask, (40, 30), (12, 9), 20, 0, 360, 1, -1)
    first, kept = pp.distance_maps(mask), []
    for call in range(16):
        kept.append(np.empty(16 * (call % 4 + 1), np.uint8))  # shifts where the next arrays start
        kept.append(pp.distance_maps(mask))
        assert np.array_equal(kept[-1], first), call
    for shape in ((64, 96), (61, 93), (400, 640)):  # where OpenCV writes them: 64-byte aligned
        assert pp._aligned_float32(shape).ctypes.data % 64 == 0
