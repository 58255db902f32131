"""Batched augmentation: every target flips together, lines and blur as specified, reproducible."""

import math

import numpy as np
import pytest
import torch

from common import preprocess
from common.augment import (
    AugmentConfig,
    AugmentError,
    AugmentParams,
    augment_batch,
    gaussian_blur,
    line_mask,
    sample_params,
)

ONLY_FLIP = AugmentConfig(p_flip=1.0, p_lines=0.0, p_blur=0.0)
ONLY_LINES = AugmentConfig(p_flip=0.0, p_lines=1.0, p_blur=0.0)
ONLY_BLUR = AugmentConfig(p_flip=0.0, p_lines=0.0, p_blur=1.0)
NOTHING = AugmentConfig(p_flip=0.0, p_lines=0.0, p_blur=0.0)
TARGETS = ("image", "label", "spatial_weights", "dist_map")


def make_batch(batch_size=4, height=32, width=48, seed=0):
    """Asymmetric random targets: a flip that misses any key, or any sample, is visible."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch_size, 1, height, width, generator=g) * 2 - 1,
        "label": (torch.rand(batch_size, height, width, generator=g) > 0.5).long(),
        "spatial_weights": torch.rand(batch_size, height, width, generator=g),
        "dist_map": torch.rand(batch_size, 2, height, width, generator=g),
        "ellipse": torch.rand(batch_size, 4, generator=g),
    }


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def same_rows(a, b):
    """(B,) bool: sample i of a equals sample i of b exactly."""
    return (a == b).flatten(1).all(dim=1)


# ----------------------------------------------------------------------------- flip
def test_flip_with_p1_flips_every_target_and_moves_cx_by_the_pixel_centre_convention():
    batch = make_batch()
    batch["ellipse"][:, 0] = torch.tensor([0.25, 0.5, 0.125, 0.75])
    out = augment_batch(batch, gen(), ONLY_FLIP)
    for key in TARGETS:
        assert torch.equal(out[key], torch.flip(batch[key], dims=[-1])), key
    # W = 48: column x -> 47 - x, so cx = x / 48 -> 47 / 48 - cx.
    expected = torch.tensor([47 / 48 - 0.25, 47 / 48 - 0.5, 47 / 48 - 0.125, 47 / 48 - 0.75], dtype=torch.float64)
    assert (out["ellipse"][:, 0].double() - expected).abs().max().item() < 1e-7
    assert torch.equal(out["ellipse"][:, 1:], batch["ellipse"][:, 1:])


def test_flip_with_p0_changes_nothing():
    batch = make_batch()
    out = augment_batch(batch, gen(), NOTHING)
    assert out is not batch and set(out) == set(batch)
    for key in batch:
        assert torch.equal(out[key], batch[key]), key


def test_random_flip_decisions_agree_across_all_targets():
    batch = make_batch(batch_size=64)
    out, params = augment_batch(batch, gen(3), AugmentConfig(p_flip=0.5, p_lines=0.0, p_blur=0.0),
                                return_params=True)
    decisions = {}
    for key in TARGETS:
        flipped = same_rows(out[key], batch[key].flip(-1))
        untouched = same_rows(out[key], batch[key])
        assert bool((flipped ^ untouched).all()), key  # each sample is flipped or left alone, never half
        decisions[key] = flipped
    decisions["cx"] = out["ellipse"][:, 0] != batch["ellipse"][:, 0]
    assert torch.equal(out["ellipse"][:, 1:], batch["ellipse"][:, 1:])
    reference = decisions["image"]
    assert 10 < int(reference.sum()) < 54  # both decisions occur
    assert torch.equal(reference, params.flip)
    for key, flipped in decisions.items():
        assert torch.equal(flipped, reference), key


def test_flipped_cx_matches_a_fit_of_the_flipped_mask_at_full_resolution():
    height, width = 400, 640
    truth = preprocess.Ellipse(0.31, 0.56, 0.07, 0.11, 20.0)  # off-centre, tilted
    mask = preprocess.draw_ellipse(truth, height, width)
    fit = preprocess.fit_ellipse(mask)
    batch = {"image": torch.zeros(1, 1, height, width), "label": torch.from_numpy(mask).long()[None],
             "ellipse": torch.tensor([[fit.cx, fit.cy, fit.rx, fit.ry]], dtype=torch.float32)}
    out = augment_batch(batch, gen(), ONLY_FLIP)
    refit = preprocess.fit_ellipse(out["label"][0].numpy().astype(np.uint8))
    cx, cy, rx, ry = out["ellipse"][0].tolist()
    assert cx == pytest.approx(refit.cx, abs=1e-6)
    assert cy == pytest.approx(refit.cy, abs=1e-6)
    assert (rx, ry) == pytest.approx((refit.rx, refit.ry), abs=1e-6)
    # The naive 1 - cx is off by one pixel (1 / W), far beyond the tolerance above.
    assert abs((1 - fit.cx) - refit.cx) == pytest.approx(1 / width, abs=1e-6)


# ----------------------------------------------------------------------------- lines
def hand_params(lines, line_count, centres, angles):
    batch = len(lines)
    return AugmentParams(flip=torch.zeros(batch, dtype=torch.bool), lines=torch.tensor(lines),
                         line_count=torch.tensor(line_count), centres=torch.tensor(centres, dtype=torch.float32),
                         angles=torch.tensor(angles, dtype=torch.float32),
                         blur=torch.zeros(batch, dtype=torch.bool), sigma=torch.full((batch,), 2.0))


def test_line_mask_of_hand_placed_lines():
    # Sample 0: one active horizontal line through y = 15.5 (rows 14..17 are within 2 px); its
    # second, vertical line is inactive. Sample 1: a vertical line through x = 10.5 (columns 9..12),
    # plus a horizontal one through y = 5.5. Sample 2: not selected, so nothing is drawn.
    params = hand_params(lines=[True, True, False], line_count=[1, 2, 2],
                         centres=[[[20.0, 15.5], [30.0, 15.5]], [[10.5, 7.0], [3.0, 5.5]], [[20.0, 15.5]] * 2],
                         angles=[[0.0, math.pi / 2], [math.pi / 2, 0.0], [0.0, 0.0]])
    mask = line_mask(params, 32, 48, thickness=4.0)
    expected = torch.zeros(3, 1, 32, 48, dtype=torch.bool)
    expected[0, 0, 14:18, :] = True
    expected[1, 0, :, 9:13] = True
    expected[1, 0, 4:8, :] = True
    assert torch.equal(mask, expected)


def test_lines_are_white_follow_the_drawn_geometry_and_leave_labels_alone():
    batch = make_batch(batch_size=8, height=96, width=160)
    batch["image"] = torch.full_like(batch["image"], -1.0)
    out, params = augment_batch(batch, gen(5), ONLY_LINES, return_params=True)
    for key in ("label", "spatial_weights", "dist_map", "ellipse"):
        assert torch.equal(out[key], batch[key]), key
    assert bool(((params.line_count >= 1) & (params.line_count <= 9)).all())
    x, y = params.centres[..., 0], params.centres[..., 1]  # (B, 9)
    assert bool(((x >= 0.3 * 160) & (x <= 0.7 * 160) & (y >= 0.3 * 96) & (y <= 0.7 * 96)).all())
    assert set(out["image"].unique().tolist()) == {-1.0, 1.0}
    # Independent float64 geometry: distance of every pixel to every active line.
    ys, xs = np.mgrid[0:96, 0:160].astype(np.float64)
    for i in range(8):
        distance = np.full((96, 160), np.inf)
        for line in range(int(params.line_count[i])):
            cx, cy = params.centres[i, line].double().tolist()
            a = params.angles[i, line].double().item()
            distance = np.minimum(distance, np.abs((xs - cx) * math.sin(a) - (ys - cy) * math.cos(a)))
        white = out["image"][i, 0].numpy() == 1.0
        assert white[distance < 2 - 1e-4].all() and not white[distance > 2 + 1e-4].any(), i


def test_lines_are_about_four_pixels_thick_across_a_near_horizontal_line():
    config = AugmentConfig(p_flip=0.0, p_lines=1.0, p_blur=0.0, max_lines=1)
    out, params = augment_batch({"image": torch.full((200, 1, 64, 96), -1.0)}, gen(1), config, return_params=True)
    near_horizontal = (params.angles[:, 0].cos().abs() > 0.98).nonzero().flatten().tolist()
    assert len(near_horizontal) >= 5
    runs = []
    for i in near_horizontal:
        column = int(params.centres[i, 0, 0].round())
        rows = (out["image"][i, 0, :, column] == 1.0).nonzero().flatten()
        # The band is 4 / |cos a| in [4, 4.09] px tall here: 4 or 5 whole rows, in one run.
        assert len(rows) in (4, 5), (i, rows)
        assert int(rows[-1] - rows[0]) == len(rows) - 1
        runs.append(len(rows))
    # Band offsets are random, so on average a band of height h covers h rows: about 4, not 5.
    assert 3.6 < np.mean(runs) < 4.5, runs


def test_lines_only_touch_selected_samples_and_p0_changes_nothing():
    batch = make_batch(batch_size=32)
    out, params = augment_batch(batch, gen(4), AugmentConfig(p_flip=0.0, p_lines=0.5, p_blur=0.0),
                                return_params=True)
    unchanged = same_rows(out["image"], batch["image"])
    assert 0 < int(params.lines.sum()) < 32
    assert torch.equal(unchanged, ~params.lines)
    out = augment_batch(batch, gen(4), NOTHING)
    assert torch.equal(out["image"], batch["image"])


# ----------------------------------------------------------------------------- blur
def numpy_blur(image, sigma):
    """7x7 Gaussian with reflect padding, written directly as a 2-D sum."""
    taps = np.exp(-np.arange(-3, 4) ** 2 / (2 * sigma**2))
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    padded = np.pad(image, 3, mode="reflect")
    height, width = image.shape
    return sum(kernel[i, j] * padded[i:i + height, j:j + width] for i in range(7) for j in range(7))


def test_blur_of_an_impulse_is_a_7x7_gaussian_with_the_drawn_sigma():
    image = torch.zeros(3, 1, 21, 21)
    image[:, 0, 10, 10] = 1.0
    out, params = augment_batch({"image": image}, gen(2), ONLY_BLUR, return_params=True)
    assert len(set(params.sigma.tolist())) == 3  # per-sample sigmas
    for i in range(3):
        sigma = params.sigma[i].item()
        assert 2.0 <= sigma <= 6.0
        taps = np.exp(-np.arange(-3, 4) ** 2 / (2 * sigma**2))
        expected = np.zeros((21, 21))
        expected[7:14, 7:14] = np.outer(taps, taps) / taps.sum() ** 2
        np.testing.assert_allclose(out["image"][i, 0].numpy(), expected, atol=1e-6)


def test_blur_pads_by_reflection_at_the_border():
    image = torch.rand(2, 1, 12, 17, generator=gen(6)) * 2 - 1
    blurred = gaussian_blur(image, torch.tensor([2.0, 5.5]), 7)
    for i, sigma in enumerate((2.0, 5.5)):
        np.testing.assert_allclose(blurred[i, 0].numpy(), numpy_blur(image[i, 0].double().numpy(), sigma), atol=1e-5)


def test_blur_only_touches_selected_samples_and_p0_changes_nothing():
    batch = make_batch(batch_size=32)
    out, params = augment_batch(batch, gen(7), AugmentConfig(p_flip=0.0, p_lines=0.0, p_blur=0.5),
                                return_params=True)
    assert 0 < int(params.blur.sum()) < 32
    assert torch.equal(same_rows(out["image"], batch["image"]), ~params.blur)
    assert torch.equal(augment_batch(batch, gen(7), NOTHING)["image"], batch["image"])


def test_lines_are_drawn_before_the_blur():
    image = torch.full((2, 1, 32, 48), -1.0)
    config = AugmentConfig(p_flip=0.0, p_lines=1.0, p_blur=1.0)
    out, params = augment_batch({"image": image}, gen(8), config, return_params=True)
    painted = image.masked_fill(line_mask(params, 32, 48, 4.0), 1.0)
    assert torch.equal(out["image"], gaussian_blur(painted, params.sigma, 7))
    assert out["image"].max().item() < 1.0  # blurred occluders are no longer pure white


# ----------------------------------------------------------------------------- draws
def test_rates_and_ranges_match_the_configuration():
    n = 4000
    params = sample_params(n, 40, 60, gen(11))
    for drawn, p in ((params.flip, 0.5), (params.lines, 0.2), (params.blur, 0.2)):
        rate = drawn.float().mean().item()
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    counts = torch.bincount(params.line_count, minlength=10)
    assert counts[0].item() == 0 and counts[1:].sum().item() == n
    assert bool((counts[1:] - n / 9).abs().max() < 5 * math.sqrt(n * (1 / 9) * (8 / 9)))
    assert 2.0 <= params.sigma.min().item() and params.sigma.max().item() <= 6.0
    assert abs(params.sigma.mean().item() - 4.0) < 5 * (4 / math.sqrt(12)) / math.sqrt(n)
    assert 0.0 <= params.angles.min().item() and params.angles.max().item() < math.pi


def test_same_seed_replays_and_another_seed_differs():
    batch = make_batch(batch_size=16)
    a = augment_batch(batch, gen(9))
    b = augment_batch(batch, gen(9))
    c = augment_batch(batch, gen(10))
    assert all(torch.equal(a[key], b[key]) for key in batch)
    assert not torch.equal(a["image"], c["image"])
    # One generator across calls continues the stream: a second batch gets new draws.
    g = gen(9)
    first, second = augment_batch(batch, g), augment_batch(batch, g)
    assert torch.equal(first["image"], a["image"]) and not torch.equal(second["image"], a["image"])


def test_optional_keys_may_be_absent():
    batch = make_batch(batch_size=6)
    full = augment_batch(batch, gen(9))
    partial = {key: batch[key] for key in ("image", "label", "ellipse")}
    out = augment_batch(partial, gen(9))
    assert set(out) == set(partial)
    for key in partial:
        assert torch.equal(out[key], full[key]), key  # same draws, same result
    image_only = augment_batch({"image": batch["image"]}, gen(9))
    assert set(image_only) == {"image"} and torch.equal(image_only["image"], full["image"])


def test_inputs_are_not_modified():
    batch = make_batch(batch_size=8)
    before = {key: value.clone() for key, value in batch.items()}
    augment_batch(batch, gen(1), AugmentConfig(p_flip=1.0, p_lines=1.0, p_blur=1.0))
    for key in batch:
        assert torch.equal(batch[key], before[key]), key


@pytest.mark.parametrize("kwargs", [{"p_flip": 1.5}, {"p_blur": -0.1}, {"max_lines": 0}, {"blur_kernel": 6},
                                    {"blur_sigma": (3.0, 2.0)}, {"centre_range": (0.2, 1.2)}])
def test_bad_configuration_is_refused(kwargs):
    with pytest.raises(AugmentError):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize("batch, message", [
    ({"label": torch.zeros(2, 32, 48)}, "image"),
    ({"image": torch.zeros(2, 32, 48)}, "image"),
    ({"image": torch.zeros(2, 1, 3, 48)}, "too small"),
    ({"image": torch.zeros(2, 1, 32, 48), "ellipse": torch.zeros(2, 5)}, "ellipse"),
])
def test_bad_batch_is_refused(batch, message):
    with pytest.raises(AugmentError, match=message):
        augment_batch(batch, gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_cuda_batches_replay_and_flip_consistently(generator_device):
    batch = {key: value.cuda() for key, value in make_batch(batch_size=64).items()}
    config = AugmentConfig(p_flip=0.5, p_lines=0.2, p_blur=0.2)
    a, params = augment_batch(batch, gen(3, generator_device), config, return_params=True)
    b = augment_batch(batch, gen(3, generator_device), config)
    assert all(a[key].device.type == "cuda" and torch.equal(a[key], b[key]) for key in batch)
    for key in ("label", "spatial_weights", "dist_map"):
        assert torch.equal(same_rows(a[key], batch[key].flip(-1)), params.flip), key
