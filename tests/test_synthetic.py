"""Checks of the synthetic IR eye-frame generator: layout, determinism, label geometry, realism."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.prep import synthetic
from common.prep.preprocess import draw_ellipse, ellipse_from_pixels

ROOT = Path(__file__).resolve().parents[1]
H, W = 160, 256  # small frames keep the tests fast; same 0.625 aspect as OpenEDS
BATCH = 40
# With seed 0, samples 0, 25 and 34 are blinks. Blinks are drawn in sample_geometry before any
# size-dependent step, so this holds at every frame size.
BLINKS_SEED0 = [0, 25, 34]


def _batch(seed=0, count=BATCH, height=H, width=W):
    return [synthetic.render_sample(np.random.default_rng([seed, i]), height, width) for i in range(count)]


@pytest.fixture(scope="module")
def batch():
    return _batch()


def _raster(ellipse, height=H, width=W) -> np.ndarray:
    cx, cy, a, b, angle = ellipse
    return draw_ellipse(ellipse_from_pixels((cx, cy), (a, b), angle, height, width), height, width) > 0


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- layout
def test_layout_dtypes_and_unlabeled_test_split(tmp_path):
    counts = synthetic.generate_raw_dataset(tmp_path, 10, seed=0, height=H, width=W)
    assert counts == {"train": 7, "validation": 2, "test": 1}
    stems = []
    for split, count in counts.items():
        images = sorted((tmp_path / split / "images").iterdir())
        assert len(images) == count and all(p.suffix == ".png" for p in images)
        for path in images:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert image.dtype == np.uint8 and image.shape == (H, W)
            stems.append(path.stem)
            label_path = tmp_path / split / "labels" / f"{path.stem}.npy"
            if split == "test":
                assert not label_path.exists()
                continue
            label = np.load(label_path, allow_pickle=False)
            assert label.dtype == np.uint8 and label.shape == (H, W)
    assert not (tmp_path / "test" / "labels").exists()
    assert stems == [f"synthetic_{i:06d}" for i in range(10)]  # train 0-6, validation 7-8, test 9
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_full_size_frames(tmp_path):
    counts = synthetic.generate_raw_dataset(tmp_path, 3, seed=5)
    assert counts == {"train": 1, "validation": 1, "test": 1}
    image = cv2.imread(str(tmp_path / "validation" / "images" / "synthetic_000001.png"), cv2.IMREAD_UNCHANGED)
    label = np.load(tmp_path / "validation" / "labels" / "synthetic_000001.npy")
    assert image.shape == label.shape == (400, 640) and image.dtype == label.dtype == np.uint8
    expected_image, expected_label, _ = synthetic.render_sample(np.random.default_rng([5, 1]))
    np.testing.assert_array_equal(image, expected_image)  # png round trip is lossless
    np.testing.assert_array_equal(label, expected_label)


@pytest.mark.parametrize(
    "n, splits, fractions, expected",
    [
        (10, ("train", "validation", "test"), (0.7, 0.2, 0.1), {"train": 7, "validation": 2, "test": 1}),
        (3, ("train", "validation", "test"), (0.7, 0.2, 0.1), {"train": 1, "validation": 1, "test": 1}),
        # 200 * 0.7 / 0.9 = 155.6 -> 156, 200 * 0.2 / 0.9 = 44.4 -> 44
        (200, ("train", "validation"), (0.7, 0.2, 0.1), {"train": 156, "validation": 44}),
        # exact 1.0 / 0.6 / 0.4: floors 1 / 0 / 0, the one left goes to the largest remainder
        (2, ("train", "validation", "test"), (0.5, 0.3, 0.2), {"train": 1, "validation": 1, "test": 0}),
        # 4 * (0.95, 0.04, 0.01) = 3.8 / 0.16 / 0.04 -> 4 / 0 / 0, then each split takes one
        (4, ("train", "validation", "test"), (0.95, 0.04, 0.01), {"train": 2, "validation": 1, "test": 1}),
        (5, ("validation",), (1.0,), {"validation": 5}),
    ],
)
def test_split_counts_hand_computed(n, splits, fractions, expected):
    assert synthetic.split_counts(n, splits, fractions) == expected


@pytest.mark.parametrize(
    "n, splits, fractions, message",
    [
        (-1, ("train",), (1.0,), "must be >= 0"),
        (5, ("train", "dev"), (0.5, 0.5), "must be distinct names"),
        (5, ("train", "train"), (0.5, 0.5), "must be distinct names"),
        (5, ("train", "validation"), (0.5, 0.3, 0.1, 0.1), "give one per split"),
        (5, ("train", "validation"), (0.0, 0.0), "positive sum"),
    ],
)
def test_bad_arguments_raise_clear_errors(n, splits, fractions, message):
    with pytest.raises(ValueError, match=message):
        synthetic.split_counts(n, splits, fractions)


def test_rerun_with_fewer_samples_removes_stale_files(tmp_path):
    synthetic.generate_raw_dataset(tmp_path, 10, seed=0, height=H, width=W)
    (tmp_path / "train" / "images" / ".tmp-123-synthetic_000000.png").write_bytes(b"partial")
    synthetic.generate_raw_dataset(tmp_path, 4, seed=0, splits=("train", "validation"), height=H, width=W)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*/*"))
    # 4 * (0.7, 0.2) / 0.9 = 3.1 / 0.9 -> 3 / 1; the test split was not requested and is left alone
    assert names == [
        "test/images/synthetic_000009.png",
        "train/images/synthetic_000000.png", "train/images/synthetic_000001.png",
        "train/images/synthetic_000002.png",
        "train/labels/synthetic_000000.npy", "train/labels/synthetic_000001.npy",
        "train/labels/synthetic_000002.npy",
        "validation/images/synthetic_000003.png", "validation/labels/synthetic_000003.npy",
    ]


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.generate_raw_dataset(tmp_path / name, 6, seed=seed, height=H, width=W)
    first, again, other = (_files(tmp_path / name) for name in "abc")
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first)


def test_sample_depends_only_on_seed_and_index(tmp_path):
    synthetic.generate_raw_dataset(tmp_path / "small", 5, seed=0, height=H, width=W)
    synthetic.generate_raw_dataset(tmp_path / "large", 30, seed=0, height=H, width=W)
    small = tmp_path / "small" / "train" / "images" / "synthetic_000002.png"
    large = tmp_path / "large" / "train" / "images" / "synthetic_000002.png"
    assert small.read_bytes() == large.read_bytes()
    image, label, _ = synthetic.render_sample(np.random.default_rng([0, 2]), H, W)
    np.testing.assert_array_equal(cv2.imread(str(small), cv2.IMREAD_UNCHANGED), image)


# sha256 of (image bytes, label bytes) of samples [0, 0]..[0, 5], per frame size, computed with the
# generator as it was before the randomized mode existed (numpy 2.4.6, opencv-python-headless
# 5.0.0.93): datasets built with the default generator must not change.
DEFAULT_GENERATOR_SHA256 = {
    (96, 160): "b7e647955a19c8e3bbcb2e3689731c75116a292c54493554d06ee21a4ec91903",
    (400, 640): "ba6ecfa5e834d371b0f294ae8991cad26bf1e57196b86286dedb73ad9d62663a",
}


@pytest.mark.parametrize("size", sorted(DEFAULT_GENERATOR_SHA256))
def test_default_generator_output_is_pinned(size):
    digest = hashlib.sha256()
    for i in range(6):
        image, label, _ = synthetic.render_sample(np.random.default_rng([0, i]), *size)
        digest.update(image.tobytes())
        digest.update(label.tobytes())
    assert digest.hexdigest() == DEFAULT_GENERATOR_SHA256[size]


# ----------------------------------------------------------------------------- labels
def test_labels_are_the_visible_parts_of_the_ellipses(batch):
    for image, label, info in batch:
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        opening = label > 0
        if info["blink"]:
            assert info["pupil"] is None and info["glints"] == 0 and not (label == 3).any()
            continue
        pupil = _raster(info["pupil"])
        iris = _raster(info["iris"])
        np.testing.assert_array_equal(label == 3, pupil & opening)
        np.testing.assert_array_equal(label == 2, iris & opening & ~pupil)
        assert (label == 3).any()


def test_blinks_are_present_and_about_six_percent(batch):
    assert [i for i, (_, _, info) in enumerate(batch) if info["blink"]] == BLINKS_SEED0
    for i in BLINKS_SEED0:
        assert not (batch[i][1] > 0).any()  # closed lids: no sclera, iris or pupil at all
    geometries = [synthetic.sample_geometry(np.random.default_rng([7, i]), H, W) for i in range(1000)]
    rate = np.mean([g.blink for g in geometries])
    assert 0.04 <= rate <= 0.08  # BLINK_PROBABILITY = 0.06; binomial sd 0.0075


def test_pupil_is_darker_than_iris(batch):
    pupil_means, iris_means = [], []
    for image, label, info in batch:
        if info["blink"]:
            continue
        pupil, iris = image[label == 3], image[label == 2]
        # medians per frame: a few saturated glints may sit on a small visible pupil
        assert np.median(pupil) + 15 < np.median(iris)
        pupil_means.append(pupil.mean())
        iris_means.append(iris.mean())
    assert np.mean(pupil_means) + 30 < np.mean(iris_means)


# ----------------------------------------------------------------------------- variation
def test_pupil_geometry_varies(batch):
    pupils = np.array([info["pupil"] for _, _, info in batch if not info["blink"]])  # (N, 5)
    cx, cy, a, b, angle = pupils.T
    assert cx.std() > 0.05 * W and cy.std() > 0.03 * H  # position
    assert a.std() > 0.1 * a.mean()  # size
    ratio = b / a
    assert ratio.min() < 0.8 and ratio.max() > 0.95  # from clearly elliptical to nearly round
    # rotation: angles spread over [0, 180); a uniform spread has sd 52 degrees
    assert angle.std() > 35 and angle.min() < 30 and angle.max() > 150


def test_glints_and_eyelid_occlusion_vary(batch):
    glints = [info["glints"] for _, _, info in batch if not info["blink"]]
    assert set(glints) == {1, 2, 3, 4}
    hidden = []
    for _, label, info in batch:
        if not info["blink"]:
            hidden.append(1.0 - (label == 3).sum() / _raster(info["pupil"]).sum())
    hidden = np.array(hidden)
    assert (hidden > 0.5).sum() >= 2  # the lid hides most of the pupil in some frames
    assert (hidden < 0.01).sum() >= len(hidden) // 2  # and none of it in most


def test_glints_are_saturated_spots_on_the_eye(batch):
    for image, label, info in batch:
        if info["blink"]:
            continue
        spots = (image >= 250).astype(np.uint8)
        _, components = cv2.connectedComponents(spots)
        on_eye = {c for c in np.unique(components[(label >= 2) & (spots > 0)])}
        assert len(on_eye) >= 1  # at least one saturated spot on the iris or pupil


# ----------------------------------------------------------------------------- realism
def test_skin_has_texture_beyond_noise_and_illumination(batch):
    for image, label, info in batch:
        skin = cv2.erode((label == 0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        frame = image.astype(np.float32)
        # band-pass: blurring at sigma 1.5 removes most sensor noise, subtracting sigma 12 removes
        # the smooth illumination; a flat background with noise leaves about 1 grey level
        texture = cv2.GaussianBlur(frame, (0, 0), 1.5) - cv2.GaussianBlur(frame, (0, 0), 12)
        assert texture[skin].std() > 3.0


def _circle_profile(image, center, radius, samples=720):
    theta = np.linspace(0.0, 2.0 * np.pi, samples, endpoint=False)
    xs = np.round(center[0] + radius * np.cos(theta)).astype(int)
    ys = np.round(center[1] + radius * np.sin(theta)).astype(int)
    return xs, ys


def test_iris_has_radial_streaks():
    """Spokes run radially: angular profiles of the iris 6 px apart in radius are correlated.

    Sensor noise blurred with sigma <= 1.7 px correlates at most exp(-6^2 / (4 * 1.7^2)) = 0.05 at
    6 px, and removing each profile's 31-sample moving average removes lid shading and
    illumination, so a flat, noisy iris would score about 0.
    """
    correlations = []
    for image, label, info in _batch(seed=1, count=8, height=400, width=640):
        if info["blink"]:
            continue
        iris, pupil = info["iris"], info["pupil"]
        radius = 0.5 * (max(pupil[2], pupil[3]) + min(iris[2], iris[3])) - 3.0
        profiles, valid = [], np.ones(720, bool)
        for r in (radius, radius + 6.0):
            xs, ys = _circle_profile(image, iris, r)
            inside = (xs >= 0) & (xs < 640) & (ys >= 0) & (ys < 400)
            xs, ys = np.clip(xs, 0, 639), np.clip(ys, 0, 399)
            valid &= inside & (label[ys, xs] == 2) & (image[ys, xs] < 240)  # iris, no glints
            values = image[ys, xs].astype(np.float64)
            trend = np.convolve(np.r_[values[-15:], values, values[:15]], np.ones(31) / 31, "valid")
            profiles.append(values - trend)
        # keep angles whose whole moving-average window saw iris pixels only
        valid &= np.convolve(np.r_[valid[-15:], valid, valid[:15]], np.ones(31), "valid") == 31
        if valid.sum() >= 200:
            correlations.append(np.corrcoef(profiles[0][valid], profiles[1][valid])[0, 1])
    assert len(correlations) >= 6
    assert np.median(correlations) > 0.3 and min(correlations) > 0.1


def test_too_small_frame_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        synthetic.render_sample(np.random.default_rng(0), 8, 8)


# ----------------------------------------------------------------------------- randomized mode
RH, RW = 160, 256
RANDOM_BATCH = 40  # per family


def _randomized(family, count=RANDOM_BATCH, seed=0, height=RH, width=RW):
    return [synthetic.render_randomized_sample(synthetic.sample_rng(seed, i, family), height, width, family)
            for i in range(count)]


@pytest.fixture(scope="module")
def randomized_batch():
    return _randomized("train") + _randomized("heldout")


@pytest.fixture(scope="module")
def scene_draws():
    """2000 scene parameter draws per family."""
    return {family: [synthetic.draw_scene_params(np.random.default_rng([11, i]), family) for i in range(2000)]
            for family in synthetic.FAMILIES}


def test_bands_hand_computed():
    bands = synthetic.Bands((0.0, 1.0, 2.0, 3.0))
    assert bands.intervals("train") == ((0.0, 1.0), (2.0, 3.0))
    assert bands.intervals("heldout") == ((1.0, 2.0),)
    rng = np.random.default_rng(0)
    held = np.array([bands.sample(rng, "heldout") for _ in range(200)])
    assert ((held >= 1.0) & (held < 2.0)).all()
    log_bands = synthetic.Bands((1.0, 10.0, 100.0), log=True)
    train = np.array([log_bands.sample(rng, "train") for _ in range(2000)])
    assert ((train >= 1.0) & (train < 10.0)).all()
    assert 0.45 < np.mean(train < math.sqrt(10.0)) < 0.55  # log-uniform: half below the geometric middle
    for edges, log in (((1.0, 2.0), False), ((1.0, 3.0, 2.0), False), ((0.0, 1.0, 2.0), True)):
        with pytest.raises(ValueError, match="increasing"):
            synthetic.Bands(edges, log)
    with pytest.raises(ValueError, match="unknown family"):
        bands.intervals("test")


def test_families_draw_disjoint_values_of_every_split_parameter(scene_draws):
    """Every split parameter of 2000 draws per family falls in that family's bands (even band
    indices for train, odd for heldout), and each family visits all of its bands."""
    config, draws = synthetic.RandomizedConfig(), scene_draws
    assert set(config.SPLIT) == {"view", "pupil_contrast", "light_direction", "light_strength", "noise",
                                 "glint_size", "blur"}
    for name in config.SPLIT:
        edges = np.asarray(getattr(config, name).edges)
        values = {family: np.array([getattr(p, name) for p in draws[family]]) for family in draws}
        for parity, family in enumerate(synthetic.FAMILIES):
            assert ((values[family] >= edges[0]) & (values[family] < edges[-1])).all(), name
            band = np.searchsorted(edges, values[family], side="right") - 1
            assert (band % 2 == parity).all(), (name, family)
            assert set(band) == set(range(parity, len(edges) - 1, 2)), (name, family)
        assert not np.isin(values["train"], values["heldout"]).any()


def test_shared_parameters_cover_the_cameras_and_eyes(scene_draws):
    params = scene_draws["train"] + scene_draws["heldout"]
    view = np.array([p.view for p in params])
    assert view.min() < 0.35 and view.max() > 2.2  # from the eye with its surroundings to the iris alone
    assert 0.11 < np.mean([p.bright_pupil for p in params]) < 0.19  # 0.15
    assert 0.06 < np.mean([p.blink for p in params]) < 0.10  # 0.08
    assert {p.lid_state for p in params} == set(synthetic.LID_STATES)
    assert {p.glint_count for p in params} == set(range(7))
    squash = np.cos(np.radians([p.off_axis_deg for p in params]))
    assert squash.min() < 0.6 and squash.max() > 0.99  # strongly elliptical to round
    dark = [p.levels for p in params if not p.bright_pupil]
    assert all(lv.iris - lv.pupil == pytest.approx(p.pupil_contrast) for p, lv in
               zip([p for p in params if not p.bright_pupil], dark))
    assert all(p.levels.pupil - p.levels.iris == pytest.approx(p.pupil_contrast)
               for p in params if p.bright_pupil)


def test_randomized_same_seed_same_frame_and_families_differ(tmp_path):
    first = synthetic.render_randomized_sample(synthetic.sample_rng(3, 5, "heldout"), 64, 96, "heldout")
    again = synthetic.render_randomized_sample(synthetic.sample_rng(3, 5, "heldout"), 64, 96, "heldout")
    other = synthetic.render_randomized_sample(synthetic.sample_rng(3, 5, "train"), 64, 96, "train")
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2]["params"] == again[2]["params"] and first[2]["params"] != other[2]["params"]
    assert not np.array_equal(first[0], other[0])
    for name in ("a", "b"):
        synthetic.generate_raw_dataset(tmp_path / name, 4, seed=3, height=64, width=96, family="train")
    synthetic.generate_raw_dataset(tmp_path / "default", 4, seed=3, height=64, width=96)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a").keys() == _files(tmp_path / "default").keys()
    assert _files(tmp_path / "a") != _files(tmp_path / "default")
    with pytest.raises(ValueError, match="unknown family"):
        synthetic.generate_raw_dataset(tmp_path / "c", 4, family="validation")
    assert not (tmp_path / "c").exists()


def test_randomized_labels_are_the_visible_parts_of_the_ellipses(randomized_batch):
    for image, label, info in randomized_batch:
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        assert info["visible_pupil"] == bool((label == 3).any())
        if info["blink"]:  # closed lids: no sclera, iris or pupil at all, and no glints
            assert info["pupil"] is None and info["glints"] == 0 and not label.any()
            continue
        opening = label > 0
        pupil, iris = _raster(info["pupil"], RH, RW), _raster(info["iris"], RH, RW)
        np.testing.assert_array_equal(label == 3, pupil & opening)
        np.testing.assert_array_equal(label == 2, iris & opening & ~pupil)


def test_randomized_labelled_pupil_is_the_dark_or_bright_disc_drawn(randomized_batch):
    """Inside the labelled pupil (3 px in from its edge) the image is darker than the iris ring
    3-6 px outside it, or brighter for a bright pupil; saturated glints left out."""
    kernel = np.ones((3, 3), np.uint8)
    checked = {True: 0, False: 0}
    for image, label, info in randomized_batch:
        pupil = (label == 3).astype(np.uint8)
        inner = (cv2.erode(pupil, kernel, iterations=3) > 0) & (image < 250)
        ring = cv2.dilate(pupil, kernel, iterations=6) > cv2.dilate(pupil, kernel, iterations=3)
        ring &= (label == 2) & (image < 250)
        if inner.sum() < 15 or ring.sum() < 15:
            continue
        params = info["params"]
        difference = float(np.median(image[inner])) - float(np.median(image[ring]))
        assert difference * (1 if params.bright_pupil else -1) > 0, (params.pupil_contrast, difference)
        checked[params.bright_pupil] += 1
    assert checked[False] >= 30 and checked[True] >= 3


def test_randomized_frames_without_a_visible_pupil():
    """Blinks (about 8%) have an all-background label; lids covering the whole pupil (about 5%)
    leave a slit of sclera and iris but no pupil. Both reach precompute as empty pupil masks."""
    blinks, covered = 0, 0
    for i in range(1000):
        rng = synthetic.sample_rng(1, i, "train")
        params = synthetic.draw_scene_params(rng, "train")
        geometry = synthetic.randomized_geometry(rng, params, 100, 160)
        label = synthetic.render_label(geometry, 100, 160)
        if params.blink:
            assert not label.any()
            blinks += 1
        elif not (label == 3).any():
            covered += 1
    assert 50 <= blinks <= 110 and 25 <= covered <= 80


def test_randomized_glints_vary_and_can_sit_on_the_pupil(randomized_batch):
    counts = [info["glints"] for _, _, info in randomized_batch if not info["blink"]]
    assert 0 in counts and max(counts) >= 5
    on_pupil = [((image >= 250) & (label == 3)).any() for image, label, _ in randomized_batch]
    assert sum(on_pupil) >= 3


def test_demo_randomized_flag_builds_its_own_cache(tmp_path):
    from common.cli import training_parser
    from common.train.data import resolve_source

    parser = training_parser("test")
    assert parser.parse_args(["--demo-randomized"]).demo_randomized == "train"
    assert not parser.parse_args([]).demo and parser.parse_args([]).demo_randomized is None
    args = parser.parse_args(["--demo-randomized", "heldout", "--demo-samples", "10",
                              "--demo-size", "32", "48", "--data-dir", str(tmp_path)])
    assert args.demo  # the flag implies --demo
    source = resolve_source(args)
    assert source == tmp_path / "demo-randomized-heldout-10-0-32x48" / "precomputed"
    manifest = json.loads((source / "manifest.json").read_text())
    assert manifest["source"] == "synthetic randomized-heldout-demo"
    path = source.parent / "raw" / "train" / "images" / "synthetic_000000.png"
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    expected, _, _ = synthetic.render_randomized_sample(synthetic.sample_rng(0, 0, "heldout"), 32, 48,
                                                        "heldout")
    np.testing.assert_array_equal(image, expected)
    with pytest.raises(SystemExit):
        parser.parse_args(["--demo-randomized", "validation"])


def _run_precompute(*args):
    return subprocess.run([sys.executable, str(ROOT / "precompute.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_precompute_randomized_end_to_end(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    # seed 0: heldout samples 0, 2 and 14 of 16 at 64x96 have no visible pupil
    result = _run_precompute("--synthetic", 16, "--randomized", "heldout", "--size", 64, 96, "--no-push",
                             "--raw-dir", raw, "--output-dir", out, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert json.loads((raw / "synthetic.json").read_text()) == {
        "n": 16, "seed": 0, "splits": ["train", "validation"], "size": [64, 96], "randomized": "heldout"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "synthetic randomized-heldout"
    empty = set()
    for split in ("train", "validation"):
        for path in (raw / split / "labels").glob("*.npy"):
            if not (np.load(path) == 3).any():
                empty.add(f"{path.stem}.png")
    assert len(empty) == 3
    assert {s["file"] for s in manifest["skipped"]} == empty
    assert all(s["reason"] == "empty pupil mask" for s in manifest["skipped"])
    assert sum(v["rows"] for v in manifest["splits"].values()) == 16 - 3
    image = cv2.imread(str(raw / "train" / "images" / "synthetic_000005.png"), cv2.IMREAD_UNCHANGED)
    expected, _, _ = synthetic.render_randomized_sample(synthetic.sample_rng(0, 5, "heldout"), 64, 96,
                                                        "heldout")
    np.testing.assert_array_equal(image, expected)


def test_precompute_randomized_needs_synthetic(capsys):
    import precompute

    with pytest.raises(SystemExit) as failed:
        precompute.main(precompute.get_args_parser().parse_args(["--randomized", "--no-push"]))
    assert failed.value.code == 1  # precompute's flag-combination errors are plain UserErrors
    assert "error: --randomized" in capsys.readouterr().err
