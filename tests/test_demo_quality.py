"""The demo job learns: a reduced-size run of the README main command reaches pupil IoU >= 0.8.

It prints its final validation mIoU (mean of background and pupil IoU) and pupil IoU, each named.

The README's command trains at 400x640 (several minutes on 2 cores); this runs the same script,
data generator, precompute pipeline, augmentation and engine at 160x256 so CI can afford it.
"""

import json
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT, clean_env


@pytest.mark.slow
def test_demo_training_reaches_pupil_iou_0_8(tmp_path):
    command = [sys.executable, str(ROOT / "train_efficientvit_local.py"), "--demo", "--demo-samples", "200",
               "--demo-size", "160", "256", "--epochs", "10", "--num-workers", "0",
               "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"final validation mIoU ([0-9.]+), pupil IoU ([0-9.]+)", result.stdout)
    miou, pupil_iou = float(match.group(1)), float(match.group(2))
    last = json.loads((tmp_path / "out" / "metrics_efficientvit_model.json").read_text())[-1]
    # the printed values are the last epoch's, each under its own name (4 decimals)
    assert abs(miou - last["valid_iou"]) <= 5e-5 and abs(pupil_iou - last["valid_pupil_iou"]) <= 5e-5
    assert miou == pytest.approx((last["valid_pupil_iou"] + last["valid_background_iou"]) / 2, abs=1e-4)
    assert pupil_iou >= 0.8, result.stdout[-2000:]
    assert (tmp_path / "out" / "best_efficientvit_model.pt").exists()
    assert (tmp_path / "out" / "best_efficientvit_model.onnx").exists()
