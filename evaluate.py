"""Score a trained pupil model on a dataset split, with the figures eye-tracking papers report.

Examples:
    python evaluate.py --model checkpoints/best_efficientvit_model.pt --dataset ./precompute_output
    python evaluate.py --model checkpoints/best_efficientvit_model.onnx --hf-repo Conner/sddec25-01 \\
        --split train
    python evaluate.py --model checkpoints/best_ellipse_model.pt --demo --output-dir evaluation/ellipse
    python evaluate.py --model best_efficientvit_model.pt --dataset my_eyes_data --device cuda --batch-size 32

The model is a checkpoint (``.pt``) or an ONNX export of any registered model; the dataset is any
the training scripts read (``--demo``, ``--dataset PATH``, ``--hf-repo REPO``, with the same
flags). Frames are used as the dataset holds them (model-ready; gamma + CLAHE are not applied a
second time), so the figures are those of the training scripts' validation pass and of
``--test-only`` (``common/train/evaluation.py``).

Prints one line, e.g.
    evaluation validation | frames 120 | without_pupil 0 | pupil_iou 0.9012 | pupil_iou_mean 0.8951 |
    pupil_iou_median 0.9103 | pupil_iou_p10 0.8420 | miou 0.9480 | center_error_px 0.61 |
    center_error_median_px 0.48 | detection_rate_5px 0.992 | missed 1
and writes, under --output-dir: summary.json (those figures), frames.csv (row, filename,
pupil_iou, center_error_px, detected, true_cx_px, true_cy_px, pred_cx_px, pred_cy_px) and
worst_frames.png (the 8 frames with the lowest pupil IoU, true pupil in yellow, prediction green).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import add_data_arguments, positive_int, report_errors
from common.infer.inference import PupilPredictor
from common.models import MODEL_NAMES
from common.train.data import TRAIN_SPLIT, VALID_SPLIT, open_split
from common.train.evaluation import evaluate_split, summary_line, write_reports
from common.train.tasks import TASKS


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score a pupil model on a dataset split", add_help=add_help)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint (.pt) or .onnx file")
    parser.add_argument("--split", choices=(VALID_SPLIT, TRAIN_SPLIT), default=VALID_SPLIT)
    parser.add_argument("--output-dir", default=Path("evaluation"), type=Path,
                        help="summary.json, frames.csv and worst_frames.png")
    parser.add_argument("--batch-size", default=8, type=positive_int)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps | auto")
    parser.add_argument("--expected-model", choices=MODEL_NAMES, default=None,
                        help="refuse a model file of another architecture")
    add_data_arguments(parser, device_data=False)
    return parser


@report_errors
def main(args: argparse.Namespace) -> dict:
    predictor = PupilPredictor(args.model, device=args.device, expected_model=args.expected_model)
    loader, source = open_split(args, args.split, TASKS[predictor.task].eval_targets)
    print(f"{args.model} ({predictor.model_name or predictor.task}) on {source}, {args.split} split: "
          f"{len(loader.dataset)} frames of {loader.dataset.image_size[0]}x{loader.dataset.image_size[1]}")
    result = evaluate_split(predictor, loader)
    about = {"model": str(args.model), "dataset": str(source), "split": args.split}
    files = write_reports(args.output_dir, result, predictor, loader.dataset, about)
    print(summary_line(result, args.split))
    print(f"wrote {', '.join(str(path) for path in files.values())}")
    return result.metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
