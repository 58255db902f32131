"""Single-thread ONNX Runtime latency of every model at full frame size.

Each model is exported (BN folded) to a temporary folder and run by ONNX Runtime on the CPU with
one intra-op and one inter-op thread and all graph optimizations, batch 1, the edge runtime's setting.
After the warm-up runs, the median and 90th percentile over the timed runs are printed as a markdown
table together with the latency target where the model has one.

Example:
    python benchmarks/bench_inference.py --runs 200 --warmup 20
    python benchmarks/bench_inference.py --models efficientvit efficientvit_micro --height 400 --width 640
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.infer.export import export_onnx  # noqa: E402
from common.models import MODEL_NAMES, build_model, count_parameters  # noqa: E402

TARGET_MS = {"efficientvit": 15.0, "efficientvit_micro": 8.0}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ONNX Runtime single-thread latency benchmark",
                                     add_help=add_help)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--height", type=int, default=400)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs before timing")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def make_session(path: Path):
    """ONNX Runtime CPU session pinned to one thread with every graph optimization enabled."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_session(session, image: np.ndarray, runs: int, warmup: int) -> np.ndarray:
    """Per-run latencies in milliseconds, shape (runs,)."""
    feed = {session.get_inputs()[0].name: image}
    for _ in range(warmup):
        session.run(None, feed)
    latencies = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        latencies[i] = (time.perf_counter() - start) * 1000.0
    return latencies


def benchmark_model(name: str, args: argparse.Namespace, folder: Path) -> dict:
    model = build_model(name).eval()
    path = export_onnx(model, folder / f"{name}.onnx", input_size=(args.height, args.width))
    rng = np.random.default_rng(args.seed)
    image = rng.uniform(-1, 1, (1, 1, args.height, args.width)).astype(np.float32)  # (1, 1, H, W)
    latencies = time_session(make_session(path), image, args.runs, args.warmup)
    return {
        "name": name, "params": count_parameters(model), "kb": path.stat().st_size / 1024,
        "median": float(np.median(latencies)), "p90": float(np.percentile(latencies, 90)),
        "target": TARGET_MS.get(name),
    }


def format_row(row: dict) -> str:
    target = f"<= {row['target']:g} ms" if row["target"] else "-"
    ratio = f"{row['median'] / row['target']:.2f}" if row["target"] else "-"
    return (f"| {row['name']} | {row['params']:,} | {row['kb']:.0f} | {row['median']:.2f} | "
            f"{row['p90']:.2f} | {target} | {ratio} |")


def main(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.warmup < 0:
        print("error: --runs must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.height % 16 or args.width % 16:
        print(f"error: height and width must be multiples of 16, got {args.height}x{args.width}",
              file=sys.stderr)
        return 2
    print(f"ONNX Runtime, 1 thread, batch 1, {args.height}x{args.width}, "
          f"{args.warmup} warm-up + {args.runs} timed runs\n")
    print("| model | params | ONNX KB | median ms | p90 ms | target | ratio to target |")
    print("|---|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            print(format_row(benchmark_model(name, args, Path(folder))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
