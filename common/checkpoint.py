"""Checkpoints: one plain dict that is enough to rebuild, evaluate or resume a model.

Layout (every value is a tensor or a plain Python value, so files load with
``torch.load(weights_only=True)``):

    model         unwrapped, contiguous CPU state_dict (no ``_orig_mod.`` / ``module.`` prefix): the
                  weights that were validated (with --ema, the moving average)
    optimizer     optimizer.state_dict() or None
    scheduler     scheduler.state_dict() or None
    scaler        GradScaler.state_dict() or None
    epoch         int, the last finished epoch
    best_metric   float or None
    args          dict of JSON-like values (paths and other objects stored as strings)
    model_config  {"name", "kwargs", "input_size"} from ``common.models.model_config``
    ...           any ``extra`` keys; they must be plain values too. Training adds
    rng           every global RNG state (``rng_state``), so a resumed run replays the same draws
    train_state   best epoch, per-epoch history and the dataset's shard fingerprint (``TrainState``)
    ema           only with --ema: ``decay``, ``updates`` and ``online``, the optimized weights
                  (a state_dict like ``model``), from which training continues

Files are written atomically: a crash mid-save leaves the previous checkpoint intact. Reading a
checkpoint into a model (``load_model``) serves inference, export, evaluation and ``--init``; it
also takes a plain state dict (``torch.save(model.state_dict())``, as the original project saved
its models, CUDA tensors included), whose model ``common.models.detect`` finds from its keys and
shapes; ``load_checkpoint`` then returns it wrapped as a checkpoint. ``TrainState``,
``save_training_checkpoint`` and ``resume_training`` are the training side of the same format.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import models
from common.errors import UserError
from common.files import atomic_path, plain
from common.models import unwrap as unwrap_model  # re-exported: strips compile / DDP wrappers
from common.models.detect import detect_model
from common.specs import DEFAULT_SIZE

REQUIRED_KEYS = ("model", "model_config")
RESERVED_KEYS = (
    "model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "args", "model_config",
)


class CheckpointError(UserError):
    """A model file that is missing, unreadable, not a checkpoint, or of the wrong model."""

    exit_code = 2


def _portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict of the unwrapped model, every tensor detached, on the CPU and contiguous."""
    state = unwrap_model(model).state_dict()
    return {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    epoch: int = 0,
    best_metric: float | None = None,
    args=None,
    input_size: tuple[int, int] = DEFAULT_SIZE,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file in the same folder, fsync, rename); returns path."""
    extra = dict(extra or {})
    clashing = sorted(set(extra) & set(RESERVED_KEYS))
    if clashing:
        raise ValueError(f"extra keys {clashing} would overwrite checkpoint fields")
    checkpoint = {
        "model": _portable_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "best_metric": None if best_metric is None else float(best_metric),
        "args": plain(args) if args is not None else {},
        "model_config": models.model_config(model, input_size=tuple(input_size)),
        **extra,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(checkpoint, handle)  # a Python file: a full disk raises OSError(ENOSPC), not RuntimeError
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``, or a plain state dict of a known model
    (returned as a checkpoint, ``checkpoint_from_state_dict``); CheckpointError says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a valid checkpoint file, or it holds objects "
            f"other than tensors and plain Python values ({first_line})"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile errors... on corrupt files
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint "
                              f"({type(exc).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, expected a dict"
        )
    if is_state_dict(checkpoint):
        return checkpoint_from_state_dict(checkpoint, path)
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project (missing keys {missing}) "
                              "nor a model's state dict")
    config = checkpoint["model_config"]
    if not isinstance(config, dict) or "name" not in config:
        raise CheckpointError(f"{path} has no usable model_config (need a dict with a 'name')")
    return checkpoint


WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP / DataParallel


def is_state_dict(value: dict) -> bool:
    """Whether ``value`` is a bare state dict: a non-empty dict of tensors, keyed by name."""
    return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def checkpoint_from_state_dict(state_dict: dict, path="<state dict>") -> dict:
    """A plain state dict as a checkpoint: the weights and the ``model_config`` their layout shows.

    Wrapper prefixes (``_orig_mod.``, ``module.``) are stripped. The frame size is not recorded in a
    state dict: the default 400x640 (the original's, too) is assumed. A layout of no known model is
    one CheckpointError line naming the closest model and the first mismatching key.
    """
    state = {}
    for key, tensor in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = tensor
    try:
        name, kwargs = detect_model(state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    config = {"name": name, "kwargs": kwargs, "input_size": list(DEFAULT_SIZE)}
    return {"model": state, "model_config": config, "epoch": 0, "args": {}, "source": "state_dict"}


def model_from_checkpoint(
    checkpoint: dict, path: str | os.PathLike = "<checkpoint>", device="cpu", expected_name=None
) -> nn.Module:
    """Rebuild the model a loaded checkpoint describes, load its weights, move to device, eval()."""
    name = checkpoint["model_config"]["name"]
    if expected_name is not None and name != expected_name:
        raise CheckpointError(
            f"{path}: checkpoint holds a '{name}' model, expected '{expected_name}'"
        )
    try:
        model = models.build_model_from_config(checkpoint["model_config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild model from its model_config: {exc}") from None
    _load_weights(model, checkpoint["model"], path, name)
    return model.to(device).eval()


def _load_weights(model: nn.Module, state_dict: dict, path, name: str) -> None:
    try:
        unwrap_model(model).load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        detail = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: weights do not match the '{name}' model ({' '.join(detail[:3])})"
        ) from None


def load_model(path: str | os.PathLike, device="cpu", expected_name: str | None = None) -> nn.Module:
    """Load a checkpoint and return its model in eval mode on ``device``."""
    return model_from_checkpoint(load_checkpoint(path), path, device, expected_name)


def load_init_model(path: str | os.PathLike, task: str) -> nn.Module:
    """``--init``: the model a checkpoint or plain state dict holds, with its weights, in train mode.

    Only the weights: no optimizer, schedule, epoch or history (that is ``--resume``). The model is
    the file's own architecture, which must solve ``task`` ("segmentation" or "ellipse").
    """
    model = model_from_checkpoint(load_checkpoint(path), path)
    if model.task != task:
        raise CheckpointError(f"--init {path} holds a '{model.model_name}' model ({model.task}) and this "
                              f"script trains {task} models")
    return model.train()


def check_resumable(checkpoint: dict, path, model_name: str | None, image_size=None) -> None:
    """Refuse ``--resume`` of a checkpoint of another model or another frame size, in one line."""
    config = checkpoint["model_config"]
    if model_name is not None and config["name"] != model_name:
        raise CheckpointError(f"cannot resume from {path}: it holds a '{config['name']}' model and this "
                              f"script trains '{model_name}'; pass that script's last_*.pt")
    saved = config.get("input_size")
    if image_size is not None and saved is not None and tuple(saved) != tuple(image_size):
        raise CheckpointError(
            f"cannot resume from {path}: it was trained on {saved[0]}x{saved[1]} frames and this dataset "
            f"has {image_size[0]}x{image_size[1]}; use the dataset it trained on, or start a new run")


def restore_training_state(checkpoint: dict, model, optimizer=None, scheduler=None, scaler=None):
    """Load model / optimizer / scheduler / scaler state for ``--resume``; returns (epoch, best_metric).

    A GradScaler saved while disabled (CPU training) has an empty state; resuming with an enabled
    scaler then starts from a fresh scale instead of failing.
    """
    name = checkpoint.get("model_config", {}).get("name", "?")
    _load_weights(model, checkpoint["model"], "<checkpoint>", name)
    for label, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if checkpoint.get(label) is None:
            raise CheckpointError(f"checkpoint has no {label} state; it cannot be resumed")
        target.load_state_dict(checkpoint[label])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    return int(checkpoint.get("epoch", 0)), checkpoint.get("best_metric")


# ----------------------------------------------------------------------------- training state
def rng_state() -> dict:
    """Every global RNG, as plain values a weights_only checkpoint can hold."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class TrainState:
    """Everything a run carries from epoch to epoch; saved in every checkpoint's ``train_state``."""

    epoch: int = 0                   # epochs completed
    best_metric: float = -math.inf
    best_epoch: int = 0
    history: list = field(default_factory=list)  # one row (dict) per epoch
    data_fingerprint: str | None = None  # shard fingerprint of the dataset it trained on

    def record(self, row: dict, metric: str) -> bool:
        """Append the epoch's ``row``; returns whether its ``valid_<metric>`` is a new best."""
        value = row[f"valid_{metric}"]
        improved = math.isfinite(value) and value > self.best_metric
        self.epoch, self.history = row["epoch"], self.history + [row]
        if improved:
            self.best_metric, self.best_epoch = value, row["epoch"]
        return improved


def save_training_checkpoint(path, model, optimizer, scheduler, stepper, state: TrainState, args,
                             image_size, ema=None) -> Path:
    """A resumable checkpoint: weights, optimizer, schedule, scaler, RNG and ``state``.

    With ``ema`` (``common.train.ema.ModelEma``) ``model`` holds the average and ``ema`` the
    decay, update count and ``model``'s own weights.
    """
    train_state = {"best_epoch": state.best_epoch, "history": state.history,
                   "data_fingerprint": state.data_fingerprint}
    extra = {"rng": rng_state(), "train_state": train_state}
    if ema is not None:
        extra["ema"] = {**ema.state_dict(), "online": _portable_state_dict(model)}
        model = ema.module
    return save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=stepper,
                           epoch=state.epoch, best_metric=state.best_metric, args=args,
                           input_size=image_size, extra=extra)


def _split_average(checkpoint: dict, path, ema, evaluate_only: bool) -> dict:
    """The checkpoint to restore ``model`` from: with ``ema``, the average goes into ``ema.module``
    and the optimized weights (``ema.online``) into ``model``. A training run must resume with
    the --ema it had: without the average, or without the weights it optimized, the resumed run
    would not continue the interrupted one. ``evaluate_only`` scores ``model``, the average."""
    average = checkpoint.get("ema")
    if ema is None:
        if average is not None and not evaluate_only:
            raise CheckpointError(f"cannot resume from {path}: it was trained with --ema "
                                  f"{average['decay']:g}; resume with the same --ema")
        return checkpoint
    if average is None:
        raise CheckpointError(f"cannot resume from {path} with --ema: it was trained without a moving "
                              "average; resume without --ema (or --ema 0), or start a new run")
    _load_weights(ema.module, checkpoint["model"], path, checkpoint["model_config"]["name"])
    ema.load_state_dict(average)
    return {**checkpoint, "model": average["online"]}


def resume_training(path, model, optimizer, scheduler, stepper, image_size=None,
                    fingerprint: str | None = None, ema=None, evaluate_only: bool = False) -> TrainState:
    """Restore model/optimizer/scheduler/scaler, counters, history and RNG from a checkpoint
    (and ``ema``'s average, see ``save_training_checkpoint``).

    A checkpoint of another model or another frame size is refused with one line; a dataset whose
    shard fingerprint differs from the one the checkpoint trained on gets a warning.
    """
    checkpoint = load_checkpoint(path)
    check_resumable(checkpoint, path, getattr(model, "model_name", None), image_size)
    checkpoint = _split_average(checkpoint, path, ema, evaluate_only)
    epoch, best = restore_training_state(checkpoint, model, optimizer, scheduler, stepper)
    extras = checkpoint.get("train_state", {})
    before = extras.get("data_fingerprint")
    if before and fingerprint and before != fingerprint:
        print(f"warning: the dataset changed since {path} was saved (shard fingerprint {before}, now "
              f"{fingerprint}); the resumed run will not match an uninterrupted one", file=sys.stderr)
    if "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])
    print(f"resumed from {path} after epoch {epoch} (best {best})")
    return TrainState(epoch=epoch, best_metric=-math.inf if best is None else best,
                      best_epoch=extras.get("best_epoch", 0), history=extras.get("history", []),
                      data_fingerprint=fingerprint)
