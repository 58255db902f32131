"""Small helpers shared by several test modules: the repository root, the environment and runner of
script subprocesses, the tiny demo flags, and a few tensor and geometry helpers.

Fixtures live in ``tests/conftest.py``; plain functions and constants live here, where a test module
imports them by name.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from packaging.utils import canonicalize_name
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "efficientvit": "train_efficientvit_local.py",
    "tiny": "train_efficientvit_tiny_local.py",
    "ellipse": "train_ellipse_local.py",
}


def demo_flags(samples: int, height: int, width: int) -> list[str]:
    """A training script's flags for ``samples`` generated demo frames of ``height`` x ``width``, in
    batches of 4 read in-process (no loader workers)."""
    return ["--demo", "--demo-samples", str(samples), "--demo-size", str(height), str(width),
            "--batch-size", "4", "--num-workers", "0"]


TINY_DEMO = demo_flags(40, 96, 160)
DEMO_SAMPLES, DEMO_SIZE = 60, (96, 160)  # the demo_data_dir fixture: ~45 train / 11 validation frames


def demo_args(data_dir) -> argparse.Namespace:
    """The training scripts' data flags naming the ``demo_data_dir`` fixture's dataset."""
    return argparse.Namespace(demo=True, dataset=None, demo_samples=DEMO_SAMPLES, demo_size=list(DEMO_SIZE),
                              data_dir=str(data_dir), size=None, preprocessed="auto")


def demo_data_flags(data_dir) -> list[str]:
    """The same, as command-line flags (without --demo itself)."""
    return ["--demo-samples", str(DEMO_SAMPLES), "--demo-size", *map(str, DEMO_SIZE),
            "--data-dir", str(data_dir)]


def clean_env(**extra) -> dict:
    """This process's environment without MLflow and Hugging Face settings, plus ``extra``.

    A script under test then neither logs to the developer's MLflow server nor picks up a Hub
    token, endpoint, offline switch or cache location from the shell; a test that needs one of
    those passes it here, e.g. ``clean_env(HF_HUB_OFFLINE="1")``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HF_"))}
    env.update(extra)
    return env


def run(command, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``command`` (paths allowed) from the repository root, output captured as text, in
    ``clean_env()`` unless ``env`` is given."""
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env or clean_env(),
                          timeout=timeout, cwd=ROOT)


def train(script, out_dir, data_dir, *args, demo=TINY_DEMO, prefix=(), env=None, check=True):
    """A training script (a key of ``SCRIPTS``) on the demo set ``demo`` describes, writing to
    ``out_dir``; ``args`` come last, so they can override the demo flags. ``prefix`` replaces the
    plain interpreter (e.g. a fault injector). With ``check``, a non-zero exit fails the test."""
    command = [*(prefix or [sys.executable]), ROOT / SCRIPTS[script], *demo, "--data-dir", data_dir,
               "--output-dir", out_dir, *args]
    result = run(command, env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def epoch_rows(path) -> list[dict]:
    """The per-epoch rows of a metrics json without the wall-clock time, so runs compare exactly."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(Path(path).read_text())]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN running statistics, so BN folding is actually exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def float32_tolerance(output: torch.Tensor, tolerance: float = 1e-4) -> float:
    """``tolerance`` for outputs up to 1 in magnitude, scaled by the largest output above that.

    float32 rounding grows with magnitude: the randomized original ShallowNet, whose decoder has no
    normalization, reaches logits of ~500, where its own float32 forward differs from float64 by ~1e-3.
    """
    return tolerance * max(1.0, output.abs().max().item())


def in_order_of(a0, b0, a1, b1, angle1):
    """(a1, b1, angle1) written in the axis order closest to (a0, b0).

    fitEllipse may report an ellipse as (b, a, angle + 90); the dataset keeps its order, so tests
    that compare with a drawn ellipse first bring the two into the same order.
    """
    if abs(a1 - a0) + abs(b1 - b0) > abs(a1 - b0) + abs(b1 - a0):
        return b1, a1, angle1 - 90.0
    return a1, b1, angle1


def load_output(path, data_files=None):
    """A precompute output (or parquet files) loaded with its own Arrow cache.

    ``datasets``' default cache can hand back another folder's rows: two outputs in folders of the
    same name (``.../out``) written by one test run have collided there.
    """
    import tempfile

    from datasets import load_dataset

    cache = tempfile.mkdtemp(prefix="hf-cache-")
    if data_files is not None:
        return load_dataset("parquet", data_files=data_files, cache_dir=cache)
    return load_dataset(str(path), cache_dir=cache)


def run_notebook(notebook, dataset, tmp_path, monkeypatch, kernel_name="python3"):
    """Execute ``notebook`` top to bottom for one epoch of batch 4 on ``dataset`` (a precompute output).

    The parameters come through the VA_* variables; the outputs go to tmp_path/out, the files the
    cells write (common/) to tmp_path/work, and the data cache (~/.cache/openeds) under tmp_path/home.
    A failing cell raises. Returns (outputs folder, work folder, the text of every cell's output).
    """
    out, work, home = tmp_path / "out", tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.setenv("VA_DATASET", str(dataset))
    monkeypatch.setenv("VA_EPOCHS", "1")
    monkeypatch.setenv("VA_BATCH_SIZE", "4")
    monkeypatch.setenv("VA_OUTPUT_DIR", str(out))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from nbclient import NotebookClient  # only the notebook tests need Jupyter's packages

    NotebookClient(notebook, timeout=600, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(work)}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    return out, work, text


def pins(path) -> dict[str, str]:
    """{canonical name: version} of the ``name==version`` lines of a requirements or pip freeze file."""
    lines = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    return {canonicalize_name(name): version
            for name, version in (line.split("==") for line in lines if "==" in line)}
