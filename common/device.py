"""The one device resolver: a ``--device`` value becomes a torch.device, or one clear error.

Training and inference both go through ``resolve_device``, so ``cuda:7`` on a one-GPU machine or
``mps`` off a Mac is exit code 2 with one line everywhere, never a traceback from inside torch.
"""

from __future__ import annotations

import torch

from common.errors import ConfigurationError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device; unavailable -> ConfigurationError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigurationError(f"unknown device '{name}'; use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"device '{name}' requested but CUDA is not available (torch {torch.__version__}); "
                "use --device cpu or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"device '{name}' requested but MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigurationError(f"unsupported device '{name}'; use {DEVICE_CHOICES}")
    return device
