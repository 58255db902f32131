"""Synthetic frame rendering speed: ms per frame of the default generator and of each
domain-randomized family (common/prep/synthetic.py).

Renders --frames frames per mode at --size on one thread (OpenCV's own threads off, as in a
precompute worker), after one warm-up frame, and reports the median of --repeats runs as wall and
CPU ms per frame. CPU time barely moves when other work shares the machine; wall time does.

Example:
    python benchmarks/bench_synthetic.py --frames 50 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.prep.synthetic import FAMILIES, render_randomized_sample, render_sample, sample_rng  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default=50, type=int, help="frames per measurement")
    parser.add_argument("--repeats", default=3, type=int, help="measurements per mode")
    parser.add_argument("--size", nargs=2, default=[400, 640], type=int, metavar=("H", "W"))
    return parser


def render_mode(family: str | None, index: int, height: int, width: int):
    rng = sample_rng(0, index, family)
    if family is None:
        return render_sample(rng, height, width)
    return render_randomized_sample(rng, height, width, family)


def time_mode(family: str | None, frames: int, height: int, width: int) -> tuple[float, float]:
    """(wall, CPU) ms per frame over frames 0..frames-1 of the mode."""
    start, cpu = time.perf_counter(), time.process_time()
    for index in range(frames):
        render_mode(family, index, height, width)
    return 1000 * (time.perf_counter() - start) / frames, 1000 * (time.process_time() - cpu) / frames


def main(args) -> None:
    cv2.setNumThreads(1)
    height, width = args.size
    print(f"{args.frames} frames of {height}x{width} per run, one thread, median of {args.repeats} runs\n")
    print("| generator | wall ms/frame | CPU ms/frame |")
    print("|---|---:|---:|")
    for family in (None, *FAMILIES):
        render_mode(family, args.frames, height, width)  # warm-up: OpenCV and numpy first-call costs
        runs = [time_mode(family, args.frames, height, width) for _ in range(args.repeats)]
        wall, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
        name = "default" if family is None else f"randomized {family}"
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
