"""Geometric augmentation: one affine warp per sample (zoom, rotation, translation, crop) applied
to the image and every target together.

Geometry (pixel-centre coordinates, column x has its centre at x, as ``preprocess.fit_ellipse``):
the pupil's bounding-box centre c (the frame centre when there is no pupil) goes to o = c + shift,
and the frame is scaled by the zoom z and rotated by theta about it:

    p_out = o + z R(theta) (p_in - c)

z < 1 zooms out (a smaller pupil in a wider view, the new border filled), z > 1 zooms in (a crop
of the frame around the eye, enlarged). The zoom is clamped so that the pupil's rotated box fits
in the frame, and o so that the box stays inside it: the pupil is never cut by the frame edge, so
the analytic ellipse below stays the fit of the warped label, and no frame loses its pupil.

Each output pixel is sampled with ``F.grid_sample`` from one ``F.affine_grid`` per sample:
* image: bilinear, after a Gaussian prefilter of sigma 0.5 sqrt(1 / z^2 - 1) px when zooming out
  (the area a pixel of the smaller image integrates; without it a zoom-out aliases), padded with
  the mean of the frame's border pixels (skin or background, a plausible fill; zeros would be
  mid-grey and reflection would mirror the eye);
* label: nearest, padded with 0 (background);
* distance maps: warped as continuous signed distances (``augment_targets``) and scaled by z (a
  distance map scales with the frame; the diagonal it is divided by stays the frame's). Outside
  the source frame the distance is extended from the nearest frame pixel by the change of the
  distance to the pupil's centroid (exact for a circular pupil). Then made discrete for the
  warped label;
* spatial weights: recomputed for the warped label by the caller (``boundary_weights``);
* ellipse (cx, cy, rx, ry): the centre moves with the warp; a radius r (px) becomes
  z (r + 1/2) - 1/2, because fitEllipse's contour runs through the centres of the boundary pixels,
  half a pixel inside the region's edge, and the warp scales the region. Rotation cannot be carried
  by an axis-order ellipse without an angle, so a batch with an ellipse target is not rotated
  (theta = 0; its draws are still made, so the stream does not change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.prep.preprocess import half_diagonal
from common.train.augment_photometric import gaussian_blur
from common.train.augment_targets import PupilStats, constants, continuous_distance, discrete_distance_maps

EDGE_MARGIN = 1.0  # px kept between the warped pupil box and the frame edge


@dataclass
class WarpDraws:
    selected: torch.Tensor  # (B,) bool
    zoom: torch.Tensor      # (B,) float32 scale factor (before the fit-in-frame clamp)
    angle: torch.Tensor     # (B,) float32 radians
    shift: torch.Tensor     # (B, 2) float32 pixels (x, y) moving the pupil's box centre


@dataclass
class Warp:
    """The resolved per-sample transform p_out = origin + zoom R(angle) (p_in - anchor)."""

    zoom: torch.Tensor    # (B,)
    angle: torch.Tensor   # (B,)
    anchor: torch.Tensor  # (B, 2) c, input pixels
    origin: torch.Tensor  # (B, 2) o, output pixels


def resolve_warp(draws: WarpDraws, stats: PupilStats | None, height: int, width: int,
                 rotate: bool) -> Warp:
    """Clamp the drawn zoom and shift so the pupil's (rotated) box fits inside the frame."""
    device = draws.zoom.device
    angle = draws.angle if rotate else torch.zeros_like(draws.angle)
    if stats is None:  # no label: nothing to keep in view
        anchor = constants([(width - 1) / 2, (height - 1) / 2], device).expand(len(angle), 2)
        half = torch.zeros_like(anchor)
    else:
        anchor = (stats.box[:, :2] + stats.box[:, 2:]) / 2
        half = torch.where(stats.present[:, None], (stats.box[:, 2:] - stats.box[:, :2]) / 2 + 0.5, 0.0)
    cos, sin = angle.cos().abs(), angle.sin().abs()
    turned = torch.stack([cos * half[:, 0] + sin * half[:, 1], sin * half[:, 0] + cos * half[:, 1]], dim=1)
    frame = constants([width / 2, height / 2], device) - EDGE_MARGIN
    largest = (frame / turned.clamp_min(1e-6)).amin(dim=1)  # (B,) zoom at which the box fills the frame
    zoom = torch.minimum(draws.zoom, largest)
    extent = zoom[:, None] * turned  # (B, 2) half size of the warped box
    low = extent - 0.5 + EDGE_MARGIN
    high = constants([width - 0.5, height - 0.5], device) - EDGE_MARGIN - extent
    origin = torch.minimum(torch.maximum(anchor + draws.shift, low), high)
    return Warp(zoom, angle, anchor, origin)


def sampling_grid(warp: Warp, height: int, width: int) -> torch.Tensor:
    """(B, H, W, 2) ``F.affine_grid`` (align_corners=False) of the inverse map output -> input.

    In pixels q = c + A (p - o) with A = R(-theta) / z; pixel p <-> normalized n = (2p + 1) / S - 1,
    i.e. p = D n + h with D = diag(W/2, H/2) and h = ((W-1)/2, (H-1)/2), so
    n_in = D^-1 A D n_out + D^-1 (c - h + A (h - o)).
    """
    cos, sin = warp.angle.cos() / warp.zoom, warp.angle.sin() / warp.zoom
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], dim=1)  # (B, 2, 2)
    scale = constants([width / 2, height / 2], cos.device)
    middle = constants([(width - 1) / 2, (height - 1) / 2], cos.device)
    linear = inverse * scale[None, None, :] / scale[None, :, None]  # D^-1 A D
    offset = (warp.anchor - middle + (inverse @ (middle - warp.origin)[..., None])[..., 0]) / scale
    theta = torch.cat([linear, offset[..., None]], dim=2)  # (B, 2, 3)
    return F.affine_grid(theta, [len(theta), 1, height, width], align_corners=False)


def grid_pixels(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalized grid (B, H, W, 2) -> the input pixel coordinates (x, y) it samples."""
    size = constants([width, height], grid.device, grid.dtype)
    return ((grid + 1) * size - 1) / 2


def border_mean(image: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) mean of each frame's outermost rows and columns: the fill for a zoom-out."""
    edges = torch.cat([image[..., 0, :], image[..., -1, :], image[..., 1:-1, 0], image[..., 1:-1, -1]],
                      dim=-1)
    return edges.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def warp_image(image: torch.Tensor, warp: Warp, grid: torch.Tensor, prefilter_size: int) -> torch.Tensor:
    """Bilinear warp of (B, 1, H, W), prefiltered when zooming out, border filled with ``border_mean``."""
    if prefilter_size > 1:
        sigma = 0.5 * torch.sqrt((1 / warp.zoom**2 - 1).clamp_min(0.0))
        image = gaussian_blur(image, sigma.clamp_min(1e-3), prefilter_size)  # 1e-3 px: exactly a copy
    fill = border_mean(image)
    return F.grid_sample(image - fill, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + fill


def warp_distance(dist_map: torch.Tensor, label: torch.Tensor, warp: Warp, grid: torch.Tensor,
                  centroid: torch.Tensor) -> torch.Tensor:
    """Distance maps (B, 2, H, W) of the source -> maps of the warped 0/1 ``label`` (B, H, W).

    ``centroid`` (B, 2): the source pupil's centroid, used to extend distances past the frame.
    """
    height, width = label.shape[-2:]
    source = continuous_distance(dist_map, height, width).unsqueeze(1)  # (B, 1, H, W) px
    inside = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]
    where = grid_pixels(grid, height, width)  # (B, H, W, 2)
    limit = constants([width - 1, height - 1], grid.device, grid.dtype)
    clamped = torch.minimum(where.clamp_min(0.0), limit)
    point = centroid[:, None, None, :]
    far, near = where - point, clamped - point
    # (B, H, W), 0 inside
    beyond = torch.hypot(far[..., 0], far[..., 1]) - torch.hypot(near[..., 0], near[..., 1])
    distance = (inside + torch.sign(inside) * beyond) * warp.zoom.view(-1, 1, 1)
    return discrete_distance_maps(distance, label)


def warp_ellipse(ellipse: torch.Tensor, warp: Warp, height: int, width: int) -> torch.Tensor:
    """(B, 4) normalized (cx, cy, rx, ry) -> the ellipse of the warped frame (rotation-free warps);
    an empty target (0, 0, 0, 0) stays empty."""
    size = constants([width, height], ellipse.device, ellipse.dtype)
    centre = ellipse[:, :2] * size                                   # (B, 2) px
    centre = warp.origin + warp.zoom[:, None] * (centre - warp.anchor)
    unit = half_diagonal(height, width)
    radii = warp.zoom[:, None] * (ellipse[:, 2:] + 0.5 / unit) - 0.5 / unit
    warped = torch.cat([centre / size, radii], dim=1)
    return torch.where(ellipse.ne(0).any(dim=1, keepdim=True), warped, ellipse)


def prefilter_size(zoom_low: float) -> int:
    """Odd kernel side covering 3 sigma of the strongest zoom-out prefilter (1: none needed)."""
    if zoom_low >= 1:
        return 1
    return 2 * math.ceil(3 * 0.5 * math.sqrt(1 / zoom_low**2 - 1)) + 1
