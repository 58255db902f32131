"""End-to-end latency of a whole camera frame, stage by stage, with ONNX Runtime on the CPU.

A raw 400x640 frame (the camera's, rendered by the synthetic generator) goes through the stages
``PupilPredictor`` runs, each timed on its own:

    letterbox        resize and pad to the model's input size (nothing when the sizes match)
    gamma+CLAHE      the training preprocessing, once per frame, at the model's size
    model            uint8 -> [-1, 1] float input, and the ONNX Runtime session
    decode+ellipse   mask, largest component, ellipse fit and confidence, back to the frame's pixels

for every model, fp32 and INT8 (static QDQ, per-channel weights, calibrated on synthetic frames;
``--int8-layers``: the 1x1 convolutions only, the default of export.py, and/or every layer),
at each model input size, with one thread (OpenCV and ONNX Runtime) and with all cores. It prints
a markdown table of the median and 99th percentile of each stage and of the total, frames per
second on the median, and the distance to the 120 Hz budget (8.33 ms). Without --checkpoints the
models have their initial weights; give trained checkpoints for a realistic decode stage.
Each row runs in the ONNX Runtime CPU layout ``--ort-layout`` gives (``auto``, the default of
predict.py too: the faster of the blocked and plain layouts on that file), named in its layout column.
``--profile`` adds onnxruntime's profile of each file on one thread: the kernel time per frame and
each operator type's share of it, with its node count (layout reorders and transposes included).

Examples:
    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --checkpoints checkpoints/best_efficientvit_model.pt \
        checkpoints/best_efficientvit_tiny_model.pt
    python benchmarks/bench_inference.py --models efficientvit_micro --sizes 400x640 --threads 1 --runs 50
    python benchmarks/bench_inference.py --precisions int8 --int8-layers linear all --threads 1
    python benchmarks/bench_inference.py --models efficientvit_micro --sizes 400x640 --threads 1 --profile
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.checkpoint import load_model  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.infer.export import export_onnx  # noqa: E402
from common.infer.inference import ORT_LAYOUTS, PupilPredictor, session_options  # noqa: E402
from common.infer.quantize import INT8_LAYERS, quantize_int8  # noqa: E402
from common.models import MODEL_NAMES, build_model, count_parameters  # noqa: E402
from common.prep import preprocess  # noqa: E402
from common.prep.synthetic import render_sample  # noqa: E402

BUDGET_MS = 1000.0 / 120  # one frame of a 120 Hz eye camera
STAGES = ("letterbox", "gamma+CLAHE", "model", "decode+ellipse")
SEGMENTERS = ("efficientvit", "efficientvit_micro")


def frame_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), both multiples of 16."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 400x640, got '{text}'") from None
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise argparse.ArgumentTypeError(f"height and width must be positive multiples of 16, got '{text}'")
    return height, width


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="End-to-end per-stage latency benchmark (ONNX Runtime, CPU)",
                                     add_help=add_help)
    parser.add_argument("--models", nargs="+", default=list(SEGMENTERS), choices=MODEL_NAMES,
                        help="models with their initial weights (ignored with --checkpoints)")
    parser.add_argument("--checkpoints", nargs="+", type=Path, default=[], help="trained .pt files instead")
    parser.add_argument("--sizes", nargs="+", type=frame_size, default=[(400, 640), (208, 208)],
                        help="model input sizes, HxW")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 0],
                        help="threads per run; 0 = all cores")
    parser.add_argument("--frame", type=frame_size, default=(400, 640), help="the camera frame, HxW")
    parser.add_argument("--runs", type=int, default=200, help="timed frames per row")
    parser.add_argument("--warmup", type=int, default=20, help="untimed frames before timing")
    parser.add_argument("--calibration-frames", type=int, default=32, help="INT8 calibration frames")
    parser.add_argument("--int8-layers", nargs="+", default=["linear"], choices=INT8_LAYERS,
                        help="which layers INT8 rows quantize (export.py --int8-layers); one row set each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ort-layout", choices=ORT_LAYOUTS, default="auto",
                        help="ONNX Runtime's CPU convolution layout (predict.py --ort-layout); auto: each "
                             "row times both on its file and keeps the faster, shown in the layout column")
    parser.add_argument("--profile", action="store_true",
                        help="also print onnxruntime's per-operator profile of each file (one thread)")
    return parser


def camera_frames(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """``count`` raw (H, W) uint8 synthetic eye frames, as a camera delivers them."""
    rng = np.random.default_rng(seed)
    return [render_sample(rng, *size)[0] for _ in range(count)]


def model_files(models: dict, size: tuple[int, int], precisions, int8_layers, frames, folder: Path) -> dict:
    """{(name, precision label): ONNX path} of every model at input ``size``; INT8 ("int8 linear",
    "int8 all") is calibrated on ``frames`` letterboxed and enhanced at that size."""
    files = {}
    if "int8" in precisions:  # the calibration frames, as the model sees them at this size
        ready = np.stack([preprocess.enhance_frame(preprocess.letterbox(f, *size)[0]) for f in frames])
    for name, model in models.items():
        fp32 = export_onnx(model, folder / f"{name}-{size[0]}x{size[1]}.onnx", input_size=size)
        if "fp32" in precisions:
            files[name, "fp32"] = fp32
        if "int8" not in precisions:
            continue
        for layers in int8_layers:
            int8 = fp32.with_name(f"{fp32.stem}.int8-{layers}.onnx")
            quantize_int8(fp32, int8, ready, method="minmax", layers=layers)
            files[name, f"int8 {layers}"] = int8
    return files


def time_stages(predictor: PupilPredictor, frames, runs: int, warmup: int) -> np.ndarray:
    """(runs, 4) milliseconds of the four stages of each timed frame, in ``STAGES`` order."""
    times = np.empty((runs, len(STAGES)))
    for index in range(warmup + runs):
        frame = frames[index % len(frames)]
        start = time.perf_counter()
        boxed, box = predictor.letterboxed(frame)
        boxed_at = time.perf_counter()
        ready = preprocess.enhance_frame(boxed)
        ready_at = time.perf_counter()
        output = predictor.outputs_prepared(ready[None])[0]  # (2, h, w) logits or (4,)
        output_at = time.perf_counter()
        predictor.postprocess(output, box, ready)
        done_at = time.perf_counter()
        if index >= warmup:
            times[index - warmup] = np.diff([start, boxed_at, ready_at, output_at, done_at]) * 1e3
    return times


def benchmark_row(path: Path, name: str, precision: str, size, threads: int, frames, args) -> dict:
    cores = threads or os.cpu_count()
    cv2.setNumThreads(cores)
    predictor = PupilPredictor(path, threads=cores, layout=args.ort_layout)
    times = time_stages(predictor, frames, args.runs, args.warmup)
    total = times.sum(axis=1)
    return {"model": name, "precision": precision, "size": size, "threads": cores, "layout": predictor.layout,
            "kb": path.stat().st_size / 1024, "stages": np.median(times, axis=0),
            "stages_p99": np.percentile(times, 99, axis=0),
            "median": float(np.median(total)), "p99": float(np.percentile(total, 99))}


def operator_profile(path: Path, layout: str, frame: np.ndarray, runs: int,
                     folder: Path) -> tuple[float, list]:
    """onnxruntime's profile of ``path`` in ``layout`` on one thread over ``runs`` frames of the
    model-ready (1, 1, H, W) ``frame``: (kernel ms per frame, [(op type, nodes, ms per frame)],
    slowest first)."""
    import onnxruntime as ort

    options = session_options(1, layout)  # the predictor's
    options.enable_profiling, options.profile_file_prefix = True, str(folder / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: frame}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    micros, nodes = collections.Counter(), collections.defaultdict(set)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]].add(event["name"])
    ops = [(op, len(nodes[op]), total / runs / 1e3) for op, total in micros.most_common()]
    return sum(micros.values()) / runs / 1e3, ops


def format_profile(name: str, precision: str, size, layout: str, kernel_ms: float, ops: list) -> str:
    """One markdown row: the operators that take at least 1% of the kernel time."""
    shares = ", ".join(f"{op} {100 * ms / kernel_ms:.0f}% ({count})" for op, count, ms in ops
                       if ms >= 0.01 * kernel_ms)
    return f"| {name} | {precision} | {size[0]}x{size[1]} | {layout} | {kernel_ms:.2f} | {shares} |"


def print_profiles(files: dict, layouts: dict, size, frame: np.ndarray, runs: int, folder: Path) -> None:
    """The profile of every file of ``files`` in its one-thread row's layout (``layouts``)."""
    ready = preprocess.normalize_frame(preprocess.enhance_frame(preprocess.letterbox(frame, *size)[0]))
    print("\n| model | precision | input | layout | kernel ms per frame | "
          "operator: share of kernel time (nodes) |")
    print("|---|---|---|---|---:|---|")
    for key, path in files.items():
        kernel_ms, ops = operator_profile(path, layouts[key], ready[None, None], runs, folder)
        print(format_profile(*key, size, layouts[key], kernel_ms, ops), flush=True)
    print()


def format_row(row: dict) -> str:
    stages = " | ".join(f"{m:.2f} / {p:.2f}" for m, p in zip(row["stages"], row["stages_p99"]))
    over = row["median"] - BUDGET_MS
    if over <= 0:
        verdict = f"within ({-over:.2f} ms to spare)"
    else:
        slowest = STAGES[int(np.argmax(row["stages"]))]
        verdict = f"{over:.2f} ms over; {slowest} {row['stages'].max():.2f} ms"
    return (f"| {row['model']} | {row['precision']} | {row['size'][0]}x{row['size'][1]} | {row['threads']} | "
            f"{row['layout']} | {row['kb']:.0f} | {stages} | {row['median']:.2f} / {row['p99']:.2f} | "
            f"{1000.0 / row['median']:.0f} | {verdict} |")


def load_models(args) -> dict:
    """{name: model in eval mode}: the checkpoints' trained models, or initial weights."""
    if args.checkpoints:
        models = {}
        for path in args.checkpoints:
            model = load_model(path)
            models[getattr(model, "model_name", None) or path.stem] = model
        return models
    return {name: build_model(name).eval() for name in args.models}


def main(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0 or args.calibration_frames < 1 or min(args.threads) < 0:
        print("error: --runs and --calibration-frames must be >= 1, --warmup and --threads >= 0",
              file=sys.stderr)
        return 2
    try:
        models = load_models(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frames = camera_frames(max(args.calibration_frames, 8), args.frame, args.seed)
    print(f"camera frame {args.frame[0]}x{args.frame[1]}; ONNX Runtime {args.warmup} warm-up + "
          f"{args.runs} timed frames per row; cells are median / p99 ms; budget {BUDGET_MS:.2f} ms (120 Hz)")
    print(", ".join(f"{name} {count_parameters(model):,} parameters"
                    for name, model in models.items()) + "\n")
    print("| model | precision | input | threads | layout | ONNX KB | " + " | ".join(STAGES) +
          " | total | FPS | 120 Hz budget |")
    print("|---|---|---|---:|---|---:|" + "---:|" * (len(STAGES) + 2) + "---|")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            files = model_files(models, size, args.precisions, args.int8_layers,
                                frames[: args.calibration_frames], Path(folder))
            layouts = {}  # (name, precision) -> the layout of its one-thread row, for the profile
            for (name, precision), path in files.items():
                for threads in args.threads:
                    row = benchmark_row(path, name, precision, size, threads, frames[:8], args)
                    print(format_row(row), flush=True)
                    if row["threads"] == 1 or (name, precision) not in layouts:
                        layouts[name, precision] = row["layout"]
            if args.profile:
                print_profiles(files, layouts, size, frames[0], args.runs, Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
