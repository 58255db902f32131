"""Training throughput: samples per second for each model at one or more frame sizes on this machine.

Times the engine's real step (forward under the runtime's autocast, task loss, OptimizerStep) on
a fixed batch of synthetic frames already on the device, so data loading is not measured.
Reports the median step time over many steps after warm-up, one row per model and size; with
several sizes, each row also gives its step time relative to the model's first size.

Examples:
    python benchmarks/bench_train.py --batch-size 8 --steps 10 --warmup 2
    python benchmarks/bench_train.py --sizes 400x640 208x320 --batch-size 4 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.models import MODEL_NAMES, build_model, count_parameters  # noqa: E402
from common.train.engine import OptimizerStep, setup_runtime  # noqa: E402
from common.train.tasks import TASKS  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--batch-size", default=8, type=int)
    parser.add_argument("--sizes", nargs="+", default=[(400, 640)], type=frame_size, metavar="HxW",
                        help="frame sizes to time, multiples of 16 (default 400x640)")
    parser.add_argument("--steps", default=10, type=int, help="timed steps per model")
    parser.add_argument("--warmup", default=2, type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    return parser


def frame_size(text: str) -> tuple[int, int]:
    """'400x640' -> (400, 640); argparse turns the ValueError into a usage error."""
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def synthetic_batch(batch_size: int, height: int, width: int, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    label = (torch.rand(batch_size, height, width, generator=generator) > 0.9).long()
    return {
        "image": torch.rand(batch_size, 1, height, width, generator=generator).mul(2).sub(1).to(device),
        "label": label.to(device),
        "spatial_weights": torch.zeros(batch_size, height, width, device=device),
        "dist_map": torch.zeros(batch_size, 2, height, width, device=device),
        "ellipse": torch.rand(batch_size, 4, generator=generator).to(device),
    }


def time_model(name: str, size: tuple[int, int], args, runtime) -> tuple[int, float]:
    model = build_model(name).to(runtime.device)
    task = TASKS[model.task](epochs=1, image_size=size, device=runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stepper = OptimizerStep(runtime, clip_grad=1.0)
    forward = torch.compile(model) if runtime.compile else model
    batch = synthetic_batch(args.batch_size, *size, runtime.device)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with runtime.autocast():
            outputs = forward(batch["image"])
        stepper(task.loss(outputs, batch, 0)["loss"], optimizer, model.parameters())
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()  # time the work, not the launch
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return count_parameters(model), statistics.median(times)


def main(args) -> None:
    runtime = setup_runtime(args)
    first = "x".join(map(str, args.sizes[0]))
    print(f"\n{runtime.describe()} | threads {torch.get_num_threads()} | batch {args.batch_size} | "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print(f"| model | params | size | median step s | samples/s | step time / {first} |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models:
        reference = None  # the model's step time at the first size
        for size in args.sizes:
            params, seconds = time_model(name, size, args, runtime)
            reference = reference or seconds
            print(f"| {name} | {params:,} | {size[0]}x{size[1]} | {seconds:.3f} | "
                  f"{args.batch_size / seconds:.1f} | {seconds / reference:.2f} |", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
