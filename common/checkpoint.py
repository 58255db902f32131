"""Checkpoints: one plain dict that is enough to rebuild, evaluate or resume a model.

Layout (every value is a tensor or a plain Python value, so files load with
``torch.load(weights_only=True)``):

    model         unwrapped, contiguous CPU state_dict (no ``_orig_mod.`` / ``module.`` prefix)
    optimizer     optimizer.state_dict() or None
    scheduler     scheduler.state_dict() or None
    scaler        GradScaler.state_dict() or None
    epoch         int, the last finished epoch
    best_metric   float or None
    args          dict of JSON-like values (paths and other objects stored as strings)
    model_config  {"name", "kwargs", "input_size"} from ``common.models.model_config``
    ...           any ``extra`` keys (e.g. "rng" for resume); they must be plain values too

Files are written atomically: a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from common import models
from common.errors import UserError
from common.io import atomic_path
from common.models import unwrap as unwrap_model  # re-exported: strips compile / DDP wrappers

REQUIRED_KEYS = ("model", "model_config")
RESERVED_KEYS = (
    "model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "args", "model_config",
)


class CheckpointError(UserError):
    """A model file that is missing, unreadable, not a checkpoint, or of the wrong model."""

    exit_code = 2


def _plain(value):
    """Recursively turn ``value`` into JSON-like types (Path, enum, objects -> str)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    return str(value)


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
    input_size: tuple[int, int] = (400, 640),
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
        "args": _plain(args) if args is not None else {},
        "model_config": models.model_config(model, input_size=tuple(input_size)),
        **extra,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(checkpoint, handle)  # a Python file: a full disk raises OSError(ENOSPC), not RuntimeError
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``; CheckpointError says what is wrong."""
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
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project: missing keys {missing}")
    config = checkpoint["model_config"]
    if not isinstance(config, dict) or "name" not in config:
        raise CheckpointError(f"{path} has no usable model_config (need a dict with a 'name')")
    return checkpoint


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
