"""Small helpers shared by several test modules."""

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN running statistics, so BN folding is actually exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def in_order_of(a0, b0, a1, b1, angle1):
    """(a1, b1, angle1) written in the axis order closest to (a0, b0).

    fitEllipse may report an ellipse as (b, a, angle + 90); the dataset keeps its order, so tests
    that compare with a drawn ellipse first bring the two into the same order.
    """
    if abs(a1 - a0) + abs(b1 - b0) > abs(a1 - b0) + abs(b1 - a0):
        return b1, a1, angle1 - 90.0
    return a1, b1, angle1


def load_output(path, data_files=None):
    """A precompute output (or parquet files) loaded with its own Arrow cache.

    ``datasets``' default cache can hand back another folder's rows: two outputs in folders of the
    same name (``.../out``) written by one test run have collided there.
    """
    import tempfile

    from datasets import load_dataset

    cache = tempfile.mkdtemp(prefix="hf-cache-")
    if data_files is not None:
        return load_dataset("parquet", data_files=data_files, cache_dir=cache)
    return load_dataset(str(path), cache_dir=cache)
