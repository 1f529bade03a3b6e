"""EfficientNet-B0..B7 in plain torch, built exactly like ``keras.applications.EfficientNetB*(include_top=False)``.

Structure (so that the TensorFlow plugin is the same architecture, and weights convert one to one):

- stem: Conv3x3/2 (no bias) -> BN -> swish, with ``round_filters(32)`` channels;
- 7 stages of MBConv blocks (expand 1x1 conv, depthwise conv, squeeze-and-excitation with ratio 0.25 of the block's
  *input* filters, project 1x1 conv), widths and repeats scaled by the compound coefficients below; a block with
  stride 1 and equal in/out filters adds its input, after stochastic depth (drop-connect) whose rate grows
  linearly from 0 to ``drop_connect_rate`` (default ``DEFAULT_DROP_CONNECT_RATE``, 0.2) over the blocks;
- top: Conv1x1 to ``round_filters(1280)`` -> BN -> swish. No Rescaling/Normalization layers (inputs are in [0, 1]).

Batch norm: eps 1e-3, momentum 0.01 (Keras' 0.99). Stride-2 convolutions pad like Keras' ``correct_pad`` for even
sizes: ``k//2 - 1`` before and ``k//2`` after (top/left less than bottom/right), then a "valid" conv.

State-dict names follow Keras' layer names: ``stem_conv``, ``stem_bn``, ``blocks.block{s}{letter}.expand_conv /
expand_bn / dwconv / bn / se_reduce / se_expand / project_conv / project_bn`` (``block1a``, ``block2a``,
``block2b``, ... as Keras names ``block2b_expand_conv``), ``top_conv``, ``top_bn``. Blocks with expand ratio 1
have no ``expand_conv``/``expand_bn`` (as in Keras).

Trainable parameters with 3 input channels: B0 4,007,548; B4 17,548,616 (Keras' counts without top).

Stride-1 depthwise convolutions of 5x5 and more take their weight gradient from :mod:`.depthwise` (same values,
faster on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepgalaxy.core.backbone_options import DEFAULT_DROP_CONNECT_RATE, check_in_channels, drop_connect_rate
from deepgalaxy.core.specs import BackboneSpec
from deepgalaxy.plugins.backbones import EFFICIENTNET_BLOCKS, EFFICIENTNET_COEFFICIENTS, round_filters, round_repeats
from deepgalaxy.plugins.torch.backbones.depthwise import depthwise_conv2d, use_folded_gradient

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # Keras momentum 0.99 = weight of the old running value; torch's momentum is the new value's


@dataclass(frozen=True)
class BlockArgs:
    kernel: int
    repeats: int
    filters_in: int
    filters_out: int
    expand: int
    stride: int
    se_ratio: float = 0.25


BASE_BLOCKS: tuple[BlockArgs, ...] = tuple(BlockArgs(*a) for a in EFFICIENTNET_BLOCKS)
"""Keras' ``DEFAULT_BLOCKS_ARGS`` (EfficientNet-B0)."""


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class KerasConv2d(nn.Conv2d):
    """A conv padded like Keras: 'same' (symmetric) at stride 1, ``correct_pad`` + 'valid' at stride 2."""

    def __init__(self, in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_ch, out_ch, k, stride=stride, padding=k // 2 if stride == 1 else 0, groups=groups,
                         bias=bias)
        self._pad = (k // 2 - 1, k // 2, k // 2 - 1, k // 2) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pad is not None:
            x = F.pad(x, self._pad)
        elif use_folded_gradient(self, x):
            return depthwise_conv2d(x, self.weight, int(self.padding[0]))
        return super().forward(x)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a block's residual branch per sample with probability ``rate`` (scaled like Dropout)."""
    if not training or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)
    return x * mask


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (Keras' ``block``)."""

    def __init__(self, a: BlockArgs, drop_rate: float) -> None:
        super().__init__()
        filters = a.filters_in * a.expand
        if a.expand != 1:
            self.expand_conv = KerasConv2d(a.filters_in, filters, 1)
            self.expand_bn = _bn(filters)
        self.dwconv = KerasConv2d(filters, filters, a.kernel, stride=a.stride, groups=filters)
        self.bn = _bn(filters)
        filters_se = max(1, int(a.filters_in * a.se_ratio))
        self.se_reduce = nn.Conv2d(filters, filters_se, 1)
        self.se_expand = nn.Conv2d(filters_se, filters, 1)
        self.project_conv = KerasConv2d(filters, a.filters_out, 1)
        self.project_bn = _bn(a.filters_out)
        self.act = nn.SiLU()
        self.residual = a.stride == 1 and a.filters_in == a.filters_out
        self.drop_rate = drop_rate
        self.expand = a.expand

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand != 1:
            x = self.act(self.expand_bn(self.expand_conv(x)))
        x = self.act(self.bn(self.dwconv(x)))
        se = x.mean(dim=(2, 3), keepdim=True)
        se = torch.sigmoid(self.se_expand(self.act(self.se_reduce(se))))
        x = self.project_bn(self.project_conv(x * se))
        if self.residual:
            x = drop_path(x, self.drop_rate, self.training) + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet-B{variant} trunk without top (but with Keras' top conv); see the module docstring."""

    def __init__(self, variant: int, in_channels: int, drop_connect_rate: float = DEFAULT_DROP_CONNECT_RATE) -> None:
        super().__init__()
        width, depth, self.native_resolution = EFFICIENTNET_COEFFICIENTS[variant]
        self.variant = variant
        stem = round_filters(32, width)
        self.stem_conv = KerasConv2d(in_channels, stem, 3, stride=2)
        self.stem_bn = _bn(stem)
        self.act = nn.SiLU()
        total = float(sum(round_repeats(a.repeats, depth) for a in BASE_BLOCKS))
        blocks: dict[str, nn.Module] = {}
        b = 0
        for i, base in enumerate(BASE_BLOCKS):
            f_in, f_out = round_filters(base.filters_in, width), round_filters(base.filters_out, width)
            for j in range(round_repeats(base.repeats, depth)):
                args = BlockArgs(base.kernel, 1, f_in if j == 0 else f_out, f_out, base.expand,
                                 base.stride if j == 0 else 1, base.se_ratio)
                blocks[f"block{i + 1}{chr(j + 97)}"] = MBConv(args, drop_connect_rate * b / total)
                b += 1
        self.blocks = nn.ModuleDict(blocks)
        self.out_channels = round_filters(1280, width)
        self.top_conv = KerasConv2d(round_filters(320, width), self.out_channels, 1)
        self.top_bn = _bn(self.out_channels)
        self.reduction = 32
        self._init_weights()

    def _init_weights(self) -> None:
        """Keras' conv initializer: VarianceScaling(2.0, 'fan_out', truncated normal)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                fan_out = k * m.out_channels // m.groups
                truncated_normal_(m.weight, math.sqrt(2.0 / fan_out) / 0.87962566103423978)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks.values():
            x = block(x)
        y: torch.Tensor = self.act(self.top_bn(self.top_conv(x)))
        return y


@torch.no_grad()
def truncated_normal_(w: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) clipped to +-2 std: close to Keras' truncated normal, and fast (``trunc_normal_`` is not)."""
    return w.normal_(0.0, std).clamp_(-2 * std, 2 * std)


def _make(variant: int, spec: BackboneSpec, in_channels: int) -> EfficientNet:
    return EfficientNet(variant, check_in_channels(spec.name, in_channels), drop_connect_rate(spec))


def efficientnet_b0(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B0 (width 1.0, depth 1.0), 1280 feature channels."""
    return _make(0, spec, in_channels)


def efficientnet_b1(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B1 (width 1.0, depth 1.1), 1280 feature channels."""
    return _make(1, spec, in_channels)


def efficientnet_b2(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B2 (width 1.1, depth 1.2), 1408 feature channels."""
    return _make(2, spec, in_channels)


def efficientnet_b3(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B3 (width 1.2, depth 1.4), 1536 feature channels."""
    return _make(3, spec, in_channels)


def efficientnet_b4(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B4 (width 1.4, depth 1.8), 1792 feature channels."""
    return _make(4, spec, in_channels)


def efficientnet_b5(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B5 (width 1.6, depth 2.2), 2048 feature channels."""
    return _make(5, spec, in_channels)


def efficientnet_b6(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B6 (width 1.8, depth 2.6), 2304 feature channels."""
    return _make(6, spec, in_channels)


def efficientnet_b7(spec: BackboneSpec, in_channels: int) -> EfficientNet:
    """EfficientNet-B7 (width 2.0, depth 3.1), 2560 feature channels."""
    return _make(7, spec, in_channels)
