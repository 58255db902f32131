"""TinyEfficientViTSeg: EfficientViT-MSRA (Liu et al., CVPR 2023) in miniature, for pupil segmentation.

What is kept from EfficientViT-MSRA ("Memory Efficient Vision Transformer with Cascaded Group
Attention"):
    * Conv+BN units everywhere (``ConvBN``), folded into single convs for export;
    * the sandwich block: depthwise conv -> FFN -> cascaded group attention -> depthwise conv -> FFN,
      every part residual;
    * cascaded group attention over local windows: channels split into one chunk per head, head i
      attends over (output of head i-1 + chunk i), each head has its own q/k/v projection, a
      depthwise conv on q and a learned relative-position bias table (``attention_biases`` indexed
      by ``attention_bias_idxs``); the head outputs are concatenated -> ReLU -> projection;
    * subsampling between stages: dwconv + FFN, an inverted-residual patch merging with a stride-2
      depthwise conv, then dwconv + FFN again.

What is added for dense prediction: a light FPN-like decoder. Each stage is projected to
``decoder_dim`` channels, upsampled and added to the next shallower one, refined at 1/4 (and, with
``stem_skip``, at 1/2 resolution with a skip from the stem) and classified into sub-pixel logits that
a pixel shuffle rearranges to full resolution. Nothing but that rearrangement runs at full resolution:
at 400x640 on one CPU thread, full-resolution convolutions or a bilinear resize of the logits would
cost more than the whole encoder.

Resolutions for an (H, W) input: stem 1/2 and 1/4, stage 1 at 1/4, stage 2 at 1/8, stage 3 at 1/16.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FFN, ConvBN, Residual, check_multiple_of, depthwise_residual, static_hw


def relative_offset_index(window_size: int) -> tuple[int, torch.Tensor]:
    """Bias-table index for every (query, key) pair of a window, as in EfficientViT-MSRA.

    Pairs with the same absolute (dy, dx) offset share one table entry.

    Returns:
        number of distinct offsets, and a long tensor (N, N) with N = window_size ** 2.
    """
    points = list(itertools.product(range(window_size), range(window_size)))
    offsets: dict[tuple[int, int], int] = {}
    index = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            index.append(offsets.setdefault(offset, len(offsets)))
    n = len(points)
    return len(offsets), torch.tensor(index, dtype=torch.long).view(n, n)


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention on windows of ``window_size x window_size`` tokens.

    The input channels are split into ``num_heads`` chunks of ``dim // num_heads``. Head 0 reads
    chunk 0; head i reads (output of head i-1 + chunk i), so later heads refine earlier ones.

    Shape:
        (B, dim, window_size, window_size) -> (B, dim, window_size, window_size)
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, window_size: int, q_kernel: int = 3):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.key_dim, self.head_dim = num_heads, key_dim, dim // num_heads
        self.window_size = window_size
        self.scale = key_dim ** -0.5
        qkv_dim = 2 * key_dim + self.head_dim
        self.qkvs = nn.ModuleList(ConvBN(self.head_dim, qkv_dim) for _ in range(num_heads))
        self.dws = nn.ModuleList(ConvBN(key_dim, key_dim, q_kernel, groups=key_dim) for _ in range(num_heads))
        self.proj = nn.Sequential(nn.ReLU(), ConvBN(dim, dim, bn_weight_init=0.0))
        num_offsets, index = relative_offset_index(window_size)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", index, persistent=False)  # (N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.window_size
        n = r * r  # tokens per window
        biases = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
        # one head: no Split / Concat (each is a copy of the whole map in the exported graph)
        chunks = x.split(self.head_dim, dim=1) if self.num_heads > 1 else (x,)  # heads x (B, head_dim, r, r)
        outputs = []
        feat = chunks[0]
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]  # the cascade: previous head's output feeds this head
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.head_dim], dim=1)
            q = dw(q)
            q, k = q.reshape(-1, self.key_dim, n), k.reshape(-1, self.key_dim, n)  # (B, key_dim, N)
            v = v.reshape(-1, self.head_dim, n)  # (B, head_dim, N)
            attn = (q.transpose(-2, -1) @ k) * self.scale + biases[i]  # (B, N, N)
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).reshape(-1, self.head_dim, r, r)
            outputs.append(feat)
        return self.proj(torch.cat(outputs, dim=1) if self.num_heads > 1 else outputs[0])


class LocalWindowAttention(nn.Module):
    """Cascaded group attention applied independently in non-overlapping windows.

    The map is zero-padded at the bottom/right to a multiple of ``window_size``, split into windows,
    attended, reassembled and cropped back.

    Shape:
        (B, dim, H, W) -> (B, dim, H, W)
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.dim, self.window_size = dim, window_size
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, (height, width), r = self.dim, static_hw(x), self.window_size
        pad_h, pad_w = (r - height % r) % r, (r - width % r) % r
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // r, (width + pad_w) // r
        # (B, C, rows*r, cols*r) -> (B*rows*cols, C, r, r); -1 keeps the batch axis dynamic in ONNX
        windows = x.reshape(-1, channels, rows, r, cols, r).permute(0, 2, 4, 1, 3, 5)
        windows = self.attn(windows.reshape(-1, channels, r, r))
        x = windows.reshape(-1, rows, cols, channels, r, r).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(-1, channels, rows * r, cols * r)
        if pad_h or pad_w:
            x = x[:, :, :height, :width]
        return x


class SandwichBlock(nn.Sequential):
    """EfficientViT-MSRA block: dwconv -> FFN -> window attention -> dwconv -> FFN (all residual)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, window_size: int, mlp_ratio: int):
        super().__init__(
            depthwise_residual(dim),
            Residual(FFN(dim, round(dim * mlp_ratio))),
            Residual(LocalWindowAttention(dim, key_dim, num_heads, window_size)),
            depthwise_residual(dim),
            Residual(FFN(dim, round(dim * mlp_ratio))),
        )


class PatchMerging(nn.Sequential):
    """Inverted residual with a stride-2 depthwise conv: (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_dim: int, out_dim: int, ratio: int):
        hidden = round(in_dim * ratio)
        super().__init__(
            ConvBN(in_dim, hidden), nn.ReLU(),
            ConvBN(hidden, hidden, 3, stride=2, groups=hidden), nn.ReLU(),
            ConvBN(hidden, out_dim),
        )


class Subsample(nn.Sequential):
    """EfficientViT-MSRA subsample block: dwconv + FFN, patch merging, dwconv + FFN."""

    def __init__(self, in_dim: int, out_dim: int, mlp_ratio: int, merge_ratio: int):
        super().__init__(
            depthwise_residual(in_dim), Residual(FFN(in_dim, round(in_dim * mlp_ratio))),
            PatchMerging(in_dim, out_dim, merge_ratio),
            depthwise_residual(out_dim), Residual(FFN(out_dim, round(out_dim * mlp_ratio))),
        )


def _upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 upsampling: the cheapest resize in ONNX Runtime, fine before a refining conv."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class FPNDecoder(nn.Module):
    """Top-down fusion of the three stages (plus a stem skip), ending in full-resolution logits.

    With ``stem_skip`` the fused 1/4 map is upsampled, added to a projection of the 1/2-resolution
    stem and classified at 1/2 with 2x2 sub-pixel logits; without it the classifier runs at 1/4 with
    4x4 sub-pixel logits (cheaper: nothing but the final pixel shuffle touches more than 1/4 res).
    Sub-pixel logits + pixel shuffle cost far less in ONNX Runtime than a bilinear resize to H x W.

    Shape:
        stem (B, stem_dim, H/2, W/2), stages [(B, d1, H/4, W/4), (B, d2, H/8, W/8), (B, d3, H/16, W/16)]
        -> (B, num_classes, H, W)
    """

    def __init__(self, stem_dim: int, stage_dims: tuple[int, ...], decoder_dim: int, num_classes: int,
                 stem_skip: bool = True):
        super().__init__()
        self.laterals = nn.ModuleList(ConvBN(dim, decoder_dim) for dim in stage_dims)
        self.refine_quarter = nn.Sequential(
            nn.ReLU(), ConvBN(decoder_dim, decoder_dim, 3, groups=decoder_dim),
            ConvBN(decoder_dim, decoder_dim))
        self.upscale = 2 if stem_skip else 4
        if stem_skip:
            self.stem_skip = ConvBN(stem_dim, decoder_dim)
            self.refine_half = nn.Sequential(
                nn.ReLU(), ConvBN(decoder_dim, decoder_dim, 3, groups=decoder_dim), nn.ReLU())
        else:
            self.stem_skip = self.refine_half = None
        self.classifier = nn.Conv2d(decoder_dim, num_classes * self.upscale ** 2, 1)  # sub-pixel logits

    def forward(self, stem: torch.Tensor, stages: list[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](stages[-1])  # (B, D, H/16, W/16)
        for lateral, feature in zip(self.laterals[-2::-1], stages[-2::-1]):
            x = _upsample2(x) + lateral(feature)  # (B, D, H/8, W/8) then (B, D, H/4, W/4)
        x = self.refine_quarter(x)
        if self.stem_skip is not None:
            x = self.refine_half(_upsample2(x) + self.stem_skip(stem))  # (B, D, H/2, W/2)
        else:
            x = torch.relu(x)
        logits = self.classifier(x)  # (B, upscale**2 * classes, H/upscale, W/upscale)
        return F.pixel_shuffle(logits, self.upscale)  # (B, classes, H, W)


class TinyEfficientViTSeg(nn.Module):
    """EfficientViT-MSRA encoder (3 stages) + FPN-like decoder for 2-class pupil segmentation.

    Args:
        in_channels: input channels (1: grayscale frames in [-1, 1]).
        num_classes: output channels (2: background, pupil).
        embed_dim: channels of the three stages.
        depth: sandwich blocks per stage.
        num_heads: attention heads per stage; must divide the stage's embed_dim.
        key_dim: query/key channels per head.
        window_size: side of the local attention windows (in tokens of that stage).
        decoder_dim: channels of the decoder.
        mlp_ratio: FFN expansion; merge_ratio: expansion inside the patch merging.
        stem_skip: decode at 1/2 resolution with a skip from the stem (True) or at 1/4 (False).

    Shape:
        (B, in_channels, H, W) -> (B, num_classes, H, W)

    H and W must be multiples of 16 (the encoder's total stride); any other size raises
    ``ValueError("H and W must be multiples of 16, got HxW")``. The check reads the static shape,
    so it does not appear in an exported ONNX graph or break torch.compile.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, embed_dim=(8, 16, 24), depth=(1, 1, 1),
                 num_heads=(1, 1, 2), key_dim: int = 4, window_size: int = 5, decoder_dim: int = 16,
                 mlp_ratio: float = 2, merge_ratio: float = 4, stem_skip: bool = True):
        super().__init__()
        if not len(embed_dim) == len(depth) == len(num_heads) == 3:
            raise ValueError("embed_dim, depth and num_heads must each have 3 entries (one per stage)")
        stem_dim = max(embed_dim[0] // 2, 1)
        self.stem_half = nn.Sequential(ConvBN(in_channels, stem_dim, 3, stride=2), nn.ReLU())
        self.stem_quarter = ConvBN(stem_dim, embed_dim[0], 3, stride=2)
        self.stages = nn.ModuleList()
        for i, (dim, blocks, heads) in enumerate(zip(embed_dim, depth, num_heads)):
            layers = [Subsample(embed_dim[i - 1], dim, mlp_ratio, merge_ratio)] if i > 0 else []
            layers += [SandwichBlock(dim, key_dim, heads, window_size, mlp_ratio) for _ in range(blocks)]
            self.stages.append(nn.Sequential(*layers))
        self.decoder = FPNDecoder(stem_dim, tuple(embed_dim), decoder_dim, num_classes, stem_skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple_of(x)
        stem = self.stem_half(x)  # (B, stem_dim, H/2, W/2)
        feature = self.stem_quarter(stem)  # (B, d1, H/4, W/4)
        stages = []
        for stage in self.stages:
            feature = stage(feature)
            stages.append(feature)
        return self.decoder(stem, stages)
