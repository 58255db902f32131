"""The Colab notebooks' steps. Each notebook cell calls one of these, so the notebooks carry no
logic of their own: training is the engine's ``fit``, data the scripts' loaders, export the
scripts' export. Figures are shown inline (and saved beside the run's other files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.checkpoint import load_checkpoint, load_model, model_from_checkpoint
from common.cli import training_parser
from common.images import write_image
from common.infer.export import export_onnx, verify_onnx
from common.infer.inference import Prediction, overlay
from common.infer.quantize import PrecisionError
from common.models import build_model, count_parameters, model_task
from common.prep.preprocess import Ellipse
from common.specs import DEFAULT_SIZE
from common.train.data import open_loaders
from common.train.engine import save_prediction_picture
from common.train.export_check import export_model, reduced_name
from common.train.runtime import setup_runtime
from common.train.tasks import TASKS


def notebook_args(spec, dataset: str, epochs: int, batch_size: int, image_size, output_dir: str):
    """The training arguments a script would get: ``dataset`` is a local folder or a Hub repo."""
    source = ["--dataset", dataset] if Path(dataset).expanduser().exists() else ["--hf-repo", dataset]
    argv = [*source, "--epochs", str(epochs), "--batch-size", str(batch_size), "--output-dir", output_dir]
    if image_size:
        argv += ["--size", str(image_size[0]), str(image_size[1])]
    return training_parser(spec.model_type).parse_args(argv)


def _show(path: Path) -> None:
    """Display a saved PNG inline in a notebook; print its path elsewhere."""
    try:
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    except ImportError:
        print(path)


def data_overview(args, spec) -> None:
    """Train/validation counts and the first validation frame with its pupil mask or ellipse."""
    task = model_task(spec.model_name)
    loaders, source = open_loaders(args, TASKS[task].targets, pin_memory=False)
    print(f"{source}: {len(loaders.train.dataset)} train / {len(loaders.valid.dataset)} validation frames "
          f"of {loaders.image_size[0]}x{loaders.image_size[1]}")
    print(f"data layout: {loaders.layout.describe(TASKS[task].targets)}")
    batch = loaders.valid.dataset[[0]]
    frame, mask = batch["image"][0].numpy(), batch["label"][0].numpy()
    ellipse = None
    if task == "ellipse":  # the stored (cx, cy, rx, ry), drawn axis-aligned as the metrics do
        ellipse = Ellipse(*batch["ellipse"][0].tolist(), 0.0)
    _show(write_image(Path(args.output_dir) / "sample.png", overlay(frame, Prediction(mask, ellipse))))


def check_model(spec, limit: int | None, input_size=DEFAULT_SIZE) -> torch.nn.Module:
    """Build the model, print its size (asserting ``limit``) and check its output on one frame."""
    model = build_model(spec.model_name).eval()
    parameters = count_parameters(model)
    print(f"{spec.model_type}: {parameters:,} trainable parameters")
    if limit is not None:
        assert parameters < limit, f"{parameters:,} parameters, over the {limit:,} limit"
    with torch.no_grad():
        output = model(torch.zeros(1, 1, *input_size))  # (1, 1, H, W) in, as a camera frame
    expected = (1, 4) if model.task == "ellipse" else (1, 2, *input_size)
    assert tuple(output.shape) == expected, f"output {tuple(output.shape)}, expected {expected}"
    print(f"output for a (1, 1, {input_size[0]}, {input_size[1]}) frame: {tuple(output.shape)}")
    return model


def show_curves(args, spec) -> None:
    _show(Path(args.output_dir) / spec.curves_name)


def show_predictions(args, spec) -> Path:
    """The best checkpoint on validation frames: true pupil and prediction overlaid."""
    task = model_task(spec.model_name)
    runtime = setup_runtime(args)
    loaders, _ = open_loaders(args, TASKS[task].targets, pin_memory=False)
    model = load_model(Path(args.output_dir) / spec.best_name, device=runtime.device)
    path = save_prediction_picture(Path(args.output_dir) / "predictions_best.png", model,
                                   loaders.valid.dataset, task, runtime)
    _show(path)
    return path


def final_report(args, spec) -> dict:
    """Best and final validation metrics of the run, from its metrics_<model>.json: mIoU, pupil IoU
    and its per-frame median and 10th percentile, centre errors (px) and the detection rate at 5 px."""
    history = json.loads((Path(args.output_dir) / f"{spec.metrics_name}.json").read_text())
    best = max(history, key=lambda row: row["valid_iou"])
    keys = [key for key in history[-1] if key.startswith("valid_") and key != "valid_loss"]
    print(f"{spec.model_type}, {len(history)} epochs")
    for label, row in (("best", best), ("final", history[-1])):
        values = ", ".join(f"{key.removeprefix('valid_')} {row[key]:{_figure_format(key)}}" for key in keys)
        print(f"  {label} (epoch {row['epoch']}): validation {values}")
    return {"best": best, "final": history[-1]}


def _figure_format(key: str) -> str:
    """Pixels with 2 decimals, frame counts whole, IoUs and rates with 4."""
    if key.endswith("_px"):
        return ".2f"
    return ".0f" if key.endswith(("missed", "negatives", "false_pupils")) else ".4f"


def export_and_verify(args, spec, max_onnx_kb: float | None = None) -> tuple[Path, Path]:
    """Export the best checkpoint to ONNX, check it with onnxruntime against PyTorch, show sizes."""
    out_dir = Path(args.output_dir)
    pt_path = out_dir / spec.best_name
    model = load_model(pt_path, device="cpu")
    size = tuple(load_checkpoint(pt_path)["model_config"]["input_size"])  # the frame size it trained at
    onnx_path = export_onnx(model, out_dir / spec.onnx_name, input_size=size)
    difference = verify_onnx(model, onnx_path, batch=1, input_size=size)
    onnx_kb = onnx_path.stat().st_size / 1024
    print(f"{pt_path.name}: {pt_path.stat().st_size / 1024:.0f} KB")
    print(f"{onnx_path.name}: {onnx_kb:.0f} KB, max |onnxruntime - torch| = {difference:.2e}")
    if max_onnx_kb is not None:
        assert onnx_kb < max_onnx_kb, f"ONNX file is {onnx_kb:.0f} KB, over {max_onnx_kb} KB"
    return pt_path, onnx_path



def export_int8(args, spec) -> Path | None:
    """The best checkpoint as an INT8 ONNX file (``export.py --int8``): calibrated on the run's
    training frames, scored against fp32 on its validation split. None, with the one-line reason,
    when it loses too much pupil IoU (nothing is written then)."""
    pt_path = Path(args.output_dir) / spec.best_name
    checkpoint = load_checkpoint(pt_path)
    try:
        report = export_model(model_from_checkpoint(checkpoint, pt_path), reduced_name(pt_path, "int8"),
                              "int8", args, recorded_size=checkpoint["model_config"]["input_size"])
    except PrecisionError as exc:
        print(f"no INT8 file: {exc}")
        return None
    print("\n".join(report.lines()))
    return report.path
