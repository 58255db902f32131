"""Loss targets of an augmented label, on the device, without a host sync.

When augmentation changes a label (a warp, an eyelid that hides pupil pixels), its targets must
follow. ``common.prep.preprocess`` is the definition (numpy, one frame at a time); this module
computes the same quantities batched on the device:

* **boundary weights** (``boundary_weights``): recomputed exactly as ``preprocess.spatial_weights``
  defines them: 1-iteration 3x3-cross dilation minus erosion (pixels outside the frame count as
  background), then a Gaussian of sigma ``BOUNDARY_SIGMA`` truncated at ``BOUNDARY_TRUNCATE`` sigma
  with scipy's "reflect" border. The Gaussian is applied as two matrix products with banded
  matrices that hold the border rule (a 41-tap convolution is several times slower on a CPU).
* **distance maps**: an exact EDT on the device is not cheap, so the maps are carried through the
  augmentation as a *continuous* signed distance ``c`` in pixels (``continuous_distance``): the
  stored map d (EDT(outside) - EDT(inside), so boundary pixels are +-1) is moved half a pixel
  towards zero, which puts the zero level on the edge between inside and outside pixel centres.
  ``c`` is then warped (scaled by the zoom) or combined with an occluder (``max``, the signed
  distance of an intersection), and turned back into a map for the new label by
  ``discrete_distance_maps``. How far that lands from ``preprocess.distance_maps`` of the new label
  is measured in tests/test_augment.py.
* **pupil statistics** (``pupil_stats``): presence, bounding box and centroid of each mask, which
  place the warp, the eyelids and the glints.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.prep.preprocess import BOUNDARY_SIGMA, BOUNDARY_TRUNCATE


def constants(values, device, dtype=torch.float32) -> torch.Tensor:
    """(N,) tensor of Python numbers, filled on ``device`` by kernels.

    ``torch.tensor(values, device="cuda")`` copies from host memory and waits for the copy (a host
    sync); this builds the same values exactly, with no copy.
    """
    index = torch.arange(len(values), device=device)
    out = torch.zeros(len(values), device=device, dtype=dtype)
    for position, value in enumerate(values):
        out = torch.where(index == position, value, out)
    return out


# ----------------------------------------------------------------------------- pupil statistics
@dataclass
class PupilStats:
    """Where each sample's pupil is (pixel-centre coordinates: column x has its centre at x)."""

    present: torch.Tensor   # (B,) bool: the mask has at least one pupil pixel
    box: torch.Tensor       # (B, 4) float32 x0, y0, x1, y1 of the outermost pupil pixel centres
    centroid: torch.Tensor  # (B, 2) float32 mean (x, y) of the pupil pixels


def pupil_stats(label: torch.Tensor) -> PupilStats:
    """Presence, bounding box and centroid of the 0/1 masks ``label`` (B, H, W).

    A sample without a pupil gets the frame centre as its centroid and a zero-size box there, so
    that whatever is placed relative to the pupil lands mid-frame.
    """
    _, height, width = label.shape
    mask = label.bool()
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (B, H), (B, W)
    present = rows.any(dim=1)
    first = lambda hit: hit.float().argmax(dim=1).float()  # first True; 0 when none
    last = lambda hit: hit.shape[1] - 1 - first(hit.flip(1))
    box = torch.stack([first(cols), first(rows), last(cols), last(rows)], dim=1)  # (B, 4)
    weights = mask.float()
    count = weights.sum(dim=(1, 2)).clamp_min(1.0)
    xs = torch.arange(width, device=label.device, dtype=torch.float32)
    ys = torch.arange(height, device=label.device, dtype=torch.float32)
    centroid = torch.stack([(weights.sum(dim=1) * xs).sum(dim=1) / count,
                            (weights.sum(dim=2) * ys).sum(dim=1) / count], dim=1)  # (B, 2)
    middle = constants([(width - 1) / 2, (height - 1) / 2], label.device)
    centroid = torch.where(present[:, None], centroid, middle)
    box = torch.where(present[:, None], box, middle.repeat(2))
    return PupilStats(present, box, centroid)


# ----------------------------------------------------------------------------- boundary weights
def _reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """scipy's "reflect" (half-sample symmetric: d c b a | a b c d | d c b a) for any offset."""
    period = index.remainder(2 * size)
    return torch.where(period < size, period, 2 * size - 1 - period)


@functools.lru_cache(maxsize=16)
def gaussian_matrix(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size, size) matrix G with (G @ x) = scipy ``gaussian_filter1d(x, BOUNDARY_SIGMA,
    truncate=BOUNDARY_TRUNCATE, mode="reflect")`` along that axis: the taps, with the border folded in."""
    radius = int(BOUNDARY_TRUNCATE * BOUNDARY_SIGMA + 0.5)  # scipy's kernel radius (20 taps each side)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / BOUNDARY_SIGMA) ** 2)
    taps /= taps.sum()
    rows = torch.arange(size)[:, None].expand(-1, len(taps))           # (size, K) output index
    cols = _reflect_index(rows + offsets.long()[None], size)           # (size, K) input index
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows.reshape(-1), cols.reshape(-1)), taps.repeat(size), accumulate=True)
    return matrix.to(device=device, dtype=dtype)


def _cross_extremes(mask: torch.Tensor, pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min of each pixel and its 4 neighbours (3x3 cross), outside pixels = ``pad_value``."""
    padded = F.pad(mask, (1, 1, 1, 1), value=pad_value)  # (B, H + 2, W + 2)
    shifts = [padded[:, 1:-1, 1:-1], padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
              padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
    stacked = torch.stack(shifts)  # (5, B, H, W)
    return stacked.amax(dim=0), stacked.amin(dim=0)


def boundary_weights(label: torch.Tensor) -> torch.Tensor:
    """``preprocess.spatial_weights`` of every mask, batched: (B, H, W) 0/1 -> (B, H, W) float32.

    The products run in float64 on CUDA, where TF32 matmuls (on in training) would round the
    weights to about 1e-3; on the CPU float32 is exact to ~1e-7.
    """
    mask = label.float()
    # scipy dilates and erodes with a background border (border_value=0): one padding serves both
    dilated, eroded = _cross_extremes(mask, 0.0)
    dtype = torch.float64 if label.device.type == "cuda" else torch.float32
    boundary = (dilated - eroded).to(dtype)  # (B, H, W)
    height, width = label.shape[-2:]
    rows = gaussian_matrix(height, label.device, dtype)  # (H, H)
    cols = gaussian_matrix(width, label.device, dtype)   # (W, W)
    return (rows @ boundary @ cols.T).float()


# ----------------------------------------------------------------------------- distance maps
def continuous_distance(dist_map: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pupil channel of stored maps (B, 2, H, W) -> continuous signed distance (B, H, W) in pixels.

    Stored values are EDT(outside) - EDT(inside) divided by the diagonal: >= 1 px outside, <= -1 px
    inside. Moving them half a pixel towards zero puts 0 on the edge between the two. A frame
    without a pupil stores zeros and keeps them.
    """
    pixels = dist_map[:, 1] * math.hypot(height, width)
    return pixels - 0.5 * torch.sign(pixels)


def discrete_distance_maps(distance: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Continuous signed distance (B, H, W) px + the new 0/1 label (B, H, W) -> maps (B, 2, H, W).

    The inverse of ``continuous_distance`` for the new label: inside pixels c - 1/2 (at most -1),
    outside pixels c + 1/2 (at least 1), divided by the diagonal. As ``preprocess.distance_maps``,
    a label without pupil pixels, or made only of them, gets zeros, and the background channel
    is minus the pupil channel (the two EDTs swap).
    """
    height, width = label.shape[-2:]
    inside = label.bool()
    pupil = torch.where(inside, (distance - 0.5).clamp(max=-1.0), (distance + 0.5).clamp(min=1.0))
    count = inside.flatten(1).sum(dim=1)  # (B,)
    has_boundary = (count > 0) & (count < height * width)
    pupil = (torch.where(has_boundary[:, None, None], pupil, torch.zeros_like(pupil))
             / math.hypot(height, width))
    return torch.stack([-pupil, pupil], dim=1)
