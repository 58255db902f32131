"""Model registry: build models by name and rebuild them from a saved config.

Every model built here carries ``model_name`` (one of ``MODEL_NAMES``), ``model_kwargs`` (the
JSON-serializable constructor kwargs) and ``task`` ("segmentation" or "ellipse"), so a checkpoint's
``model_config`` is enough to rebuild it.
"""

from __future__ import annotations

import copy

from torch import nn

from common.specs import DEFAULT_SIZE

from .efficientvit import TinyEfficientViTSeg
from .ellipse import EllipseRegressionNet
from .layers import ConvBN, fuse_model
from .original import OriginalEfficientViTSeg, OriginalShallowNet
from .shallownet import ShallowNet

MODEL_NAMES = ("efficientvit", "efficientvit_micro", "shallownet", "ellipse", "efficientvit_original",
               "efficientvit_original_micro", "shallownet_original")

# name -> (class, default kwargs that differ from the class defaults, task)
_REGISTRY = {
    "efficientvit": (TinyEfficientViTSeg, {}, "segmentation"),
    "efficientvit_micro": (
        TinyEfficientViTSeg,
        {"embed_dim": [8, 12, 18], "num_heads": [1, 1, 1], "decoder_dim": 8, "mlp_ratio": 1, "merge_ratio": 2,
         "stem_skip": False},
        "segmentation",
    ),
    "shallownet": (ShallowNet, {}, "segmentation"),
    "ellipse": (EllipseRegressionNet, {}, "ellipse"),
    # The original project's networks (common/models/original.py), so its state dicts load: the
    # released best_efficientvit_model.pt config, its Micro config and its ShallowNet.
    "efficientvit_original": (
        OriginalEfficientViTSeg, {"embed_dims": [16, 32, 64], "num_heads": [1, 1, 2], "decoder_dim": 32},
        "segmentation",
    ),
    "efficientvit_original_micro": (
        OriginalEfficientViTSeg, {"embed_dims": [8, 12, 18], "num_heads": [1, 1, 1], "decoder_dim": 8},
        "segmentation",
    ),
    "shallownet_original": (OriginalShallowNet, {}, "segmentation"),
}

__all__ = [
    "MODEL_NAMES", "ConvBN", "EllipseRegressionNet", "OriginalEfficientViTSeg", "OriginalShallowNet",
    "ShallowNet", "TinyEfficientViTSeg",
    "build_model", "build_model_from_config", "count_parameters", "fuse_model", "model_config", "model_task",
    "unwrap",
]


def _json_ready(value):
    """Tuples -> lists (recursively) so kwargs survive a JSON round trip unchanged."""
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    return value


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; ``kwargs`` override its defaults.

    Raises:
        ValueError: unknown name.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODEL_NAMES)}")
    cls, defaults, task = _REGISTRY[name]
    resolved = _json_ready({**defaults, **kwargs})
    model = cls(**resolved)
    model.model_name = name
    model.model_kwargs = resolved
    model.task = task
    return model


def model_task(name: str) -> str:
    """The task ("segmentation" or "ellipse") of the registered model ``name``, without building it."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name][2]


def unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DDP / DataParallel (``.module``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def model_config(model: nn.Module, input_size=DEFAULT_SIZE) -> dict:
    """``{"name", "kwargs", "input_size"}`` describing ``model`` (wrappers are looked through).

    Raises:
        ValueError: the model was not built by ``build_model``.
    """
    model = unwrap(model)
    if not hasattr(model, "model_name"):
        raise ValueError(f"{type(model).__name__} was not built with common.models.build_model")
    return {
        "name": model.model_name,
        "kwargs": copy.deepcopy(model.model_kwargs),
        "input_size": [int(v) for v in input_size],
    }


def build_model_from_config(config: dict) -> nn.Module:
    """Rebuild the (untrained) model described by a ``model_config`` dict."""
    try:
        name, kwargs = config["name"], config.get("kwargs", {})
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"not a model config (needs 'name' and 'kwargs'): {config!r}") from None
    return build_model(name, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
