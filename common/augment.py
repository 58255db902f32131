"""Train-split augmentation, batched on the batch's device, driven by one explicit generator.

Applied in this order to a device batch (see ``common.data.to_device``):
    1. horizontal flip, p=0.5: image, label, spatial_weights, dist_map and the ellipse cx are
       flipped together, in one call, by the same per-sample decision (geometry first, so the
       occluders and blur below land on the final frame);
    2. line augment, p=0.2: 1-9 white lines, 4 px thick, each through its own random centre in
       the middle 30-70% of the frame with a random direction (image only: lines are occluders,
       the labels do not change);
    3. Gaussian blur, p=0.2: 7x7 kernel, sigma uniform in [2, 6], reflect padding (image only;
       after the lines, so occluders are out of focus like the rest of the frame).

Every random draw comes from ``generator`` and happens in :func:`sample_params`, in a fixed order
and a fixed amount whatever the probabilities turn out to be; the engine seeds the generator from
(seed, epoch), so a resumed run replays the same augmentations. Nothing here syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPATIAL_KEYS = ("image", "label", "spatial_weights", "dist_map")


class AugmentError(ValueError):
    """A configuration or batch that augmentation cannot work with."""


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the train-split augmentation.

    Attributes:
        p_flip: per-sample probability of a horizontal flip of every spatial target (0.5).
        p_lines: per-sample probability of drawing white lines on the image (0.2).
        max_lines: lines per augmented sample are uniform integers in [1, max_lines] (9).
        line_thickness: a pixel is on a line when its distance to it is <= thickness / 2 (4 px).
        line_value: value painted on line pixels; +1.0 is white in the [-1, 1] input space.
        centre_range: line centres are uniform in [lo, hi] * W and [lo, hi] * H ((0.3, 0.7)).
        p_blur: per-sample probability of a Gaussian blur of the image (0.2).
        blur_kernel: odd side length of the Gaussian kernel (7).
        blur_sigma: sigma is uniform in this range, in pixels ((2.0, 6.0)).
    """

    p_flip: float = 0.5
    p_lines: float = 0.2
    max_lines: int = 9
    line_thickness: float = 4.0
    line_value: float = 1.0
    centre_range: tuple[float, float] = (0.3, 0.7)
    p_blur: float = 0.2
    blur_kernel: int = 7
    blur_sigma: tuple[float, float] = (2.0, 6.0)

    def __post_init__(self):
        for name in ("p_flip", "p_lines", "p_blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise AugmentError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.max_lines < 1 or self.line_thickness <= 0:
            raise AugmentError("max_lines must be >= 1 and line_thickness > 0")
        if not 0.0 <= self.centre_range[0] <= self.centre_range[1] <= 1.0:
            raise AugmentError(f"centre_range must satisfy 0 <= lo <= hi <= 1, got {self.centre_range}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise AugmentError(f"blur_kernel must be a positive odd integer, got {self.blur_kernel}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise AugmentError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")


@dataclass
class AugmentParams:
    """The per-sample draws of one call (all tensors on the batch's device)."""

    flip: torch.Tensor        # (B,) bool
    lines: torch.Tensor       # (B,) bool
    line_count: torch.Tensor  # (B,) int64 in [1, max_lines]
    centres: torch.Tensor     # (B, L, 2) float32 pixel (x, y) of each line's centre, L = max_lines
    angles: torch.Tensor      # (B, L) float32 line direction in radians, [0, pi)
    blur: torch.Tensor        # (B,) bool
    sigma: torch.Tensor       # (B,) float32 Gaussian sigma in pixels


def _uniform(generator: torch.Generator, *shape: int) -> torch.Tensor:
    # A generator lives on one device: draw there, move afterwards.
    return torch.rand(*shape, generator=generator, device=generator.device)


def _between(low: float, high: float, u: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * u


def sample_params(batch_size: int, height: int, width: int, generator: torch.Generator,
                  config: AugmentConfig = AugmentConfig(), device=None) -> AugmentParams:
    """Draw every random quantity of one call, in a fixed order, from ``generator`` only.

    The draws land on ``device`` (default: the generator's device).
    """
    lines = config.max_lines
    lo, hi = config.centre_range
    size = torch.tensor([width, height], dtype=torch.float32, device=generator.device)
    draws = AugmentParams(
        flip=_uniform(generator, batch_size) < config.p_flip,
        lines=_uniform(generator, batch_size) < config.p_lines,
        line_count=torch.randint(1, lines + 1, (batch_size,), generator=generator, device=generator.device),
        centres=_between(lo, hi, _uniform(generator, batch_size, lines, 2)) * size,
        angles=_uniform(generator, batch_size, lines) * math.pi,
        blur=_uniform(generator, batch_size) < config.p_blur,
        sigma=_between(*config.blur_sigma, _uniform(generator, batch_size)),
    )
    device = generator.device if device is None else device
    return AugmentParams(**{name: value.to(device) for name, value in vars(draws).items()})


def flip_batch(batch: dict, flip: torch.Tensor) -> dict:
    """Mirror the selected samples left-right: every spatial target and cx, by one decision.

    Pixel convention (the one ``common.preprocess.fit_ellipse`` reports, OpenCV's): pixel column
    x has its centre at x, and cx = x / W. A flip moves column x to W - 1 - x, so the centre
    becomes (W - 1 - x) / W, i.e. cx -> (W - 1) / W - cx (not 1 - cx). cy, rx, ry do not change.
    An empty target (0, 0, 0, 0: a frame without a pupil) stays empty.

    Shape:
        flip: (B,) bool; image (B, 1, H, W), label/spatial_weights (B, H, W), dist_map
        (B, 2, H, W), ellipse (B, 4). Absent keys are skipped; other keys pass through.
    """
    out = dict(batch)
    for key in SPATIAL_KEYS:
        if key in batch:
            value = batch[key]
            chosen = flip.view(-1, *([1] * (value.dim() - 1)))  # (B, 1, ..., 1)
            out[key] = torch.where(chosen, value.flip(-1), value)
    if "ellipse" in batch:
        width = batch["image"].shape[-1]
        ellipse = batch["ellipse"]
        has_pupil = ellipse.ne(0).any(dim=1)  # (B,) negatives store (0, 0, 0, 0)
        cx = torch.where(flip & has_pupil, (width - 1) / width - ellipse[:, 0], ellipse[:, 0])  # (B,)
        out["ellipse"] = torch.cat([cx[:, None], ellipse[:, 1:]], dim=1)
    return out


def line_mask(params: AugmentParams, height: int, width: int, thickness: float) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels within thickness / 2 of an active line of a selected sample.

    Line l of sample b passes through ``centres[b, l]`` with direction (cos a, sin a); the distance
    of pixel (x, y) to it is |dx sin a - dy cos a|. Lines are evaluated one at a time so memory
    stays at (B, 1, H, W) instead of (B, L, H, W).
    """
    device = params.centres.device
    batch, count = params.angles.shape
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width)
    active = torch.arange(count, device=device) < params.line_count[:, None]  # (B, L)
    active &= params.lines[:, None]
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool, device=device)
    for line in range(count):
        dx = xs - params.centres[:, line, 0].view(-1, 1, 1, 1)   # (B, 1, 1, W)
        dy = ys - params.centres[:, line, 1].view(-1, 1, 1, 1)   # (B, 1, H, 1)
        sin = params.angles[:, line].sin().view(-1, 1, 1, 1)
        cos = params.angles[:, line].cos().view(-1, 1, 1, 1)
        near = (dx * sin - dy * cos).abs() <= thickness / 2       # (B, 1, H, W)
        mask |= near & active[:, line].view(-1, 1, 1, 1)
    return mask


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
    grouped = F.conv2d(F.pad(grouped, (pad, pad, 0, 0), mode="reflect"), taps.view(batch, 1, 1, -1), groups=batch)
    grouped = F.conv2d(F.pad(grouped, (0, 0, pad, pad), mode="reflect"), taps.view(batch, 1, -1, 1), groups=batch)
    return grouped.reshape(image.shape)


def _check_batch(batch: dict, config: AugmentConfig) -> None:
    image = batch.get("image")
    if image is None or image.dim() != 4 or image.shape[1] != 1:
        raise AugmentError("batch['image'] must be a (B, 1, H, W) tensor")
    if min(image.shape[-2:]) <= config.blur_kernel // 2:
        raise AugmentError(f"image of size {tuple(image.shape[-2:])} is too small for a "
                           f"{config.blur_kernel}x{config.blur_kernel} blur with reflect padding")
    if "ellipse" in batch and batch["ellipse"].shape != (image.shape[0], 4):
        raise AugmentError(f"batch['ellipse'] must be (B, 4) = (cx, cy, rx, ry), got {tuple(batch['ellipse'].shape)}")


def augment_batch(batch: dict, generator: torch.Generator, config: AugmentConfig = AugmentConfig(),
                  return_params: bool = False):
    """Flip, lines, blur (see the module docstring) on a device batch.

    Args:
        batch: "image" (B, 1, H, W) in [-1, 1] and optionally "label", "spatial_weights",
            "dist_map", "ellipse" (see :func:`flip_batch`). Not modified.
        generator: the only source of randomness; may live on another device than the batch.
        config: probabilities and ranges.
        return_params: also return the :class:`AugmentParams` that were drawn.

    Returns:
        A new dict with the same keys (and the params when ``return_params``).
    """
    _check_batch(batch, config)
    image = batch["image"]
    height, width = image.shape[-2:]
    params = sample_params(image.shape[0], height, width, generator, config, image.device)
    out = flip_batch(batch, params.flip)
    lines = line_mask(params, height, width, config.line_thickness)  # (B, 1, H, W)
    image = out["image"].masked_fill(lines, config.line_value)
    blurred = gaussian_blur(image, params.sigma, config.blur_kernel)
    out["image"] = torch.where(params.blur.view(-1, 1, 1, 1), blurred, image)
    return (out, params) if return_params else out
