"""Malformed inputs to precompute.py (OpenEDS and folder layouts) and predict.py: each is a counted
skip or one clear line, never a traceback, and what an earlier run wrote is kept."""

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from common.checkpoint import save_checkpoint
from common.models import build_model
from tests.faults.runs import the_error_line
from tests.helpers import ROOT, run

H, W = 64, 96


def _good(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = np.zeros((H, W), np.uint8)
    cy, cx = 24 + rng.integers(0, 16), 36 + rng.integers(0, 24)
    cv2.ellipse(label, (int(cx), int(cy)), (9, 7), 0, 0, 360, 3, -1)
    image = np.full((H, W), 150, np.uint8)
    image[label == 3] = 20
    return image, label


def write_bad_images(folder: Path) -> list[str]:
    """Every malformed image file of the fuzz set in ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = set(folder.iterdir())
    png = cv2.imencode(".png", _good(0)[0])[1].tobytes()
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "random_bytes.png").write_bytes(np.random.default_rng(1).bytes(4000))
    (folder / "truncated_body.png").write_bytes(png[: len(png) // 2])
    (folder / "not_an_image.png").write_text("id,name\n1,eye\n")
    deep = (np.random.default_rng(2).random((H, W)) * 65535).astype(np.uint16)
    cv2.imwrite(str(folder / "sixteen_bit.png"), deep)
    Image.fromarray(np.zeros((H, W, 4), np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(_good(3)[0]).convert("P").save(folder / "palette.png")
    cv2.imwrite(str(folder / "one_pixel.png"), np.zeros((1, 1), np.uint8))
    cv2.imwrite(str(folder / "huge.png"), np.zeros((10000, 10000), np.uint8))
    (folder / "a_folder.png").mkdir()
    return sorted(p.name for p in set(folder.iterdir()) - existing)


def _precompute(*args):
    return run([sys.executable, ROOT / "precompute.py", *args, "--no-push", "--workers", "1", "--size", H, W])


def _openeds(raw: Path) -> None:
    for split, count in (("train", 6), ("validation", 3)):
        (raw / split / "images").mkdir(parents=True, exist_ok=True)
        (raw / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = _good(10 * i + len(split))
            cv2.imwrite(str(raw / split / "images" / f"{split}_{i}.png"), image)
            np.save(raw / split / "labels" / f"{split}_{i}.npy", label)


def _rows(out: Path) -> dict:
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    return {split: entry["rows"] for split, entry in splits.items()}


def _skipped(out: Path) -> set[str]:
    return {entry["file"] for entry in json.loads((out / "manifest.json").read_text())["skipped"]}


@pytest.mark.slow
def test_precompute_openeds_layout_skips_and_counts_bad_inputs(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _openeds(raw)
    first = _precompute("--skip-download", "--raw-dir", raw, "--output-dir", out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _rows(out)
    bad = write_bad_images(raw / "train" / "images")
    for name in bad:  # each image gets a valid label, so only the image is at fault
        np.save(raw / "train" / "labels" / f"{Path(name).stem}.npy", _good(0)[1])
    cv2.imwrite(str(raw / "train" / "images" / "nan_label.png"), _good(4)[0])
    np.save(raw / "train" / "labels" / "nan_label.npy", np.full((H, W), np.nan, np.float32))
    result = _precompute("--skip-download", "--raw-dir", raw, "--output-dir", out)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _rows(out) == before  # the good frames are all still there
    assert _skipped(out) == {*bad, "nan_label.png"}


@pytest.mark.slow
def test_precompute_folder_layout_skips_and_counts_bad_inputs(tmp_path):
    raw, out = tmp_path / "eyes", tmp_path / "out"
    (raw / "masks").mkdir(parents=True)
    (raw / "images").mkdir()
    for i in range(12):
        image, label = _good(i)
        cv2.imwrite(str(raw / "images" / f"eye_{i:02d}.png"), image)
        cv2.imwrite(str(raw / "masks" / f"eye_{i:02d}.png"), (label == 3).astype(np.uint8) * 255)
    bad = write_bad_images(raw / "images")  # no mask: each would be an empty frame if it could be read
    args = ["--source", "folder", "--raw-dir", raw, "--output-dir", out, "--min-val-pos", "1"]
    first = _precompute(*args)
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert sum(_rows(out).values()) == 12 and _skipped(out) == set(bad)
    shards = {p.name: p.read_bytes() for p in (out / "data").glob("*.parquet")}
    again = _precompute(*args)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert {p.name: p.read_bytes() for p in (out / "data").glob("*.parquet")} == shards


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.pt"
    save_checkpoint(path, model=build_model("efficientvit_micro"), input_size=(H, W))
    return path


@pytest.mark.slow
def test_predict_on_a_folder_skips_bad_files_and_counts_them(model_file, tmp_path):
    frames = tmp_path / "frames"
    bad = write_bad_images(frames)
    cv2.imwrite(str(frames / "good.png"), _good(5)[0])
    result = run([sys.executable, ROOT / "predict.py", "--model", model_file, "--input", frames,
                  "--output-dir", tmp_path / "out"])
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "out" / "masks" / "good.png").is_file()
    assert len(bad) == 10
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped ")]
    assert f", {len(warnings)} unreadable files skipped" in result.stdout  # every skip is counted
    assert any("a_folder.png is a folder, not an image" in line for line in warnings)
    assert any("zero_bytes.png" in line for line in warnings)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero_bytes.png", "random_bytes.png", "truncated_body.png",
                                  "not_an_image.png", "sixteen_bit.png", "rgba.png", "a_folder.png"])
def test_predict_on_one_bad_file_is_one_line(name, model_file, tmp_path):
    write_bad_images(tmp_path / "frames")
    result = run([sys.executable, ROOT / "predict.py", "--model", model_file, "--input",
                  tmp_path / "frames" / name, "--output-dir", tmp_path / "out"])
    assert result.returncode != 0
    assert name in the_error_line(result)
