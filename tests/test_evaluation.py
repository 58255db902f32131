"""evaluate.py end to end on a tiny trained model: the summary line, frames.csv, the worst-frames
picture, agreement with the training script's --test-only, and .pt against its ONNX export."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import evaluate
from common.checkpoint import save_checkpoint
from common.models import build_model
from tests.test_training import ROOT, clean_env

TINY = ["--demo", "--demo-samples", "24", "--demo-size", "32", "48", "--batch-size", "4",
        "--num-workers", "0"]
STEM = "efficientvit_tiny_model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the Micro segmenter on the tiny demo: best .pt and its ONNX export."""
    root = tmp_path_factory.mktemp("evaluate")
    command = [sys.executable, str(ROOT / "train_efficientvit_tiny_local.py"), *TINY, "--epochs", "1",
               "--data-dir", str(root / "data"), "--output-dir", str(root / "run")]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root


def split_rows(trained, split: str) -> int:
    """Rows of ``split`` in the demo dataset, from its manifest (a blink-like empty frame is skipped)."""
    manifest = next((trained / "data").glob("demo-*/precomputed/manifest.json"))
    return json.loads(manifest.read_text())["splits"][split]["rows"]


def run_evaluate(trained, model, out, *extra, capsys):
    """evaluate.main in this process (the script's wiring; a subprocess would only add start-up)."""
    argv = ["--model", str(model), *TINY, "--data-dir", str(trained / "data"), "--output-dir", str(out),
            *extra]
    metrics = evaluate.main(evaluate.get_args_parser().parse_args(argv))
    return metrics, capsys.readouterr().out


def parse_summary(stdout: str) -> dict[str, float]:
    """'evaluation validation | frames 5 | ... | missed 0' -> {"frames": 5.0, ...}."""
    lines = [line for line in stdout.splitlines() if line.startswith("evaluation ")]
    assert len(lines) == 1, stdout
    fields = [part.rsplit(" ", 1) for part in lines[0].split(" | ")[1:]]
    return {name: float(value) for name, value in fields}


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_summary_csv_and_picture(trained, tmp_path, capsys):
    metrics, stdout = run_evaluate(trained, trained / "run" / f"best_{STEM}.pt", tmp_path, capsys=capsys)
    summary = parse_summary(stdout)
    assert list(summary) == ["frames", "without_pupil", "pupil_iou", "pupil_iou_mean", "pupil_iou_median",
                             "pupil_iou_p10", "miou", "center_error_px", "center_error_median_px",
                             "detection_rate_5px", "missed"]
    assert summary["frames"] == split_rows(trained, "validation") and summary["without_pupil"] == 0
    assert summary["miou"] == pytest.approx(metrics["iou"], abs=5e-5)
    rows = read_rows(tmp_path / "frames.csv")
    assert (len(rows) == split_rows(trained, "validation")
            and [int(r["row"]) for r in rows] == list(range(len(rows))))
    assert all(r["filename"].endswith(".png") for r in rows)
    ious = np.array([float(r["pupil_iou"]) for r in rows])
    assert summary["pupil_iou_median"] == pytest.approx(np.median(ious), abs=1e-4)
    detected = [int(r["detected"]) for r in rows if r["detected"] != ""]
    assert summary["detection_rate_5px"] == pytest.approx(sum(detected) / len(detected), abs=5e-4)
    for row in rows:  # a centre error exactly where both centres are given, equal to their distance
        if row["center_error_px"]:
            dx = float(row["pred_cx_px"]) - float(row["true_cx_px"])
            dy = float(row["pred_cy_px"]) - float(row["true_cy_px"])
            assert float(row["center_error_px"]) == pytest.approx(np.hypot(dx, dy), abs=0.01)
    assert (tmp_path / "worst_frames.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["split"] == "validation"
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_same_figures_as_the_training_test_only(trained, tmp_path, capsys):
    checkpoint = trained / "run" / f"best_{STEM}.pt"
    command = [sys.executable, str(ROOT / "train_efficientvit_tiny_local.py"), *TINY, "--data-dir",
               str(trained / "data"), "--output-dir", str(tmp_path / "test-only"), "--test-only", "--resume",
               str(checkpoint)]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("test-only "))
    training = json.loads(line.removeprefix("test-only "))
    metrics, _ = run_evaluate(trained, checkpoint, tmp_path / "eval", capsys=capsys)
    for key in ("iou", "pupil_iou", "pupil_iou_median", "pupil_iou_p10", "center_error_px",
                "detection_rate_5px", "missed"):
        assert metrics[key] == pytest.approx(training[f"valid_{key}"], rel=1e-9, nan_ok=True), key


@pytest.mark.slow
def test_onnx_export_agrees_with_the_checkpoint(trained, tmp_path, capsys):
    run = trained / "run"
    pt, _ = run_evaluate(trained, run / f"best_{STEM}.pt", tmp_path / "pt", capsys=capsys)
    onnx, _ = run_evaluate(trained, run / f"best_{STEM}.onnx", tmp_path / "onnx", capsys=capsys)
    assert onnx["pupil_iou"] == pytest.approx(pt["pupil_iou"], abs=0.01)
    assert onnx["center_error_px"] == pytest.approx(pt["center_error_px"], abs=0.05, nan_ok=True)
    per_frame = [[float(r["pupil_iou"]) for r in read_rows(tmp_path / name / "frames.csv")]
                 for name in ("pt", "onnx")]
    assert per_frame[1] == pytest.approx(per_frame[0], abs=0.02)


@pytest.mark.slow
def test_train_split_every_row_once(trained, tmp_path, capsys):
    _, stdout = run_evaluate(trained, trained / "run" / f"best_{STEM}.pt", tmp_path, "--split", "train",
                             capsys=capsys)
    assert parse_summary(stdout)["frames"] == split_rows(trained, "train") > split_rows(trained, "validation")
    assert len(read_rows(tmp_path / "frames.csv")) == split_rows(trained, "train")


@pytest.mark.slow
def test_model_of_another_frame_size_is_refused(trained, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "other.pt", model=build_model("efficientvit_micro"),
                           input_size=(64, 96))
    with pytest.raises(SystemExit) as exit_info:
        run_evaluate(trained, path, tmp_path / "out", capsys=capsys)
    assert exit_info.value.code != 0
    assert "error: the model takes 64x96 frames but the dataset holds 32x48" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
