"""The networks of the original VisionAssist project (sddec25-01), rebuilt so that its state dicts load.

Written from a description of the original's layer structure and state_dict layout, not from its
source: the attribute names below are the original's state_dict prefixes, and on the same weights
the outputs equal the original's. These are *not* our ``TinyEfficientViTSeg`` / ``ShallowNet``.

``OriginalEfficientViTSeg`` (registered as ``efficientvit_original``, the released (16, 32, 64)
config, and ``efficientvit_original_micro``): despite its name it has no cascaded group attention.
    encoder.patch_embed   conv1 (3x3 s2, ConvBN) -> GELU -> conv2 (3x3 s2, ConvBN) -> GELU: stride 4
    encoder.stage1..3     [downsample: ConvBN 3x3 s2 -> GELU (stages 2, 3)] + blocks, each
                          x += dw_conv(norm1(x)); x += attn(norm2(x)); tokens t += mlp(norm3(t))
                          attn: plain multi-head self-attention (nn.Linear qkv / proj) in 7x7 windows,
                          the map zero-padded bottom/right to whole windows, padding not masked
    decoder               1x1 laterals, top-down sum with bilinear upsampling, depthwise 3x3 + BN +
                          GELU smoothing, 1x1 head at 1/4 resolution, bilinear resize to (H, W)
Every GELU is the exact (erf) one. Any H, W works.

``OriginalShallowNet`` (``shallownet_original``): a dense U-Net of 4 down blocks (the last three
after 2x2 average pooling) and 3 up blocks, biased depthwise + pointwise convs with 1x1 bottlenecks,
LeakyReLU(0.01), batch norm only at the end of each down block. H and W must be multiples of 8.
The original trained it with dropout, which holds no weights and is left out here.

``efficientvit_original_kwargs`` and ``shallownet_original_kwargs`` read a model's constructor
arguments back from the shapes of its state dict (``common.models.detect`` uses them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBN, check_multiple_of, static_hw

ORIGINAL_SHALLOWNET_MULTIPLE = 8  # three 2x2 poolings
ASSUMED_KEY_DIM = 4  # q/k channels per head in every config the original trained


# ----------------------------------------------------------------------------- EfficientViT (original)
class MultiHeadSelfAttention(nn.Module):
    """Plain multi-head self-attention over tokens.

    ``qkv`` gives [q of every head | k of every head | v of every head], head-major inside each
    block; q and k have ``key_dim`` channels per head, v has ``value_dim``.

    Shape:
        (B, N, dim) -> (B, N, dim)
    """

    def __init__(self, dim: int, num_heads: int, key_dim: int, value_dim: int):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.scale = key_dim ** -0.5
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + value_dim))
        self.proj = nn.Linear(num_heads * value_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1]
        heads, kd, vd = self.num_heads, self.key_dim, self.value_dim
        q, k, v = self.qkv(x).split([heads * kd, heads * kd, heads * vd], dim=-1)
        q = q.reshape(-1, tokens, heads, kd).transpose(1, 2)  # (B, heads, N, kd)
        k = k.reshape(-1, tokens, heads, kd).transpose(1, 2)  # (B, heads, N, kd)
        v = v.reshape(-1, tokens, heads, vd).transpose(1, 2)  # (B, heads, N, vd)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
        out = (attn @ v).transpose(1, 2).reshape(-1, tokens, heads * vd)  # heads concatenated
        return self.proj(out)


class WindowedAttention(nn.Module):
    """``MultiHeadSelfAttention`` inside non-overlapping ``window_size`` x ``window_size`` windows.

    The map is zero-padded at the bottom and right to whole windows; the padded tokens take part as
    keys and values (no mask), as in the original. Windows and the tokens inside them are row-major.

    Shape:
        (B, dim, H, W) -> (B, dim, H, W)
    """

    def __init__(self, dim: int, num_heads: int, key_dim: int, value_dim: int, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.attn = MultiHeadSelfAttention(dim, num_heads, key_dim, value_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, (height, width), r = x.shape[1], static_hw(x), self.window_size
        pad_h, pad_w = (-height) % r, (-width) % r
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // r, (width + pad_w) // r
        # (B, C, rows*r, cols*r) -> (B*rows*cols, r*r, C); -1 keeps the batch axis dynamic in ONNX
        windows = x.reshape(-1, channels, rows, r, cols, r).permute(0, 2, 4, 3, 5, 1)
        windows = windows.reshape(-1, r * r, channels)
        windows = self.attn(windows)
        x = windows.reshape(-1, rows, cols, r, r, channels).permute(0, 5, 1, 3, 2, 4)
        x = x.reshape(-1, channels, rows * r, cols * r)
        return x[:, :, :height, :width] if pad_h or pad_w else x


class TokenMLP(nn.Module):
    """fc1 -> GELU -> fc2 on tokens: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OriginalBlock(nn.Module):
    """Pre-norm residual block: depthwise conv, windowed attention, token MLP.

    Shape:
        (B, dim, H, W) -> (B, dim, H, W)
    """

    def __init__(self, dim: int, num_heads: int, key_dim: int, value_dim: int, window_size: int, hidden: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.dw_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.attn = WindowedAttention(dim, num_heads, key_dim, value_dim, window_size)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dw_conv(self.norm1(x))
        x = x + self.attn(self.norm2(x))
        channels, (height, width) = x.shape[1], static_hw(x)
        tokens = x.permute(0, 2, 3, 1).reshape(-1, height * width, channels)  # (B, H*W, C)
        tokens = tokens + self.mlp(self.norm3(tokens))
        return tokens.reshape(-1, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W)


class OriginalStage(nn.Module):
    """An optional stride-2 ConvBN + GELU (``downsample``), then ``depth`` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, key_dim: int, value_dim: int,
                 window_size: int, hidden: int, downsample: bool):
        super().__init__()
        self.downsample = nn.Sequential(ConvBN(in_dim, dim, 3, stride=2), nn.GELU()) if downsample else None
        self.blocks = nn.ModuleList(OriginalBlock(dim, num_heads, key_dim, value_dim, window_size, hidden)
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbedding(nn.Module):
    """Two stride-2 3x3 ConvBN + GELU: (B, in, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        mid = dim // 2 if dim >= 4 else 2
        self.conv1, self.act1 = ConvBN(in_channels, mid, 3, stride=2), nn.GELU()
        self.conv2, self.act2 = ConvBN(mid, dim, 3, stride=2), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))))


class OriginalEncoder(nn.Module):
    """patch_embed and three stages: features at strides 4, 8 and 16."""

    def __init__(self, in_channels, embed_dims, depths, num_heads, key_dims, value_dims, window_sizes,
                 hiddens):
        super().__init__()
        self.patch_embed = PatchEmbedding(in_channels, embed_dims[0])
        for i in range(3):
            in_dim = embed_dims[max(i - 1, 0)]
            stage = OriginalStage(in_dim, embed_dims[i], depths[i], num_heads[i], key_dims[i], value_dims[i],
                                  window_sizes[i], hiddens[i], downsample=i > 0)
            setattr(self, f"stage{i + 1}", stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f1 = self.stage1(self.patch_embed(x))  # (B, d0, H/4, W/4)
        f2 = self.stage2(f1)  # (B, d1, H/8, W/8)
        return f1, f2, self.stage3(f2)  # ..., (B, d2, H/16, W/16)


def _smoothing(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class OriginalDecoder(nn.Module):
    """Top-down fusion of the three stages; logits at 1/4 resolution resized to the input size."""

    def __init__(self, embed_dims, decoder_dim: int, num_classes: int):
        super().__init__()
        self.lateral3 = nn.Conv2d(embed_dims[2], decoder_dim, 1)
        self.lateral2 = nn.Conv2d(embed_dims[1], decoder_dim, 1)
        self.lateral1 = nn.Conv2d(embed_dims[0], decoder_dim, 1)
        self.smooth3, self.smooth2, self.smooth1 = (_smoothing(decoder_dim) for _ in range(3))
        self.head = nn.Conv2d(decoder_dim, num_classes, 1)

    def forward(self, f1, f2, f3, size: tuple[int, int]) -> torch.Tensor:
        p3 = self.smooth3(self.lateral3(f3))  # (B, D, H/16, W/16)
        p2 = self.smooth2(self.lateral2(f2) + _resize(p3, static_hw(f2)))  # (B, D, H/8, W/8)
        p1 = self.smooth1(self.lateral1(f1) + _resize(p2, static_hw(f1)))  # (B, D, H/4, W/4)
        return _resize(self.head(p1), size)  # (B, classes, H, W)


class OriginalEfficientViTSeg(nn.Module):
    """The original TinyEfficientViTSeg's layer structure; keyword names as in the original.

    Args:
        embed_dims, depths, num_heads, key_dims, attn_ratios, window_sizes, mlp_ratios: per stage;
            v has ``int(attn_ratio * key_dim)`` channels per head, the MLP ``int(dim * mlp_ratio)``.
        decoder_dim: channels of the decoder.

    Shape:
        (B, in_channels, H, W) -> (B, num_classes, H, W) logits, for any H, W >= 1.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, embed_dims=(8, 16, 24), depths=(1, 1, 1),
                 num_heads=(1, 1, 2), key_dims=(4, 4, 4), attn_ratios=(2, 2, 2), window_sizes=(7, 7, 7),
                 mlp_ratios=(2, 2, 2), decoder_dim: int = 16):
        super().__init__()
        value_dims = [int(ratio * kd) for ratio, kd in zip(attn_ratios, key_dims)]
        hiddens = [int(dim * ratio) for dim, ratio in zip(embed_dims, mlp_ratios)]
        self.encoder = OriginalEncoder(in_channels, embed_dims, depths, num_heads, key_dims, value_dims,
                                       window_sizes, hiddens)
        self.decoder = OriginalDecoder(embed_dims, decoder_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(*self.encoder(x), static_hw(x))


# ----------------------------------------------------------------------------- ShallowNet (original)
def _depthwise(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels)


class OriginalDownBlock(nn.Module):
    """[2x2 average pool] -> three densely connected separable convs -> BN: (B, cin, H, W) -> (B, c, ...)."""

    def __init__(self, in_channels: int, channels: int, pool: bool):
        super().__init__()
        c, cin = channels, in_channels
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()
        self.depthwise_conv1, self.pointwise_conv1 = _depthwise(cin), nn.Conv2d(cin, c, 1)
        self.conv21 = nn.Conv2d(cin + c, c, 1)
        self.depthwise_conv22, self.pointwise_conv22 = _depthwise(c), nn.Conv2d(c, c, 1)
        self.conv31 = nn.Conv2d(cin + 2 * c, c, 1)
        self.depthwise_conv32, self.pointwise_conv32 = _depthwise(c), nn.Conv2d(c, c, 1)
        self.act = nn.LeakyReLU()  # slope 0.01
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        x1 = self.act(self.pointwise_conv1(self.depthwise_conv1(x)))
        x21 = torch.cat((x, x1), dim=1)
        x22 = self.act(self.pointwise_conv22(self.depthwise_conv22(self.conv21(x21))))
        x31 = torch.cat((x21, x22), dim=1)
        return self.bn(self.act(self.pointwise_conv32(self.depthwise_conv32(self.conv31(x31)))))


class OriginalUpBlock(nn.Module):
    """Nearest x2 upsampling of the deeper map, concatenated *before* the skip, two dense separable
    convs: (B, skip, 2h, 2w), (B, cin, h, w) -> (B, c, 2h, 2w)."""

    def __init__(self, skip_channels: int, in_channels: int, channels: int):
        super().__init__()
        c, cat = channels, skip_channels + in_channels
        self.conv11 = nn.Conv2d(cat, c, 1)
        self.depthwise_conv12, self.pointwise_conv12 = _depthwise(c), nn.Conv2d(c, c, 1)
        self.conv21 = nn.Conv2d(cat + c, c, 1)
        self.depthwise_conv22, self.pointwise_conv22 = _depthwise(c), nn.Conv2d(c, c, 1)
        self.act = nn.LeakyReLU()

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((F.interpolate(x, scale_factor=2.0, mode="nearest"), skip), dim=1)
        x1 = self.act(self.pointwise_conv12(self.depthwise_conv12(self.conv11(x))))
        return self.act(self.pointwise_conv22(self.depthwise_conv22(self.conv21(torch.cat((x, x1), dim=1)))))


class OriginalShallowNet(nn.Module):
    """The original ShallowNet; keyword names as in the original.

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W) logits; H and W must be multiples of 8,
        otherwise ``ValueError("H and W must be multiples of 8, got HxW")``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channel_size: int = 32):
        super().__init__()
        c = channel_size
        self.down_block1 = OriginalDownBlock(in_channels, c, pool=False)
        self.down_block2, self.down_block3, self.down_block4 = (OriginalDownBlock(c, c, pool=True)
                                                                for _ in range(3))
        self.up_block1, self.up_block2, self.up_block3 = (OriginalUpBlock(c, c, c) for _ in range(3))
        self.out_conv1 = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_multiple_of(x, ORIGINAL_SHALLOWNET_MULTIPLE)
        x1 = self.down_block1(x)  # (B, c, H, W)
        x2 = self.down_block2(x1)  # (B, c, H/2, W/2)
        x3 = self.down_block3(x2)  # (B, c, H/4, W/4)
        x4 = self.down_block4(x3)  # (B, c, H/8, W/8)
        x = self.up_block3(x1, self.up_block2(x2, self.up_block1(x3, x4)))
        return self.out_conv1(x)  # (B, out_channels, H, W)


# ----------------------------------------------------------------------------- kwargs from shapes
def _ratio(numerator: int, denominator: int) -> int | float:
    """numerator / denominator as an int when whole (JSON-friendly kwargs), else a float."""
    return numerator // denominator if numerator % denominator == 0 else numerator / denominator


def efficientvit_original_kwargs(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``OriginalEfficientViTSeg`` kwargs read from a state dict's {key: shape}; KeyError if a key is absent.

    The shapes fix everything but how qkv's rows split into heads and key channels (rows =
    heads * (2 * key_dim + value_dim), proj inputs = heads * value_dim): every config the original
    trained uses key_dim 4, so that is assumed. The window size (7) holds no weights either.
    """
    stem = shapes["encoder.patch_embed.conv1.conv.weight"]  # (mid, in, 3, 3)
    head = shapes["decoder.head.weight"]  # (classes, D, 1, 1)
    kwargs = {"in_channels": stem[1], "num_classes": head[0], "embed_dims": [], "depths": [], "num_heads": [],
              "key_dims": [], "attn_ratios": [], "window_sizes": [7, 7, 7], "mlp_ratios": [],
              "decoder_dim": head[1]}
    for stage in (1, 2, 3):
        prefix = f"encoder.stage{stage}.blocks."
        depth = len({key[len(prefix):].split(".")[0] for key in shapes if key.startswith(prefix)})
        dim = shapes[f"{prefix}0.norm1.weight"][0]
        qkv_rows = shapes[f"{prefix}0.attn.attn.qkv.weight"][0]
        value_total = shapes[f"{prefix}0.attn.attn.proj.weight"][1]  # heads * value_dim
        key_total = (qkv_rows - value_total) // 2  # heads * key_dim
        heads = key_total // ASSUMED_KEY_DIM
        if heads < 1 or key_total % ASSUMED_KEY_DIM or value_total % heads:
            heads = 1  # not a key_dim-4 layout: one head holds every key channel
        key_dim = key_total // heads
        kwargs["embed_dims"].append(dim)
        kwargs["depths"].append(depth)
        kwargs["num_heads"].append(heads)
        kwargs["key_dims"].append(key_dim)
        kwargs["attn_ratios"].append(_ratio(value_total // heads, key_dim))
        kwargs["mlp_ratios"].append(_ratio(shapes[f"{prefix}0.mlp.fc1.weight"][0], dim))
    return kwargs


def shallownet_original_kwargs(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``OriginalShallowNet`` kwargs read from a state dict's {key: shape}; KeyError if a key is absent."""
    first = shapes["down_block1.pointwise_conv1.weight"]  # (c, in, 1, 1)
    return {"in_channels": first[1], "out_channels": shapes["out_conv1.weight"][0], "channel_size": first[0]}
