"""The README's "Train on your own eye images" walkthrough, end to end on a generated video.

video -> collect_frames.py (ROI crop) -> masks (as a labelling tool would export them) ->
precompute.py --source folder at 240x320 -> train_efficientvit_local.py --dataset -> predict.py on
the video with the same ROI.
"""

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.checkpoint import load_checkpoint
from common.prep.synthetic import render_sample
from tests.helpers import ROOT, clean_env

VIDEO_SIZE = (300, 520)  # H, W of the recording
ROI = (20, 15, 480, 270)  # X, Y, W, H: the eye region, 16:9, not a multiple of 16
N_FRAMES = 24

pytestmark = pytest.mark.slow  # every test reads what the walkthrough's script runs left


def run(script, *args):
    env = clean_env()
    env.pop("DISPLAY", None)
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{script}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def write_video(path: Path) -> dict[int, np.ndarray]:
    """An MJPG video of rendered eyes inside a larger frame; returns each frame's OpenEDS labels."""
    rng = np.random.default_rng(0)
    x, y, w, h = ROI
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, VIDEO_SIZE[::-1])
    assert writer.isOpened()
    labels = {}
    for index in range(N_FRAMES):
        image, label, _ = render_sample(rng, h, w)
        frame = np.full(VIDEO_SIZE, 40, np.uint8)
        frame[y:y + h, x:x + w] = image
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
        labels[index] = label
    writer.release()
    return labels


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    base = tmp_path_factory.mktemp("walkthrough")
    video = base / "eye.avi"
    labels = write_video(video)
    run("collect_frames.py", video, "--dataset", base / "frames", "--every", 1, "--grayscale",
        "--roi", *ROI)
    folder = base / "frames" / "eye"
    (folder / "masks").mkdir()
    for image in sorted((folder / "images").glob("*.png")):  # eye_000007.png -> frame 7
        pupil = labels[int(image.stem.rsplit("_", 1)[1])] == 3
        if pupil.any():  # a blink stays unlabelled: an empty mask
            cv2.imwrite(str(folder / "masks" / image.name), pupil.astype(np.uint8) * 255)
    imported = run("precompute.py", "--source", "folder", "--raw-dir", folder, "--size", 240, 320,
                   "--output-dir", base / "data", "--no-push", "--min-val-pos", 2, "--workers", 2)
    trained = run("train_efficientvit_local.py", "--dataset", base / "data", "--epochs", 1, "--batch-size", 4,
                  "--num-workers", 0, "--data-dir", base / "cache", "--output-dir", base / "run")
    predicted = run("predict.py", "--model", base / "run" / "best_efficientvit_model.pt", "--input", video,
                    "--roi", *ROI, "--every", 4, "--output-dir", base / "pred")
    return base, imported, trained, predicted


def test_frames_are_collected_and_imported(walkthrough):
    base, imported, _, _ = walkthrough
    assert len(list((base / "frames" / "eye" / "images").glob("*.png"))) == N_FRAMES
    assert (base / "frames" / "eye" / "splits" / "val.txt").is_file()
    assert "train:" in imported.stdout and "validation:" in imported.stdout


def test_training_takes_the_non_default_size_and_announces_the_best_model(walkthrough):
    base, _, trained, _ = walkthrough
    assert "epoch   1/1 |" in trained.stdout
    assert "saved new best model" in trained.stdout
    checkpoint = load_checkpoint(base / "run" / "best_efficientvit_model.pt")
    assert checkpoint["model_config"]["input_size"] == [240, 320]
    assert (base / "run" / "best_efficientvit_model.onnx").is_file()


def test_prediction_on_the_video_uses_the_roi(walkthrough):
    base, _, _, predicted = walkthrough
    masks = sorted((base / "pred" / "masks").glob("*.png"))
    assert [m.stem for m in masks] == [f"eye_{i:06d}" for i in range(0, N_FRAMES, 4)]
    assert cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED).shape == (ROI[3], ROI[2])  # the crop's size
    with open(base / "pred" / "ellipses.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(masks) and f"{len(masks)} frames" in predicted.stdout
    x, y, w, h = ROI
    for row in (r for r in rows if r["found"] == "1"):  # centres in full-frame pixels, inside the ROI
        assert x <= float(row["cx_px"]) <= x + w and y <= float(row["cy_px"]) <= y + h
