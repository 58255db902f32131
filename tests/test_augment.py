"""Batched augmentation: every target flips together, lines and blur as specified, reproducible."""

import math

import numpy as np
import pytest
import torch

from common import preprocess
from common.augment import AugmentConfig, augment_batch, gaussian_blur

ONLY_FLIP = AugmentConfig(p_flip=1.0, p_lines=0.0, p_blur=0.0)
NOTHING = AugmentConfig(p_flip=0.0, p_lines=0.0, p_blur=0.0)


def make_batch(batch_size=4, height=32, width=48, seed=0):
    """Asymmetric random targets: a flip that misses any key is visible."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch_size, 1, height, width, generator=g) * 2 - 1,
        "label": (torch.rand(batch_size, height, width, generator=g) > 0.5).long(),
        "spatial_weights": torch.rand(batch_size, height, width, generator=g),
        "dist_map": torch.rand(batch_size, 2, height, width, generator=g),
        "ellipse": torch.rand(batch_size, 4, generator=g),
    }


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_flip_applies_to_every_target():
    batch = make_batch()
    out = augment_batch(batch, gen(), ONLY_FLIP)
    for key in ("image", "label", "spatial_weights", "dist_map"):
        assert torch.equal(out[key], batch[key].flip(-1)), key
    width = batch["image"].shape[-1]
    assert torch.allclose(out["ellipse"][:, 0], (width - 1) / width - batch["ellipse"][:, 0])
    assert torch.equal(out["ellipse"][:, 1:], batch["ellipse"][:, 1:])
    unchanged = augment_batch(batch, gen(), NOTHING)
    for key in batch:
        assert torch.equal(unchanged[key], batch[key]), key


def test_random_flip_decisions_agree_across_targets():
    batch = make_batch(batch_size=64)
    out = augment_batch(batch, gen(3), AugmentConfig(p_flip=0.5, p_lines=0.0, p_blur=0.0))
    decisions = {}
    for key in ("image", "label", "spatial_weights", "dist_map"):
        flipped = torch.tensor([torch.equal(out[key][i], batch[key][i].flip(-1)) for i in range(64)])
        same = torch.tensor([torch.equal(out[key][i], batch[key][i]) for i in range(64)])
        assert bool((flipped ^ same).all()), key  # every sample is either flipped or untouched
        decisions[key] = flipped
    decisions["cx"] = ~torch.isclose(out["ellipse"][:, 0], batch["ellipse"][:, 0])
    reference = decisions["image"]
    assert 10 < int(reference.sum()) < 54
    for key, flipped in decisions.items():
        assert torch.equal(flipped, reference), key


def test_flipped_cx_matches_a_fit_of_the_flipped_mask():
    height, width = 96, 160
    truth = preprocess.Ellipse(0.3, 0.55, 0.08, 0.12, 15.0)
    mask = preprocess.draw_ellipse(truth, height, width)
    fit = preprocess.fit_ellipse(mask)
    batch = {"image": torch.zeros(1, 1, height, width), "label": torch.from_numpy(mask).long()[None],
             "ellipse": torch.tensor([[fit.cx, fit.cy, fit.rx, fit.ry]], dtype=torch.float32)}
    out = augment_batch(batch, gen(), ONLY_FLIP)
    refit = preprocess.fit_ellipse(out["label"][0].numpy().astype(np.uint8))
    assert out["ellipse"][0, 0].item() == pytest.approx(refit.cx, abs=1e-5)
    assert out["ellipse"][0, 1].item() == pytest.approx(refit.cy, abs=1e-5)


def test_lines_are_white_four_pixels_thick_and_leave_labels_alone():
    batch = make_batch(batch_size=8, height=96, width=160)
    batch["image"] = torch.full_like(batch["image"], -1.0)
    config = AugmentConfig(p_flip=0.0, p_lines=1.0, p_blur=0.0)
    out, params = augment_batch(batch, gen(5), config, return_params=True)
    for key in ("label", "spatial_weights", "dist_map", "ellipse"):
        assert torch.equal(out[key], batch[key])
    assert bool(((params.line_count >= 1) & (params.line_count <= 9)).all())
    centre = params.centre
    assert bool((centre[:, 0] >= 0.3 * 160).all() and (centre[:, 0] <= 0.7 * 160).all())
    assert bool((centre[:, 1] >= 0.3 * 96).all() and (centre[:, 1] <= 0.7 * 96).all())
    white = out["image"][:, 0] == 1.0
    assert bool(white.any(dim=(1, 2)).all())  # every sample got lines
    assert set(out["image"].unique().tolist()) <= {-1.0, 1.0}
    # A vertical-ish line: run length across columns at the centre row is about 4 px.
    one = AugmentConfig(p_flip=0.0, p_lines=1.0, p_blur=0.0, max_lines=1)
    out, params = augment_batch({"image": torch.full((1, 1, 96, 160), -1.0)}, gen(1), one, return_params=True)
    angle = params.angles[0, 0].item()
    row = int(params.centre[0, 1].round())
    run = int((out["image"][0, 0, row] == 1.0).sum())
    expected = 4 / abs(math.sin(angle))  # horizontal run of a 4 px band at this angle
    assert abs(run - expected) <= 2 or expected > 160


def test_blur_is_a_7x7_gaussian_with_the_drawn_sigma():
    image = torch.zeros(2, 1, 21, 21)
    image[:, 0, 10, 10] = 1.0
    config = AugmentConfig(p_flip=0.0, p_lines=0.0, p_blur=1.0)
    out, params = augment_batch({"image": image}, gen(2), config, return_params=True)
    for i in range(2):
        sigma = params.sigma[i].item()
        assert 2.0 <= sigma <= 6.0
        taps = np.exp(-np.arange(-3, 4) ** 2 / (2 * sigma**2))
        taps /= taps.sum()
        expected = np.zeros((21, 21))
        expected[7:14, 7:14] = np.outer(taps, taps)
        np.testing.assert_allclose(out["image"][i, 0].numpy(), expected, atol=1e-6)
    flat = gaussian_blur(torch.ones(1, 1, 9, 9), torch.tensor([3.0]), 7)  # reflect padding keeps a flat image flat
    assert torch.allclose(flat, torch.ones(1, 1, 9, 9), atol=1e-6)


def test_probabilities_match_the_configuration():
    n = 4000
    batch = {"image": torch.zeros(n, 1, 16, 16)}
    _, params = augment_batch(batch, gen(11), AugmentConfig(), return_params=True)
    for rate, p in ((params.flip.float().mean().item(), 0.5), (params.lines.float().mean().item(), 0.2),
                    (params.blur.float().mean().item(), 0.2)):
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_same_seed_same_output_and_optional_keys():
    batch = make_batch(batch_size=6)
    a = augment_batch(batch, gen(9))
    b = augment_batch(batch, gen(9))
    c = augment_batch(batch, gen(10))
    assert all(torch.equal(a[k], b[k]) for k in batch)
    assert any(not torch.equal(a[k], c[k]) for k in batch)
    partial = {"image": batch["image"], "label": batch["label"], "ellipse": batch["ellipse"]}
    out = augment_batch(partial, gen(9))
    assert set(out) == set(partial)
    assert torch.equal(out["label"], a["label"])  # same draws, same flips
