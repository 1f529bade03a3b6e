"""Backbone factories of the PyTorch plugin: ``factory(spec: BackboneSpec, in_channels: int) -> nn.Module``.

Every returned module maps images ``(N, in_channels, H, W)`` to feature maps ``(N, out_channels, H/r, W/r)`` and
has the attributes ``reduction`` (r) and ``out_channels``.
"""

from __future__ import annotations

from deepgalaxy.plugins.torch.backbones.efficientnet import (
    EfficientNet,
    efficientnet_b0,
    efficientnet_b1,
    efficientnet_b2,
    efficientnet_b3,
    efficientnet_b4,
    efficientnet_b5,
    efficientnet_b6,
    efficientnet_b7,
)
from deepgalaxy.plugins.torch.backbones.resnet import ResNet, resnet18, resnet34, resnet50
from deepgalaxy.plugins.torch.backbones.simple import SimpleCNN, simple

__all__ = [
    "EfficientNet",
    "ResNet",
    "SimpleCNN",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "resnet18",
    "resnet34",
    "resnet50",
    "simple",
]
