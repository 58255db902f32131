"""Per-run files in the output directory: resolved arguments, per-epoch metrics, training curves."""

from __future__ import annotations

import csv
import io
import platform
import sys
from pathlib import Path

import torch

from common.io import atomic_path, atomic_write_json, atomic_write_text


def write_run_config(out_dir: Path, args, runtime_description: str) -> Path:
    """args.json: every resolved argument plus the environment the run used."""
    config = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runtime": runtime_description,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "argv": sys.argv},
    }
    return atomic_write_json(out_dir / "args.json", config)


def write_history(out_dir: Path, history: list[dict]) -> None:
    """metrics.json and metrics.csv, one row per epoch."""
    atomic_write_json(out_dir / "metrics.json", history)
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())


def plot_curves(out_dir: Path, history: list[dict], name: str = "training_curves.png") -> Path:
    """Loss and IoU curves of train vs valid per epoch, as a PNG (mIoU solid, pupil IoU dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, title in zip(axes, ("loss", "iou"), ("loss", "mIoU (solid), pupil IoU (dashed)")):
        for split in ("train", "valid"):
            line, = axis.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
            if metric == "iou" and f"{split}_pupil_iou" in history[0]:
                axis.plot(epochs, [row[f"{split}_pupil_iou"] for row in history], linestyle="--",
                          color=line.get_color())
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path = out_dir / name
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path
