"""Occluders: an eyelid coming down (or up) over the eye, and eyelashes hanging from its margin.

**Lid margin.** Both follow one curve per sample, in pixels,

    e(x) = y0 + tilt (x - xm) + s k H ((x - xm) / (W / 2))^2,   s = +1 upper lid, -1 lower lid,

an arch over the eye (the upper margin is highest above the pupil, the lower lowest below it).
The upper lid covers y < e(x), the lower y > e(x). xm is the pupil's column, y0 puts the margin a
drawn fraction of the pupil's height into the pupil (a negative fraction: above or below it).

**Eyelid.** Skin-toned: the mean of the frame's border pixels (mostly skin in an eye camera's
view) plus a drawn offset, darkened towards the margin (the lash line's shadow), with a one-pixel
anti-aliased edge. OpenEDS labels the *visible* pupil (its masks follow the eyelid), so a lid that
covers pupil pixels takes them out of the label, and the targets follow: the distance maps as
the signed distance of the intersection of the pupil and the visible region (the larger of the
two continuous signed distances), the weights recomputed by the caller. An ellipse target is the
fit of the visible pupil, which cannot be refitted on the device: in a batch with an ellipse
target the margin is moved clear of the pupil's box (by at least one pixel), so the label and
the ellipse stay as they are.

**Eyelashes.** Thin dark curved strokes hanging from the margin over the eye, a row of them along
the margin: evenly spaced with jitter, all slanted and curled alike in a sample, each of its own
length, tapering to the tip. They are a few pixels wide and OpenEDS does not cut them out of the
pupil, so labels do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.train.augment_targets import PupilStats, constants, continuous_distance, discrete_distance_maps

LID_SHADOW_WIDTH = 0.012  # of the frame height: how far into the lid the margin's shadow reaches
LASH_COLOUR = -0.9        # near black in the [-1, 1] input
NOMINAL_PUPIL = 0.2       # of the frame height: the eye placed mid-frame when a sample has no pupil


@dataclass
class LidDraws:
    upper: torch.Tensor      # (B,) bool: upper lid (else lower)
    cover: torch.Tensor      # (B,) float32 fraction of the pupil's height the margin reaches into it
    curvature: torch.Tensor  # (B,) float32 k: the margin's rise at the frame's sides, in frame heights
    tilt: torch.Tensor       # (B,) float32 slope of the margin
    offset: torch.Tensor     # (B,) float32 pixels between the pupil's column and the arch's apex


@dataclass
class EyelidDraws:
    selected: torch.Tensor   # (B,) bool
    tone: torch.Tensor       # (B,) float32 offset from the border mean
    shadow: torch.Tensor     # (B,) float32 darkening at the margin


@dataclass
class LashDraws:
    selected: torch.Tensor   # (B,) bool
    spacing: torch.Tensor    # (B,) float32 pixels between lashes
    phase: torch.Tensor      # (B,) float32 in [0, 1): where the row starts, in spacings
    slant: torch.Tensor      # (B,) float32 dx per pixel down the lash
    curl: torch.Tensor       # (B,) float32 extra dx at the tip, in lash lengths
    thickness: torch.Tensor  # (B,) float32 pixels at the root
    opacity: torch.Tensor    # (B,) float32
    span: torch.Tensor       # (B,) float32 pixels: half the width of the row
    length: torch.Tensor     # (B, M) float32 pixels, lash i uses entry i mod M
    jitter: torch.Tensor     # (B, M) float32 base offsets, in spacings


@dataclass
class Margin:
    """The lid margin of each sample: its curve and its values on the pixel grid."""

    y0: torch.Tensor     # (B,) margin height at the apex
    apex: torch.Tensor   # (B,) column of the arch's apex
    tilt: torch.Tensor   # (B,) slope
    bend: torch.Tensor   # (B,) coefficient of (x - apex)^2
    sign: torch.Tensor   # (B,) +1 upper lid, -1 lower lid
    depth: torch.Tensor  # (B, 1, H, W) signed distance into the lid (> 0 covered), along the normal
    below: torch.Tensor  # (B, 1, H, W) vertical distance from the margin out over the eye (> 0)

    def curve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The margin's height e(x) and slope e'(x) at columns x of shape (B, ...)."""
        view = (-1,) + (1,) * (x.dim() - 1)
        dx = x - self.apex.view(view)
        height = self.y0.view(view) + self.tilt.view(view) * dx + self.bend.view(view) * dx**2
        return height, self.tilt.view(view) + 2 * self.bend.view(view) * dx

    def depth_at(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Signed distance into the lid at points (x, y) of shape (B, ...), as ``depth``."""
        height, slope = self.curve(x)
        return (height - y) * self.sign.view((-1,) + (1,) * (x.dim() - 1)) / torch.sqrt(1 + slope**2)


def pupil_extent(stats: PupilStats | None, height: int, width: int, batch: int, device) -> torch.Tensor:
    """(B, 4) x0, y0, x1, y1 of the pupil, or of a nominal pupil mid-frame where there is none."""
    size = NOMINAL_PUPIL * height / 2
    nominal = constants([(width - 1) / 2 - size, (height - 1) / 2 - size,
                            (width - 1) / 2 + size, (height - 1) / 2 + size], device=device)
    if stats is None:
        return nominal.expand(batch, 4)
    return torch.where(stats.present[:, None], stats.box, nominal)


def lid_margin(draws: LidDraws, box: torch.Tensor, height: int, width: int, keep_clear: bool) -> Margin:
    """The margin curve of the module docstring for the pupil boxes ``box`` (B, 4).

    ``keep_clear``: move the margin off the pupil's box (a batch whose ellipse cannot change).
    """
    sign = torch.where(draws.upper, 1.0, -1.0)  # (B,)
    apex = (box[:, 0] + box[:, 2]) / 2 + draws.offset
    tall = box[:, 3] - box[:, 1] + 1
    y0 = torch.where(draws.upper, box[:, 1] + draws.cover * tall, box[:, 3] - draws.cover * tall)
    bend = sign * draws.curvature * height / (width / 2) ** 2  # (B,) coefficient of (x - xm)^2
    curve = lambda x: draws.tilt * (x - apex) + bend * (x - apex) ** 2  # (B,) -> (B,)
    if keep_clear:
        # The upper margin is convex in x, the lower concave: over the box the extreme is at an end
        ends = torch.stack([curve(box[:, 0] - 0.5), curve(box[:, 2] + 0.5)], dim=1)  # (B, 2)
        upper_y0 = torch.minimum(y0, box[:, 1] - 1 - ends.amax(dim=1))
        lower_y0 = torch.maximum(y0, box[:, 3] + 1 - ends.amin(dim=1))
        y0 = torch.where(draws.upper, upper_y0, lower_y0)
    xs = torch.arange(width, device=box.device, dtype=torch.float32).view(1, 1, 1, width)
    ys = torch.arange(height, device=box.device, dtype=torch.float32).view(1, 1, height, 1)
    dx = xs - apex.view(-1, 1, 1, 1)                                                  # (B, 1, 1, W)
    curve_y = y0.view(-1, 1, 1, 1) + draws.tilt.view(-1, 1, 1, 1) * dx + bend.view(-1, 1, 1, 1) * dx**2
    slope = draws.tilt.view(-1, 1, 1, 1) + 2 * bend.view(-1, 1, 1, 1) * dx
    below = (ys - curve_y) * sign.view(-1, 1, 1, 1)                                   # (B, 1, H, W)
    return Margin(y0, apex, draws.tilt, bend, sign, depth=-below / torch.sqrt(1 + slope**2), below=below)


def draw_eyelid(batch: dict, draws: EyelidDraws, margin: Margin, fill: torch.Tensor) -> dict:
    """Paint the lid on the selected samples; take covered pixels out of the label and follow with
    the distance maps. ``fill`` (B, 1, 1, 1): the skin level (the frame's border mean)."""
    out = dict(batch)
    image = batch["image"]
    height = image.shape[-2]
    alpha = (margin.depth + 0.5).clamp(0.0, 1.0)  # (B, 1, H, W) coverage of each pixel
    shade = torch.exp(-margin.depth.clamp_min(0.0) / (LID_SHADOW_WIDTH * height + 1))
    skin = fill + draws.tone.view(-1, 1, 1, 1) - draws.shadow.view(-1, 1, 1, 1) * shade
    chosen = draws.selected.view(-1, 1, 1, 1)
    out["image"] = torch.where(chosen, image + alpha * (skin - image), image)
    if "label" in batch:
        covered = (margin.depth >= 0)[:, 0] & chosen[:, 0]  # (B, H, W): the lid's half of the edge and beyond
        out["label"] = batch["label"].masked_fill(covered, 0)
        if "dist_map" in batch:
            distance = occluded_distance(batch["dist_map"], out["label"], margin)
            out["dist_map"] = torch.where(chosen, discrete_distance_maps(distance, out["label"]),
                                          batch["dist_map"])
    return out


def occluded_distance(dist_map: torch.Tensor, visible: torch.Tensor, margin: Margin) -> torch.Tensor:
    """Continuous signed distance (B, H, W) px of the visible pupil: the pupil of ``dist_map``
    (B, 2, H, W) minus what the lid covers; ``visible`` (B, H, W) is that pupil's mask.

    max(pupil, depth), the usual signed distance of an intersection, is exact inside the visible
    pupil and wherever the nearest pupil point is visible, and too small where that point is under
    the lid: there the distance to the chord the margin cuts from the pupil (a straight segment
    between its ends, the extreme columns of the visible pupil's first row) is used. A point's
    nearest pupil point is found by following the distance's gradient.
    """
    depth = margin.depth[:, 0]                                               # (B, H, W)
    pupil = continuous_distance(dist_map, *visible.shape[-2:])
    chord = (visible.bool() & (depth > -1.5)).any(dim=1)                     # (B, W) columns at the margin
    width = chord.shape[1]
    start = chord.float().argmax(dim=1).float()                              # (B,) first column
    end = width - 1 - chord.flip(1).float().argmax(dim=1).float()            # (B,) last column
    ends = torch.stack([start, end], dim=1)                                  # (B, 2)
    ends = torch.stack([ends, margin.curve(ends)[0]], dim=2)                 # (B, 2 ends, xy)
    xs = torch.arange(width, device=depth.device, dtype=torch.float32).view(1, 1, width)
    ys = torch.arange(depth.shape[1], device=depth.device, dtype=torch.float32).view(1, -1, 1)
    to_chord = segment_distance(xs, ys, ends[:, 0], ends[:, 1])
    # nearest pupil point of an outside pixel: one distance back along the unit gradient
    gy, gx = torch.gradient(pupil, dim=(1, 2))
    norm = torch.sqrt(gx**2 + gy**2).clamp_min(1e-6)
    foot_covered = margin.depth_at(xs - pupil * gx / norm, ys - pupil * gy / norm) >= 0
    hidden = (depth >= 0) & ((pupil < 0) | foot_covered) & chord.any(dim=1).view(-1, 1, 1)
    return torch.where(hidden, to_chord, torch.maximum(pupil, depth))


def segment_distance(xs: torch.Tensor, ys: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, H, W) distance of pixels (xs (1, 1, W), ys (1, H, 1)) to the segments a-b, (B, 2) each."""
    ax, ay = a[:, 0].view(-1, 1, 1), a[:, 1].view(-1, 1, 1)
    dx, dy = (b - a)[:, 0].view(-1, 1, 1), (b - a)[:, 1].view(-1, 1, 1)
    t = (((xs - ax) * dx + (ys - ay) * dy) / (dx**2 + dy**2).clamp_min(1e-6)).clamp(0.0, 1.0)
    return torch.sqrt((xs - ax - t * dx) ** 2 + (ys - ay - t * dy) ** 2)


def draw_lashes(image: torch.Tensor, draws: LashDraws, margin: Margin, apex_x: torch.Tensor) -> torch.Tensor:
    """Dark tapered strokes below the margin (above it for a lower lid) on the selected samples.

    Lash i's centre line runs at x = base_i + slant t + curl t^2 / L, t the distance out from the
    margin and L the sample's mean length; a pixel is matched to the nearest lash by inverting
    that with the shared slant and curl, so every lash costs nothing extra.
    """
    width = image.shape[-1]
    count = draws.length.shape[1]
    view = lambda v: v.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)
    t = margin.below                                                        # (B, 1, H, W)
    xs = torch.arange(width, device=image.device, dtype=torch.float32).view(1, 1, 1, width)
    mean_length = draws.length.mean(dim=1)
    start = view(apex_x - draws.span + draws.phase * draws.spacing)
    along = xs - start - view(draws.slant) * t - view(draws.curl / mean_length) * t**2
    index = torch.round(along / view(draws.spacing))                         # nearest lash
    slot = index.long().remainder(count).flatten(1)                          # (B, H*W)
    length = torch.gather(draws.length, 1, slot).view_as(t)
    jitter = torch.gather(draws.jitter, 1, slot).view_as(t)
    offset = along - (index + 0.25 * jitter) * view(draws.spacing)
    slope = view(draws.slant) + 2 * view(draws.curl / mean_length) * t
    across = offset.abs() / torch.sqrt(1 + slope**2)
    half = view(draws.thickness) / 2 * (1 - 0.7 * (t / length).clamp(0.0, 1.0))
    in_row = (index >= 0) & (index * view(draws.spacing) <= 2 * view(draws.span))
    alpha = (half + 0.5 - across).clamp(0.0, 1.0) * ((t >= 0) & (t <= length) & in_row) * view(draws.opacity)
    painted = image + alpha * (LASH_COLOUR - image)
    return torch.where(view(draws.selected), painted, image)
