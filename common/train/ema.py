"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step.

``--ema DECAY`` keeps one: the training loop optimizes the model as before, and validation, the
best checkpoint, the prediction pictures and the ONNX export use the average. After update n
(1-based) every floating-point parameter and buffer (BatchNorm running statistics included) moves
toward the model's:

    average = d * average + (1 - d) * weights,   d = min(DECAY, (1 + n) / (10 + n))

The warm-up term keeps the first updates from being dominated by the random initialization: at
n = 1 the average is mostly the trained weights (d = 0.18), and d reaches 0.99 after 890 updates.
Integer buffers (BatchNorm's batch counter) are copied. Everything stays on the device; nothing
syncs with the host.

In a checkpoint (``common.checkpoint.save_training_checkpoint``) ``model`` holds the average, the
weights that were scored, and ``ema`` holds the decay, the update count and the optimized weights
(``online``), so ``--resume`` continues both exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from common.models import unwrap

WARMUP = 10  # d = (1 + n) / (WARMUP + n) until that reaches the decay


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in the same order for the average and its source (one is a copy of
    the other); read each step, as moving a module to another device or memory format replaces
    its buffers."""
    return [*module.parameters(), *module.buffers()]


class ModelEma:
    """The average of ``model``'s weights (``module``: a copy of the plain module, in eval mode).

    ``model`` is the module the optimizer updates (DDP or compile wrappers are looked through);
    ``update()`` reads its current weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.source = unwrap(model)
        self.module = copy.deepcopy(self.source).eval().requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    def decay_at(self, update: int) -> float:
        """The weight of the old average at ``update`` (1-based)."""
        return min(self.decay, (1.0 + update) / (WARMUP + update))

    @torch.no_grad()
    def update(self) -> None:
        """Two device ops whatever the model's size: one lerp over every float tensor, one copy
        over the integer ones (taking ``state_dict()`` each step would cost an op per tensor)."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        pairs = list(zip(_tensors(self.module), _tensors(self.source)))
        floats = [(average, current) for average, current in pairs if average.is_floating_point()]
        counts = [(average, current) for average, current in pairs if not average.is_floating_point()]
        if floats:  # average += weight * (current - average)
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        if counts:
            torch._foreach_copy_([a for a, _ in counts], [c for _, c in counts])

    def state_dict(self) -> dict:
        """The decay and the update count (the weights are saved by the checkpoint itself)."""
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
