"""Hand-computed checks of the training losses."""

import math

import numpy as np
import pytest
import torch

from common.prep import preprocess as pp
from common.train import losses

LN3 = math.log(3.0)  # a logit gap of ln 3 gives softmax probabilities 0.75 / 0.25


def two_class_logits(pupil_minus_background) -> torch.Tensor:
    """(1, 2, H, W) logits with background 0 and the given pupil logit per pixel."""
    pupil = torch.tensor(pupil_minus_background, dtype=torch.float32)
    return torch.stack([torch.zeros_like(pupil), pupil])[None]


def confident_logits(target: torch.Tensor, margin: float = 30.0) -> torch.Tensor:
    """(B, 2, H, W) logits that put probability ~1 on the target class."""
    onehot = torch.nn.functional.one_hot(target.long(), 2).permute(0, 3, 1, 2).float()
    return onehot * margin


# ----------------------------------------------------------------------------- cross-entropy
def test_ce_confident_correct_prediction_is_zero():
    target = torch.tensor([[[0, 1], [1, 0]]])
    loss = losses.weighted_cross_entropy(confident_logits(target), target, torch.ones(1, 2, 2))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_ce_uniform_logits_is_ln2_times_weight(weight):
    target = torch.tensor([[[0, 1, 1]]])
    loss = losses.weighted_cross_entropy(torch.zeros(1, 2, 1, 3), target, torch.full((1, 1, 3), weight))
    assert loss.item() == pytest.approx((1.0 + weight) * math.log(2.0), rel=1e-6)


def test_ce_weights_each_pixel_before_reduction():
    # pixel A: p(target) = 0.75 -> ce = ln(4/3), weight 0; pixel B: p(target) = 0.25 -> ce = ln 4, weight 1
    logits = two_class_logits([[LN3, LN3]])
    target = torch.tensor([[[1, 0]]])
    weights = torch.tensor([[[0.0, 1.0]]])
    ce_a, ce_b = math.log(4.0 / 3.0), math.log(4.0)
    expected = (1.0 * ce_a + 2.0 * ce_b) / 2.0  # mean((1 + w) * ce) = 1.5305
    scaled_mean = (ce_a + ce_b) / 2.0 * 1.5  # mean(ce) * mean(1 + w) = 1.2555, the wrong formula
    loss = losses.weighted_cross_entropy(logits, target, weights).item()
    assert loss == pytest.approx(expected, rel=1e-6)
    assert abs(loss - scaled_mean) > 0.2


# ----------------------------------------------------------------------------- generalized dice
@pytest.mark.parametrize(
    "target",
    [[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]], [[1, 0], [0, 1]]],
    ids=["one-pupil-pixel", "all-background", "all-pupil", "diagonal"],
)
def test_dice_perfect_prediction_is_zero(target):
    target = torch.tensor([target])
    loss = losses.generalized_dice_loss(confident_logits(target), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


# Probabilities of pupil per pixel from logits (ln3, -ln3, -ln3, 0) -> (.75, .25, .25, .5).
PROBE_LOGITS = [[LN3, -LN3], [-LN3, 0.0]]


@pytest.mark.parametrize(
    "target, expected",
    [
        # w_bg = 1/3^2, w_pupil = 1/1^2; background: sum p*g = .75+.75+.5 = 2, sum p+g = 2.25+3 = 5.25;
        # pupil: sum p*g = .75, sum p+g = 1.75+1 = 2.75.
        # GDS = 2 (2/9 + 3/4) / (5.25/9 + 2.75) = (70/36) / (120/36) = 7/12 -> loss 5/12
        ([[1, 0], [0, 0]], 5.0 / 12.0),
        # pupil absent: its weight is 0, so only background counts:
        # GDS = 2 * sum p_bg / (sum p_bg + 4) = 2 * 2.25 / 6.25 = 0.72 -> loss 0.28
        ([[0, 0], [0, 0]], 0.28),
        # background absent: GDS = 2 * sum p_pupil / (sum p_pupil + 4) = 3.5 / 5.75 -> loss 2.25 / 5.75
        ([[1, 1], [1, 1]], 2.25 / 5.75),
    ],
    ids=["hand", "all-background", "all-pupil"],
)
def test_dice_hand_computed(target, expected):
    loss = losses.generalized_dice_loss(two_class_logits(PROBE_LOGITS), torch.tensor([target]))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dice_is_mean_over_samples_and_penalizes_absent_class():
    logits = torch.cat([two_class_logits(PROBE_LOGITS), two_class_logits(PROBE_LOGITS)])
    target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    assert losses.generalized_dice_loss(logits, target).item() == pytest.approx((5 / 12 + 0.28) / 2, rel=1e-6)
    # on an all-background frame, a more confident pupil prediction costs more
    empty = torch.zeros(1, 2, 2, dtype=torch.long)
    low = losses.generalized_dice_loss(two_class_logits([[-2.0, -2.0], [-2.0, -2.0]]), empty)
    high = losses.generalized_dice_loss(two_class_logits([[2.0, 2.0], [2.0, 2.0]]), empty)
    assert low.item() < high.item()


# ----------------------------------------------------------------------------- surface loss
def test_surface_loss_hand_computed():
    logits = two_class_logits([[LN3, -LN3, 0.0]])  # p_pupil = (.75, .25, .5)
    dist = torch.tensor([[[[0.2, -0.4, -0.6]], [[-0.2, 0.4, 0.6]]]])  # (1, 2, 1, 3) background, pupil
    # background: .25*.2 + .75*-.4 + .5*-.6 = -.55; pupil: .75*-.2 + .25*.4 + .5*.6 = .25; mean over 6
    assert losses.surface_loss(logits, dist).item() == pytest.approx(-0.3 / 6.0, rel=1e-6)


def test_surface_loss_good_prediction_scores_lower_than_bad():
    mask = np.zeros((12, 16), np.uint8)
    mask[3:8, 5:11] = 1
    dist = torch.from_numpy(pp.distance_maps(mask))[None]  # (1, 2, H, W)
    target = torch.from_numpy(mask).long()[None]
    good = losses.surface_loss(confident_logits(target, 5.0), dist)
    bad = losses.surface_loss(confident_logits(1 - target, 5.0), dist)
    assert good.item() < 0 < bad.item()


# ----------------------------------------------------------------------------- combined
@pytest.mark.parametrize(
    "epoch, epochs, expected",
    [(0, 10, 1.0), (5, 10, 0.5), (7, 10, 0.3), (8, 10, 0.2), (9, 10, 0.2), (25, 10, 0.2), (0, 1, 1.0)],
)
def test_alpha_schedule(epoch, epochs, expected):
    assert losses.alpha_schedule(epoch, epochs) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("epoch, epochs", [(0, 0), (-1, 10)])
def test_alpha_schedule_rejects_bad_arguments(epoch, epochs):
    with pytest.raises(ValueError, match="alpha_schedule"):
        losses.alpha_schedule(epoch, epochs)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2])
def test_segmentation_loss_components_and_total(alpha):
    logits = two_class_logits(PROBE_LOGITS)
    target = torch.tensor([[[1, 0], [0, 0]]])
    weights = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    dist = torch.tensor([[[[0.0, 0.1], [0.2, 0.3]], [[0.4, -0.5], [0.6, 0.7]]]])
    parts = losses.SegmentationLoss()(logits, target, weights, dist, alpha)
    # ce per pixel: -log p(target) = ln(4/3), ln(4/3), ln(4/3), ln 2 with weights (2, 2, 1, 1)
    ce = (2 * math.log(4 / 3) + 2 * math.log(4 / 3) + math.log(4 / 3) + math.log(2)) / 4
    # surface: background (.25, .75, .75, .5) . (0, .1, .2, .3) = .375;
    # pupil (.75, .25, .25, .5) . (.4, -.5, .6, .7) = .675; mean over 8 entries
    surface = (0.375 + 0.675) / 8
    dice = 5.0 / 12.0
    assert set(parts) == {"loss", "ce", "dice", "surface"}
    assert all(value.ndim == 0 and value.dtype == torch.float32 for value in parts.values())
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert parts["dice"].item() == pytest.approx(dice, rel=1e-6)
    assert parts["surface"].item() == pytest.approx(surface, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(ce + alpha * dice + (1 - alpha) * surface, rel=1e-6)


def test_segmentation_loss_is_float32_under_autocast_and_backpropagates():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    target = (torch.rand(2, 8, 8) > 0.5).long()
    weights, dist = torch.rand(2, 8, 8), torch.randn(2, 2, 8, 8)
    rounded = logits.detach().to(torch.bfloat16).float()
    reference = losses.segmentation_loss(rounded, target, weights, dist, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = logits.to(torch.bfloat16)  # what a model returns under autocast
        parts = losses.segmentation_loss(half, target, weights, dist, 0.5)
    # computed in float32 from the bfloat16 logits: the same as outside autocast
    for key, value in parts.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(reference[key].item(), rel=1e-6)
    parts["loss"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_segmentation_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="target"):
        losses.segmentation_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long),
                                 torch.zeros(1, 4, 5), torch.zeros(1, 2, 4, 5), 0.5)


# ----------------------------------------------------------------------------- ellipse
def test_ellipse_loss_hand_computed_smooth_l1():
    pred = torch.tensor([[0.50, 0.50, 0.10, 0.10]])
    target = torch.tensor([[0.51, 0.45, 0.10, 0.20]])
    # beta 0.02: |d| < beta -> 0.5 d^2 / beta, else |d| - beta / 2
    center = (0.5 * 0.01**2 / 0.02 + (0.05 - 0.01)) / 2  # (0.0025 + 0.04) / 2 = 0.02125
    radius = (0.0 + (0.10 - 0.01)) / 2  # 0.045
    parts = losses.EllipseLoss(center_weight=2.0, radius_weight=0.5)(pred, target)
    assert parts["center"].item() == pytest.approx(center, abs=1e-6)
    assert parts["radius"].item() == pytest.approx(radius, abs=1e-6)
    assert parts["loss"].item() == pytest.approx(2.0 * center + 0.5 * radius, abs=1e-6)
    assert losses.ELLIPSE_BETA == 0.02


def test_ellipse_loss_beta_switches_quadratic_to_linear():
    target = torch.zeros(1, 4)
    small = losses.ellipse_loss(torch.tensor([[0.01, 0.0, 0.0, 0.0]]), target, beta=0.02)["center"]
    large = losses.ellipse_loss(torch.tensor([[0.01, 0.0, 0.0, 0.0]]), target, beta=0.005)["center"]
    assert small.item() == pytest.approx(0.5 * 0.01**2 / 0.02 / 2, abs=1e-8)  # quadratic branch
    assert large.item() == pytest.approx((0.01 - 0.0025) / 2, abs=1e-8)  # linear branch


def test_ellipse_loss_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        losses.ellipse_loss(torch.zeros(2, 5), torch.zeros(2, 5))
