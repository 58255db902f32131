"""Training throughput: samples per second for each model at 400x640 on this machine.

Times the engine's real step (forward under the runtime's autocast, task loss, OptimizerStep) on
a fixed batch of synthetic frames already on the device, so data loading is not measured.
Reports the median step time over many steps after warm-up.

Example:
    python benchmarks/bench_train.py --batch-size 8 --steps 10 --warmup 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engine import OptimizerStep, setup_runtime  # noqa: E402
from common.models import MODEL_NAMES, build_model, count_parameters  # noqa: E402
from common.tasks import TASKS  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--batch-size", default=8, type=int)
    parser.add_argument("--size", nargs=2, default=[400, 640], type=int, metavar=("H", "W"))
    parser.add_argument("--steps", default=10, type=int, help="timed steps per model")
    parser.add_argument("--warmup", default=2, type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    return parser


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


def time_model(name: str, args, runtime) -> tuple[int, float]:
    model = build_model(name).to(runtime.device)
    task = TASKS[model.task](epochs=1, image_size=tuple(args.size), device=runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stepper = OptimizerStep(runtime, clip_grad=1.0)
    forward = torch.compile(model) if runtime.compile else model
    batch = synthetic_batch(args.batch_size, *args.size, runtime.device)
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
    print(f"\n{runtime.describe()} | threads {torch.get_num_threads()} | batch {args.batch_size} | "
          f"{args.size[0]}x{args.size[1]} | median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| model | params | median step s | samples/s |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        params, seconds = time_model(name, args, runtime)
        print(f"| {name} | {params:,} | {seconds:.3f} | {args.batch_size / seconds:.1f} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
