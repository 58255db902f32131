"""Training losses: a functional core of pure tensor functions under thin ``nn.Module`` wrappers.

Segmentation (logits (B, 2, H, W), channel 0 background, 1 pupil):

    loss = weighted_ce + alpha * generalized_dice + (1 - alpha) * surface

``alpha`` follows ``alpha_schedule``: region overlap (Dice) dominates early, when a boundary term
on a random prediction is mostly noise, and the boundary (surface) term gains weight later.

Ellipse regression (outputs (B, 4) = (cx, cy, rx, ry) normalized as in ``common.prep.preprocess``):
SmoothL1 on the centre and on the semi-axes (``ellipse_loss``).

Every function computes in float32, whatever autocast does around it (inputs are cast with
``.float()``), and returns 0-dim tensors: nothing here calls ``.item()`` or otherwise waits for the
device, so the caller decides when to read values back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.specs import DEFAULT_ALPHA_FLOOR

ALPHA_FLOOR = DEFAULT_ALPHA_FLOOR  # --alpha-floor's default
# SmoothL1 switches from quadratic to linear at |error| = beta. Targets are normalized to [0, 1],
# so beta = 0.02 is 12.8 px of a 640-px-wide frame (8 px of its 400-px height): errors larger than
# that get a constant-size gradient (robust to badly wrong early predictions and label outliers),
# smaller ones a gradient that shrinks with the error (no jitter around the optimum).
ELLIPSE_BETA = 0.02


def _check_segmentation_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, C, H, W) and target (B, H, W); got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, spatial_weights: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy weighted per pixel by ``1 + spatial_weights``, averaged over all pixels.

    The weighting happens before the reduction: ``mean((1 + w) * ce)``. Weighting an already
    averaged CE would only rescale the loss.

    Args:
        logits: raw class scores.
        target: class index per pixel.
        spatial_weights: extra weight per pixel (``common.prep.preprocess.spatial_weights``: a
            Gaussian (sigma 5) of the pupil's boundary band, largest on the boundary).

    Shape:
        logits (B, C, H, W), target (B, H, W) integer, spatial_weights (B, H, W) -> scalar ().
    """
    _check_segmentation_shapes(logits, target)
    if spatial_weights.shape != target.shape:
        raise ValueError(
            f"spatial_weights shape {tuple(spatial_weights.shape)} != target shape {tuple(target.shape)}"
        )
    per_pixel = F.cross_entropy(logits.float(), target.long(), reduction="none")  # (B, H, W)
    return (per_pixel * (1.0 + spatial_weights.float())).mean()


def generalized_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - generalized Dice score (Sudre et al. 2017) of softmax probabilities, averaged over the batch.

    Per sample, with p the softmax probabilities and g the one-hot target of class c over pixels i:

        GDS = 2 * sum_c w_c * sum_i p_ci g_ci / sum_c w_c * sum_i (p_ci + g_ci),
        w_c = 1 / (sum_i g_ci) ** 2.

    A class absent from a sample's target would get an infinite weight; its weight is set to 0
    instead, so such a sample is scored on the classes it contains (an all-background frame
    gets the plain Dice of the background). Predicting an absent class is still penalized, since
    its probability is taken from the classes that are present. Every pixel has a class, so at
    least one weight is non-zero and the result is always finite; ``eps`` only guards the
    division. Class counts are used as fractions of the frame (the ratio is unchanged by a
    common factor on all weights), which keeps the weights far from float32 underflow.

    Args:
        logits: raw class scores.
        target: class index per pixel.
        eps: lower bound on the denominator.

    Shape:
        logits (B, C, H, W), target (B, H, W) integer -> scalar ().
    """
    _check_segmentation_shapes(logits, target)
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1).flatten(2)  # (B, C, N)
    onehot = F.one_hot(target.long().flatten(1), num_classes).transpose(1, 2).float()  # (B, C, N)
    fraction = onehot.mean(dim=2)  # (B, C), share of the frame per class
    present = fraction > 0
    weights = torch.where(present, 1.0 / fraction.clamp_min(eps) ** 2, torch.zeros_like(fraction))
    intersection = (weights * (probs * onehot).sum(dim=2)).sum(dim=1)  # (B,)
    total = (weights * (probs + onehot).sum(dim=2)).sum(dim=1)  # (B,)
    score = 2.0 * intersection / total.clamp_min(eps)
    return (1.0 - score).mean()


def surface_loss(logits: torch.Tensor, dist_map: torch.Tensor) -> torch.Tensor:
    """Boundary loss (Kervadec et al. 2019): mean of softmax probabilities times signed distances.

    ``dist_map`` follows ``common.prep.preprocess.distance_maps``: per class, positive outside the class
    and negative inside, so probability placed far outside a class costs, and probability inside
    it lowers the loss. Channel order matches the logits (0 background, 1 pupil).

    Args:
        logits: raw class scores.
        dist_map: signed distance per class and pixel.

    Shape:
        logits (B, C, H, W), dist_map (B, C, H, W) -> scalar ().
    """
    if dist_map.shape != logits.shape:
        raise ValueError(f"dist_map shape {tuple(dist_map.shape)} != logits shape {tuple(logits.shape)}")
    probs = logits.float().softmax(dim=1)  # (B, C, H, W)
    return (probs * dist_map.float()).mean()


def alpha_schedule(epoch: int, epochs: int, floor: float = ALPHA_FLOOR) -> float:
    """Weight of the Dice term at 0-based ``epoch`` of ``epochs``; the surface term gets 1 - alpha.

    ``alpha = max(floor, 1 - epoch / epochs)``: 1.0 (Dice only) at the first epoch, then a linear
    decrease of 1 / epochs per epoch until it reaches ``floor`` (0.2 by default: at epoch
    0.8 * epochs), where it stays; a floor of 1 keeps Dice alone (no surface term). Epochs past
    ``epochs`` (e.g. a resumed run that trains longer) keep the floor.

    Raises:
        ValueError: if ``epochs < 1`` or ``epoch < 0``.
    """
    if epochs < 1 or epoch < 0:
        raise ValueError(
            f"alpha_schedule needs epochs >= 1 and epoch >= 0; got epoch={epoch}, epochs={epochs}"
        )
    return max(float(floor), 1.0 - epoch / epochs)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    spatial_weights: torch.Tensor,
    dist_map: torch.Tensor,
    alpha: float,
) -> dict[str, torch.Tensor]:
    """Total segmentation loss and its parts, all 0-dim float32 tensors (no host sync).

    ``loss = ce + alpha * dice + (1 - alpha) * surface`` with ``ce`` from ``weighted_cross_entropy``,
    ``dice`` from ``generalized_dice_loss`` and ``surface`` from ``surface_loss``.

    Shape:
        logits (B, C, H, W), target (B, H, W), spatial_weights (B, H, W), dist_map (B, C, H, W).

    Returns:
        {"loss", "ce", "dice", "surface"}.
    """
    ce = weighted_cross_entropy(logits, target, spatial_weights)
    dice = generalized_dice_loss(logits, target)
    surface = surface_loss(logits, dist_map)
    loss = ce + alpha * dice + (1.0 - alpha) * surface
    return {"loss": loss, "ce": ce, "dice": dice, "surface": surface}


def ellipse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    center_weight: float = 1.0,
    radius_weight: float = 1.0,
    beta: float = ELLIPSE_BETA,
    has_pupil: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """SmoothL1 on the ellipse centre and semi-axes, in normalized units (see ``ELLIPSE_BETA``).

    ``center`` is the mean SmoothL1 over (cx, cy), ``radius`` over (rx, ry), and
    ``loss = center_weight * center + radius_weight * radius``. Frames without a pupil have no
    ellipse to regress: with ``has_pupil`` they are left out of the means (a batch of negatives
    only gives 0, still attached to the graph).

    Args:
        pred: predicted (cx, cy, rx, ry), normalized as in ``common.prep.preprocess``.
        target: ground-truth (cx, cy, rx, ry), same convention.
        has_pupil: which frames show a pupil (default: all).

    Shape:
        pred (B, 4), target (B, 4), has_pupil (B,) bool -> dict of 0-dim tensors
        {"loss", "center", "radius"}.
    """
    if pred.ndim != 2 or pred.shape[1] != 4 or target.shape != pred.shape:
        raise ValueError(
            f"expected pred and target of shape (B, 4); got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    pred, target = pred.float(), target.float()
    if has_pupil is None:
        weight = torch.ones(pred.shape[0], 1, device=pred.device)
    else:
        weight = has_pupil.float().view(-1, 1)  # (B, 1)
    count = weight.sum().clamp_min(1.0) * 2  # two values per frame in each term
    elementwise = F.smooth_l1_loss(pred, target, beta=beta, reduction="none") * weight  # (B, 4)
    center = elementwise[:, :2].sum() / count
    radius = elementwise[:, 2:].sum() / count
    loss = center_weight * center + radius_weight * radius
    return {"loss": loss, "center": center, "radius": radius}


class SegmentationLoss(nn.Module):
    """Module form of ``segmentation_loss``; ``alpha`` is passed per call (see ``alpha_schedule``).

    Shape:
        logits (B, C, H, W), target (B, H, W), spatial_weights (B, H, W), dist_map (B, C, H, W)
        -> {"loss", "ce", "dice", "surface"} of 0-dim tensors.
    """

    def forward(self, logits, target, spatial_weights, dist_map, alpha: float) -> dict[str, torch.Tensor]:
        return segmentation_loss(logits, target, spatial_weights, dist_map, alpha)


class EllipseLoss(nn.Module):
    """Module form of ``ellipse_loss`` with fixed term weights and SmoothL1 ``beta``.

    Shape:
        pred (B, 4), target (B, 4) -> {"loss", "center", "radius"} of 0-dim tensors.
    """

    def __init__(self, center_weight: float = 1.0, radius_weight: float = 1.0, beta: float = ELLIPSE_BETA):
        super().__init__()
        self.center_weight = center_weight
        self.radius_weight = radius_weight
        self.beta = beta

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return ellipse_loss(pred, target, self.center_weight, self.radius_weight, self.beta)

    def extra_repr(self) -> str:
        return f"center_weight={self.center_weight}, radius_weight={self.radius_weight}, beta={self.beta}"
