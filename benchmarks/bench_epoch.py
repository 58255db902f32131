"""Where an epoch's time goes: data wait vs model step, in the real engine, per model and frame size.

For each size the demo dataset is built through the real precompute pipeline, a session is opened
with the real engine (``open_session``: the same loaders, model, task and runtime as training) and
``run_epoch`` runs as training runs it. Its loaders are wrapped so that the time spent waiting for
each batch (``next`` on the loader) is recorded. Per epoch:
    data wait       train + validation time spent waiting for batches;
    compute         the rest of train_one_epoch + evaluate (to_device, augmentation, forward,
                    loss, backward, optimizer step, metrics);
    files           the rest of run_epoch: checkpoints, the prediction picture, logging.
The last epoch is reported (worker start-up is paid in the first); samples/s = train frames / epoch.

Example:
    python benchmarks/bench_epoch.py --models efficientvit --sizes 400x640 208x208 --samples 64
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import frame_size  # noqa: E402
from common.cli import training_parser  # noqa: E402
from common.specs import SPECS  # noqa: E402
from common.train.engine import open_session, run_epoch  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["efficientvit"], choices=sorted(SPECS))
    parser.add_argument("--sizes", nargs="+", default=[(400, 640), (208, 208)], type=frame_size,
                        metavar="HxW")
    parser.add_argument("--samples", default=64, type=int, help="demo frames (80%% train, 20%% validation)")
    parser.add_argument("--epochs", default=2, type=int, help="epochs run; the last is reported")
    parser.add_argument("--batch-size", default=8, type=int)
    parser.add_argument("--num-workers", default=2, type=int)
    parser.add_argument("--data-on-device", default="off", choices=("auto", "on", "off"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "bench-epoch-data"))
    return parser


class TimedLoader:
    """A loader that adds the seconds spent waiting for each batch to ``wait``."""

    def __init__(self, loader):
        self.loader, self.sampler, self.dataset = loader, loader.sampler, loader.dataset
        self.wait = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch


def time_epochs(name: str, size: tuple[int, int], args, out_dir: Path) -> dict:
    """Run ``args.epochs`` real epochs; the last epoch's split of time (seconds)."""
    train_args = training_parser("bench").parse_args([
        "--demo", "--demo-samples", str(args.samples), "--demo-size", *map(str, size),
        "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
        "--epochs", str(args.epochs), "--device", args.device, "--data-on-device", args.data_on_device,
        "--data-dir", args.data_dir, "--output-dir", str(out_dir)])
    with contextlib.redirect_stdout(io.StringIO()):  # the session's own report lines
        session, state = open_session(train_args, SPECS[name])
    train, valid = TimedLoader(session.loaders.train), TimedLoader(session.loaders.valid)
    session.loaders.train, session.loaders.valid = train, valid
    for epoch in range(args.epochs):
        train.wait = valid.wait = 0.0
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            row = run_epoch(session, state, epoch)
        total = time.perf_counter() - start
    session.tracker.finish("FINISHED")
    wait = train.wait + valid.wait
    frames = len(train) * args.batch_size
    return {"epoch": total, "wait": wait, "compute": row["seconds"] - wait, "files": total - row["seconds"],
            "frames": frames, "rate": frames / total}


def main(args) -> None:
    print(f"\n{args.device} | threads {torch.get_num_threads()} | {args.samples} demo frames | "
          f"batch {args.batch_size} | {args.num_workers} workers | data on device {args.data_on_device} | "
          f"epoch {args.epochs} of {args.epochs}\n")
    print("| model | size | epoch s | data wait s | compute s | files s | train samples/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        for size in args.sizes:
            with tempfile.TemporaryDirectory(prefix="bench-epoch-") as out:
                t = time_epochs(name, size, args, Path(out))
            print(f"| {name} | {size[0]}x{size[1]} | {t['epoch']:.2f} | {t['wait']:.2f} | "
                  f"{t['compute']:.2f} | {t['files']:.2f} | {t['rate']:.1f} |", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
