"""Which registered model a plain state dict (``torch.save(model.state_dict())``) belongs to.

Each registered model is built with its default kwargs, and, for the models whose kwargs can be read
back from tensor shapes (the original project's, ``common.models.original``), with those kwargs;
the first whose full {key: shape} list equals the state dict's is the answer. Nothing matching is
a ``ValueError`` naming the closest model (most keys with the right shape) and its first mismatch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import MODEL_NAMES, build_model
from .original import efficientvit_original_kwargs, shallownet_original_kwargs

Shapes = dict[str, tuple[int, ...]]

# name -> reads that model's kwargs from a state dict's shapes (KeyError when a key it needs is absent)
KWARGS_FROM_SHAPES: dict[str, Callable[[Shapes], dict]] = {
    "efficientvit_original": efficientvit_original_kwargs,
    "efficientvit_original_micro": efficientvit_original_kwargs,
    "shallownet_original": shallownet_original_kwargs,
}


def state_shapes(state_dict: dict[str, torch.Tensor]) -> Shapes:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _candidates(shapes: Shapes):
    """(name, kwargs overrides) to try, defaults first so that a registered config keeps its name."""
    for name in MODEL_NAMES:
        yield name, {}
    for name, read in KWARGS_FROM_SHAPES.items():
        try:
            kwargs = read(shapes)
        except (KeyError, IndexError, ValueError, ZeroDivisionError):
            continue  # not this layout at all; its defaults were already compared
        yield name, kwargs


def first_mismatch(expected: Shapes, shapes: Shapes) -> str:
    """The first difference between a model's {key: shape} (``expected``, in its order) and ``shapes``."""
    for key, shape in expected.items():
        if key not in shapes:
            return f"missing key {key}"
        if shapes[key] != shape:
            return f"{key} has shape {shapes[key]}, expected {shape}"
    extra = next((key for key in shapes if key not in expected), None)
    return f"unexpected key {extra}" if extra else "none"


def detect_model(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """(registered name, kwargs) of the model whose state_dict layout equals ``state_dict``'s.

    Raises:
        ValueError: no registered model matches; the one-line message names the closest one and
            its first mismatching key.
    """
    shapes = state_shapes(state_dict)
    closest = None  # (keys with the right shape, name, expected shapes)
    for name, kwargs in _candidates(shapes):
        try:
            model = build_model(name, **kwargs)
        except (ValueError, TypeError, RuntimeError):
            continue  # shapes that give no buildable model (e.g. a zero width)
        expected = state_shapes(model.state_dict())
        if expected == shapes:
            return name, model.model_kwargs
        matching = sum(shapes.get(key) == shape for key, shape in expected.items())
        if closest is None or matching > closest[0]:
            closest = (matching, name, expected)
    matching, name, expected = closest
    raise ValueError(f"the state dict ({len(shapes)} tensors) matches no known model; the closest is "
                     f"'{name}' ({matching} of its {len(expected)} tensors match), first mismatch: "
                     f"{first_mismatch(expected, shapes)}")
