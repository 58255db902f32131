"""Temporal smoothing of the pupil ellipse with the One Euro filter (Casiez, Roussel and Vogel,
"1€ Filter: A Simple Speed-based Low-pass Filter for Noisy Input in Interactive Systems", CHI 2012).

A first-order low-pass filter whose cutoff frequency rises with the signal's speed: at rest a low
cutoff removes jitter, and during a fast movement (a saccade) the cutoff rises so the estimate
follows with little lag. For a sample x_i at time t_i, with Te = t_i - t_{i-1}:

    alpha(fc) = 1 / (1 + tau / Te),  tau = 1 / (2 pi fc)        smoothing factor for a cutoff fc (Hz)
    dx_i      = (x_i - x̂_{i-1}) / Te                            speed, from the previous estimate
    dx̂_i      = alpha(d_cutoff) dx_i + (1 - alpha(d_cutoff)) dx̂_{i-1}
    fc_i      = min_cutoff + beta |dx̂_i|                         the adaptive cutoff
    x̂_i       = alpha(fc_i) x_i + (1 - alpha(fc_i)) x̂_{i-1}

The first sample (and the first after ``reset``) passes unchanged, with x̂ = x and dx̂ = 0. Te is
taken from the timestamps, so frames dropped by a busy live loop only lengthen one step.
Tuning, as the paper advises: with beta = 0, lower min_cutoff until the ellipse of a still eye stops
jittering; then raise beta until fast movements stop lagging.
"""

from __future__ import annotations

import math

import numpy as np

from common.prep import preprocess
from common.prep.preprocess import Ellipse

# Defaults for the ellipse, filtered in frame pixels (centre and semi-axes): 1 Hz at rest, and
# +0.05 Hz per px/s of speed, so a 200 px/s movement is filtered at 11 Hz.
DEFAULT_MIN_CUTOFF = 1.0
DEFAULT_BETA = 0.05
DEFAULT_D_CUTOFF = 1.0  # the paper's value for the speed's own low-pass


def smoothing_factor(te: float, cutoff):
    """alpha = 1 / (1 + tau / Te) with tau = 1 / (2 pi cutoff): the weight of the new sample
    (element-wise for an array of cutoffs)."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / te)


class OneEuroFilter:
    """The One Euro filter of one signal, or of several independent ones at once (a numpy array
    is filtered element by element, each with its own speed and cutoff, as the paper filters each
    coordinate on its own).

    Args:
        min_cutoff: cutoff (Hz) at rest; lower removes more jitter.
        beta: how much the cutoff rises with speed (Hz per unit/s); higher lags less.
        d_cutoff: cutoff (Hz) of the low-pass applied to the speed.
    """

    def __init__(self, min_cutoff: float = DEFAULT_MIN_CUTOFF, beta: float = DEFAULT_BETA,
                 d_cutoff: float = DEFAULT_D_CUTOFF):
        if not (min_cutoff > 0 and d_cutoff > 0 and beta >= 0):
            raise ValueError(f"need min_cutoff > 0, d_cutoff > 0 and beta >= 0; got {min_cutoff}, "
                             f"{d_cutoff}, {beta}")
        self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next sample passes unchanged."""
        self.x_hat = None
        self.dx_hat = None
        self.t_prev = None

    def __call__(self, x, t: float):
        """Filter sample ``x`` (a float or an array) taken at time ``t`` (seconds, increasing)."""
        x = np.asarray(x, dtype=np.float64)
        if self.x_hat is None:
            self.x_hat, self.dx_hat, self.t_prev = x, np.zeros_like(x), float(t)
            return self._out(x)
        te = float(t) - self.t_prev
        if not te > 0:
            raise ValueError(f"timestamps must increase: {t} after {self.t_prev}")
        dx = (x - self.x_hat) / te
        # a x + (1 - a) x̂ written as x̂ + a (x - x̂): the same low-pass, and a constant input stays
        # exactly constant in floating point
        self.dx_hat = self.dx_hat + smoothing_factor(te, self.d_cutoff) * (dx - self.dx_hat)
        cutoff = self.min_cutoff + self.beta * np.abs(self.dx_hat)
        self.x_hat = self.x_hat + smoothing_factor(te, cutoff) * (x - self.x_hat)  # element-wise cutoffs
        self.t_prev = float(t)
        return self._out(self.x_hat)

    @staticmethod
    def _out(x: np.ndarray):
        return float(x) if x.ndim == 0 else x.copy()


class EllipseSmoother:
    """One Euro filtering of a stream of pupil ellipses, with blinks.

    The centre and the two semi-axes are filtered in the frame's pixels (so beta reads as Hz per
    pixel/s whatever the normalization). The angle is not smoothed: it is periodic (180 degrees),
    and for a near-circular pupil fitEllipse's angle is arbitrary and jumps, so any average of it
    would be meaningless; the latest measured angle is passed through. Because fitEllipse may list
    the axes in either order (``(b, a, angle + 90)`` is the same ellipse as ``(a, b, angle)``), each
    new ellipse is first written in the axis order closest to the current estimate, so the filter
    never blends one axis into the other.

    ``None`` (no pupil: a blink) resets the filter and gives ``None``: the first pupil after a blink
    is taken as measured, never dragged from where the pupil was before the blink.
    """

    def __init__(self, min_cutoff: float = DEFAULT_MIN_CUTOFF, beta: float = DEFAULT_BETA,
                 d_cutoff: float = DEFAULT_D_CUTOFF):
        self.filter = OneEuroFilter(min_cutoff, beta, d_cutoff)

    def reset(self) -> None:
        self.filter.reset()

    def __call__(self, ellipse: Ellipse | None, t: float, height: int, width: int) -> Ellipse | None:
        """The smoothed ellipse for the (normalized) ``ellipse`` of an (height, width) frame at ``t``."""
        if ellipse is None:
            self.reset()
            return None
        (x, y), (a, b), angle = preprocess.ellipse_to_pixels(ellipse, height, width)
        previous = self.filter.x_hat  # (4,) estimate (x, y, a, b), or None after a reset
        if previous is not None and _swapped_is_closer(a, b, previous[2], previous[3]):
            a, b, angle = b, a, (angle + 90.0) % 180.0
        x, y, a, b = self.filter(np.array([x, y, a, b]), t)
        return preprocess.ellipse_from_pixels((x, y), (a, b), angle, height, width)


def _swapped_is_closer(a: float, b: float, a_ref: float, b_ref: float) -> bool:
    """Whether semi-axes (b, a) are nearer (a_ref, b_ref) than (a, b) are (L1 distance)."""
    return abs(b - a_ref) + abs(a - b_ref) < abs(a - a_ref) + abs(b - b_ref)
