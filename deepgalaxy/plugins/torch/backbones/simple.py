"""``simple``: a configurable plain conv stack, the cheapest backbone (smoke runs, small images).

Per width w: Conv3x3(stride 2, padding 1, no bias) + BN + ReLU, then Conv3x3(stride 1, padding 1, no bias) + BN +
ReLU. Reduction ``2 ** len(widths)``, ``out_channels = widths[-1]``.

State-dict names: ``blocks.{i}.conv1 / bn1 / conv2 / bn2`` (i counts widths from 0). Padding is symmetric (1 px).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from deepgalaxy.core.backbone_options import check_in_channels, simple_widths
from deepgalaxy.core.specs import BackboneSpec
from deepgalaxy.plugins.backbones import DEFAULT_SIMPLE_WIDTHS


class SimpleBlock(nn.Module):
    """Halve the size and change the width to ``out_ch``: strided conv then a same-size conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        y: torch.Tensor = self.act(self.bn2(self.conv2(x)))
        return y


class SimpleCNN(nn.Module):
    """A stack of :class:`SimpleBlock`, one per width."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.blocks = nn.Sequential(*(SimpleBlock(a, b) for a, b in itertools.pairwise(chans)))
        self.reduction = 2 ** len(widths)
        self.out_channels = int(widths[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.blocks(x)
        return y


def simple(spec: BackboneSpec, in_channels: int) -> SimpleCNN:
    """Factory of the ``simple`` backbone (option ``widths``, default ``DEFAULT_SIMPLE_WIDTHS``)."""
    return SimpleCNN(check_in_channels(spec.name, in_channels), simple_widths(spec, DEFAULT_SIMPLE_WIDTHS))
