"""Hand-computed checks of the shared preprocessing functions."""

import math

import numpy as np
import pytest

from common import preprocess as pp


def test_gamma_lut_hand_values():
    lut = pp.gamma_lut(0.8)
    # round(255 * (v / 255) ** 0.8): 1 -> 3.03, 128 -> 146.92, 200 -> 209.96
    assert (lut[0], lut[1], lut[128], lut[200], lut[255]) == (0, 3, 147, 210, 255)
    frame = np.array([[0, 1, 128, 200, 255]], np.uint8)
    assert pp.gamma_correct(frame).tolist() == [[0, 3, 147, 210, 255]]


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
    # pupil channel: its only pixel is on the boundary (0); outside is positive distance
    assert pupil[2, 2] == 0.0
    assert pupil[2, 3] == pytest.approx(1 / diag, abs=1e-6)
    assert pupil[1, 1] == pytest.approx(math.sqrt(2) / diag, abs=1e-6)
    assert pupil[0, 0] == pytest.approx(math.sqrt(8) / diag, abs=1e-6)
    # background channel: the pupil pixel is outside (+1 px); far pixels are inside (negative)
    assert background[2, 2] == pytest.approx(1 / diag, abs=1e-6)
    assert background[2, 3] == 0.0  # background pixel touching the pupil: on the boundary
    assert background[0, 0] == pytest.approx(-(math.sqrt(8) - 1) / diag, abs=1e-6)
    assert background[0, 2] == pytest.approx(-(2 - 1) / diag, abs=1e-6)


def test_distance_map_absent_class_is_zero():
    maps = pp.distance_maps(np.zeros((6, 8), np.uint8))
    assert maps.shape == (2, 6, 8) and maps.dtype == np.float32
    assert not maps.any()


ROUND_TRIP_CASES = [
    (0.5, 0.5, 0.05, 0.07, 0.0),
    (0.31, 0.62, 0.06, 0.05, 30.0),
    (0.7, 0.4, 0.035, 0.09, -40.0),
    (0.45, 0.55, 0.08, 0.06, 44.0),
    (0.2, 0.3, 0.02, 0.025, 12.5),
]


@pytest.mark.parametrize("cx,cy,rx,ry,angle", ROUND_TRIP_CASES)
def test_ellipse_round_trip_within_one_pixel(cx, cy, rx, ry, angle):
    height, width = 400, 640
    drawn = pp.draw_ellipse(pp.Ellipse(cx, cy, rx, ry, angle), height, width)
    fit = pp.fit_ellipse(drawn)
    (x0, y0), (a0, b0), _ = pp.ellipse_to_pixels(pp.Ellipse(cx, cy, rx, ry, angle), height, width)
    (x1, y1), (a1, b1), angle1 = pp.ellipse_to_pixels(fit, height, width)
    assert math.hypot(x1 - x0, y1 - y0) < 1.0
    assert abs(a1 - a0) < 1.0 and abs(b1 - b0) < 1.0
    assert abs(angle1 - angle) < 2.0  # degrees; fits of rasterized ellipses wobble slightly
    redrawn = pp.draw_ellipse(fit, height, width)
    iou = (redrawn & drawn).sum() / (redrawn | drawn).sum()
    assert iou > 0.95


def test_ellipse_canonical_form_is_more_horizontal_axis_first():
    e = pp.ellipse_from_pixels((100, 50), (10, 20), 100.0, 200, 300)
    assert e.angle == pytest.approx(10.0)
    assert (e.rx * 300, e.ry * 200) == pytest.approx((20, 10))


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
    "name,region",
    [
        ("single pixel", (slice(20, 21), slice(30, 31))),
        ("2x2 square, 4 contour points", (slice(20, 22), slice(30, 32))),
        ("1 px line, zero area", (slice(20, 21), slice(10, 50))),
        ("sliver at the top border", (slice(0, 2), slice(20, 60))),
        ("sliver at the left border", (slice(5, 35), slice(0, 1))),
    ],
)
def test_fit_ellipse_degenerate_contours(name, region):
    mask = np.zeros((40, 64), np.uint8)
    mask[region] = 1
    fit = pp.fit_ellipse(mask)
    assert fit is not None, name
    _assert_sane(fit, mask, 40, 64)


def test_fit_ellipse_uses_largest_contour():
    mask = np.zeros((100, 160), np.uint8)
    mask |= pp.draw_ellipse(pp.Ellipse(0.25, 0.5, 0.1, 0.2, 0.0), 100, 160)
    mask[10:13, 140:143] = 1  # a small glint-like speck elsewhere
    fit = pp.fit_ellipse(mask)
    assert fit.cx == pytest.approx(0.25, abs=1 / 160)


def test_spatial_weights_band_on_the_boundary():
    mask = np.zeros((30, 30), np.uint8)
    mask[10:20, 10:20] = 1
    weights = pp.spatial_weights(mask)
    assert weights.dtype == np.float32
    assert set(np.unique(weights)) == {0.0, pp.BOUNDARY_WEIGHT_SCALE}
    assert weights[10, 15] == pp.BOUNDARY_WEIGHT_SCALE and weights[9, 15] == pp.BOUNDARY_WEIGHT_SCALE
    assert weights[15, 15] == 0 and weights[0, 0] == 0  # deep inside and far outside


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
    (x1, y1), (a1, b1), _ = pp.ellipse_to_pixels(back, height, width)
    assert math.hypot(x1 - x0, y1 - y0) < 1.5 and abs(a1 - a0) < 1.5 and abs(b1 - b0) < 1.5
    assert pp.unletterbox_mask(boxed, box).shape == (height, width)
