"""Precompute throughput: 400x640 samples per second, per worker process, through the real pipeline.

Generates synthetic raw data once, then times, on the same samples:
- bare: ``process_sample`` alone on one thread, the frames already in memory (the compute bound);
- ``run_shards`` (read, preprocess, write parquet) for each worker count.
Each measurement is repeated and the median reported. Per worker, the pipeline is compared with
the bare rate: the rest is overhead (reading, building and writing parquet, process start-up).
CPU time per sample (all processes) is shown beside it: other work on the machine slows the
wall clock but barely changes CPU time, so "bare CPU / CPU" is the share of the pipeline's work
that is preprocessing, whatever the load.
Use a shard count divisible by every worker count (samples / shard size), or idle workers at the
end of the run count against the pipeline.

Example:
    python benchmarks/bench_precompute.py --samples 64 --shard-size 16 --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.prep.build_dataset import SampleOptions, default_workers, plan_shards, run_shards  # noqa: E402
from common.prep.openeds_source import find_split_dirs, list_raw_samples, read_raw_sample  # noqa: E402
from common.prep.preprocess import SkipSample, process_sample  # noqa: E402
from common.prep.synthetic import generate_raw_dataset  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=64, type=int, help="raw samples per measurement")
    parser.add_argument("--workers", nargs="+", default=sorted({1, default_workers()}), type=int,
                        help="worker counts to compare (default: 1 and all cores)")
    parser.add_argument("--repeats", default=3, type=int, help="measurements per worker count")
    parser.add_argument("--shard-size", default=16, type=int)
    return parser


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_run(samples, workers: int, shard_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes) of one run_shards."""
    out = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    try:
        start, cpu = time.perf_counter(), cpu_seconds()
        run_shards(out, plan_shards(samples, shard_size), SampleOptions(), workers)
        return time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        shutil.rmtree(out)


def time_bare(samples) -> tuple[float, float]:
    """(wall, CPU) seconds of ``process_sample`` over ``samples`` on one thread, frames read beforehand."""
    cv2.setNumThreads(1)  # as in a worker
    frames = [read_raw_sample(sample) for sample in samples]
    start, cpu = time.perf_counter(), time.process_time()
    for image, label in frames:
        try:
            process_sample(image, label, (400, 640))
        except SkipSample:  # skipped samples also count in the pipeline's rate
            pass
    return time.perf_counter() - start, time.process_time() - cpu


def main(args) -> None:
    raw = Path(tempfile.mkdtemp(prefix="bench-raw-"))
    try:
        generate_raw_dataset(raw, args.samples, seed=0, splits=("train",), fractions=(1.0,))
        split_dir = find_split_dirs(raw, ["train"])["train"]
        samples = {"train": list_raw_samples(split_dir, "train")}
        bare = median_runs(lambda: time_bare(samples["train"]), args.repeats)
        rows = [(workers, *median_runs(lambda: time_run(samples, workers, args.shard_size), args.repeats))
                for workers in args.workers]
    finally:
        shutil.rmtree(raw)
    print_table(args, bare, rows)


def median_runs(run, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls of ``run``."""
    runs = [run() for _ in range(repeats)]
    return tuple(statistics.median(r[i] for r in runs) for i in (0, 1))


def print_table(args, bare: tuple[float, float], rows) -> None:
    """Wall-clock rates, and CPU ms per sample: the latter holds on a machine busy with other work."""
    n, base = args.samples, args.samples / rows[0][1]
    print(f"\n{n} samples of 400x640, shards of {args.shard_size}, median of {args.repeats} runs")
    print(f"bare process_sample, one thread: {n / bare[0]:.1f} samples/s, "
          f"{1000 * bare[1] / n:.1f} CPU ms/sample\n")
    print("| workers | median s | samples/s | samples/s per worker | per worker / bare | speed-up vs first "
          "| CPU ms/sample | bare CPU / CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers, seconds, cpu in rows:
        rate = n / seconds
        per_worker = rate / workers
        print(f"| {workers} | {seconds:.2f} | {rate:.1f} | {per_worker:.1f} | {per_worker * bare[0] / n:.0%} "
              f"| {rate / base:.2f}x | {1000 * cpu / n:.1f} | {bare[1] / cpu:.0%} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
