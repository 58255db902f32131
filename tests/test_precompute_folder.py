"""precompute.py --source folder end to end: folder and CVAT imports, letterboxing, splits, resume, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import precompute
from common.prep import hub
from common.prep.preprocess import Ellipse, Letterbox, ellipse_to_pixels, fit_ellipse, unletterbox_ellipse
from common.prep.synthetic import render_sample
from common.schema import dataset_features
from tests.helpers import ROOT, load_output
from tests.hub_standin import RecordingHfApi

SOURCE_SIZE = (270, 480)  # a 16:9 webcam crop: letterboxed into 240x320 as 180x320 + 30 px bands
OUT_SIZE = (240, 320)
PUPIL_RGB = (250, 50, 83)
LABELMAP = "# label:color_rgb:parts:actions\nbackground:0,0,0::\nPupil:250,50,83::\niris:10,200,10::\n"


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--source", "folder", "--no-push",
                           "--workers", "2", *map(str, args)], capture_output=True, text=True, timeout=600)


def assert_clean_error(result, *fragments):
    """One 'error:' line naming the problem, a non-zero exit, and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def eye_frames(count, size=SOURCE_SIZE, seed=0):
    """(stem, image, OpenEDS class map) of rendered eyes with a visible pupil."""
    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < count:
        image, label, _ = render_sample(rng, *size)
        if (label == 3).sum() > 50:
            frames.append((f"frame_{len(frames):03d}", image, label))
    return frames


def write_folder(root, frames, negatives=(), mask_style="binary"):
    """DIR/images/*.png and DIR/masks/*.png; stems in ``negatives`` get no mask (empty pupil)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, image, label in frames:
        cv2.imwrite(str(root / "images" / f"{stem}.png"), image)
        if stem in negatives:
            continue
        mask = {"binary": (label == 3) * 255, "01": label == 3, "classes": label}[mask_style]
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask.astype(np.uint8))
    return root


def write_cvat(root, frames):
    """A CVAT 'Segmentation mask 1.1' export: JPEGImages/, SegmentationClass/ (RGB), labelmap.txt."""
    for sub in ("JPEGImages", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    (root / "labelmap.txt").write_text(LABELMAP)
    for stem, image, label in frames:
        cv2.imwrite(str(root / "JPEGImages" / f"{stem}.png"), image)
        rgb = np.zeros((*label.shape, 3), np.uint8)
        rgb[label == 2] = (10, 200, 10)
        rgb[label == 3] = PUPIL_RGB
        cv2.imwrite(str(root / "SegmentationClass" / f"{stem}.png"), rgb[:, :, ::-1].copy())  # stored BGR
    return root


def split_stems(root, split_file):
    return (root / "splits" / split_file).read_text().split()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """24 webcam-sized frames, 4 without a mask, imported at 240x320."""
    base = tmp_path_factory.mktemp("folder")
    frames = eye_frames(24)
    negatives = {"frame_005", "frame_011", "frame_017", "frame_023"}
    raw = write_folder(base / "raw", frames, negatives)
    out = base / "out"
    result = run_cli("--raw-dir", raw, "--output-dir", out, "--size", *OUT_SIZE, "--min-val-pos", 2,
                     "--shard-size", 8)
    assert result.returncode == 0, result.stderr
    return raw, out, result, {stem: label for stem, _, label in frames}, negatives


@pytest.mark.slow
def test_import_writes_the_openeds_schema_at_the_requested_size(imported):
    raw, out, result, _, negatives = imported
    dataset = load_output(out)
    assert dataset["train"].features == dataset_features(*OUT_SIZE)
    assert np.asarray(dataset["train"][0]["image"]).shape == OUT_SIZE
    train, val = split_stems(raw, "train.txt"), split_stems(raw, "val.txt")
    assert len(train) + len(val) == 24 and not set(train) & set(val)
    # empty masks are skipped by default, as for OpenEDS
    assert dataset["train"].num_rows == len(set(train) - negatives)
    assert dataset["validation"].num_rows == len(set(val) - negatives)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_size"] == list(OUT_SIZE)
    assert manifest["source"] == "folder:raw"
    assert {s["file"] for s in manifest["skipped"]} == {f"{stem}.png" for stem in negatives}
    assert "24 images (folder layout)" in result.stdout


@pytest.mark.slow
def test_letterbox_padding_is_recorded_and_maps_ellipses_back(imported):
    raw, out, _, labels, _ = imported
    manifest = json.loads((out / "manifest.json").read_text())
    row = load_output(out)["validation"][0]
    box = Letterbox(**manifest["letterbox"]["validation"][row["filename"]])
    assert (box.orig_h, box.orig_w, box.pad_top, box.pad_left) == (*SOURCE_SIZE, 30, 0)
    stored = Ellipse(*(row[k] for k in ("cx", "cy", "rx", "ry")), 0.0)
    back = unletterbox_ellipse(stored, box)
    original = fit_ellipse((labels[Path(row["filename"]).stem] == 3).astype(np.uint8))
    (x, y), back_axes, _ = ellipse_to_pixels(back, *SOURCE_SIZE)
    (x0, y0), original_axes, _ = ellipse_to_pixels(original, *SOURCE_SIZE)
    assert abs(x - x0) < 1.5 and abs(y - y0) < 1.5
    assert abs(max(back_axes) - max(original_axes)) < 3


def copy_import(imported, tmp_path):
    """A private copy of the imported folder and output (copytree keeps mtimes: nothing looks changed)."""
    raw, out = imported[0], imported[1]
    shutil.copytree(raw, tmp_path / "raw")
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "raw", tmp_path / "out"


@pytest.mark.slow
def test_rerun_resumes_and_redoes_only_a_relabelled_shard(imported, tmp_path):
    raw, out = copy_import(imported, tmp_path)
    args = ("--raw-dir", raw, "--output-dir", out, "--size", *OUT_SIZE, "--min-val-pos", 2, "--shard-size", 8)
    again = run_cli(*args)
    assert again.returncode == 0 and "0 shards written" in again.stdout, again.stdout + again.stderr
    mask = raw / "masks" / f"{split_stems(raw, 'train.txt')[0]}.png"
    cv2.imwrite(str(mask), cv2.flip(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED), 1))  # a new export
    relabelled = run_cli(*args)
    assert relabelled.returncode == 0, relabelled.stderr
    assert "1 shards written" in relabelled.stdout
    validated = run_cli("--raw-dir", raw, "--output-dir", out, "--validate", "--validate-samples", 50)
    assert validated.returncode == 0, validated.stdout + validated.stderr


@pytest.mark.slow
def test_validate_detects_an_image_changed_after_import(imported, tmp_path):
    raw, out = copy_import(imported, tmp_path)
    negatives = imported[4]
    stem = next(s for s in split_stems(raw, "val.txt") if s not in negatives)
    path = raw / "images" / f"{stem}.png"
    cv2.imwrite(str(path), 255 - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    result = run_cli("--raw-dir", raw, "--output-dir", out, "--validate", "--splits", "validation",
                     "--validate-samples", 50)
    assert_clean_error(result, "validation failed")
    assert f"{stem}.png" in result.stdout


@pytest.mark.slow
def test_keep_empty_keeps_images_without_mask_as_negatives(tmp_path):
    frames = eye_frames(14, seed=1)
    raw = write_folder(tmp_path / "raw", frames, negatives={"frame_000", "frame_007"}, mask_style="01")
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out", "--size", *OUT_SIZE, "--keep-empty",
                     "--min-val-pos", 1, "--val-ratio", 0.5)
    assert result.returncode == 0, result.stderr
    dataset = load_output(tmp_path / "out")
    assert dataset["train"].num_rows + dataset["validation"].num_rows == 14
    empty = [r["filename"] for split in dataset.values() for r in split if not np.asarray(r["label"]).any()]
    assert sorted(empty) == ["frame_000.png", "frame_007.png"]
    # the stratified split keeps one negative in each split at a ratio of 0.5
    assert {"frame_000", "frame_007"} & set(split_stems(raw, "val.txt"))
    assert {"frame_000", "frame_007"} & set(split_stems(raw, "train.txt"))


@pytest.mark.slow
def test_cvat_export_with_labelmap_and_existing_split_files(tmp_path):
    frames = eye_frames(10, seed=2)
    raw = write_cvat(tmp_path / "cvat", frames)
    (raw / "splits").mkdir()
    (raw / "splits" / "train.txt").write_text("\n".join(f"frame_{i:03d}" for i in range(7)) + "\n")
    (raw / "splits" / "val.txt").write_text("frame_007\nframe_008\n")  # frame_009 is left out
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out", "--size", *OUT_SIZE,
                     "--label", "pupil")
    assert result.returncode == 0, result.stderr
    dataset = load_output(tmp_path / "out")
    assert sorted(dataset["validation"]["filename"]) == ["frame_007.png", "frame_008.png"]
    assert dataset["train"].num_rows == 7
    row = dataset["train"][0]
    assert 0 < np.asarray(row["label"]).sum() and "cvat layout" in result.stdout
    assert "warning: 1 image(s) are in neither" in result.stderr  # frame_009


@pytest.mark.slow
def test_class_index_masks_at_native_size(tmp_path):
    frames = eye_frames(12, size=(160, 224), seed=3)
    raw = write_folder(tmp_path / "raw", frames, mask_style="classes")
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out", "--size", "native",
                     "--pupil-class", 3, "--min-val-pos", 2)
    assert result.returncode == 0, result.stderr
    dataset = load_output(tmp_path / "out")
    assert dataset["train"].features == dataset_features(160, 224)
    row = dataset["train"][0]
    expected = dict(frames_by_name(frames))[row["filename"]] == 3
    assert np.array_equal(np.asarray(row["label"]), expected.astype(np.uint8))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["image_size"] == [160, 224]


def frames_by_name(frames):
    return [(f"{stem}.png", label) for stem, _, label in frames]


def test_push_of_a_folder_dataset_uses_the_hub_upload(tmp_path, monkeypatch, capsys):
    raw = write_folder(tmp_path / "raw", eye_frames(12, seed=4))
    api = RecordingHfApi()
    api.failures_left = 0
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(hub, "make_hub_api", lambda token: api)
    args = precompute.get_args_parser().parse_args(
        ["--source", "folder", "--raw-dir", str(raw), "--output-dir", str(tmp_path / "out"),
         "--size", "240", "320", "--hf-repo", "team/my-eyes", "--min-val-pos", "2", "--workers", "1"])
    precompute.main(args)
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"]
    assert "manifest.json" in api.uploaded and any(f.startswith("data/validation-") for f in api.uploaded)
    assert "pushed to team/my-eyes" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_mask_of_another_size_is_an_error(tmp_path):
    raw = write_folder(tmp_path / "raw", eye_frames(12, seed=5))
    cv2.imwrite(str(raw / "masks" / "frame_004.png"), np.zeros((100, 100), np.uint8))
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out", "--min-val-pos", 2)
    assert_clean_error(result, "frame_004.png", "mask size 100x100 differs from image")


@pytest.mark.slow
def test_rgb_mask_colour_missing_from_labelmap_is_an_error(tmp_path):
    raw = write_cvat(tmp_path / "cvat", eye_frames(6, seed=6))
    mask = cv2.imread(str(raw / "SegmentationClass" / "frame_002.png"))
    mask[:5, :5] = (1, 2, 3)
    cv2.imwrite(str(raw / "SegmentationClass" / "frame_002.png"), mask)
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out", "--min-val-pos", 1)
    assert_clean_error(result, "frame_002.png", "(3,2,1)", "not in labelmap.txt")


@pytest.mark.slow
def test_split_file_stem_missing_on_disk_is_an_error(tmp_path):
    raw = write_folder(tmp_path / "raw", eye_frames(4, seed=7))
    (raw / "splits").mkdir()
    (raw / "splits" / "train.txt").write_text("frame_000\nframe_001\nframe_404\n")
    (raw / "splits" / "val.txt").write_text("frame_002\n")
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out")
    assert_clean_error(result, "train.txt lists 'frame_404'")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_split_without_positives_is_an_error(tmp_path):
    frames = eye_frames(6, seed=8)
    raw = write_folder(tmp_path / "raw", frames, negatives={"frame_004", "frame_005"})
    (raw / "splits").mkdir()
    (raw / "splits" / "train.txt").write_text("frame_000\nframe_001\nframe_002\nframe_003\n")
    (raw / "splits" / "val.txt").write_text("frame_004\nframe_005\n")
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out")
    assert_clean_error(result, "No positive samples in validation split")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--size", "native"], "native size 270x480 is not a multiple of 16"),
    (["--size", "240"], "--size takes H W"),
    (["--splits", "train", "test"], "not test"),
    (["--val-ratio", "1.5"], "--val-ratio must be between 0 and 1"),
    (["--raw-dir", "does-not-exist"], "does-not-exist does not exist"),
])
def test_bad_options_are_clear_errors(tmp_path, args, message):
    raw = write_folder(tmp_path / "raw", eye_frames(12, seed=9))
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out", "--min-val-pos", 2, *args)
    assert_clean_error(result, message)


@pytest.mark.slow
def test_native_size_needs_one_frame_size(tmp_path):
    frames = eye_frames(8, size=(160, 224), seed=10) + [
        (f"wide_{stem}", image, label) for stem, image, label in eye_frames(4, size=(160, 256), seed=11)]
    raw = write_folder(tmp_path / "raw", frames)
    result = run_cli("--raw-dir", raw, "--output-dir", tmp_path / "out", "--size", "native",
                     "--min-val-pos", 2)
    assert_clean_error(result, "--size native needs every image at 160x224")


@pytest.mark.slow
def test_native_size_is_refused_for_openeds(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "precompute.py"), "--synthetic", "4", "--no-push",
                             "--raw-dir", str(tmp_path), "--size", "native"], capture_output=True, text=True,
                            timeout=600, env={**os.environ})
    assert_clean_error(result, "--size native is for --source folder")
