"""Photometric augmentation: what another camera, lens, light or sensor does to the same eye.

The model's input is the preprocessed frame (gamma LUT 0.8, then CLAHE 1.5 / 8x8) scaled to
[-1, 1] (``common.train.data.to_device``). These changes are applied to that frame, so they say how
they read it:

* ``v = (x + 1) / 2`` in [0, 1] is the **encoded** value, the one the model sees. CLAHE is a local
  monotone remap whose slope the clip limit bounds (at most 1.5): it cannot be undone, and
  locally it is close to linear, so it is treated as part of the scene's reflectance.
* ``L = v ** (1 / 0.8)`` undoes the gamma LUT: a stand-in for **linear** sensor irradiance. What
  acts on light is applied there: lens blur (defocus disk, motion line) mixes light, vignetting
  and exposure/LED power (``brightness``) multiply it, and sensor noise is added to it, shot noise
  with variance proportional to the signal (Poisson-like) plus Gaussian read noise:
  ``L + sqrt(shot * L + read ** 2) * n`` with one standard normal field n. The result is encoded
  back with the same gamma and clipped, so noise is relatively stronger in dark regions and
  saturates in bright ones, as in a camera.
* What acts on the encoded value is the camera's response: ``gamma`` (``v ** gamma``) and
  ``contrast`` (about the frame's mean). Because CLAHE at inference removes much of a global
  exposure or contrast difference, the default ranges are moderate: they stand for what is left
  of them after equalization.
* IR **glints** (specular reflections of the illuminators on the cornea) are saturated: they move
  a soft disk of pixels to white, also on the pupil. Labels do not change: the pupil is behind the
  reflection, and OpenEDS labels it as pupil.

Every function takes per-sample parameters already drawn (``common.train.augment.sample_params``)
and a (B,) ``selected`` mask; unselected samples come back bit-identical. Nothing syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.prep.preprocess import GAMMA
from common.train.augment_targets import constants


@dataclass
class Choice:
    """A part's per-sample decision and its one scalar parameter."""

    selected: torch.Tensor  # (B,) bool
    value: torch.Tensor     # (B,) float32


@dataclass
class GlintDraws:
    selected: torch.Tensor  # (B,) bool
    count: torch.Tensor     # (B,) int64 in [1, G]
    where: torch.Tensor     # (B, G, 2) float32 uniform [0, 1): position within the chosen region
    on_pupil: torch.Tensor  # (B, G) bool: within the pupil's box rather than the middle of the frame
    radius: torch.Tensor    # (B, G) float32 pixels


@dataclass
class MotionDraws:
    selected: torch.Tensor  # (B,) bool
    length: torch.Tensor    # (B,) float32 pixels
    angle: torch.Tensor     # (B,) float32 radians in [0, pi)


@dataclass
class VignetteDraws:
    selected: torch.Tensor  # (B,) bool
    strength: torch.Tensor  # (B,) float32: the light lost at half a diagonal from the centre
    centre: torch.Tensor    # (B, 2) float32 pixel (x, y) of the optical centre


@dataclass
class NoiseDraws:
    read: Choice            # Gaussian read noise std, in linear units of full scale
    shot: Choice            # shot-noise variance per unit of linear signal
    field: torch.Tensor     # (B, 1, H, W) float32 standard normal


# ----------------------------------------------------------------------------- per-sample kernels
def gaussian_kernel_1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, K) normalized Gaussian taps at offsets -K//2..K//2, one row per sigma of shape (B,)."""
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - kernel_size // 2
    taps = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].float() ** 2))  # (B, K)
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur every sample with its own separable Gaussian; reflect padding keeps the size.

    Shape:
        image: (B, 1, H, W), sigma: (B,) -> (B, 1, H, W)
    """
    batch, height, width = image.shape[0], image.shape[-2], image.shape[-1]
    taps = gaussian_kernel_1d(sigma, kernel_size).to(image.dtype)  # (B, K)
    pad = kernel_size // 2
    # Samples become channels of one image so a grouped conv applies per-sample kernels.
    grouped = image.reshape(1, batch, height, width)                # (1, B, H, W)
    grouped = F.conv2d(F.pad(grouped, (pad, pad, 0, 0), mode="reflect"), taps.view(batch, 1, 1, -1),
                       groups=batch)
    grouped = F.conv2d(F.pad(grouped, (0, 0, pad, pad), mode="reflect"), taps.view(batch, 1, -1, 1),
                       groups=batch)
    return grouped.reshape(image.shape)


def _kernel_offsets(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, K, 1) and (1, 1, K) pixel offsets -K//2..K//2 of a K x K kernel."""
    offsets = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    return offsets.view(1, -1, 1), offsets.view(1, 1, -1)


def disk_kernels(radius: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, K) defocus kernels: a uniform disk of each radius (B,), anti-aliased over one pixel.

    A pixel's weight is its coverage approximated by clamp(radius + 1/2 - distance, 0, 1); the
    weights sum to 1.
    """
    dy, dx = _kernel_offsets(size, radius.device)
    weights = (radius.view(-1, 1, 1) + 0.5 - torch.sqrt(dx**2 + dy**2)).clamp(0.0, 1.0)
    return weights / weights.sum(dim=(1, 2), keepdim=True)


def line_kernels(length: torch.Tensor, angle: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, K) motion-blur kernels: a segment of ``length`` px through the centre at ``angle``.

    Weight = (1 - distance across the segment) x (coverage along it), both clamped to [0, 1], so a
    segment at any angle is one pixel wide and ``length`` long; the weights sum to 1.
    """
    dy, dx = _kernel_offsets(size, length.device)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    along, across = dx * cos + dy * sin, dy * cos - dx * sin  # (B, K, K)
    weights = ((1 - across.abs()).clamp(0.0, 1.0)
               * (length.view(-1, 1, 1) / 2 + 0.5 - along.abs()).clamp(0.0, 1.0))
    return weights / weights.sum(dim=(1, 2), keepdim=True)


def convolve_each(image: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve sample b of ``image`` (B, 1, H, W) with ``kernels[b]`` (B, K, K), reflect padding."""
    batch, _, height, width = image.shape
    pad = kernels.shape[-1] // 2
    grouped = F.pad(image.reshape(1, batch, height, width), (pad, pad, pad, pad), mode="reflect")
    # conv2d is a correlation: flip the kernels so an asymmetric one is applied as drawn
    out = F.conv2d(grouped, kernels.flip(-1, -2).unsqueeze(1).to(image.dtype), groups=batch)
    return out.reshape(image.shape)


def _pick(selected: torch.Tensor, changed: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.where(selected.view(-1, 1, 1, 1), changed, image)


# ----------------------------------------------------------------------------- the two domains
def to_linear(image: torch.Tensor) -> torch.Tensor:
    """Model input x in [-1, 1] -> linear irradiance L = ((x + 1) / 2) ** (1 / GAMMA) in [0, 1]."""
    return ((image + 1) / 2).clamp(0.0, 1.0).pow(1 / GAMMA)


def from_linear(linear: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_linear``, clipping to the sensor's range first: [0, 1] -> [-1, 1]."""
    return linear.clamp(0.0, 1.0).pow(GAMMA) * 2 - 1


# ----------------------------------------------------------------------------- parts
def add_glints(image: torch.Tensor, draws: GlintDraws, box: torch.Tensor,
               present: torch.Tensor) -> torch.Tensor:
    """Saturated soft disks: on the pupil (within its box, shrunk to 80%) or in the middle 20-80% of
    the frame. ``box`` (B, 4) x0, y0, x1, y1 and ``present`` (B,) from ``pupil_stats``."""
    batch, _, height, width = image.shape
    frame_low = constants([0.2 * (width - 1), 0.2 * (height - 1)], image.device)
    frame_size = frame_low * 3  # the middle 60% of each side
    centre, size = (box[:, :2] + box[:, 2:]) / 2, (box[:, 2:] - box[:, :2]) * 0.8  # (B, 2)
    on_pupil = draws.on_pupil & present[:, None]  # (B, G)
    low = torch.where(on_pupil[..., None], (centre - size / 2)[:, None], frame_low)   # (B, G, 2)
    span = torch.where(on_pupil[..., None], size[:, None], frame_size)
    position = low + draws.where * span  # (B, G, 2) pixel centres
    ys = torch.arange(height, device=image.device, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, device=image.device, dtype=torch.float32).view(1, 1, width)
    spot = torch.zeros(batch, height, width, device=image.device)
    for glint in range(draws.radius.shape[1]):
        distance = torch.sqrt((xs - position[:, glint, 0].view(-1, 1, 1)) ** 2
                              + (ys - position[:, glint, 1].view(-1, 1, 1)) ** 2)   # (B, H, W)
        active = (glint < draws.count).view(-1, 1, 1)
        coverage = (draws.radius[:, glint].view(-1, 1, 1) + 0.5 - distance).clamp(0.0, 1.0)
        spot = torch.maximum(spot, coverage * active)
    return _pick(draws.selected, image + (1 - image) * spot.unsqueeze(1), image)


def vignette(linear: torch.Tensor, draws: VignetteDraws) -> torch.Tensor:
    """Multiply by 1 - strength * (r / R)^2, r the distance to the drawn optical centre and R half
    the frame's diagonal (a smooth cos^4-like fall-off), floored at 0."""
    height, width = linear.shape[-2:]
    ys = torch.arange(height, device=linear.device, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, device=linear.device, dtype=torch.float32).view(1, 1, 1, width)
    squared = ((xs - draws.centre[:, 0].view(-1, 1, 1, 1)) ** 2
               + (ys - draws.centre[:, 1].view(-1, 1, 1, 1)) ** 2) / (math.hypot(height, width) / 2) ** 2
    factor = (1 - draws.strength.view(-1, 1, 1, 1) * squared).clamp_min(0.0)  # (B, 1, H, W)
    return _pick(draws.selected, linear * factor, linear)


def sensor_noise(linear: torch.Tensor, draws: NoiseDraws) -> torch.Tensor:
    """L + sqrt(shot * L + read^2) * n: Poisson-like shot noise plus Gaussian read noise, with one
    normal field; a part not selected for a sample contributes 0 to its variance."""
    shot = torch.where(draws.shot.selected, draws.shot.value, 0.0).view(-1, 1, 1, 1)
    read = torch.where(draws.read.selected, draws.read.value, 0.0).view(-1, 1, 1, 1)
    noisy = linear + torch.sqrt(shot * linear.clamp_min(0.0) + read**2) * draws.field
    return _pick(draws.read.selected | draws.shot.selected, noisy, linear)


def adjust_gamma(image: torch.Tensor, draws: Choice) -> torch.Tensor:
    """Encoded value v = (x + 1) / 2 -> v ** gamma (a different camera response curve)."""
    changed = ((image + 1) / 2).clamp(0.0, 1.0).pow(draws.value.view(-1, 1, 1, 1)) * 2 - 1
    return _pick(draws.selected, changed, image)


def adjust_contrast(image: torch.Tensor, draws: Choice) -> torch.Tensor:
    """x -> m + c (x - m) about each frame's mean m (B,)."""
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    changed = mean + draws.value.view(-1, 1, 1, 1) * (image - mean)
    return _pick(draws.selected, changed, image)


def scale_light(linear: torch.Tensor, draws: Choice) -> torch.Tensor:
    """Exposure or illuminator power: linear irradiance times a gain (saturates when encoded)."""
    return _pick(draws.selected, linear * draws.value.view(-1, 1, 1, 1), linear)


def blur_each(image: torch.Tensor, selected: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve the selected samples with their kernels (B, K, K)."""
    return _pick(selected, convolve_each(image, kernels), image)
