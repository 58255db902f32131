"""The One Euro filter (common/infer/smoothing.py) against the paper's definition, and the ellipse
smoother built on it: axis order, angle, blinks."""

from __future__ import annotations

import numpy as np
import pytest

from common.infer.smoothing import EllipseSmoother, OneEuroFilter, smoothing_factor
from common.prep import preprocess

RATE = 30.0  # samples per second in the synthetic signals


def run(filt: OneEuroFilter, values, rate: float = RATE) -> np.ndarray:
    return np.array([filt(value, index / rate) for index, value in enumerate(values)])


def test_smoothing_factor_is_the_papers_alpha():
    # alpha = 1 / (1 + tau / Te), tau = 1 / (2 pi fc): fc = 1 Hz, Te = 0.1 s -> 1 / (1 + 1.591549)
    assert smoothing_factor(0.1, 1.0) == pytest.approx(0.3858695, abs=1e-7)
    assert smoothing_factor(0.1, np.array([1.0, 2.0])) == pytest.approx([0.3858695, 0.5568627], abs=1e-7)


def test_constant_input_is_returned_exactly_and_a_start_elsewhere_converges():
    constant = np.full(50, 0.123456789)
    assert np.array_equal(run(OneEuroFilter(1.0, 0.3), constant), constant)
    values = np.r_[5.0, np.full(200, 0.123456789)]  # starts away from the constant
    out = run(OneEuroFilter(1.0, 0.0), values)
    # each step keeps 1 - alpha = 0.8266 of the error (1 Hz, 30 Hz): 5 * 0.8266^200 < 1e-15
    assert abs(out[-1] - 0.123456789) < 1e-12
    assert np.all(np.diff(np.abs(out[1:] - 0.123456789)) <= 0)  # the error only shrinks


def test_step_is_smoothed_then_followed():
    step = np.r_[np.zeros(30), np.ones(60)]
    out = run(OneEuroFilter(1.0, 0.0), step)
    assert np.array_equal(out[:30], np.zeros(30))
    assert 0.0 < out[30] < 0.5  # the jump is smoothed ...
    assert np.all(np.diff(out[30:]) > 0)  # ... rises monotonically ...
    assert out[-1] > 0.99  # ... and follows (2 s at a 1 Hz cutoff)
    assert np.all(out <= 1.0)  # a first-order low-pass never overshoots


def test_beta_raises_responsiveness():
    step = np.r_[np.zeros(30), np.ones(60)]
    slow = run(OneEuroFilter(1.0, 0.0), step)
    fast = run(OneEuroFilter(1.0, 1.0), step)
    assert fast[30] > slow[30]
    settle = [int(np.argmax(out >= 0.9)) for out in (slow, fast)]  # first sample within 10 %
    assert settle[1] < settle[0]
    # At rest (before the step) beta changes nothing: the speed is 0.
    assert np.array_equal(fast[:30], slow[:30])


def test_two_steps_computed_by_hand():
    """min_cutoff 1 Hz, beta 0.5, d_cutoff 1 Hz; samples 0 @ 0 s, 1 @ 0.1 s, 1 @ 0.3 s (one frame
    dropped: Te = 0.2 s).

    t = 0.1: dx = (1 - 0) / 0.1 = 10; alpha_d = 1 / (1 + 0.1591549 / 0.1) = 0.3858695;
             dx^ = 0.3858695 * 10 = 3.858695; fc = 1 + 0.5 * 3.858695 = 2.929348 Hz;
             alpha = 1 / (1 + 1 / (2 pi * 2.929348 * 0.1)) = 0.6479572; x^ = 0.6479572.
    t = 0.3: dx = (1 - 0.6479572) / 0.2 = 1.760214; alpha_d = 1 / (1 + 0.1591549 / 0.2) = 0.5568627;
             dx^ = 3.858695 + 0.5568627 * (1.760214 - 3.858695) = 2.690129; fc = 2.345065 Hz;
             alpha = 1 / (1 + 1 / (2 pi * 2.345065 * 0.2)) = 0.7466363;
             x^ = 0.6479572 + 0.7466363 * 0.3520428 = 0.9108051.
    """
    filt = OneEuroFilter(min_cutoff=1.0, beta=0.5, d_cutoff=1.0)
    assert filt(0.0, 0.0) == 0.0
    assert filt(1.0, 0.1) == pytest.approx(0.6479572, abs=1e-6)
    assert filt.dx_hat == pytest.approx(3.858695, abs=1e-6)
    assert filt(1.0, 0.3) == pytest.approx(0.9108051, abs=1e-6)
    assert filt.dx_hat == pytest.approx(2.690129, abs=1e-6)


def test_arrays_are_filtered_per_element_and_reset_forgets():
    filt = OneEuroFilter(1.0, 0.5)
    filt(np.array([0.0, 5.0]), 0.0)
    both = filt(np.array([1.0, 5.0]), 0.1)
    single = OneEuroFilter(1.0, 0.5)
    single(0.0, 0.0)
    assert both[0] == single(1.0, 0.1) and both[1] == 5.0  # each element has its own speed
    filt.reset()
    assert np.array_equal(filt(np.array([7.0, 8.0]), 0.2), [7.0, 8.0])
    with pytest.raises(ValueError, match="timestamps must increase"):
        filt(np.array([7.0, 8.0]), 0.2)
    with pytest.raises(ValueError):
        OneEuroFilter(min_cutoff=0.0)


HEIGHT, WIDTH = 96, 160


def pixel_ellipse(x, y, a, b, angle):
    return preprocess.ellipse_from_pixels((x, y), (a, b), angle, HEIGHT, WIDTH)


def test_ellipse_smoother_keeps_the_axis_order_and_passes_the_angle():
    smoother = EllipseSmoother(1.0, 0.0)
    first = smoother(pixel_ellipse(80, 48, 12, 8, 30), 0.0, HEIGHT, WIDTH)
    assert first == pixel_ellipse(80, 48, 12, 8, 30)  # the first ellipse passes unchanged
    # The same ellipse as fitEllipse may also report it: axes swapped, angle + 90.
    same = smoother(pixel_ellipse(80, 48, 8, 12, 120), 1 / RATE, HEIGHT, WIDTH)
    (x, y), (a, b), angle = preprocess.ellipse_to_pixels(same, HEIGHT, WIDTH)
    assert (x, y, a, b) == pytest.approx((80, 48, 12, 8), abs=1e-9)  # not blended towards 10, 10
    assert angle == pytest.approx(30.0)
    # A turned ellipse: the angle is the measured one, not an average.
    turned = smoother(pixel_ellipse(80, 48, 12, 8, 60), 2 / RATE, HEIGHT, WIDTH)
    assert turned.angle == 60.0


def test_ellipse_smoother_resets_at_a_blink():
    smoother = EllipseSmoother(1.0, 0.0)
    for index in range(10):
        smoother(pixel_ellipse(50, 40, 10, 9, 0), index / RATE, HEIGHT, WIDTH)
    moved = smoother(pixel_ellipse(110, 40, 10, 9, 0), 10 / RATE, HEIGHT, WIDTH)
    assert 50 < preprocess.ellipse_to_pixels(moved, HEIGHT, WIDTH)[0][0] < 80  # smoothed: lags
    assert smoother(None, 11 / RATE, HEIGHT, WIDTH) is None  # a blink
    after = pixel_ellipse(110, 40, 10, 9, 0)
    assert smoother(after, 12 / RATE, HEIGHT, WIDTH) == after  # taken as measured, not dragged
