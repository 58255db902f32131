"""Train-split augmentation, batched on the batch's device, driven by one explicit generator.

Parts come in groups that ``--augment`` switches (``AugmentConfig.from_groups``; a comma list of
groups, ``all`` or ``none``; ``--no-augment`` is ``none``):

    original     today's augmentation, unchanged: flip, white lines, Gaussian blur
    geometric    one affine warp of the image and every target (zoom, rotation, shift, crop)
    occluders    an eyelid over part of the eye (and the pupil), eyelashes hanging from it
    photometric  gamma, contrast, brightness, vignetting, IR glints, defocus and motion blur,
                 shot and read noise

Applied in this order to a device batch (see ``common.train.data.to_device``):
    1. horizontal flip, p=0.5: image, label, spatial_weights, dist_map and the ellipse cx are
       flipped together, in one call, by the same per-sample decision;
    2. warp (``augment_warp``): image, label, distance maps and ellipse in one grid per sample;
       geometry first, so everything below lands on the final frame;
    3. eyelid and eyelashes (``augment_occluders``): a lid takes the pupil pixels it covers out of
       the label (OpenEDS labels the visible pupil); lashes are thin and leave it;
    4. line augment, p=0.2: 1-9 white lines, 4 px thick, each through its own random centre in
       the middle 30-70% of the frame with a random direction (image only: lines are occluders,
       the labels do not change);
    5. IR glints (image only; on the pupil too);
    6. Gaussian blur, p=0.2: 7x7 kernel, sigma uniform in [2, 6], reflect padding (image only;
       after the occluders, so they are out of focus like the rest of the frame);
    7. in linear light (``augment_photometric`` says why): defocus, motion blur, vignetting,
       brightness, then shot and read noise;
    8. the camera's response: gamma, contrast; then the image is clipped to [-1, 1] (when any part
       beyond the original ones is on).
    Where a step changed the label, the spatial weights are recomputed for it
    (``augment_targets.boundary_weights``, exactly as precompute defines them).

Every random draw comes from ``generator`` and happens in :func:`sample_params`, in a fixed order
and a fixed amount for a given configuration and batch shape, whatever the draws turn out to be.
The original parts (flip, lines, blur) draw first, always, exactly what they always drew; every
other part draws only when its probability is above 0 (and costs nothing otherwise), so
``original`` replays today's stream batch after batch. The engine seeds the generator from
(seed, epoch, rank), so a resumed run with the same ``--augment`` replays the same augmentations.
Nothing here syncs with the host, except the copy of the boundary weights' two filter matrices at
the first batch of a frame size (cached).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from common.specs import AUGMENT_GROUPS, DEFAULT_AUGMENT
from common.train.augment_occluders import (
    EyelidDraws,
    LashDraws,
    LidDraws,
    draw_eyelid,
    draw_lashes,
    lid_margin,
    pupil_extent,
)
from common.train.augment_photometric import (
    Choice,
    GlintDraws,
    MotionDraws,
    NoiseDraws,
    VignetteDraws,
    add_glints,
    adjust_contrast,
    adjust_gamma,
    blur_each,
    disk_kernels,
    from_linear,
    gaussian_blur,
    gaussian_kernel_1d,
    line_kernels,
    scale_light,
    sensor_noise,
    to_linear,
    vignette,
)
from common.train.augment_targets import boundary_weights, constants, pupil_stats
from common.train.augment_warp import (
    WarpDraws,
    border_mean,
    prefilter_size,
    resolve_warp,
    sampling_grid,
    warp_distance,
    warp_ellipse,
    warp_image,
)

__all__ = ["AugmentConfig", "AugmentError", "AugmentParams", "augment_batch", "flip_batch", "gaussian_blur",
           "gaussian_kernel_1d", "line_mask", "sample_params"]

SPATIAL_KEYS = ("image", "label", "spatial_weights", "dist_map")


class AugmentError(ValueError):
    """A configuration or batch that augmentation cannot work with."""


# Probabilities each group turns on; every other probability of a preset is 0. Ranges are the
# AugmentConfig defaults. `original` is AugmentConfig() itself.
GROUP_PROBABILITIES = {
    "original": {"p_flip": 0.5, "p_lines": 0.2, "p_blur": 0.2},
    "geometric": {"p_warp": 0.7},
    "occluders": {"p_eyelid": 0.3, "p_eyelash": 0.3},
    "photometric": {"p_gamma": 0.5, "p_contrast": 0.5, "p_brightness": 0.5, "p_vignette": 0.3,
                    "p_glints": 0.3, "p_defocus": 0.15, "p_motion": 0.15, "p_read_noise": 0.3,
                    "p_shot_noise": 0.3},
}
# (lowest allowed low end, highest allowed high end, low end may equal the lowest) of each range
RANGE_LIMITS = {
    "centre_range": (0.0, 1.0, True), "blur_sigma": (0.0, math.inf, False),
    "zoom_range": (0.0, math.inf, False), "eyelid_cover": (-math.inf, 1.0, True),
    "eyelid_curvature": (0.0, math.inf, True), "eyelid_tone": (-2.0, 2.0, True),
    "eyelid_shadow": (0.0, 2.0, True), "lash_spacing": (0.0, math.inf, False),
    "lash_length": (0.0, 1.0, False), "lash_thickness": (0.0, math.inf, False),
    "lash_span": (0.0, 1.0, False), "lash_opacity": (0.0, 1.0, True),
    "gamma_range": (0.0, math.inf, False), "contrast_range": (0.0, math.inf, True),
    "brightness_range": (0.0, math.inf, True), "vignette_strength": (0.0, 1.0, True),
    "glint_radius": (0.0, math.inf, False), "defocus_radius": (0.0, math.inf, False),
    "motion_length": (1.0, math.inf, True), "read_noise": (0.0, 1.0, True), "shot_noise": (0.0, 1.0, True),
}


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the train-split augmentation.

    The defaults are the ``original`` group (today's augmentation); every other part defaults to
    probability 0, with the range it uses when a group (``from_groups``) or a caller turns it on.
    Probabilities are per sample; ranges are (low, high), drawn uniformly (the zoom log-uniformly).

    Attributes:
        p_flip: horizontal flip of every spatial target (0.5).
        p_lines, max_lines, line_thickness, line_value, centre_range: white lines: 1..max_lines
            per sample, a pixel is on a line within thickness / 2 (4 px); value +1.0 is white;
            centres uniform in [lo, hi] * W and * H ((0.3, 0.7)).
        p_blur, blur_kernel, blur_sigma: Gaussian blur, odd kernel side 7, sigma in px (2, 6).
        p_warp, zoom_range, max_rotation, max_shift: the affine warp; zoom log-uniform in
            (0.25, 3.0) (pupils from a few pixels to a large part of the frame); rotation uniform
            in +-max_rotation degrees (25); the pupil moves by up to max_shift of the frame (0.2).
        p_eyelid, eyelid_upper_share, eyelid_cover, eyelid_curvature, eyelid_tilt, eyelid_tone,
            eyelid_shadow: an eyelid, upper with probability 0.75; its margin reaches a fraction
            (-1.0, 0.6) of the pupil's height into it (< 0: clear of it); rise at the sides
            (0.05, 0.3) frame heights; slope up to +-0.15; skin = border mean + (-0.15, 0.15),
            darkened by (0.1, 0.6) at the margin.
        p_eyelash, lash_spacing, lash_length, lash_thickness, lash_span, lash_slant, lash_curl,
            lash_opacity, max_lashes: eyelashes every (3, 7) px, (0.03, 0.1) frame heights long,
            (1, 2.5) px thick, over a row (0.15, 0.35) frame widths either side of the pupil,
            slant up to +-0.5 and curl up to +-0.4 lengths, opacity (0.5, 0.95); max_lashes
            lengths are drawn per sample (64).
        p_gamma, gamma_range: v -> v ** gamma on the encoded value, (0.7, 1.5).
        p_contrast, contrast_range: about the frame's mean, (0.6, 1.4).
        p_brightness, brightness_range: gain on linear light, (0.6, 1.6).
        p_vignette, vignette_strength, vignette_shift: light lost at half a diagonal (0.1, 0.6),
            optical centre up to 0.2 frame from the middle.
        p_glints, max_glints, glint_radius, glint_on_pupil: 1..4 saturated spots of radius
            (1, 4) px, each on the pupil with probability 0.5.
        p_defocus, defocus_radius: disk kernel radius (1, 4) px.
        p_motion, motion_length: line kernel (3, 15) px long at a uniform angle.
        p_read_noise, read_noise: Gaussian std (0.005, 0.03) of full scale, in linear light.
        p_shot_noise, shot_noise: Poisson-like variance per unit of linear signal (0.0005, 0.005).
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
    p_warp: float = 0.0
    zoom_range: tuple[float, float] = (0.25, 3.0)
    max_rotation: float = 25.0
    max_shift: float = 0.2
    p_eyelid: float = 0.0
    eyelid_upper_share: float = 0.75
    eyelid_cover: tuple[float, float] = (-1.0, 0.6)
    eyelid_curvature: tuple[float, float] = (0.05, 0.3)
    eyelid_tilt: float = 0.15
    eyelid_tone: tuple[float, float] = (-0.15, 0.15)
    eyelid_shadow: tuple[float, float] = (0.1, 0.6)
    p_eyelash: float = 0.0
    lash_spacing: tuple[float, float] = (3.0, 7.0)
    lash_length: tuple[float, float] = (0.03, 0.1)
    lash_thickness: tuple[float, float] = (1.0, 2.5)
    lash_span: tuple[float, float] = (0.15, 0.35)
    lash_slant: float = 0.5
    lash_curl: float = 0.4
    lash_opacity: tuple[float, float] = (0.5, 0.95)
    max_lashes: int = 64
    p_gamma: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_contrast: float = 0.0
    contrast_range: tuple[float, float] = (0.6, 1.4)
    p_brightness: float = 0.0
    brightness_range: tuple[float, float] = (0.6, 1.6)
    p_vignette: float = 0.0
    vignette_strength: tuple[float, float] = (0.1, 0.6)
    vignette_shift: float = 0.2
    p_glints: float = 0.0
    max_glints: int = 4
    glint_radius: tuple[float, float] = (1.0, 4.0)
    glint_on_pupil: float = 0.5
    p_defocus: float = 0.0
    defocus_radius: tuple[float, float] = (1.0, 4.0)
    p_motion: float = 0.0
    motion_length: tuple[float, float] = (3.0, 15.0)
    p_read_noise: float = 0.0
    read_noise: tuple[float, float] = (0.005, 0.03)
    p_shot_noise: float = 0.0
    shot_noise: tuple[float, float] = (0.0005, 0.005)

    def __post_init__(self):
        shares = ([f.name for f in fields(self) if f.name.startswith("p_")]
                  + ["eyelid_upper_share", "glint_on_pupil"])
        for name in shares:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise AugmentError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if min(self.max_lines, self.max_lashes, self.max_glints) < 1 or self.line_thickness <= 0:
            raise AugmentError("max_lines, max_lashes and max_glints must be >= 1 and line_thickness > 0")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise AugmentError(f"blur_kernel must be a positive odd integer, got {self.blur_kernel}")
        for name, (floor, ceiling, floor_included) in RANGE_LIMITS.items():
            low, high = getattr(self, name)
            if not ((low >= floor if floor_included else low > floor) and low <= high <= ceiling):
                relation = "<=" if floor_included else "<"
                raise AugmentError(f"{name} must satisfy {floor} {relation} lo <= hi <= {ceiling}, "
                                   f"got {(low, high)}")
        for name in ("max_rotation", "max_shift", "eyelid_tilt", "lash_slant", "lash_curl", "vignette_shift"):
            if getattr(self, name) < 0:
                raise AugmentError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_groups(cls, groups) -> AugmentConfig:
        """The configuration of a comma list (or sequence) of groups, ``all`` or ``none``.

        Each group turns on its parts with ``GROUP_PROBABILITIES``; every other part is off.
        """
        names = [g.strip() for g in groups.split(",")] if isinstance(groups, str) else list(groups)
        names = list(AUGMENT_GROUPS) if names == ["all"] else [] if names == ["none"] else names
        unknown = sorted(set(names) - set(GROUP_PROBABILITIES))
        if unknown:
            raise AugmentError(f"unknown augmentation group(s) {unknown}; choose from "
                               f"{', '.join(AUGMENT_GROUPS)}, all or none")
        off = {f.name: 0.0 for f in fields(cls) if f.name.startswith("p_")}
        for name in names:
            off.update(GROUP_PROBABILITIES[name])
        return cls(**off)

    @property
    def enabled(self) -> bool:
        """Whether any part can change a batch."""
        return any(getattr(self, f.name) > 0 for f in fields(self) if f.name.startswith("p_"))


def augment_config(args) -> AugmentConfig | None:
    """The configuration a training run's ``--augment`` asks for (``--no-augment`` stores "none");
    None when nothing is to be augmented, so the engine skips the call."""
    config = AugmentConfig.from_groups(getattr(args, "augment", DEFAULT_AUGMENT))
    return config if config.enabled else None


# ----------------------------------------------------------------------------- draws
# the AugmentParams fields beyond the original parts'
NEW_PARTS = ("warp", "lid", "eyelid", "lashes", "glints", "defocus", "motion", "vignette", "brightness",
             "gamma", "contrast", "noise")


@dataclass
class AugmentParams:
    """The per-sample draws of one call (all tensors on the batch's device).

    The original parts' fields are always drawn, as they always were; every other part is None
    when its probability is 0.
    """

    flip: torch.Tensor        # (B,) bool
    lines: torch.Tensor       # (B,) bool
    line_count: torch.Tensor  # (B,) int64 in [1, max_lines]
    centres: torch.Tensor     # (B, L, 2) float32 pixel (x, y) of each line's centre, L = max_lines
    angles: torch.Tensor      # (B, L) float32 line direction in radians, [0, pi)
    blur: torch.Tensor        # (B,) bool
    sigma: torch.Tensor       # (B,) float32 Gaussian sigma in pixels
    warp: WarpDraws | None = None
    lid: LidDraws | None = None
    eyelid: EyelidDraws | None = None
    lashes: LashDraws | None = None
    glints: GlintDraws | None = None
    defocus: Choice | None = None
    motion: MotionDraws | None = None
    vignette: VignetteDraws | None = None
    brightness: Choice | None = None
    gamma: Choice | None = None
    contrast: Choice | None = None
    noise: NoiseDraws | None = None


class _Draw:
    """Uniform draws from one generator, on its device (a generator lives on one device)."""

    def __init__(self, generator: torch.Generator, batch: int):
        self.generator, self.batch = generator, batch

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(self.batch, *shape, generator=self.generator, device=self.generator.device)

    def between(self, low_high: tuple[float, float], *shape: int) -> torch.Tensor:
        low, high = low_high
        return low + (high - low) * self.uniform(*shape)

    def symmetric(self, bound: float, *shape: int) -> torch.Tensor:
        return (2 * self.uniform(*shape) - 1) * bound

    def chance(self, p: float, *shape: int) -> torch.Tensor:
        return self.uniform(*shape) < p

    def integers(self, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high + 1, (self.batch,), generator=self.generator,
                             device=self.generator.device)


def _original_draws(draw: _Draw, height: int, width: int, config: AugmentConfig) -> dict:
    """Flip, lines, blur: today's draws in today's order, made whatever their probabilities."""
    lines = config.max_lines
    size = constants([width, height], draw.generator.device)
    return {"flip": draw.chance(config.p_flip), "lines": draw.chance(config.p_lines),
            "line_count": draw.integers(1, lines),
            "centres": draw.between(config.centre_range, lines, 2) * size,
            "angles": draw.uniform(lines) * math.pi, "blur": draw.chance(config.p_blur),
            "sigma": draw.between(config.blur_sigma)}


def _geometry_draws(draw: _Draw, height: int, width: int, c: AugmentConfig) -> dict:
    """Warp, lid margin, eyelid and eyelashes (each None at probability 0)."""
    values = {}
    if c.p_warp > 0:
        low, high = (math.log(z) for z in c.zoom_range)
        frame = constants([width, height], draw.generator.device)
        values["warp"] = WarpDraws(draw.chance(c.p_warp), torch.exp(draw.between((low, high))),
                                   draw.symmetric(math.radians(c.max_rotation)),
                                   draw.symmetric(c.max_shift, 2) * frame)
    if c.p_eyelid > 0 or c.p_eyelash > 0:
        values["lid"] = LidDraws(draw.chance(c.eyelid_upper_share), draw.between(c.eyelid_cover),
                                 draw.between(c.eyelid_curvature), draw.symmetric(c.eyelid_tilt),
                                 draw.symmetric(0.1 * width))
    if c.p_eyelid > 0:
        values["eyelid"] = EyelidDraws(draw.chance(c.p_eyelid), draw.between(c.eyelid_tone),
                                       draw.between(c.eyelid_shadow))
    if c.p_eyelash > 0:
        values["lashes"] = LashDraws(
            draw.chance(c.p_eyelash), draw.between(c.lash_spacing), draw.uniform(),
            draw.symmetric(c.lash_slant),
            draw.symmetric(c.lash_curl), draw.between(c.lash_thickness), draw.between(c.lash_opacity),
            draw.between(c.lash_span) * width,
            draw.between(c.lash_length)[:, None] * height * draw.between((0.6, 1.4), c.max_lashes),
            draw.symmetric(1.0, c.max_lashes))
    return values


def _photometric_draws(draw: _Draw, height: int, width: int, c: AugmentConfig) -> dict:
    """Glints, blurs, light, response and noise (each None at probability 0); the noise field last."""
    values, device = {}, draw.generator.device
    choice = lambda p, low_high: Choice(draw.chance(p), draw.between(low_high))
    if c.p_glints > 0:
        values["glints"] = GlintDraws(draw.chance(c.p_glints), draw.integers(1, c.max_glints),
                                      draw.uniform(c.max_glints, 2),
                                      draw.chance(c.glint_on_pupil, c.max_glints),
                                      draw.between(c.glint_radius, c.max_glints))
    if c.p_defocus > 0:
        values["defocus"] = choice(c.p_defocus, c.defocus_radius)
    if c.p_motion > 0:
        values["motion"] = MotionDraws(draw.chance(c.p_motion), draw.between(c.motion_length),
                                       draw.uniform() * math.pi)
    if c.p_vignette > 0:
        middle, frame = (constants([(width - 1) / 2, (height - 1) / 2], device),
                         constants([width, height], device))
        values["vignette"] = VignetteDraws(draw.chance(c.p_vignette), draw.between(c.vignette_strength),
                                           middle + draw.symmetric(c.vignette_shift, 2) * frame)
    for name in ("brightness", "gamma", "contrast"):
        p = getattr(c, f"p_{name}")
        if p > 0:
            values[name] = choice(p, getattr(c, f"{name}_range"))
    if c.p_read_noise > 0 or c.p_shot_noise > 0:
        read, shot = choice(c.p_read_noise, c.read_noise), choice(c.p_shot_noise, c.shot_noise)
        field = torch.randn(draw.batch, 1, height, width, generator=draw.generator, device=device)
        values["noise"] = NoiseDraws(read, shot, field)
    return values


def _moved(value, device):
    """``value`` (a tensor, a draws dataclass or None) with every tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value):
        return type(value)(**{f.name: _moved(getattr(value, f.name), device) for f in fields(value)})
    return value


def sample_params(batch_size: int, height: int, width: int, generator: torch.Generator,
                  config: AugmentConfig = AugmentConfig(), device=None) -> AugmentParams:
    """Draw every random quantity of one call, in a fixed order, from ``generator`` only.

    The order: flip, lines, blur (as they always were), warp, lid margin, eyelid, eyelashes,
    glints, defocus, motion, vignette, brightness, gamma, contrast, read and shot noise, the
    noise field. The draws land on ``device`` (default: the generator's device).
    """
    draw = _Draw(generator, batch_size)
    values = _original_draws(draw, height, width, config)
    values.update(_geometry_draws(draw, height, width, config))
    values.update(_photometric_draws(draw, height, width, config))
    params = AugmentParams(**values)
    return params if device is None else _moved(params, device)


# ----------------------------------------------------------------------------- original parts
def flip_batch(batch: dict, flip: torch.Tensor) -> dict:
    """Mirror the selected samples left-right: every spatial target and cx, by one decision.

    Pixel convention (the one ``common.prep.preprocess.fit_ellipse`` reports, OpenCV's): pixel column
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


# ----------------------------------------------------------------------------- new parts
def _warp_batch(batch: dict, draws: WarpDraws, config: AugmentConfig) -> dict:
    """Step 2: the affine warp of the selected samples (``augment_warp``)."""
    out = dict(batch)
    image = batch["image"]
    height, width = image.shape[-2:]
    stats = pupil_stats(batch["label"]) if "label" in batch else None
    warp = resolve_warp(draws, stats, height, width, rotate="ellipse" not in batch)
    grid = sampling_grid(warp, height, width)                   # (B, H, W, 2)
    chosen = draws.selected.view(-1, 1, 1, 1)
    warped = warp_image(image, warp, grid, prefilter_size(config.zoom_range[0]))
    out["image"] = torch.where(chosen, warped, image)
    if stats is not None:
        label = batch["label"]
        moved = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].to(label.dtype)  # (B, H, W)
        out["label"] = torch.where(chosen[:, 0], moved, label)
        if "dist_map" in batch:
            maps = warp_distance(batch["dist_map"], moved, warp, grid, stats.centroid)
            out["dist_map"] = torch.where(chosen, maps, batch["dist_map"])
    if "ellipse" in batch:
        ellipse = warp_ellipse(batch["ellipse"], warp, height, width)
        out["ellipse"] = torch.where(chosen[:, :, 0, 0], ellipse, batch["ellipse"])
    return out


def _occlude(batch: dict, params: AugmentParams) -> dict:
    """Step 3: eyelid and eyelashes along one margin per sample (``augment_occluders``)."""
    image = batch["image"]
    batch_size, _, height, width = image.shape
    stats = pupil_stats(batch["label"]) if "label" in batch else None
    box = pupil_extent(stats, height, width, batch_size, image.device)
    margin = lid_margin(params.lid, box, height, width, keep_clear="ellipse" in batch)
    out = batch
    if params.eyelid is not None:
        out = draw_eyelid(batch, params.eyelid, margin, border_mean(image))
    if params.lashes is not None:
        out = dict(out)
        apex = (box[:, 0] + box[:, 2]) / 2 + params.lid.offset
        out["image"] = draw_lashes(out["image"], params.lashes, margin, apex)
    return out


def _add_glints(image: torch.Tensor, label: torch.Tensor | None, draws: GlintDraws) -> torch.Tensor:
    """Step 5, placed by the pupil of the label as it now is (after warp and eyelid)."""
    batch_size, _, height, width = image.shape
    stats = pupil_stats(label) if label is not None else None
    box = pupil_extent(stats, height, width, batch_size, image.device)
    present = (stats.present if stats is not None
               else torch.zeros(batch_size, dtype=torch.bool, device=image.device))
    return add_glints(image, draws, box, present)


def defocus_size(radius_high: float) -> int:
    """Odd side of a disk kernel that holds every radius up to ``radius_high`` (its edge reaches r + 1/2)."""
    return 2 * math.floor(radius_high + 0.5) + 1


def motion_size(length_high: float) -> int:
    """Odd side of a line kernel that holds a segment of ``length_high`` px (plus one pixel across)
    at any angle."""
    return 2 * math.floor(math.hypot(length_high / 2 + 0.5, 1.0)) + 1


def _in_linear_light(image: torch.Tensor, params: AugmentParams, config: AugmentConfig) -> torch.Tensor:
    """Step 7: defocus, motion blur, vignetting, brightness and noise on linear irradiance; samples
    with none of them selected come back bit-identical."""
    linear = to_linear(image)
    touched = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
    if params.defocus is not None:
        kernels = disk_kernels(params.defocus.value, defocus_size(config.defocus_radius[1]))
        linear = blur_each(linear, params.defocus.selected, kernels)
        touched |= params.defocus.selected
    if params.motion is not None:
        kernels = line_kernels(params.motion.length, params.motion.angle,
                               motion_size(config.motion_length[1]))
        linear = blur_each(linear, params.motion.selected, kernels)
        touched |= params.motion.selected
    if params.vignette is not None:
        linear = vignette(linear, params.vignette)
        touched |= params.vignette.selected
    if params.brightness is not None:
        linear = scale_light(linear, params.brightness)
        touched |= params.brightness.selected
    if params.noise is not None:
        linear = sensor_noise(linear, params.noise)
        touched |= params.noise.read.selected | params.noise.shot.selected
    return torch.where(touched.view(-1, 1, 1, 1), from_linear(linear), image)


LINEAR_PARTS = ("defocus", "motion", "vignette", "brightness", "noise")


def _photometric(image: torch.Tensor, label, params: AugmentParams, config: AugmentConfig) -> torch.Tensor:
    """Steps 5-8 around the original blur: glints, blur, linear light, response curve."""
    if params.glints is not None:
        image = _add_glints(image, label, params.glints)
    if config.p_blur > 0:
        blurred = gaussian_blur(image, params.sigma, config.blur_kernel)
        image = torch.where(params.blur.view(-1, 1, 1, 1), blurred, image)
    if any(getattr(params, name) is not None for name in LINEAR_PARTS):
        image = _in_linear_light(image, params, config)
    if params.gamma is not None:
        image = adjust_gamma(image, params.gamma)
    if params.contrast is not None:
        image = adjust_contrast(image, params.contrast)
    return image


# ----------------------------------------------------------------------------- the call
def _check_batch(batch: dict, config: AugmentConfig) -> None:
    image = batch.get("image")
    if image is None or image.dim() != 4 or image.shape[1] != 1:
        raise AugmentError("batch['image'] must be a (B, 1, H, W) tensor")
    pads = [config.blur_kernel // 2]
    if config.p_warp > 0:
        pads.append(prefilter_size(config.zoom_range[0]) // 2)
    if config.p_defocus > 0:
        pads.append(defocus_size(config.defocus_radius[1]) // 2)
    if config.p_motion > 0:
        pads.append(motion_size(config.motion_length[1]) // 2)
    if min(image.shape[-2:]) <= max(pads):
        raise AugmentError(f"image of size {tuple(image.shape[-2:])} is too small for kernels of "
                           f"{2 * max(pads) + 1}x{2 * max(pads) + 1} with reflect padding")
    if "ellipse" in batch and batch["ellipse"].shape != (image.shape[0], 4):
        raise AugmentError(f"batch['ellipse'] must be (B, 4) = (cx, cy, rx, ry), "
                           f"got {tuple(batch['ellipse'].shape)}")
    moves_label = config.p_warp > 0 or config.p_eyelid > 0
    if moves_label and "label" not in batch and any(k in batch for k in ("spatial_weights", "dist_map")):
        raise AugmentError("a warp or an eyelid needs batch['label'] to recompute spatial_weights "
                           "and dist_map")


def augment_batch(batch: dict, generator: torch.Generator, config: AugmentConfig = AugmentConfig(),
                  return_params: bool = False):
    """The augmentation of the module docstring on a device batch.

    Args:
        batch: "image" (B, 1, H, W) in [-1, 1] and optionally "label" (B, H, W) 0/1,
            "spatial_weights" (B, H, W), "dist_map" (B, 2, H, W), "ellipse" (B, 4) (see
            :func:`flip_batch`). Not modified.
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
    out = flip_batch(batch, params.flip) if config.p_flip > 0 else dict(batch)
    relabelled = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)  # (B,) label changed
    if params.warp is not None:
        out = _warp_batch(out, params.warp, config)
        relabelled |= params.warp.selected
    if params.lid is not None:
        out = _occlude(out, params)
        if params.eyelid is not None:
            relabelled |= params.eyelid.selected
    image = out["image"]
    if config.p_lines > 0:
        image = image.masked_fill(line_mask(params, height, width, config.line_thickness), config.line_value)
    image = _photometric(image, out.get("label"), params, config)
    new_parts = any(getattr(params, name) is not None for name in NEW_PARTS)
    out["image"] = image.clamp(-1.0, 1.0) if new_parts else image  # original's values stay in range
    if "spatial_weights" in out and (params.warp is not None or params.eyelid is not None):
        out["spatial_weights"] = torch.where(relabelled[:, None, None], boundary_weights(out["label"]),
                                             out["spatial_weights"])
    return (out, params) if return_params else out
