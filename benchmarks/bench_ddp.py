"""DDP on this machine: samples/s of 1 process vs N torchrun processes, through the real scripts.

Each configuration trains the same demo dataset for ``--epochs`` epochs with
``train_efficientvit_tiny_local.py`` (or ``--script``), launched by ``torchrun --standalone``
(N > 1) or plainly (N = 1) with one thread per process, as torchrun sets it. Samples/s is the
training frames of an epoch over that epoch's seconds (from the run's metrics file), median
over the epochs after the first (start-up and first-batch costs are paid there). An epoch's
seconds include its validation pass.

Example:
    python benchmarks/bench_ddp.py --processes 1 2 --samples 96 --size 208 320 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--script", default="train_efficientvit_tiny_local.py")
    parser.add_argument("--samples", type=int, default=96, help="demo dataset size")
    parser.add_argument("--size", nargs=2, type=int, default=[208, 320], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--epochs", type=int, default=3)
    return parser


def epoch_rates(args, processes: int, work: Path) -> list[float]:
    """Training samples/s of each epoch after the first, for one launch with ``processes``."""
    out = work / f"run-{processes}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), str(ROOT / args.script), "--demo",
               "--demo-samples", str(args.samples), "--demo-size", *map(str, args.size),
               "--batch-size", str(args.batch_size), "--num-workers", "0", "--epochs", str(args.epochs),
               "--data-dir", str(work / "data"), "--output-dir", str(out)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, capture_output=True, env=env)
    history = json.loads(next(out.glob("metrics_*.json")).read_text())
    manifest = json.loads(next((work / "data").glob("demo-*/precomputed/manifest.json")).read_text())
    frames = manifest["splits"]["train"]["rows"]
    return [frames / row["seconds"] for row in history[1:]]


def main(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        rows = [(n, statistics.median(epoch_rates(args, n, Path(folder)))) for n in args.processes]
    base = rows[0][1]
    print(f"{args.script}, {args.samples} demo frames at {args.size[0]}x{args.size[1]}, batch "
          f"{args.batch_size} per process, {args.epochs} epochs (median after the first)")
    print("| processes | samples/s | vs 1st row |\n|---:|---:|---:|")
    for processes, rate in rows:
        print(f"| {processes} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
