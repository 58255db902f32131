"""Batched augmentation: every target flips together, lines and blur as specified, reproducible; the
groups of --augment, and for every new part: image and targets aligned, targets as precompute
would compute them for the changed label (within stated tolerances), physics as documented,
nothing changed at probability 0, replay under a seed."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from common import specs
from common.cli import training_parser
from common.prep import preprocess
from common.train import augment
from common.train.augment import (
    GROUP_PROBABILITIES,
    AugmentConfig,
    AugmentError,
    AugmentParams,
    augment_batch,
    augment_config,
    gaussian_blur,
    line_mask,
    sample_params,
)
from common.train.augment_photometric import convolve_each, disk_kernels, line_kernels
from common.train.data import to_device
from common.train.engine import OptimizerStep, augment_generator, train_one_epoch
from common.train.runtime import Runtime
from common.train.tasks import SegmentationTask
from tests.helpers import in_order_of


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These frames are tiny: a second CPU thread only adds OpenMP hand-offs, which on a busy
    machine made this module several times slower. Restored afterwards for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    expected = torch.tensor([47 / 48 - 0.25, 47 / 48 - 0.5, 47 / 48 - 0.125, 47 / 48 - 0.75],
                            dtype=torch.float64)
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
                         line_count=torch.tensor(line_count),
                         centres=torch.tensor(centres, dtype=torch.float32),
                         angles=torch.tensor(angles, dtype=torch.float32),
                         blur=torch.zeros(batch, dtype=torch.bool), sigma=torch.full((batch,), 2.0))


def test_line_mask_of_hand_placed_lines():
    # Sample 0: one active horizontal line through y = 15.5 (rows 14..17 are within 2 px); its
    # second, vertical line is inactive. Sample 1: a vertical line through x = 10.5 (columns 9..12),
    # plus a horizontal one through y = 5.5. Sample 2: not selected, so nothing is drawn.
    params = hand_params(lines=[True, True, False], line_count=[1, 2, 2],
                         centres=[[[20.0, 15.5], [30.0, 15.5]], [[10.5, 7.0], [3.0, 5.5]],
                                  [[20.0, 15.5]] * 2],
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
    out, params = augment_batch({"image": torch.full((200, 1, 64, 96), -1.0)}, gen(1), config,
                                return_params=True)
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
        np.testing.assert_allclose(blurred[i, 0].numpy(), numpy_blur(image[i, 0].double().numpy(), sigma),
                                   atol=1e-5)


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


# ============================================================================= groups and new parts
GROUPS = ("original", "photometric", "geometric", "occluders")
NEW_PARTS = {  # probability -> where its per-sample decision is in AugmentParams
    "p_warp": ("warp",), "p_eyelid": ("eyelid",), "p_eyelash": ("lashes",), "p_glints": ("glints",),
    "p_defocus": ("defocus",), "p_motion": ("motion",), "p_vignette": ("vignette",),
    "p_brightness": ("brightness",), "p_gamma": ("gamma",), "p_contrast": ("contrast",),
    "p_read_noise": ("noise", "read"), "p_shot_noise": ("noise", "shot"),
}
NONE = AugmentConfig.from_groups("none")
H, W = 96, 160


def only(**probabilities) -> AugmentConfig:
    """Every part off except the ones named (with their default ranges unless given)."""
    return dataclasses.replace(NONE, **probabilities)


def selected(params, probability: str) -> torch.Tensor:
    value = params
    for name in NEW_PARTS[probability]:
        value = getattr(value, name)
    return value.selected


def eye_batch(batch_size=6, seed=0, ellipse=False, negative=False, radius=(0.04, 0.07)):
    """Frames (H, W) = (96, 160) with a dark pupil (-0.8) in an iris (-0.1) on skin (0.3), and the
    targets precompute writes for them (``preprocess``); the last frame has no pupil if ``negative``."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(batch_size):
        pupil = preprocess.Ellipse(rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.65), rng.uniform(*radius),
                                   rng.uniform(*radius), rng.uniform(0, 180))
        iris = preprocess.draw_ellipse(preprocess.Ellipse(pupil.cx, pupil.cy, 2 * pupil.rx, 2 * pupil.rx, 0),
                                       H, W)
        mask = preprocess.draw_ellipse(pupil, H, W)
        if negative and i == batch_size - 1:
            mask[:] = 0
        image = np.where(iris > 0, -0.1, 0.3)
        images.append(np.where(mask > 0, -0.8, image))
        masks.append(mask)
    batch = {"image": torch.tensor(np.stack(images), dtype=torch.float32)[:, None],
             "label": torch.from_numpy(np.stack(masks)).long(),
             "spatial_weights": torch.from_numpy(np.stack([preprocess.spatial_weights(m) for m in masks])),
             "dist_map": torch.from_numpy(np.stack([preprocess.distance_maps(m) for m in masks]))}
    if ellipse:
        batch["ellipse"] = torch.tensor([preprocess.pupil_ellipse(m).as_tuple()[:4] for m in masks],
                                        dtype=torch.float32)
        del batch["spatial_weights"], batch["dist_map"]  # the ellipse task's batch
    return batch


def pixels(dist_map: np.ndarray) -> np.ndarray:
    """A stored distance map (2, H, W) in pixels."""
    return dist_map * math.hypot(H, W)


# ----------------------------------------------------------------------------- groups
def test_groups_are_presets_and_original_is_todays_default():
    assert AugmentConfig.from_groups("original") == AugmentConfig()
    assert set(GROUP_PROBABILITIES) == set(GROUPS) == set(specs.AUGMENT_GROUPS)
    assert not NONE.enabled and AugmentConfig().enabled
    every = AugmentConfig.from_groups("all")
    assert every == AugmentConfig.from_groups(",".join(GROUPS))
    for group, probabilities in GROUP_PROBABILITIES.items():
        config = AugmentConfig.from_groups(group)
        on = {f.name for f in dataclasses.fields(config)
              if f.name.startswith("p_") and getattr(config, f.name) > 0}
        assert on == set(probabilities), group  # a group turns on its parts and nothing else
        assert all(getattr(every, name) == p for name, p in probabilities.items())
    assert set(NEW_PARTS) | {"p_flip", "p_lines", "p_blur"} == {
        f.name for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")}
    drawn = {f.name for f in dataclasses.fields(AugmentParams)}
    assert (drawn - {"flip", "lines", "line_count", "centres", "angles", "blur", "sigma"}
            == set(augment.NEW_PARTS))
    with pytest.raises(AugmentError, match="unknown augmentation group"):
        AugmentConfig.from_groups("original,colour")


@pytest.mark.parametrize("argv, expected", [
    ([], "original"), (["--augment", "photometric,original"], "original,photometric"),
    (["--augment", "all"], "original,photometric,geometric,occluders"), (["--augment", "none"], "none"),
    (["--no-augment"], "none"), (["--augment", " geometric , occluders"], "geometric,occluders"),
])
def test_augment_flag_records_the_groups_it_runs(argv, expected):
    args = training_parser("t").parse_args(argv)
    assert args.augment == expected
    config = augment_config(args)
    assert (config is None) == (expected == "none")
    if config is not None:
        assert config == AugmentConfig.from_groups(expected)


@pytest.mark.parametrize("argv", [["--augment", "colour"], ["--augment", "none,original"], ["--augment", ","],
                                  ["--augment", "all", "--no-augment"]])
def test_bad_augment_flags_are_refused_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        training_parser("t").parse_args(argv)
    assert exit_info.value.code == 2
    assert "--augment" in capsys.readouterr().err


# ----------------------------------------------------------------------------- draws
def test_original_draws_exactly_what_it_always_drew():
    """The stream of ``original`` is today's: the same calls in the same order, nothing more, so the
    next batch of an epoch gets the same draws too; new parts draw after them."""
    batch = eye_batch(batch_size=5)
    used = gen(21)
    augment_batch(batch, used)
    today = gen(21)
    torch.rand(5, generator=today)                            # flip
    torch.rand(5, generator=today)                            # lines
    torch.randint(1, 10, (5,), generator=today)               # line count
    torch.rand(5, 9, 2, generator=today)                      # centres
    torch.rand(5, 9, generator=today)                         # angles
    torch.rand(5, generator=today)                            # blur
    torch.rand(5, generator=today)                            # sigma
    assert torch.equal(used.get_state(), today.get_state())
    _, original = augment_batch(batch, gen(21), return_params=True)
    _, everything = augment_batch(batch, gen(21), AugmentConfig.from_groups("all"), return_params=True)
    for name in ("flip", "lines", "line_count", "centres", "angles", "blur", "sigma"):
        assert torch.equal(getattr(original, name), getattr(everything, name)), name


def test_every_group_replays_under_a_seed_and_draws_a_fixed_amount():
    batch = eye_batch(batch_size=4, negative=True)
    other = eye_batch(batch_size=4, seed=5)  # other content, same shapes
    for groups in (*GROUPS, "all"):
        config = AugmentConfig.from_groups(groups)
        first, second, third = gen(3), gen(3), gen(3)
        a, b = augment_batch(batch, first, config), augment_batch(batch, second, config)
        assert all(torch.equal(a[key], b[key]) for key in batch), groups
        augment_batch(other, third, config)  # the amount drawn does not depend on the content
        assert torch.equal(first.get_state(), third.get_state()), groups
        assert not torch.equal(augment_batch(batch, gen(4), config)["image"], a["image"]), groups


@pytest.mark.parametrize("probability", sorted(NEW_PARTS))
def test_each_part_touches_only_its_drawn_samples_and_nothing_at_p0(probability):
    batch = eye_batch(batch_size=8, negative=True)
    out, params = augment_batch(batch, gen(1), only(**{probability: 0.5}), return_params=True)
    chosen = selected(params, probability)
    assert 0 < int(chosen.sum()) < 8
    assert torch.equal(same_rows(out["image"], batch["image"]), ~chosen)  # every drawn sample changes
    for key in batch:
        assert bool(same_rows(out[key], batch[key])[~chosen].all()), key  # the others are bit-identical
    untouched, reference = gen(6), gen(6)
    out = augment_batch(batch, untouched, only(**{probability: 0.0}))
    assert all(torch.equal(out[key], batch[key]) for key in batch)
    augment_batch(batch, reference, NONE)  # the original parts' draws only: a part at 0 draws nothing
    assert torch.equal(untouched.get_state(), reference.get_state())


def test_all_groups_keep_the_image_in_range_and_every_target_finite():
    batch = eye_batch(batch_size=8, negative=True)
    out = augment_batch(batch, gen(7), AugmentConfig.from_groups("all"))
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    assert set(out["label"].unique().tolist()) <= {0, 1}
    assert all(bool(torch.isfinite(out[key]).all()) for key in batch)
    assert out["dist_map"][-1].abs().max() == 0  # the frame without a pupil keeps zero maps


# ----------------------------------------------------------------------------- geometric
WARP = only(p_warp=1.0)


def test_warp_moves_the_image_and_the_label_together():
    """After any warp (zoom 0.25-3, rotation, shift) the image's dark pupil is the label's pupil:
    they differ only on the label's boundary pixels (|distance| <= 1.5 px: the pixel on either side
    of the edge, diagonals included), where bilinear sampling and the zoom-out prefilter mix the
    pupil's value with the iris'."""
    batch = eye_batch(batch_size=12)
    out, params = augment_batch(batch, gen(11), WARP, return_params=True)
    zoom, angle = params.warp.zoom, params.warp.angle
    assert zoom.min() < 0.5 and zoom.max() > 2 and angle.abs().max() > math.radians(15)  # real warps
    for i in range(12):
        label = out["label"][i].numpy().astype(np.uint8)
        assert label.any() and not (label[0].any() or label[-1].any() or label[:, 0].any()
                                    or label[:, -1].any())
        dark = out["image"][i, 0].numpy() < -0.45  # halfway between pupil (-0.8) and iris (-0.1)
        disagree = dark != label.astype(bool)
        edge = np.abs(pixels(preprocess.distance_maps(label))[1])
        assert edge[disagree].max(initial=0) <= 1.5, i
        assert disagree.sum() < 0.5 * label.sum() + 20, i


def test_warped_weights_and_distance_maps_match_precompute_on_the_warped_label():
    """Weights are recomputed exactly (float32 rounding: 1e-6). Distance maps are warped, not
    recomputed (an exact EDT on the device is not cheap), and measured against
    ``preprocess.distance_maps`` of the warped label: each pixel within 1 + z/2 px (z the zoom), the
    median within 0.5 px. Why that bound: the stored map is discrete (the edge lies half a pixel
    from the boundary pixels' values, and the source EDT of a rasterized ellipse is off its
    continuous distance by up to ~1/2 px, which the zoom scales by z), and the warped label is
    itself a nearest-neighbour raster, off by up to 1/2 px of the output; the last 1/2 px covers
    bilinear smoothing at the distance's ridges and its extension past the source frame."""
    batch = eye_batch(batch_size=8)
    out, params = augment_batch(batch, gen(12), WARP, return_params=True)
    assert params.warp.zoom.min() < 0.5 and params.warp.zoom.max() > 2
    for i in range(8):
        label = out["label"][i].numpy().astype(np.uint8)
        np.testing.assert_allclose(out["spatial_weights"][i].numpy(), preprocess.spatial_weights(label),
                                   atol=1e-6)
        error = np.abs(pixels(out["dist_map"][i].numpy()) - pixels(preprocess.distance_maps(label)))
        zoom = float(params.warp.zoom[i])
        assert error.max() <= 1 + zoom / 2, (i, zoom, error.max())
        assert np.median(error) <= 0.5, i


def test_warped_ellipse_matches_a_fit_of_the_warped_label():
    """The ellipse task's batch: no rotation, and (cx, cy, rx, ry) moved analytically equals
    ``pupil_ellipse`` of the warped label to within 1/4 + z/4 px for the centre and 1/4 + z/2 px
    for the radii (fitEllipse on a raster: its contour runs through boundary pixel centres, whose
    placement on the ellipse varies by up to half a pixel, and a zoom-in turns each source pixel
    into a z x z block, a staircase the fit follows). A radius scales about the region's edge,
    z (r + 1/2) - 1/2, not z r (the test also shows z r is worse on average). The warped pupils
    here are 3 to 20 px in radius; an empty target stays empty."""
    batch = eye_batch(batch_size=10, ellipse=True, negative=True, radius=(0.05, 0.08))
    out, params = augment_batch(batch, gen(13), WARP, return_params=True)
    assert params.warp.angle.abs().max() > 0.1  # rotations were drawn, and not applied:
    assert torch.equal(out["ellipse"][-1], torch.zeros(4))
    unit = preprocess.half_diagonal(H, W)
    errors, naive = [], []
    for i in range(9):
        fit = preprocess.pupil_ellipse(out["label"][i].numpy().astype(np.uint8))
        cx, cy, rx, ry = out["ellipse"][i].tolist()
        zoom = float(params.warp.zoom[i])
        assert abs(cx - fit.cx) * W <= 0.25 + zoom / 4 and abs(cy - fit.cy) * H <= 0.25 + zoom / 4, (i, zoom)
        fit_rx, fit_ry, _ = in_order_of(rx, ry, fit.rx, fit.ry, fit.angle)
        errors.append(max(abs(rx - fit_rx), abs(ry - fit_ry)) * unit)
        assert errors[-1] <= 0.25 + zoom / 2, (i, zoom, errors[-1])
        scaled = batch["ellipse"][i, 2:].double() * zoom
        naive.append(max(abs(scaled[0] - fit_rx), abs(scaled[1] - fit_ry)) * unit)
    assert np.mean(errors) < np.mean(naive), (errors, naive)


def test_warp_without_a_label_warps_the_image_about_the_frame_centre():
    image = torch.rand(3, 1, 32, 48, generator=gen(14)) * 2 - 1
    out = augment_batch({"image": image}, gen(15), WARP)
    assert out.keys() == {"image"} and not torch.equal(out["image"], image)
    with pytest.raises(AugmentError, match="needs batch"):
        augment_batch({"image": image, "dist_map": torch.zeros(3, 2, 32, 48)}, gen(15), WARP)


# ----------------------------------------------------------------------------- occluders
def test_eyelid_hides_the_pupil_pixels_it_covers_and_the_targets_follow():
    """The label loses exactly the pupil pixels under the lid (the visible pupil, as OpenEDS labels
    it): in each column every removed pixel lies on the lid's side of every kept one. Weights are
    recomputed exactly. Distance maps are built from the pupil's and the margin's distances (see
    ``occluded_distance``) and measured against ``preprocess.distance_maps`` of the new label:
    within 5 px of the new boundary, where the surface loss's values matter most, each pixel is
    within 3 px; elsewhere within 3 px or 12% of the distance. The remaining error is at the
    corners where the margin cuts the pupil, where the nearest visible pixel is found from the
    stored map's gradient and a straight chord."""
    batch = eye_batch(batch_size=8, radius=(0.06, 0.1))
    config = only(p_eyelid=1.0, eyelid_cover=(0.2, 0.8))
    out, params = augment_batch(batch, gen(16), config, return_params=True)
    upper = params.lid.upper
    assert 0 < int(upper.sum()) < 8
    for i in range(8):
        before, after = batch["label"][i].numpy().astype(bool), out["label"][i].numpy().astype(bool)
        lost = before & ~after
        assert not (after & ~before).any() and lost.any() and after.any(), i
        rows = np.arange(H)[:, None]
        first_kept = (np.where(after, rows, H).min(axis=0) if upper[i]
                      else np.where(after, rows, -1).max(axis=0))
        lost_rows = np.where(lost, rows, -1 if upper[i] else H)
        assert ((lost_rows.max(axis=0) < first_kept) if upper[i]
                else (lost_rows.min(axis=0) > first_kept)).all(), i
        assert (out["image"][i, 0].numpy() != batch["image"][i, 0].numpy())[lost].all(), i  # painted over
        label = after.astype(np.uint8)
        np.testing.assert_allclose(out["spatial_weights"][i].numpy(), preprocess.spatial_weights(label),
                                   atol=1e-6)
        truth = pixels(preprocess.distance_maps(label))
        error = np.abs(pixels(out["dist_map"][i].numpy()) - truth)
        near = np.abs(truth[1]) <= 5
        assert error[:, near].max() <= 3, (i, error[:, near].max())
        assert (error <= np.maximum(3, 0.12 * np.abs(truth))).all(), (i, error.max())


def test_an_eyelid_leaves_the_pupil_alone_when_the_batch_has_an_ellipse():
    """The ellipse is the fit of the visible pupil and cannot be refitted on the device, so the
    lid's margin stays off the pupil's box: label and ellipse keep every bit."""
    batch = eye_batch(batch_size=6, ellipse=True)
    out = augment_batch(batch, gen(17), only(p_eyelid=1.0, eyelid_cover=(0.3, 0.9)))
    assert torch.equal(out["label"], batch["label"]) and torch.equal(out["ellipse"], batch["ellipse"])
    changed = out["image"] != batch["image"]
    assert bool(changed.flatten(1).any(dim=1).all())
    assert not changed[:, 0][batch["label"].bool()].any()  # no pupil pixel was painted


def test_eyelashes_are_thin_dark_strokes_that_leave_the_label():
    batch = eye_batch(batch_size=6)
    out = augment_batch(batch, gen(18), only(p_eyelash=1.0))
    for key in ("label", "spatial_weights", "dist_map"):
        assert torch.equal(out[key], batch[key]), key
    darker = out["image"] < batch["image"] - 1e-6
    assert not (out["image"] > batch["image"] + 1e-6).any()  # only darkened
    share = darker.flatten(1).float().mean(dim=1)
    assert bool(((share > 0.002) & (share < 0.15)).all()), share
    # strokes: most darkened pixels have a darkened neighbour above or below (they run down)
    vertical = darker[:, :, 1:] & darker[:, :, :-1]
    assert vertical.sum() > 0.5 * darker.sum()
    assert out["image"].min() < -0.5  # dark, whatever the skin


# ----------------------------------------------------------------------------- photometric
def test_glints_are_saturated_spots_also_on_the_pupil():
    batch = eye_batch(batch_size=8)
    config = only(p_glints=1.0, glint_on_pupil=0.5)
    out, params = augment_batch(batch, gen(19), config, return_params=True)
    assert torch.equal(out["label"], batch["label"])
    assert not (out["image"] < batch["image"] - 1e-6).any()  # only brightened
    white = out["image"][:, 0] > 0.999
    assert bool(white.flatten(1).any(dim=1).all())  # every frame got a saturated spot
    on_pupil = params.glints.on_pupil & (torch.arange(config.max_glints) < params.glints.count[:, None])
    for i in range(8):
        if on_pupil[i].any():  # a glint placed on the pupil saturates pupil pixels
            assert (white[i] & batch["label"][i].bool()).any(), i
    assert bool(on_pupil.any(dim=1).sum() >= 3)


def test_disk_and_line_kernels():
    radius = torch.tensor([1.0, 2.5, 4.0])
    disks = disk_kernels(radius, 9)
    offsets = torch.arange(9.0) - 4
    distance = torch.sqrt(offsets[:, None] ** 2 + offsets[None] ** 2)
    assert torch.allclose(disks.sum(dim=(1, 2)), torch.ones(3))
    for i, r in enumerate(radius.tolist()):
        assert ((disks[i][distance >= r + 0.5] == 0).all()
                and (disks[i][distance <= r - 0.5] == disks[i, 4, 4]).all())
        assert torch.equal(disks[i], disks[i].T) and torch.equal(disks[i], disks[i].flip(0))
    length, angle = torch.tensor([5.0, 12.0, 12.0]), torch.tensor([0.0, math.pi / 6, 2.0])
    lines = line_kernels(length, angle, 15)
    assert torch.allclose(lines.sum(dim=(1, 2)), torch.ones(3))
    ys, xs = torch.meshgrid(torch.arange(15.0) - 7, torch.arange(15.0) - 7, indexing="ij")
    for i in range(3):
        w = lines[i].double()
        cov = torch.tensor([[(w * xs * xs).sum(), (w * xs * ys).sum()],
                            [(w * xs * ys).sum(), (w * ys * ys).sum()]])
        values, vectors = torch.linalg.eigh(cov)
        direction = math.atan2(vectors[1, 1], vectors[0, 1]) % math.pi
        assert abs(math.remainder(direction - angle[i].item(), math.pi)) < math.radians(2), i
        extent = math.sqrt(12 * values[1].item())  # a uniform segment of length L has variance L^2 / 12
        assert abs(extent - length[i].item()) < 1.0, (i, extent)


def test_per_sample_convolution_applies_each_kernel_as_drawn():
    image = torch.rand(2, 1, 20, 24, generator=gen(20))
    kernels = torch.rand(2, 5, 5, generator=gen(21))  # asymmetric: a flipped kernel would show
    out = convolve_each(image, kernels)
    for i in range(2):
        expected = ndimage.convolve(image[i, 0].double().numpy(), kernels[i].double().numpy(), mode="mirror")
        np.testing.assert_allclose(out[i, 0].numpy(), expected, atol=1e-5)


def flat(value: float, batch_size=4, size=(64, 96)) -> dict:
    return {"image": torch.full((batch_size, 1, *size), value)}


def test_brightness_gamma_and_contrast_act_as_documented():
    """Brightness is a gain g on linear light L = v^(1/0.8), v = (x + 1) / 2: an unsaturated
    frame becomes v g^0.8. Gamma maps v to v^gamma, contrast scales deviations from the mean."""
    out, params = augment_batch(flat(-0.5), gen(22), only(p_brightness=1.0, brightness_range=(0.5, 1.5)),
                                return_params=True)
    expected = 2 * 0.25 * params.brightness.value ** preprocess.GAMMA - 1
    assert torch.allclose(out["image"][:, 0, 5, 5], expected, atol=1e-5)
    out, params = augment_batch(flat(0.2), gen(23), only(p_gamma=1.0), return_params=True)
    assert torch.allclose(out["image"][:, 0, 5, 5], 2 * 0.6 ** params.gamma.value - 1, atol=1e-5)
    batch = eye_batch(batch_size=4)
    out, params = augment_batch(batch, gen(24), only(p_contrast=1.0), return_params=True)
    mean = batch["image"].mean(dim=(1, 2, 3), keepdim=True)
    expected = (mean + params.contrast.value.view(-1, 1, 1, 1) * (batch["image"] - mean)).clamp(-1, 1)
    assert torch.allclose(out["image"], expected, atol=1e-6)
    assert torch.allclose(out["image"].mean(dim=(1, 2, 3)), mean.flatten(), atol=1e-4)


def test_vignetting_darkens_away_from_the_drawn_optical_centre():
    out, params = augment_batch(flat(0.5, batch_size=6), gen(25), only(p_vignette=1.0), return_params=True)
    linear = ((out["image"][:, 0] + 1) / 2) ** (1 / preprocess.GAMMA)                  # (B, H, W)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(96.0), indexing="ij")
    for i in range(6):
        cx, cy = params.vignette.centre[i].tolist()
        r2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / (math.hypot(64, 96) / 2) ** 2
        expected = 0.75 ** (1 / preprocess.GAMMA) * (1 - params.vignette.strength[i] * r2)
        assert torch.allclose(linear[i], expected, atol=1e-5), i


@pytest.mark.parametrize("level", [-0.6, 0.4])
def test_sensor_noise_is_shot_plus_read_noise_in_linear_light(level):
    """Shot noise has variance shot * L, read noise read^2, in linear light: measured on flat
    frames (6144 px each) the standard deviation matches sqrt(shot L + read^2) within 6%."""
    config = only(p_shot_noise=1.0, p_read_noise=1.0, shot_noise=(0.002, 0.01), read_noise=(0.005, 0.02))
    out, params = augment_batch(flat(level, batch_size=6), gen(26), config, return_params=True)
    light = ((level + 1) / 2) ** (1 / preprocess.GAMMA)
    linear = ((out["image"][:, 0].double() + 1) / 2) ** (1 / preprocess.GAMMA)
    expected = torch.sqrt(params.noise.shot.value.double() * light + params.noise.read.value.double() ** 2)
    measured = linear.flatten(1).std(dim=1)
    assert torch.allclose(measured, expected, rtol=0.06), (measured, expected)
    assert torch.allclose(linear.flatten(1).mean(dim=1), torch.full((6,), light, dtype=torch.float64),
                          atol=3e-3)


# ----------------------------------------------------------------------------- engine and devices
class _Recorder(torch.nn.Module):
    """A 1x1 conv that keeps every input it is given."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.seen = []

    def forward(self, image):
        self.seen.append(image.detach().clone())
        return self.conv(image)


class _Loader(list):
    """What train_one_epoch uses of a DataLoader: iteration, len and sampler.set_epoch."""

    sampler = SimpleNamespace(set_epoch=lambda epoch: None)


def _cpu_batches() -> _Loader:
    """Two batches as the DataLoader yields them (uint8 image and label, float maps)."""
    batches = []
    for seed in (0, 1):
        batch = eye_batch(batch_size=3, seed=seed)
        batch["image"] = ((batch["image"][:, 0] + 1) * 127.5).round().to(torch.uint8)
        batch["label"] = batch["label"].to(torch.uint8)
        batches.append(batch)
    return _Loader(batches)


def _seen(augment, epoch: int) -> list[torch.Tensor]:
    model, cpu = _Recorder(), torch.device("cpu")
    runtime = Runtime(cpu, amp=False, compile=False, channels_last=False, pin_memory=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, _cpu_batches(), SegmentationTask(1, (H, W), cpu), optimizer,
                    OptimizerStep(runtime), runtime, epoch, seed=5, augment=augment)
    return model.seen


def test_the_engine_augments_with_the_runs_config_from_its_seed_and_epoch():
    """A resumed run restarts an epoch with the generator seeded from (seed, epoch): the model sees
    exactly the batches augment_batch makes from that generator, with the run's groups, every time."""
    config = AugmentConfig.from_groups("all")
    generator = augment_generator(5, 2, torch.device("cpu"))
    expected = [augment_batch(to_device(batch, torch.device("cpu")), generator, config)["image"]
                for batch in _cpu_batches()]
    first, again = _seen(config, epoch=2), _seen(config, epoch=2)
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, expected))
    assert all(torch.equal(a, b) for a, b in zip(again, expected))
    assert not torch.equal(_seen(config, epoch=3)[0], expected[0])
    plain = [to_device(batch, torch.device("cpu"))["image"] for batch in _cpu_batches()]
    assert all(torch.equal(a, b) for a, b in zip(_seen(None, epoch=2), plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("groups", [*GROUPS, "all"])
def test_cuda_groups_never_sync_with_the_host_and_match_the_cpu(groups):
    """On CUDA nothing waits for the device (sync debug mode raises on any synchronizing call), a
    seed replays bit for bit, and with the same draws (a CPU generator) the result is the CPU's."""
    config = AugmentConfig.from_groups(groups)
    cpu_batch = eye_batch(batch_size=8, negative=True)
    batch = {key: value.cuda() for key, value in cpu_batch.items()}
    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)  # as to_device on CUDA
    augment_batch(batch, gen(3, "cuda"), config)  # first call: cached Gaussian matrices are copied over
    first, second = gen(3, "cuda"), gen(3, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment_batch(batch, first, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    replay = augment_batch(batch, second, config)
    assert all(out[key].device.type == "cuda" and torch.equal(out[key], replay[key]) for key in batch)
    on_cuda = augment_batch(batch, gen(4), config)
    on_cpu = augment_batch(cpu_batch, gen(4), config)
    assert (on_cuda["label"].cpu() != on_cpu["label"]).float().mean() < 1e-3  # nearest ties may round apart
    for key in ("image", "spatial_weights", "dist_map"):
        close = torch.isclose(on_cuda[key].cpu(), on_cpu[key], atol=1e-3)
        assert close.float().mean() > 0.999, key
