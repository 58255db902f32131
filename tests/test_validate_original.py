"""``precompute.py --validate`` accepts a dataset written by the original precompute.

The published ``Conner/sddec25-01`` was written by the original code: no manifest, no ``angle``
column, shards named as ``push_to_hub`` names them. Here such a dataset is written from that code's
outputs (the goldens, degenerate masks included) with ``datasets`` directly, beside the raw inputs
they came from, and validated as a user would validate the published one.
"""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from datasets import Array2D, Array3D, Dataset, Features, Value

from tests.helpers import ROOT
from tests.test_goldens import CASES

SPLITS = ("train", "validation")


def original_features(height: int, width: int) -> Features:
    """The original's schema, written out here rather than taken from common.schema."""
    return Features({
        "image": Array2D((height, width), "uint8"),
        "label": Array2D((height, width), "uint8"),
        "spatial_weights": Array2D((height, width), "float32"),
        "dist_map": Array3D((2, height, width), "float32"),
        **{name: Value("float32") for name in ("cx", "cy", "rx", "ry")},
        "filename": Value("string"),
        "preprocessed": Value("bool"),
    })


def cases_of_size(size) -> dict[str, dict]:
    return {name: case for name, case in sorted(CASES.items()) if case["raw_image"].shape == size}


def write_raw(root: Path, split: str, name: str, case: dict) -> None:
    """OpenEDS layout: {split}/images/NAME.png and {split}/labels/NAME.npy (4-class)."""
    for sub in ("images", "labels"):
        (root / split / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / split / "images" / f"{name}.png"), case["raw_image"])
    np.save(root / split / "labels" / f"{name}.npy", case["raw_label"])


def write_original_split(root: Path, split: str, cases: dict[str, dict], size) -> None:
    """One split as the original stored it: its outputs, filename = the image's file name."""
    columns = {name: [] for name in original_features(*size)}
    for name, case in cases.items():
        for column in ("image", "label", "spatial_weights", "dist_map"):
            columns[column].append(case[column])
        for column, value in zip(("cx", "cy", "rx", "ry"), case["ellipse_cx_cy_rx_ry"]):
            columns[column].append(float(value))
        columns["filename"].append(f"{name}.png")
        columns["preprocessed"].append(True)
    path = root / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=original_features(*size)).to_parquet(str(path))


def write_original_dataset(tmp_path: Path, size, tamper: str | None = None) -> tuple[Path, Path, dict]:
    """Cases alternate between train and validation; ``tamper`` names a case whose stored image
    differs from the original's output in one pixel. Returns (raw dir, dataset dir, split of each case)."""
    raw, dataset = tmp_path / "raw", tmp_path / "dataset"
    split_of = {name: SPLITS[i % 2] for i, name in enumerate(cases_of_size(size))}
    for split in SPLITS:
        cases = {}
        for name, case in cases_of_size(size).items():
            if split_of[name] != split:
                continue
            write_raw(raw, split, name, case)
            if name == tamper:
                image = case["image"].copy()
                image[size[0] // 2, size[1] // 2] ^= 1
                case = {**case, "image": image}
            cases[name] = case
        write_original_split(dataset, split, cases, size)
    return raw, dataset, split_of


def validate(raw: Path, dataset: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "precompute.py"), "--validate", "--skip-download", "--raw-dir", str(raw),
         "--output-dir", str(dataset), "--validate-samples", "100"],
        capture_output=True, text=True, env={**os.environ}, timeout=600)


def report_line(stdout: str, column: str) -> str:
    return next(line for line in stdout.splitlines() if line.split()[:1] == [column])


@pytest.mark.slow
@pytest.mark.parametrize("size", [(96, 160), (400, 640)], ids=["96x160", "400x640"])
def test_a_dataset_written_by_the_original_validates(tmp_path, size):
    raw, dataset, split_of = write_original_dataset(tmp_path, size)
    result = validate(raw, dataset)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checked rows match" in result.stdout
    for column in ("image", "label", "spatial_weights", "dist_map", "cx", "cy", "rx", "ry", "filename",
                   "preprocessed"):
        assert report_line(result.stdout, column).split()[1] == str(len(split_of))  # every row compared
        assert report_line(result.stdout, column).endswith("ok")
    assert "not stored" in report_line(result.stdout, "angle")


@pytest.mark.slow
@pytest.mark.parametrize("size", [(96, 160), (400, 640)], ids=["96x160", "400x640"])
def test_one_changed_image_pixel_fails_validation(tmp_path, size):
    tampered = next(iter(cases_of_size(size)))
    raw, dataset, _ = write_original_dataset(tmp_path, size, tamper=tampered)
    result = validate(raw, dataset)
    assert result.returncode == 1
    assert "validation failed" in result.stderr and "Traceback" not in result.stderr
    assert "MISMATCH in 1 rows" in report_line(result.stdout, "image")
    assert f"{tampered}.png: max |diff| 1" in result.stdout
    for column in ("label", "spatial_weights", "dist_map", "cx", "cy", "rx", "ry"):
        assert report_line(result.stdout, column).endswith("ok")
