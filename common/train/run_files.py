"""Per-run files in the output directory: resolved arguments, per-epoch metrics, training curves."""

from __future__ import annotations

import csv
import io
import math
import platform
import sys
from pathlib import Path

import torch

from common.files import atomic_path, atomic_write_json, atomic_write_text, plain


def write_run_config(out_dir: Path, args, runtime_description: str, name: str = "args.json") -> Path:
    """args_<model>.json (``TrainSpec.args_name``): every resolved argument plus the environment."""
    config = {
        "args": plain(args),
        "runtime": runtime_description,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "argv": sys.argv},
    }
    return atomic_write_json(out_dir / name, config)


def write_history(out_dir: Path, history: list[dict], name: str = "metrics") -> None:
    """``name``.json and ``name``.csv (``TrainSpec.metrics_name``), one row per epoch."""
    atomic_write_json(out_dir / f"{name}.json", history)
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / f"{name}.csv", buffer.getvalue())


def _optional(history: list[dict], key: str) -> list[float]:
    """``key`` of every row, NaN where a row lacks it (a history resumed across a change of metrics)."""
    return [row.get(key, math.nan) for row in history]


def _keys(history: list[dict]) -> list[str]:
    """Every key of any row, in first-seen order."""
    return list(dict.fromkeys(key for row in history for key in row))


def _loss_panel(axis, epochs, history: list[dict]) -> None:
    """Total loss of both splits (solid) and the train loss terms (ce, dice, surface, ...; dashed)."""
    for split in ("train", "valid"):
        axis.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=f"{split} loss")
    terms = [key for key in _keys(history)
             if key.endswith("_loss") and key not in ("train_loss", "valid_loss")]
    for key in terms:
        axis.plot(epochs, _optional(history, key), linestyle="--", label=key.removesuffix("_loss"))
    axis.set_title("loss (terms: train)")


def _iou_panel(axis, epochs, history: list[dict]) -> None:
    """mIoU solid, pupil IoU dashed, background IoU dotted; one colour per split."""
    keys = _keys(history)
    for split in ("train", "valid"):
        line, = axis.plot(epochs, [row[f"{split}_iou"] for row in history], marker="o", label=f"{split} mIoU")
        for name, style in (("pupil", "--"), ("background", ":")):
            if f"{split}_{name}_iou" in keys:
                axis.plot(epochs, _optional(history, f"{split}_{name}_iou"), linestyle=style,
                          color=line.get_color(), label=f"{split} {name}")
    axis.set_title("mIoU (solid), pupil (dashed), background (dotted)")


def _error_panel(axis, epochs, history: list[dict]) -> None:
    """Pixel errors: the validation pupil centre error (mean, median) and the ellipse regressor's
    centre and radius errors."""
    for key in [k for k in _keys(history) if k.endswith("_error_px")]:
        axis.plot(epochs, _optional(history, key), marker="o", label=key.removesuffix("_px"))
    axis.set_title("pupil centre / radius errors (px)")


def plot_curves(out_dir: Path, history: list[dict], name: str = "training_curves.png") -> Path:
    """Per-epoch curves as a PNG: losses and their terms, mIoU with per-class IoU, and the
    pixel errors when the run has them. Losses and mIoU must be in every row (KeyError)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    panels = [_loss_panel, _iou_panel]
    if any(key.endswith("_error_px") for key in _keys(history)):
        panels.append(_error_panel)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    try:
        for axis, draw in zip(axes, panels):
            draw(axis, epochs, history)
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / name
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(figure)  # also when a row lacks a drawn metric: no figure piles up in pyplot
    return path
