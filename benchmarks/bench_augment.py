"""Cost of train-split augmentation per batch: each ``--augment`` group, and each part alone.

The batch is what the segmentation task trains on (image, label, spatial weights, distance maps)
plus the ellipse target, made by the real preprocessing (``process_sample``) from generated eye
frames, already on the device as ``to_device`` leaves it. A part's cost does not depend on its
probability: without host syncs every sample is computed and the drawn ones are kept, so a part
costs its full price whenever its probability is above 0 (and nothing at 0). Each row is the
median of --repeats calls after --warmup calls, wall time and this process's CPU time (all its
threads: on a shared machine CPU time moves less than wall time); CUDA times are taken after a
synchronize.

Example:
    python benchmarks/bench_augment.py                       # batch 8 at 400x640 on the CPU
    python benchmarks/bench_augment.py --device cuda --repeats 50
    python benchmarks/bench_augment.py --threads 1 --no-parts --groups original original,geometric all
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import augment_groups  # noqa: E402
from common.prep.preprocess import Ellipse, draw_ellipse, process_sample  # noqa: E402
from common.specs import AUGMENT_GROUPS  # noqa: E402
from common.train.augment import GROUP_PROBABILITIES, AugmentConfig, augment_batch  # noqa: E402
from common.train.data import to_device  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", default=8, type=int)
    parser.add_argument("--size", nargs=2, default=(400, 640), type=int, metavar=("H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", default=10, type=int)
    parser.add_argument("--warmup", default=2, type=int)
    parser.add_argument("--no-parts", action="store_true", help="time the groups only")
    parser.add_argument("--groups", nargs="+", type=augment_groups, metavar="GROUPS",
                        help="--augment values to time (default: each group alone, then all), e.g. "
                             "original,geometric")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return parser


def eye_frame(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A raw grey frame (H, W) uint8 with skin texture, an iris and a dark pupil, and its 4-class label."""
    pupil = Ellipse(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.04, 0.09),
                    rng.uniform(0.04, 0.09), rng.uniform(0, 180))
    iris = Ellipse(pupil.cx, pupil.cy, 2.3 * pupil.rx, 2.3 * pupil.rx, 0.0)
    label = np.where(draw_ellipse(iris, height, width) > 0, 2, 0)
    label[draw_ellipse(pupil, height, width) > 0] = 3
    frame = rng.normal(150, 12, (height, width))
    frame[label == 2] -= 50
    frame[label == 3] = rng.normal(25, 4, (label == 3).sum())
    return np.clip(frame, 0, 255).astype(np.uint8), label.astype(np.uint8)


def make_batch(batch_size: int, height: int, width: int, device: torch.device) -> dict:
    rng = np.random.default_rng(0)
    rows = [process_sample(*eye_frame(rng, height, width)) for _ in range(batch_size)]
    batch = {key: torch.from_numpy(np.stack([row[key] for row in rows]))
             for key in ("image", "label", "spatial_weights", "dist_map")}
    batch["ellipse"] = torch.tensor([[row[k] for k in ("cx", "cy", "rx", "ry")] for row in rows],
                                    dtype=torch.float32)
    return to_device(batch, device)


def median_ms(batch: dict, config: AugmentConfig, device: torch.device, repeats: int,
              warmup: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of one ``augment_batch`` call."""
    generator = torch.Generator(device=device).manual_seed(0)
    walls, cpus = [], []
    for call in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        augment_batch(batch, generator, config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if call >= warmup:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
    return 1000 * statistics.median(walls), 1000 * statistics.median(cpus)


def rows(parts: bool, groups: list[str] | None = None) -> list[tuple[str, AugmentConfig]]:
    """(name, config): every group at its preset, all, then every part alone at probability 1."""
    named = [(group, AugmentConfig.from_groups(group)) for group in groups or (*AUGMENT_GROUPS, "all")]
    if parts:
        none = AugmentConfig.from_groups("none")
        for group, probabilities in GROUP_PROBABILITIES.items():
            named += [(f"  {group}: {name[2:]}", dataclasses.replace(none, **{name: 1.0}))
                      for name in probabilities]
    return named


def main(args) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = args.size
    batch = make_batch(args.batch_size, height, width, device)
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"augment_batch: batch {args.batch_size} at {height}x{width} on {device}{threads}; "
          f"median of {args.repeats} calls (ms)")
    print(f"{'augmentation':34s} {'median ms':>10s} {'CPU ms':>10s}")
    for name, config in rows(not args.no_parts, args.groups):
        wall, cpu = median_ms(batch, config, device, args.repeats, args.warmup)
        print(f"{name:34s} {wall:10.1f} {cpu:10.1f}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
