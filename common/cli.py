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

from common.errors import UserError
from common.specs import (
    AUGMENT_GROUPS,
    DEFAULT_ALPHA_FLOOR,
    DEFAULT_AUGMENT,
    DEFAULT_DATA_DIR,
    DEFAULT_EMA,
    DEFAULT_EPOCHS,
    DEFAULT_HF_REPO,
    DEFAULT_SIZE,
    DEMO_SAMPLES,
    SYNTHETIC_FAMILIES,
)


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


def ema_decay(text: str) -> float:
    """argparse type for --ema: a decay in [0, 1); 0 turns the moving average off."""
    value = _number(text, float, 0.0, True, "a decay in [0, 1) (0: off)")
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1) (0: off), got '{text}'")
    return value


def unit_fraction(text: str) -> float:
    """argparse type for weights between 0 and 1, both included (e.g. --alpha-floor)."""
    value = _number(text, float, 0.0, True, "a number in [0, 1]")
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'")
    return value


def augment_groups(text: str) -> str:
    """argparse type for --augment: a comma list of groups, ``all`` or ``none``, returned as the
    groups in their canonical order (``all`` spelled out), so the args file records what ran."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*AUGMENT_GROUPS, "all", "none")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(AUGMENT_GROUPS)}, "
                                         f"or all or none; got '{text}'")
    if "none" in names:
        if len(set(names)) > 1:
            raise argparse.ArgumentTypeError(f"'none' cannot be combined with other groups, got '{text}'")
        return "none"
    chosen = AUGMENT_GROUPS if "all" in names else names
    return ",".join(group for group in AUGMENT_GROUPS if group in chosen)


class Interrupt(KeyboardInterrupt):
    """KeyboardInterrupt that remembers the signal (SIGINT or SIGTERM) that raised it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Interrupt`` so ``finally`` clauses and atomic
    writes run; the previous handlers come back afterwards. Only the main thread can install
    handlers: elsewhere the block runs with the process's handlers unchanged.

    A signal that lands in Python code called back from a C library (pyarrow deserializing an
    extension type while a batch is gathered, say) can come out of the library as another
    exception; once a signal was received, any exception leaving the block is that ``Interrupt``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        received.append(signum)
        raise Interrupt(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Exception as exc:
        if received:
            raise Interrupt(received[0]) from exc
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _ImpliesDemo(argparse.Action):
    """Store the flag's value and set --demo too."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.demo = True


def add_dataset_options(group) -> None:
    """How a dataset source is built, cached and read: the flags beside the choice of source
    (also ``export.py --calibrate``'s)."""
    group.add_argument("--demo-samples", default=DEMO_SAMPLES, type=positive_int,
                       help="size of the --demo dataset")
    group.add_argument("--demo-size", nargs=2, type=positive_int, default=list(DEFAULT_SIZE),
                       metavar=("H", "W"), help="frame size of the --demo dataset")
    group.add_argument("--demo-randomized", nargs="?", const="train", choices=SYNTHETIC_FAMILIES,
                       metavar="FAMILY", action=_ImpliesDemo,
                       help="--demo from the domain-randomized generator (implies --demo): FAMILY "
                            "train (default) or heldout, whose rendering parameters are disjoint from "
                            "train's")
    group.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="cache for Hub and demo data")
    group.add_argument("--size", nargs=2, type=positive_int, metavar=("H", "W"),
                       help="frame size for datasets that store frames as flat lists (default: the dataset's "
                            "manifest or card, else 400 640)")
    group.add_argument("--preprocessed", choices=("auto", "yes", "no"), default="auto",
                       help="whether stored frames already carry gamma + CLAHE: auto reads the dataset's "
                            "preprocessed (or image_preprocessed) column, absent = no; yes/no override it")


def add_data_arguments(parser: argparse.ArgumentParser, device_data: bool = True):
    """The "data" flags: which dataset (--demo, --dataset, --hf-repo), its cache and how it is read;
    ``common.train.data`` resolves them. Shared by the training scripts and ``evaluate.py``."""
    data = parser.add_argument_group("data")
    data.add_argument("--demo", action="store_true", help="use the embedded synthetic dataset")
    data.add_argument("--dataset", type=str,
                      help="a local dataset folder (precompute.py output, or data/{split}/*.parquet shards)")
    data.add_argument("--hf-repo", default=DEFAULT_HF_REPO,
                      help="Hub dataset (used without --demo/--dataset)")
    add_dataset_options(data)
    data.add_argument("--num-workers", default=None, type=non_negative_int,
                      help="DataLoader worker processes (default: 0 for precomputed data, which is only "
                           "read, 2 when frames or targets are computed at load time)")
    if device_data:
        data.add_argument("--data-on-device", choices=("auto", "on", "off"), default="auto",
                          help="hold both splits on the device and batch there, without a DataLoader; "
                               "auto: on for CUDA when they fit in half the free GPU memory (at most 32 GiB)")
    return data


def training_parser(description: str, defaults: dict | None = None, add_help: bool = True):
    """The flags every training script shares (torchvision reference-script style).

    ``defaults`` overrides per script (e.g. a larger --lr for a smaller model).
    """
    parser = argparse.ArgumentParser(description=description, add_help=add_help)
    add_data_arguments(parser)
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", default=DEFAULT_EPOCHS, type=positive_int)
    train.add_argument("--batch-size", default=8, type=positive_int)
    train.add_argument("--lr", default=3e-3, type=positive_float,
                       help="initial learning rate (cosine decay per epoch to 1%%)")
    train.add_argument("--weight-decay", default=1e-4, type=non_negative_float)
    train.add_argument("--clip-grad", default=1.0, type=non_negative_float,
                       help="max gradient norm (0 disables)")
    augment = train.add_mutually_exclusive_group()
    augment.add_argument("--augment", default=DEFAULT_AUGMENT, type=augment_groups, metavar="GROUPS",
                         help=f"train-split augmentation: a comma list of {', '.join(AUGMENT_GROUPS)}, "
                              f"or all or none (default: {DEFAULT_AUGMENT}, the flip, lines and blur of "
                              "earlier runs)")
    augment.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                         help="no train-split augmentation (same as --augment none)")
    train.add_argument("--ema", default=DEFAULT_EMA, type=ema_decay, metavar="DECAY",
                       help="keep an exponential moving average of the weights (e.g. 0.99; 0: off, the "
                            f"default {DEFAULT_EMA:g}); validation, the best checkpoint, the pictures and "
                            "the ONNX export use the average")
    train.add_argument("--alpha-floor", default=DEFAULT_ALPHA_FLOOR, type=unit_fraction, metavar="A",
                       help="segmentation loss CE + alpha*Dice + (1-alpha)*surface: alpha falls from 1 to "
                            f"this floor over 80%% of the epochs (default {DEFAULT_ALPHA_FLOOR:g}; 1 keeps "
                            "Dice alone); not used by the ellipse regressor")
    train.add_argument("--seed", default=0, type=int)
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    runtime.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.compile the model (default: on for CUDA, off otherwise)")
    runtime.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                         help="mixed precision with GradScaler (default: on for CUDA; CUDA only)")
    runtime.add_argument("--output-dir", default="./checkpoints", help="checkpoints, metrics, curves, ONNX")
    runtime.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                         help="export the best checkpoint to ONNX at the end (default: on)")
    runtime.add_argument("--resume", type=str, help="checkpoint to resume from (e.g. the last_*.pt file)")
    runtime.add_argument("--init", type=str,
                         help="start from these weights (a checkpoint or a plain state dict, e.g. the "
                              "original project's best_efficientvit_model.pt) and train its architecture; "
                              "not a resume")
    runtime.add_argument("--test-only", action="store_true",
                         help="only evaluate the --resume checkpoint on the validation split")
    parser.set_defaults(**(defaults or {}))
    return parser
