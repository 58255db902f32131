"""Tiny real runs in subprocesses for the fault-injection suite, and how to read what they leave."""

import json
import sys
import time
from pathlib import Path

from tests.helpers import ROOT, demo_flags, train

INJECT = ROOT / "tests" / "faults" / "inject.py"
TINY_SCRIPT = ROOT / "train_efficientvit_tiny_local.py"
# Smaller than tests.helpers.TINY_DEMO: this suite starts many runs, and demo_dataset() finds this size.
TINY_DEMO = demo_flags(16, 64, 96)
LAST = "last_efficientvit_tiny_model.pt"
BEST = "best_efficientvit_tiny_model.pt"
METRICS = "metrics_efficientvit_tiny_model.json"


def train_tiny(out_dir, data_dir, *args, inject=(), env=None):
    """train_efficientvit_tiny_local.py on the tiny demo set (or the --dataset in args), optionally
    under tests/faults/inject.py; the caller checks the exit code."""
    prefix = [sys.executable, INJECT, *inject] if inject else [sys.executable]
    data = TINY_DEMO[6:] if "--dataset" in args else TINY_DEMO  # --demo would win over --dataset
    return train("tiny", out_dir, data_dir, *args, demo=data, prefix=prefix, env=env, check=False)


def the_error_line(result) -> str:
    """The single 'error:' line of a failed run; no traceback anywhere."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


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
