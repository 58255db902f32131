"""Scoring a trained model on a dataset split: the logic behind ``evaluate.py``.

The model (``.pt`` or ``.onnx``, through ``PupilPredictor``) sees the split's frames as the
training loader reads them: model-ready, gamma + CLAHE applied once (stored in a built dataset,
or applied at load time for a raw one; ``PupilPredictor.outputs_prepared`` does not enhance
again). Its outputs go through the training task's own metrics (``tasks.TASKS``) with the
per-frame table of a validation pass (``metrics.FrameMetrics``), so every figure means what the
same name means in a training run's validation line and in ``--test-only``: ``iou`` (mIoU),
``pupil_iou``, the per-frame IoU distribution, the centre errors and the detection rate at 5 px.

Written under the output folder, each file atomically:
    summary.json       the figures, with the model, dataset, split and task
    frames.csv         one row per frame (``CSV_COLUMNS``)
    worst_frames.png   the frames with the lowest pupil IoU, drawn like the training pictures
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.files import atomic_write_json, atomic_write_text
from common.infer.inference import PupilPredictor
from common.infer.pictures import PICTURE_FRAMES, save_predictions
from common.progress import progress
from common.train.data import batch_rows
from common.train.metrics import frame_outcomes
from common.train.tasks import TASKS

CSV_COLUMNS = ("row", "filename", "pupil_iou", "center_error_px", "detected", "true_cx_px", "true_cy_px",
               "pred_cx_px", "pred_cy_px")
# The summary line's figures, in order, with their format; "negatives" prints as without_pupil.
SUMMARY_FIGURES = (("frames", ".0f"), ("negatives", ".0f"), ("pupil_iou", ".4f"), ("pupil_iou_mean", ".4f"),
                   ("pupil_iou_median", ".4f"), ("pupil_iou_p10", ".4f"), ("iou", ".4f"),
                   ("center_error_px", ".2f"), ("center_error_median_px", ".2f"),
                   ("detection_rate_5px", ".3f"), ("missed", ".0f"))
LABELS = {"negatives": "without_pupil", "iou": "miou"}


@dataclass
class Evaluation:
    """One model on one split: ``metrics`` as floats, the host per-frame table ``frames``
    (N, len(metrics.FRAME_COLUMNS)) and the split's file names, row by row."""

    metrics: dict[str, float]
    frames: torch.Tensor
    filenames: list[str]
    task: str


def evaluate_split(predictor: PupilPredictor, loader) -> Evaluation:
    """Run ``predictor`` over every batch of ``loader`` (``data.open_split``: one split, row order)
    and score it with the task's metrics and per-frame table."""
    dataset = loader.dataset
    if tuple(predictor.input_size) != tuple(dataset.image_size):
        size, frames = predictor.input_size, dataset.image_size
        raise UserError(f"the model takes {size[0]}x{size[1]} frames but the dataset holds "
                        f"{frames[0]}x{frames[1]}; evaluate it on a dataset built at its size "
                        "(precompute.py --size H W)")
    task = TASKS[predictor.task](1, dataset.image_size, "cpu")
    task.reset_metrics(frames=len(dataset))
    for batch, rows in zip(progress(loader, "evaluate", unit="batch"), batch_rows(loader, "cpu")):
        # (B, 2, H, W) | (B, 4)
        outputs = torch.from_numpy(predictor.outputs_prepared(batch["image"].numpy()))
        task.update_metrics(outputs, {**batch, "label": batch["label"].long()}, rows)
    metrics = {"frames": float(len(dataset)), **task.compute_metrics()}
    return Evaluation(metrics, task.frames.frames, split_filenames(dataset.split), predictor.task)


def split_filenames(split) -> list[str]:
    """The ``filename`` column of a ``datasets`` split, or empty names when it has none."""
    return list(split["filename"]) if "filename" in split.column_names else [""] * len(split)


def summary_line(result: Evaluation, split: str) -> str:
    """'evaluation validation | frames 120 | without_pupil 0 | pupil_iou 0.9012 | ... | missed 1'."""
    parts = [f"evaluation {split}"]
    parts += [f"{LABELS.get(key, key)} {result.metrics[key]:{spec}}" for key, spec in SUMMARY_FIGURES]
    return " | ".join(parts)


def frame_rows(result: Evaluation) -> list[dict]:
    """frames.csv rows: pixel centres and errors with 2 decimals, IoU with 4; an empty cell where a
    value is undefined (no true pupil: no true centre, error or detection; none predicted: no
    predicted centre or error). ``detected`` is 1 or 0 for each frame with a true pupil, so its
    mean over the non-empty cells is the detection rate."""
    table, outcome = result.frames, frame_outcomes(result.frames)
    rows = []
    for row, name in enumerate(result.filenames):
        has_true, has_pred = bool(outcome["has_true"][row]), bool(outcome["has_pred"][row])
        error = float(outcome["center_error"][row])
        rows.append({
            "row": row, "filename": name, "pupil_iou": f"{float(table[row, 0]):.4f}",
            "center_error_px": "" if math.isnan(error) else f"{error:.2f}",
            "detected": int(outcome["detected"][row]) if has_true else "",
            **_cells(("true_cx_px", "true_cy_px"), table[row, 1:3], has_true),
            **_cells(("pred_cx_px", "pred_cy_px"), table[row, 4:6], has_pred),
        })
    return rows


def _cells(names: tuple[str, str], values: torch.Tensor, present: bool) -> dict:
    return {name: f"{float(value):.2f}" if present else "" for name, value in zip(names, values)}


def write_frames_csv(path: Path, result: Evaluation) -> Path:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(frame_rows(result))
    return atomic_write_text(path, text.getvalue())


def worst_rows(result: Evaluation, count: int = PICTURE_FRAMES) -> list[int]:
    """The ``count`` rows with the lowest pupil IoU, lowest first (ties: the lower row first)."""
    iou = result.frames[:, 0].numpy()
    return np.lexsort((np.arange(len(iou)), iou))[:count].tolist()


def save_worst_picture(path: Path, result: Evaluation, predictor: PupilPredictor, dataset) -> Path:
    """The worst frames of ``dataset`` (an ``ArrowBatches``) run again and drawn by
    ``pictures.save_predictions``, captioned with their row and pupil IoU."""
    rows = worst_rows(result)
    batch = dataset[rows]  # image (B, H, W) uint8, model-ready; label (B, H, W) 0/1
    frames = batch["image"].numpy()
    outputs = predictor.outputs_prepared(frames)
    return save_predictions(path, frames, batch["label"].numpy(), outputs, [f"#{row}" for row in rows],
                            result.task)


def write_reports(out_dir: Path, result: Evaluation, predictor: PupilPredictor, dataset, about: dict
                  ) -> dict[str, Path]:
    """summary.json (``about`` + the figures), frames.csv and worst_frames.png under ``out_dir``."""
    out_dir = Path(out_dir)
    return {
        "summary": atomic_write_json(out_dir / "summary.json",
                                     {**about, "task": result.task, **result.metrics}),
        "frames": write_frames_csv(out_dir / "frames.csv", result),
        "picture": save_worst_picture(out_dir / "worst_frames.png", result, predictor, dataset),
    }
