"""Command-line plumbing shared by the top-level scripts: parsers, error reporting and exit codes.

Imports only the standard library and light ``common`` modules, so a launcher can parse and check
flags on a machine without torch, datasets or OpenCV."""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
import threading
from typing import Callable, Iterator

from common.defaults import DEFAULT_DATA_DIR, DEFAULT_HF_REPO, DEMO_SAMPLES
from common.errors import UserError


def report_errors(main: Callable) -> Callable:
    """Decorate a script's ``main(args)``: UserError (and its subclasses) -> message + exit code.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def parse_frame_size(values: list[str]) -> tuple[int, int] | str:
    """``--size`` values -> (H, W), or "native" to keep each frame's own size."""
    if len(values) == 1 and values[0] == "native":
        return "native"
    try:
        height, width = (int(v) for v in values)
    except ValueError:
        raise UserError(f"--size takes H W (two integers) or 'native', got {' '.join(values)}") from None
    if height <= 0 or width <= 0:
        raise UserError(f"--size must be positive, got {height} {width}")
    return height, width


def _number(text: str, kind: type, low: float, inclusive: bool, what: str):
    """Parse ``text`` as ``kind`` and check it against ``low``; argparse prints the message."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
    if value != value or value < low or (value == low and not inclusive):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return value


def positive_int(text: str) -> int:
    """argparse type for epochs, batch sizes and frame sizes: an integer >= 1."""
    return _number(text, int, 1, True, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type for counts that may be zero (e.g. --num-workers)."""
    return _number(text, int, 0, True, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type for the learning rate: a finite number > 0."""
    value = _number(text, float, 0.0, False, "a number > 0")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got '{text}'")
    return value


def non_negative_float(text: str) -> float:
    """argparse type for weight decay and gradient clipping: a finite number >= 0."""
    value = _number(text, float, 0.0, True, "a number >= 0")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got '{text}'")
    return value


class Interrupt(KeyboardInterrupt):
    """KeyboardInterrupt that remembers the signal (SIGINT or SIGTERM) that raised it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Interrupt`` so ``finally`` clauses and atomic
    writes run; the previous handlers come back afterwards. Only the main thread can install
    handlers: elsewhere the block runs with the process's handlers unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupt(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def training_parser(description: str, defaults: dict | None = None, add_help: bool = True):
    """The flags every training script shares (torchvision reference-script style).

    ``defaults`` overrides per script (e.g. a larger --lr for a smaller model).
    """
    parser = argparse.ArgumentParser(description=description, add_help=add_help)
    data = parser.add_argument_group("data")
    data.add_argument("--demo", action="store_true", help="train on the embedded synthetic dataset")
    data.add_argument("--demo-samples", default=DEMO_SAMPLES, type=positive_int,
                      help="size of the --demo dataset")
    data.add_argument("--demo-size", nargs=2, type=positive_int, default=[400, 640], metavar=("H", "W"),
                      help="frame size of the --demo dataset")
    data.add_argument("--dataset", type=str,
                      help="a local dataset folder (precompute.py output, or data/{split}/*.parquet shards)")
    data.add_argument("--hf-repo", default=DEFAULT_HF_REPO, help="Hub dataset (used without --demo/--dataset)")
    data.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="cache for Hub and demo data")
    data.add_argument("--size", nargs=2, type=positive_int, metavar=("H", "W"),
                      help="frame size for datasets that store frames as flat lists (default: the dataset's "
                           "manifest or card, else 400 640)")
    data.add_argument("--preprocessed", choices=("auto", "yes", "no"), default="auto",
                      help="whether stored frames already carry gamma + CLAHE: auto reads the dataset's "
                           "preprocessed (or image_preprocessed) column, absent = no; yes/no override it")
    data.add_argument("--num-workers", default=None, type=non_negative_int,
                      help="DataLoader worker processes (default: 0 for precomputed data, which is only "
                           "read, 2 when frames or targets are computed at load time)")
    data.add_argument("--data-on-device", choices=("auto", "on", "off"), default="auto",
                      help="hold both splits on the device and batch there, without a DataLoader; "
                           "auto: on for CUDA when they fit in half the free GPU memory (at most 32 GiB)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", default=10, type=positive_int)
    train.add_argument("--batch-size", default=8, type=positive_int)
    train.add_argument("--lr", default=3e-3, type=positive_float,
                       help="initial learning rate (cosine decay per epoch to 1%%)")
    train.add_argument("--weight-decay", default=1e-4, type=non_negative_float)
    train.add_argument("--clip-grad", default=1.0, type=non_negative_float,
                       help="max gradient norm (0 disables)")
    train.add_argument("--no-augment", action="store_true", help="disable train-split augmentation")
    train.add_argument("--seed", default=0, type=int)
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    runtime.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.compile the model (default: on for CUDA, off otherwise)")
    runtime.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                         help="mixed precision with GradScaler (default: on for CUDA; CUDA only)")
    runtime.add_argument("--output-dir", default="./checkpoints", help="checkpoints, metrics, curves, ONNX")
    runtime.add_argument("--resume", type=str, help="checkpoint to resume from (e.g. the last_*.pt file)")
    runtime.add_argument("--test-only", action="store_true",
                         help="only evaluate the --resume checkpoint on the validation split")
    parser.set_defaults(**(defaults or {}))
    return parser
