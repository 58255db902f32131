"""Precompute throughput: 400x640 samples per second, per worker process, through the real pipeline.

Generates synthetic raw data once, then times ``run_shards`` (read, preprocess, write parquet) for
each worker count, repeating each measurement and reporting the median.

Example:
    python benchmarks/bench_precompute.py --samples 64 --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.pipeline import SampleOptions, plan_shards, run_shards  # noqa: E402
from common.raw_sources import find_split_dirs, list_raw_samples  # noqa: E402
from common.synthetic import generate_raw_dataset  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=64, type=int, help="raw samples per measurement")
    parser.add_argument("--workers", nargs="+", default=[1, 2], type=int, help="worker counts to compare")
    parser.add_argument("--repeats", default=3, type=int, help="measurements per worker count")
    parser.add_argument("--shard-size", default=32, type=int)
    return parser


def time_run(samples, workers: int, shard_size: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    try:
        start = time.perf_counter()
        run_shards(out, plan_shards(samples, shard_size), SampleOptions(), workers)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out)


def main(args) -> None:
    raw = Path(tempfile.mkdtemp(prefix="bench-raw-"))
    try:
        generate_raw_dataset(raw, args.samples, seed=0, splits=("train",), fractions=(1.0,))
        split_dir = find_split_dirs(raw, ["train"])["train"]
        samples = {"train": list_raw_samples(split_dir, "train")}
        rows = []
        for workers in args.workers:
            times = [time_run(samples, workers, args.shard_size) for _ in range(args.repeats)]
            rate = args.samples / statistics.median(times)
            rows.append((workers, statistics.median(times), rate, rate / workers))
    finally:
        shutil.rmtree(raw)
    base = rows[0][2]
    print(f"\n{args.samples} samples of 400x640, median of {args.repeats} runs\n")
    print("| workers | median s | samples/s | samples/s per worker | speed-up vs first |")
    print("|---:|---:|---:|---:|---:|")
    for workers, seconds, rate, per_worker in rows:
        print(f"| {workers} | {seconds:.2f} | {rate:.1f} | {per_worker:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
