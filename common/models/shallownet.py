"""ShallowNet: the compact dense U-Net used by VisionAssist for pupil segmentation (about 60k parameters).

Encoder: five densely connected blocks (four preceded by 2x2 average pooling). Inside a block
every depthwise-separable conv sees the concatenation of the block input and all earlier conv
outputs, DenseNet style. Decoder: four blocks that upsample, concatenate the encoder skip of the
same resolution and apply two densely connected depthwise-separable convs. A 1x1 conv gives logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBN, check_multiple_of


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 conv -> pointwise ConvBN -> LeakyReLU: (B, in_ch, H, W) -> (B, out_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
            ConvBN(in_ch, out_ch),
            nn.LeakyReLU(0.1),
        )


class DenseConvs(nn.Module):
    """Separable convs where conv i reads cat(input, out_0, ..., out_{i-1}); returns the last output.

    Shape:
        (B, in_ch, H, W) -> (B, out_ch, H, W)
    """

    def __init__(self, in_ch: int, out_ch: int, num_convs: int):
        super().__init__()
        self.convs = nn.ModuleList(SeparableConv(in_ch + i * out_ch, out_ch) for i in range(num_convs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs:
            features.append(conv(torch.cat(features, dim=1) if len(features) > 1 else x))
        return features[-1]


class DownBlock(nn.Module):
    """Optional 2x2 average pooling, then a dense block: (B, in, H, W) -> (B, out, H/2 or H, ...)."""

    def __init__(self, in_ch: int, out_ch: int, pool: bool, num_convs: int = 3):
        super().__init__()
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()
        self.dense = DenseConvs(in_ch, out_ch, num_convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.pool(x))


class UpBlock(nn.Module):
    """Nearest x2 upsampling, concat with the skip, dense block: (B, in, h, w) -> (B, out, 2h, 2w)."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, num_convs: int = 2):
        super().__init__()
        self.dense = DenseConvs(in_ch + skip_ch, out_ch, num_convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.dense(torch.cat([x, skip], dim=1))


class ShallowNet(nn.Module):
    """Dense U-Net with depthwise-separable convs.

    Args:
        in_channels: input channels (1: grayscale in [-1, 1]); num_classes: 2 (background, pupil).
        channels: width of every block.

    Shape:
        (B, in_channels, H, W) -> (B, num_classes, H, W); H and W must be multiples of 16, otherwise
        ``ValueError("H and W must be multiples of 16, got HxW")``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, channels: int = 31):
        super().__init__()
        self.down = nn.ModuleList(DownBlock(in_channels if i == 0 else channels, channels, pool=i > 0)
                                  for i in range(5))
        self.up = nn.ModuleList(UpBlock(channels, channels, channels) for _ in range(4))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple_of(x)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)  # resolutions 1, 1/2, 1/4, 1/8, 1/16
        for block, skip in zip(self.up, skips[-2::-1]):
            x = block(x, skip)
        return self.classifier(x)  # (B, num_classes, H, W)
