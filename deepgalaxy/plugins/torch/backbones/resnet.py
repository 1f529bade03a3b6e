"""ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck) in plain torch, laid out exactly as torchvision's.

torchvision cannot be imported on the CPU torch build used here, so this mirrors ``torchvision.models.resnet``
(v1.5: the stride sits on the 3x3 conv of a Bottleneck) without the final pool and fc, with any number of input
channels. State-dict names are torchvision's: ``conv1, bn1, layer{1-4}.{j}.conv1/bn1/conv2/bn2[/conv3/bn3]``,
``layer{k}.0.downsample.0`` (1x1 conv) / ``.1`` (BN). Paddings are symmetric (7x7 stem: 3, 3x3: 1, maxpool: 1).
Reduction 32; out_channels 512 (18, 34) or 2048 (50).
"""

from __future__ import annotations

import torch
from torch import nn

from deepgalaxy.core.backbone_options import check_in_channels, check_options
from deepgalaxy.core.specs import BackboneSpec


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        y: torch.Tensor = self.relu(out + identity)
        return y


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, ch * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        y: torch.Tensor = self.relu(out + identity)
        return y


class ResNet(nn.Module):
    """torchvision's ResNet trunk (stem 7x7/2 + maxpool, four stages), ending at the last stage's feature maps."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], in_channels: int) -> None:
        super().__init__()
        self._in = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.reduction = 32
        self.out_channels = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], ch: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in != ch * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._in, ch * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(ch * block.expansion),
            )
        blocks = [block(self._in, ch, stride, downsample)]
        self._in = ch * block.expansion
        blocks += [block(self._in, ch) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        y: torch.Tensor = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return y


def _make(spec: BackboneSpec, in_channels: int, block: type[BasicBlock] | type[Bottleneck],
          layers: list[int]) -> ResNet:
    check_options(spec, {})
    return ResNet(block, layers, check_in_channels(spec.name, in_channels))


def resnet18(spec: BackboneSpec, in_channels: int) -> ResNet:
    """ResNet-18 trunk (BasicBlock, [2, 2, 2, 2]), 512 feature channels."""
    return _make(spec, in_channels, BasicBlock, [2, 2, 2, 2])


def resnet34(spec: BackboneSpec, in_channels: int) -> ResNet:
    """ResNet-34 trunk (BasicBlock, [3, 4, 6, 3]), 512 feature channels."""
    return _make(spec, in_channels, BasicBlock, [3, 4, 6, 3])


def resnet50(spec: BackboneSpec, in_channels: int) -> ResNet:
    """ResNet-50 trunk (Bottleneck, [3, 4, 6, 3]), 2048 feature channels."""
    return _make(spec, in_channels, Bottleneck, [3, 4, 6, 3])
