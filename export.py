"""Export a trained model to ONNX: fp32 (the default), static INT8 or fp16, each checked before it is kept.

Examples:
    python export.py checkpoints/best_efficientvit_model.pt     # fp32: best_efficientvit_model.onnx
    python export.py checkpoints/best_efficientvit_model.pt --int8 --calibrate demo
    python export.py checkpoints/best_efficientvit_model.pt --int8 --calibrate ./precompute_output \\
        --calibration-frames 300 --output edge/model.int8.onnx
    python export.py checkpoints/best_efficientvit_model.pt --int8 --int8-layers all --calibrate demo
    python export.py best_efficientvit_model.pt --fp16 --calibrate Conner/sddec25-01  # Hub dataset

MODEL is a checkpoint of this project or a plain state dict of a known model (e.g. the original
project's best_efficientvit_model.pt). DATASET is what the training scripts read: ``demo`` (the
--demo dataset, shaped by --demo-samples/--demo-size), a local dataset folder, or a Hub repo id.
INT8 calibrates on --calibration-frames training frames (a seeded choice) and by default quantizes
the 1x1 convolutions and fully connected layers only (--int8-layers); INT8 and fp16 are both
scored against fp32 on the whole validation split (mean pupil IoU, ellipse-centre error, file
sizes). A loss of more than --max-drop mean pupil IoU is one ``error:`` line naming the layers whose
outputs differ most, and no file is written. Without a dataset the fp32 file is only checked
against PyTorch; with one it is scored too.

The output defaults to MODEL's name with .onnx, .int8.onnx or .fp16.onnx. All three take a
float32 (B, 1, H, W) input in [-1, 1] and give float32 outputs, so predict.py and
``PupilPredictor`` run any of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.checkpoint import load_checkpoint, model_from_checkpoint
from common.cli import add_dataset_options, positive_float, positive_int, report_errors
from common.infer.quantize import CALIBRATION_METHODS, INT8_LAYERS, MAX_PUPIL_IOU_DROP
from common.train.data import named_source
from common.train.export_check import export_model, reduced_name


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a model to ONNX (fp32, INT8 or fp16)",
                                     add_help=add_help)
    parser.add_argument("model", type=Path, help="checkpoint (.pt) or plain state dict")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true", help="static INT8 (QDQ), calibrated on --calibrate")
    precision.add_argument("--fp16", action="store_true",
                           help="float16 weights and activations, for GPU runtimes")
    parser.add_argument("--output", type=Path, help="destination .onnx (default: beside MODEL)")
    parser.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                        help="frame size baked into the graph (default: the checkpoint's; for a plain state "
                             "dict, the dataset's frames, else 400 640)")
    data = parser.add_argument_group("calibration and scoring data")
    data.add_argument("--calibrate", metavar="DATASET",
                      help="demo, a dataset folder or a Hub repo id: its training frames calibrate INT8, its "
                           "validation split scores every precision (required with --int8 and --fp16)")
    data.add_argument("--calibration-frames", type=positive_int, default=200,
                      help="training frames that calibrate INT8 (a seeded choice)")
    data.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="percentile",
                      help="how INT8 activation ranges are chosen from the calibration frames")
    data.add_argument("--int8-layers", choices=INT8_LAYERS, default="linear",
                      help="linear: only 1x1 convolutions and fully connected layers are INT8 (the fastest "
                           "on CPUs); all: every layer onnxruntime can quantize, for integer accelerators")
    data.add_argument("--seed", type=int, default=0, help="seed of the calibration frames' choice")
    data.add_argument("--max-drop", type=positive_float, default=MAX_PUPIL_IOU_DROP,
                      help="largest loss of mean pupil IoU against fp32 that is accepted")
    add_dataset_options(data)
    return parser


@report_errors
def main(args: argparse.Namespace) -> Path:
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    checkpoint = load_checkpoint(args.model)
    model = model_from_checkpoint(checkpoint, args.model)
    data_args = argparse.Namespace(**vars(args), **named_source(args.calibrate)) if args.calibrate else None
    recorded = None if checkpoint.get("source") == "state_dict" else checkpoint["model_config"]["input_size"]
    report = export_model(model, args.output or reduced_name(args.model, precision), precision, data_args,
                          requested_size=args.input_size, recorded_size=recorded,
                          calibration_frames=args.calibration_frames, seed=args.seed,
                          method=args.calibration_method, int8_layers=args.int8_layers,
                          max_drop=args.max_drop)
    print("\n".join(report.lines()))
    return report.path


if __name__ == "__main__":
    main(get_args_parser().parse_args())
