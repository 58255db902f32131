"""EllipseRegressionNet: direct regression of the pupil ellipse (cx, cy, rx, ry).

A strided ConvBN-ReLU encoder, global average pooling and a linear head through a sigmoid, so every
output lies in (0, 1) like the normalized ellipse of ``common.prep.preprocess`` (cx = x / W, cy = y / H,
rx and ry = semi-axes / R with R half the frame's diagonal). Its ellipse is drawn axis-aligned.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBN


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(ConvBN(in_ch, out_ch, 3, stride=stride, groups=groups), nn.ReLU())


class EllipseRegressionNet(nn.Module):
    """Strided CNN encoder + global average pool + linear head -> sigmoid.

    Args:
        in_channels: input channels (1: grayscale in [-1, 1]).
        widths: channels of the stride-2 stages; the first is a full 3x3 conv, later stages are a
            full strided 3x3 conv followed by a depthwise 3x3 + pointwise ConvBN refinement.

    Shape:
        (B, in_channels, H, W) -> (B, 4) in (0, 1): (cx, cy, rx, ry). Any H, W >= 32 works.
    """

    def __init__(self, in_channels: int = 1, widths=(8, 16, 32, 48, 64)):
        super().__init__()
        layers = [_conv_bn_relu(in_channels, widths[0], stride=2)]
        for in_ch, out_ch in zip(widths[:-1], widths[1:]):
            layers.append(_conv_bn_relu(in_ch, out_ch, stride=2))
            refine = [_conv_bn_relu(out_ch, out_ch, stride=1, groups=out_ch), ConvBN(out_ch, out_ch),
                      nn.ReLU()]
            layers.append(nn.Sequential(*refine))  # depthwise 3x3 + pointwise
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)  # (B, C, H/32, W/32)
        pooled = features.mean(dim=(2, 3))  # (B, C)
        return torch.sigmoid(self.head(pooled))  # (B, 4)
