"""Input pipeline throughput: samples per second of three ways to feed training, in one run.

    precomputed     the training DataLoader over the precomputed Arrow split (``make_loader``);
    device          the device-resident split (``DeviceBatches``), batches by ``index_select``;
    runtime         what training did before precompute existed: per sample, read PNG + npy with
                    the project's reader and run ``process_sample`` (gamma, CLAHE, boundary
                    weights, distance maps, ellipse), collated by a DataLoader.

Raw synthetic data comes from ``generate_raw_dataset`` and is precomputed by the real pipeline
(``build_dataset``). Each loader is timed over whole shuffled epochs (median of --repeats, worker
start-up included, as training pays it once per run with persistent workers: the first epoch is
excluded). The model's step rate at the same size and batch (``bench_train.time_model``) is the
bar the device path must clear. Ratios are against the runtime-preprocessing loader.

Example:
    python benchmarks/bench_input.py --samples 96 --batch-size 4 --num-workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import frame_size, time_model  # noqa: E402
from common.prep.build_dataset import SampleOptions, build_dataset, load_row  # noqa: E402
from common.prep.openeds_source import find_split_dirs, list_raw_samples  # noqa: E402
from common.prep.synthetic import generate_raw_dataset  # noqa: E402
from common.train.data import (  # noqa: E402
    ALL_TARGETS,
    AUTO_WORKERS,
    TRAIN_SPLIT,
    DeviceBatches,
    loader_workers,
    make_loader,
    to_device,
)
from common.train.engine import setup_runtime  # noqa: E402
from common.train.layout import detect_layout  # noqa: E402

ROW_TENSORS = ("image", "label", "spatial_weights", "dist_map")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default=96, type=int, help="raw frames generated and precomputed")
    parser.add_argument("--size", default=(400, 640), type=frame_size, metavar="HxW")
    parser.add_argument("--batch-size", default=4, type=int)
    parser.add_argument("--num-workers", default=None, type=int,
                        help="DataLoader workers of both loaders (default: as training chooses: 2 for the "
                             "runtime-preprocessing loader, 0 for precomputed data)")
    parser.add_argument("--repeats", default=3, type=int, help="timed epochs per loader (after one untimed)")
    parser.add_argument("--model", default="efficientvit", help="whose step rate is the bar")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None)
    return parser


class RuntimeRows(torch.utils.data.Dataset):
    """One raw sample per index, read and preprocessed on the fly (the pre-precompute way)."""

    def __init__(self, samples, options: SampleOptions):
        self.samples, self.options = samples, options

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row, _ = load_row(self.samples[index], self.options)
        out = {name: torch.from_numpy(row[name]) for name in ROW_TENSORS}
        out["ellipse"] = torch.tensor([row["cx"], row["cy"], row["rx"], row["ry"]], dtype=torch.float32)
        return out


def epoch_seconds(loader, device: torch.device, epochs: int) -> list[float]:
    """Wall time of whole epochs, each batch moved as training moves it; the first epoch is untimed."""
    times = []
    for epoch in range(epochs + 1):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            batch = to_device(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize()  # time the copies, not their launch
        times.append(time.perf_counter() - start)
    return times[1:]


def build(args, root: Path):
    """Raw frames under root/raw, precomputed into root/precomputed; returns (raw samples, split)."""
    size = tuple(args.size)
    generate_raw_dataset(root / "raw", args.samples, seed=0, splits=(TRAIN_SPLIT,), fractions=(1.0,),
                         height=size[0], width=size[1])
    samples = list_raw_samples(find_split_dirs(root / "raw", [TRAIN_SPLIT])[TRAIN_SPLIT], TRAIN_SPLIT)
    options = SampleOptions(height=size[0], width=size[1])
    build_dataset({TRAIN_SPLIT: samples}, root / "precomputed", options, workers=2,
                  shard_size=100, source="bench_input")
    # load_splits wants both splits; only train is precomputed here, so its files are read directly
    files = sorted(str(p) for p in (root / "precomputed" / "data").glob(f"{TRAIN_SPLIT}-*.parquet"))
    split = load_dataset("parquet", data_files={TRAIN_SPLIT: files}, cache_dir=str(root / "cache"))
    split = split[TRAIN_SPLIT]
    kept = set(split["filename"])  # the synthetic set holds deliberate rejects: time the same frames
    return [s for s in samples if s.name in kept], options, split


def main(args) -> None:
    runtime = setup_runtime(args)
    device = runtime.device
    root = Path(tempfile.mkdtemp(prefix="bench-input-"))
    try:
        samples, options, split = build(args, root)
        layout = detect_layout({TRAIN_SPLIT: split})
        workers = loader_workers(args, layout, ALL_TARGETS)  # what training uses for this data
        runtime_workers = AUTO_WORKERS if args.num_workers is None else args.num_workers
        shared = dict(batch_size=args.batch_size, shuffle=True, seed=0, num_workers=workers)
        precomputed = make_loader(split, layout, ALL_TARGETS, pin_memory=runtime.pin_memory, **shared)
        start = time.perf_counter()
        resident = DeviceBatches(precomputed.dataset, precomputed.sampler, device, workers)
        load_s = time.perf_counter() - start
        runtime_loader = torch.utils.data.DataLoader(
            RuntimeRows(samples, options), batch_size=args.batch_size, shuffle=True, drop_last=True,
            num_workers=runtime_workers, persistent_workers=runtime_workers > 0,
            generator=torch.Generator().manual_seed(0))
        rates = {}
        for name, loader in (("runtime", runtime_loader), ("precomputed", precomputed), ("device", resident)):
            seconds = statistics.median(epoch_seconds(loader, device, args.repeats))
            rates[name] = len(loader) * args.batch_size / seconds
        _, step_s = time_model(args.model, tuple(args.size), _step_args(args), runtime)
    finally:
        shutil.rmtree(root)
    used = f"runtime {runtime_workers}, precomputed {workers}"
    report(args, runtime, rates, args.batch_size / step_s, load_s, used)


def _step_args(args):
    return argparse.Namespace(batch_size=args.batch_size, warmup=1, steps=3)


def report(args, runtime, rates: dict, step_rate: float, load_s: float, workers: str) -> None:
    size = f"{args.size[0]}x{args.size[1]}"
    print(f"\n{runtime.describe()} | threads {torch.get_num_threads()} | {args.samples} frames of {size} | "
          f"batch {args.batch_size} | workers: {workers} | "
          f"median of {args.repeats} epochs\n")
    print("| loader | samples/s | / runtime preprocessing | / model step rate |")
    print("|---|---:|---:|---:|")
    labels = {"runtime": "runtime preprocessing (PNG + npy, gamma, CLAHE, weights, distances)",
              "precomputed": "precomputed Arrow (DataLoader)", "device": "device-resident (index_select)"}
    for name in ("runtime", "precomputed", "device"):
        print(f"| {labels[name]} | {rates[name]:.1f} | {rates[name] / rates['runtime']:.1f} | "
              f"{rates[name] / step_rate:.1f} |")
    print(f"| {args.model} training step (bench_train) | {step_rate:.1f} | "
          f"{step_rate / rates['runtime']:.1f} | 1.0 |")
    print(f"\ndevice-resident split loaded once in {load_s:.1f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
