"""Train-split augmentation, batched on the batch's device, driven by one explicit generator.

Applied in this order to a device batch (see ``common.data.to_device``):
    1. horizontal flip, p=0.5: image, label, spatial_weights, dist_map and the ellipse cx are
       flipped together, in one call, by the same per-sample decision;
    2. line augment, p=0.2: 1-9 white lines, 4 px thick, through one random centre in the middle
       30-70% of the frame (image only: lines are occluders, the labels do not change);
    3. Gaussian blur, p=0.2: 7x7 kernel, sigma uniform in [2, 6] (image only; after the lines,
       so occluders are out of focus like the rest of the frame).

Every random draw comes from ``generator``; the engine seeds it from (seed, epoch), so a resumed
run replays the same augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    p_flip: float = 0.5
    p_lines: float = 0.2
    max_lines: int = 9
    line_thickness: float = 4.0
    centre_range: tuple[float, float] = (0.3, 0.7)
    p_blur: float = 0.2
    blur_kernel: int = 7
    blur_sigma: tuple[float, float] = (2.0, 6.0)


@dataclass
class AugmentParams:
    """The per-sample draws of one call (all tensors on the batch's device)."""

    flip: torch.Tensor        # (B,) bool
    lines: torch.Tensor       # (B,) bool
    line_count: torch.Tensor  # (B,) int, 1..max_lines
    centre: torch.Tensor      # (B, 2) pixel (x, y)
    angles: torch.Tensor      # (B, max_lines) radians
    blur: torch.Tensor        # (B,) bool
    sigma: torch.Tensor       # (B,)


def _uniform(generator: torch.Generator, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=generator.device)


def sample_params(batch_size: int, height: int, width: int, generator: torch.Generator,
                  config: AugmentConfig, device) -> AugmentParams:
    """Draw every random quantity of one call, in a fixed order."""
    low, high = config.centre_range
    draws = AugmentParams(
        flip=_uniform(generator, batch_size) < config.p_flip,
        lines=_uniform(generator, batch_size) < config.p_lines,
        line_count=1 + (_uniform(generator, batch_size) * config.max_lines).long().clamp(max=config.max_lines - 1),
        centre=(low + (high - low) * _uniform(generator, batch_size, 2))
        * torch.tensor([width, height], dtype=torch.float32, device=generator.device),
        angles=_uniform(generator, batch_size, config.max_lines) * math.pi,
        blur=_uniform(generator, batch_size) < config.p_blur,
        sigma=config.blur_sigma[0] + (config.blur_sigma[1] - config.blur_sigma[0]) * _uniform(generator, batch_size),
    )
    return AugmentParams(**{k: v.to(device) for k, v in draws.__dict__.items()})


def flip_batch(batch: dict, flip: torch.Tensor) -> dict:
    """Mirror the selected samples left-right: every spatial target and cx together.

    OpenCV pixel centres sit at integer x, so column x moves to W - 1 - x and the normalized
    centre cx = x / W becomes (W - 1) / W - cx.
    """
    out = dict(batch)
    for key in ("image", "label", "spatial_weights", "dist_map"):
        if key in batch:
            value = batch[key]
            mask = flip.view(-1, *([1] * (value.dim() - 1)))
            out[key] = torch.where(mask, value.flip(-1), value)
    if "ellipse" in batch:
        width = batch["image"].shape[-1]
        ellipse = batch["ellipse"].clone()
        ellipse[:, 0] = torch.where(flip, (width - 1) / width - ellipse[:, 0], ellipse[:, 0])
        out["ellipse"] = ellipse
    return out


def line_mask(params: AugmentParams, height: int, width: int, config: AugmentConfig) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels within thickness/2 of any active line of an active sample."""
    device = params.centre.device
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width)
    dx = xs - params.centre[:, 0].view(-1, 1, 1, 1)                      # (B, 1, 1, W)
    dy = ys - params.centre[:, 1].view(-1, 1, 1, 1)                      # (B, 1, H, 1)
    sin, cos = params.angles.sin()[..., None, None], params.angles.cos()[..., None, None]  # (B, L, 1, 1)
    near = (dx * sin - dy * cos).abs() <= config.line_thickness / 2      # (B, L, H, W)
    active = torch.arange(config.max_lines, device=device) < params.line_count[:, None]  # (B, L)
    active &= params.lines[:, None]
    return (near & active[..., None, None]).any(dim=1, keepdim=True)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample separable Gaussian blur of (B, 1, H, W) with reflect padding."""
    batch = image.shape[0]
    offsets = torch.arange(kernel_size, device=image.device, dtype=torch.float32) - kernel_size // 2
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))  # (B, K)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(image.dtype)
    pad = kernel_size // 2
    grouped = image.reshape(1, batch, *image.shape[-2:])                   # (1, B, H, W)
    grouped = F.conv2d(F.pad(grouped, (pad, pad, 0, 0), mode="reflect"), kernel.view(batch, 1, 1, -1), groups=batch)
    grouped = F.conv2d(F.pad(grouped, (0, 0, pad, pad), mode="reflect"), kernel.view(batch, 1, -1, 1), groups=batch)
    return grouped.reshape_as(image)


def augment_batch(batch: dict, generator: torch.Generator, config: AugmentConfig = AugmentConfig(),
                  return_params: bool = False):
    """Flip, lines, blur (see module docstring); returns a new batch (and the draws if asked)."""
    image = batch["image"]
    height, width = image.shape[-2:]
    params = sample_params(image.shape[0], height, width, generator, config, image.device)
    out = flip_batch(batch, params.flip)
    lines = line_mask(params, height, width, config)
    image = torch.where(lines, torch.ones_like(out["image"]), out["image"])
    blurred = gaussian_blur(image, params.sigma, config.blur_kernel)
    out["image"] = torch.where(params.blur.view(-1, 1, 1, 1), blurred, image)
    return (out, params) if return_params else out
