"""Export at a precision with a dataset's frames: the data side of ``common.infer.quantize``.

``common.infer.quantize`` works on plain arrays; this module reads them from a dataset the way the
training scripts do (``common.train.data``: demo, folder or Hub; every layout rule applies): a seeded
choice of training frames calibrates INT8, and the whole validation split scores fp32 against the
reduced file. ``export.py`` and the notebooks call ``export_model``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from torch import nn

from common.errors import ConfigurationError
from common.infer.quantize import MAX_PUPIL_IOU_DROP, PrecisionReport, export_precision
from common.specs import DEFAULT_SIZE
from common.train.data import TRAIN_SPLIT, VALID_SPLIT, ArrowBatches, frame_chunks, open_dataset, sample_rows

SUFFIXES = {"fp32": ".onnx", "int8": ".int8.onnx", "fp16": ".fp16.onnx"}
SCORE_ROWS = 32  # validation frames a model call


def reduced_name(model_path: Path, precision: str) -> Path:
    """best_model.pt -> best_model.onnx, best_model.int8.onnx or best_model.fp16.onnx beside it."""
    return model_path.with_name(model_path.stem + SUFFIXES[precision])


def choose_input_size(requested, recorded, frames) -> tuple[int, int]:
    """The (H, W) to export at: ``requested`` (--input-size), else ``recorded`` (the checkpoint's;
    None for a plain state dict), else the dataset's ``frames``, else 400x640; it must be the
    dataset's frame size when there is a dataset."""
    size = tuple(requested or recorded or frames or DEFAULT_SIZE)
    if frames and tuple(frames) != size:
        raise ConfigurationError(f"the dataset's frames are {frames[0]}x{frames[1]} and the model exports at "
                                 f"{size[0]}x{size[1]}; use a dataset of that size or pass --input-size")
    return size


def export_model(model: nn.Module, destination, precision: str, data_args: argparse.Namespace | None, *,
                 requested_size=None, recorded_size=None, calibration_frames: int = 200, seed: int = 0,
                 method: str = "percentile", int8_layers: str = "linear",
                 max_drop: float = MAX_PUPIL_IOU_DROP) -> PrecisionReport:
    """Export ``model`` at ``precision``, calibrated and scored on the dataset ``data_args`` name.

    Args:
        data_args: the training scripts' data flags (demo / dataset / hf_repo, data_dir, ...); None
            exports fp32 without scoring. INT8 and fp16 need it.
        requested_size, recorded_size: see ``choose_input_size``.
        calibration_frames: training frames (a ``seed``-ed choice) that calibrate INT8.
    """
    if precision != "fp32" and data_args is None:
        use = "calibrate it and score it against fp32" if precision == "int8" else "score it against fp32"
        raise ConfigurationError(f"a {precision} export needs a dataset (export.py --calibrate DATASET: "
                                 f"demo, a dataset folder or a Hub repo id) to {use}")
    calibration = validation = frames = None
    metadata = {}
    if data_args is not None:
        dataset, layout, source = open_dataset(data_args)
        train, valid = (ArrowBatches(dataset[split], layout, ()) for split in (TRAIN_SPLIT, VALID_SPLIT))
        frames = layout.image_size
        if precision == "int8":
            rows = sample_rows(len(train), calibration_frames, seed)
            calibration = next(frame_chunks(train, rows, chunk=len(rows)))[0]  # (N, H, W) uint8
            metadata = {"calibration_data": str(source), "calibration_seed": seed}
        validation = functools.partial(frame_chunks, valid, range(len(valid)), chunk=SCORE_ROWS)
    size = choose_input_size(requested_size, recorded_size, frames)
    return export_precision(model, destination, precision, input_size=size, calibration=calibration,
                            validation=validation, method=method, int8_layers=int8_layers,
                            max_drop=max_drop, metadata=metadata)
