"""Tiny real runs in subprocesses for the fault-injection suite, and how to read what they leave."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INJECT = ROOT / "tests" / "faults" / "inject.py"
TINY_SCRIPT = ROOT / "train_efficientvit_tiny_local.py"
TINY_DEMO = ["--demo", "--demo-samples", "16", "--demo-size", "64", "96", "--batch-size", "4",
             "--num-workers", "0"]
LAST = "last_efficientvit_tiny_model.pt"
BEST = "best_efficientvit_tiny_model.pt"
METRICS = "metrics_efficientvit_tiny_model.json"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HF_"))}
    env.update(extra)
    return env


def run(command, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env or clean_env(),
                          timeout=timeout, cwd=ROOT)


def train_tiny(out_dir, data_dir, *args, inject=(), env=None) -> subprocess.CompletedProcess:
    """train_efficientvit_tiny_local.py on the tiny demo set (or the --dataset in args), optionally
    under tests/faults/inject.py."""
    prefix = [sys.executable, INJECT, *inject] if inject else [sys.executable]
    data = TINY_DEMO[6:] if "--dataset" in args else TINY_DEMO  # --demo would win over --dataset
    command = [*prefix, TINY_SCRIPT, *data, "--data-dir", data_dir, "--output-dir", out_dir, *args]
    return run(command, env)


def the_error_line(result) -> str:
    """The single 'error:' line of a failed run; no traceback anywhere."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def history(path) -> list[dict]:
    """Per-epoch rows without the wall-clock time, so runs compare exactly."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(Path(path).read_text())]


def wait_for(condition, proc=None, timeout=300.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def epochs_done(path) -> int:
    try:
        return len(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return 0


def demo_dataset(data_dir) -> Path:
    return next(Path(data_dir).glob("demo-16-*-64x96/precomputed"))
