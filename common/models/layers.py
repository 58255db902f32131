"""Building blocks shared by the models: Conv+BN units that fold into one conv, and small helpers.

Every convolution that is followed by batch norm is a ``ConvBN``. Training uses the two layers;
export calls ``fuse_model`` which replaces each ``ConvBN`` (and any plain ``Conv2d -> BatchNorm2d``
pair inside an ``nn.Sequential``) by a single ``nn.Conv2d``, and a batch norm with no conv before it
(the original project's pre-norms) by a per-channel scale and shift, so the ONNX graph has no
BatchNormalization node.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from common.specs import SIZE_MULTIPLE


class ConvBN(nn.Module):
    """Conv2d without bias followed by BatchNorm2d.

    Args:
        bn_weight_init: initial BN scale; 0 makes a residual branch start as the identity
            (EfficientViT-MSRA initialises the last ConvBN of each residual branch this way).

    Shape:
        (B, in_ch, H, W) -> (B, out_ch, H', W')
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """One nn.Conv2d computing the same function as this unit in eval mode."""
        return fuse_conv_bn(self.conv, self.bn)


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold ``bn`` (running statistics, i.e. eval mode) into a copy of ``conv``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out_ch,)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((conv_bias - bn.running_mean) * scale + bn.bias)
    return fused.to(conv.weight.device)


class ChannelAffine(nn.Module):
    """An eval-mode batch norm as a per-channel scale and shift: (B, C, ...) -> (B, C, ...).

    What ``fuse_model`` puts in place of a batch norm that no convolution precedes (a pre-norm),
    so the exported graph has a Mul and an Add instead of a BatchNormalization node.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
            self.register_buffer("scale", scale.view(-1, 1, 1).clone())  # (C, 1, 1)
            self.register_buffer("shift", (bn.bias - bn.running_mean * scale).view(-1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _fuse_children(module: nn.Module) -> None:
    """Replace, in place and recursively, ConvBN units and Conv2d->BatchNorm2d pairs by one conv,
    and any other BatchNorm2d by a ``ChannelAffine``."""
    children = list(module.named_children())
    folded = set()  # names of batch norms already folded into the conv before them
    for index, (name, child) in enumerate(children):
        if name in folded:
            continue
        if isinstance(child, ConvBN):
            setattr(module, name, child.fuse())
            continue
        following = children[index + 1] if index + 1 < len(children) else (None, None)
        if (isinstance(module, nn.Sequential) and isinstance(child, nn.Conv2d)
                and isinstance(following[1], nn.BatchNorm2d)):
            setattr(module, name, fuse_conv_bn(child, following[1]))
            setattr(module, following[0], nn.Identity())
            folded.add(following[0])
            continue
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, ChannelAffine(child))
            continue
        _fuse_children(child)


def fuse_model(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` in eval mode with every batch norm folded into its convolution (or,
    with none before it, turned into a per-channel scale and shift).

    Attributes such as ``model_name`` / ``model_kwargs`` / ``task`` survive the copy.
    """
    fused = copy.deepcopy(model).eval()
    _fuse_children(fused)
    return fused


class Residual(nn.Module):
    """x + branch(x)."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class FFN(nn.Sequential):
    """Pointwise feed-forward: ConvBN 1x1 (expand) -> ReLU -> ConvBN 1x1 (project, BN scale 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(ConvBN(dim, hidden), nn.ReLU(), ConvBN(hidden, dim, bn_weight_init=0.0))


def depthwise_residual(dim: int, kernel_size: int = 3) -> Residual:
    """Residual depthwise ConvBN: the local token interaction of EfficientViT-MSRA's sandwich."""
    return Residual(ConvBN(dim, dim, kernel_size, groups=dim, bn_weight_init=0.0))


def check_multiple_of(x: torch.Tensor, factor: int = SIZE_MULTIPLE) -> None:
    """Raise ValueError unless the spatial size of ``x`` (B, C, H, W) is a multiple of ``factor``
    (by default the models' total stride, 16).

    Skipped while tracing for the TorchScript exporter; under dynamo export and torch.compile the
    spatial sizes are static Python ints, so the check costs nothing in the graph.
    """
    if torch.jit.is_tracing():
        return
    height, width = x.shape[-2], x.shape[-1]
    if height % factor or width % factor:
        raise ValueError(f"H and W must be multiples of {factor}, got {height}x{width}")


def static_hw(x: torch.Tensor) -> tuple[int, int]:
    """(H, W) of ``x`` (B, C, H, W) as Python ints.

    Window arithmetic (padding, window counts) then becomes constants in an exported graph with
    static H, W instead of Shape/Gather/Mod nodes; only the batch axis stays dynamic.
    """
    return int(x.shape[-2]), int(x.shape[-1])
