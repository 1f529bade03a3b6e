"""Keras 3 backbones: ``simple``, ResNet-18/34/50 (torchvision layout) and EfficientNet-B0..B7.

Each factory ``factory(spec, in_channels)`` returns a functional ``keras.Model`` from NHWC images of any size
(``(None, None, in_channels)``) to feature maps M, with the attributes ``reduction`` and ``out_channels``.

Every weighted layer is named explicitly, so weight names are deterministic and map one to one onto the torch
plugin's module paths (see :mod:`deepgalaxy.plugins.convert`): ``simple`` ``blocks.{i}.conv1/bn1/conv2/bn2``;
ResNets torchvision's ``conv1, bn1, layer{k}.{j}.conv1/bn1/.../downsample.0/.1``; EfficientNets
keras.applications' ``stem_conv, block2a_expand_conv, ..., top_bn`` (torch: ``blocks.block2a.expand_conv``).

Where torch pads a strided convolution symmetrically, the Keras layer is an explicit ``ZeroPadding2D`` +
``"valid"`` convolution: Keras' ``"same"`` pads strided convolutions asymmetrically, which would shift every
feature map by one pixel against torch.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from deepgalaxy.core.backbone_options import check_in_channels, check_options, drop_connect_rate, simple_widths
from deepgalaxy.core.specs import BackboneSpec
from deepgalaxy.plugins.backbones import (
    DEFAULT_SIMPLE_WIDTHS,
    EFFICIENTNET_BLOCKS,
    EFFICIENTNET_COEFFICIENTS,
    round_filters,
    round_repeats,
)


def conv_init() -> keras.initializers.Initializer:
    """Kaiming-normal (fan out) as torchvision and keras.applications initialise convolutions.

    A new instance per layer: a Keras initializer draws its seed once, when it is created, so one shared instance
    would give every kernel of the same shape the same values.
    """
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="truncated_normal")

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # torch momentum 0.1
EFFNET_BN_EPS = 1e-3
EFFNET_BN_MOMENTUM = 0.99  # torch momentum 0.01


def _finish(model: keras.Model, reduction: int, out_channels: int) -> keras.Model:
    model.reduction = reduction
    model.out_channels = out_channels
    return model


def _input(spec: BackboneSpec, in_channels: int) -> keras.KerasTensor:
    return keras.Input((None, None, check_in_channels(spec.name, in_channels)), name="images")


def conv_bn_relu(x: Any, filters: int, kernel: int, stride: int, conv: str, bn: str, relu: bool = True) -> Any:
    """Conv (no bias) + BN (+ ReLU) named ``conv`` / ``bn``, padded like torch's ``padding=kernel // 2``."""
    if stride == 1 or kernel == 1:
        pad = "same" if stride == 1 else "valid"
    else:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{conv}.pad")(x)
        pad = "valid"
    x = layers.Conv2D(filters, kernel, strides=stride, padding=pad, use_bias=False,
                      kernel_initializer=conv_init(), name=conv)(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=bn)(x)
    return layers.ReLU(name=f"{bn}.relu")(x) if relu else x


# --- simple --------------------------------------------------------------------------------------------------


def simple(spec: BackboneSpec, in_channels: int) -> keras.Model:
    """Plain conv stack: per width, a stride-2 and a stride-1 3x3 conv (each + BN + ReLU); reduction 2**len."""
    widths = simple_widths(spec, DEFAULT_SIMPLE_WIDTHS)
    inputs = _input(spec, in_channels)
    x = inputs
    for i, w in enumerate(widths):
        x = conv_bn_relu(x, w, 3, 2, f"blocks.{i}.conv1", f"blocks.{i}.bn1")
        x = conv_bn_relu(x, w, 3, 1, f"blocks.{i}.conv2", f"blocks.{i}.bn2")
    return _finish(keras.Model(inputs, x, name="simple"), 2 ** len(widths), widths[-1])


# --- ResNet (torchvision layout) ------------------------------------------------------------------------------


def _basic_block(x: Any, planes: int, stride: int, name: str) -> Any:
    shortcut = x
    out = conv_bn_relu(x, planes, 3, stride, f"{name}.conv1", f"{name}.bn1")
    out = conv_bn_relu(out, planes, 3, 1, f"{name}.conv2", f"{name}.bn2", relu=False)
    if stride != 1 or x.shape[-1] != planes:
        shortcut = conv_bn_relu(x, planes, 1, stride, f"{name}.downsample.0", f"{name}.downsample.1", relu=False)
    out = layers.Add(name=f"{name}.add")([out, shortcut])
    return layers.ReLU(name=f"{name}.out")(out)


def _bottleneck(x: Any, planes: int, stride: int, name: str) -> Any:
    shortcut = x
    out = conv_bn_relu(x, planes, 1, 1, f"{name}.conv1", f"{name}.bn1")
    out = conv_bn_relu(out, planes, 3, stride, f"{name}.conv2", f"{name}.bn2")
    out = conv_bn_relu(out, planes * 4, 1, 1, f"{name}.conv3", f"{name}.bn3", relu=False)
    if stride != 1 or x.shape[-1] != planes * 4:
        shortcut = conv_bn_relu(x, planes * 4, 1, stride, f"{name}.downsample.0", f"{name}.downsample.1", relu=False)
    out = layers.Add(name=f"{name}.add")([out, shortcut])
    return layers.ReLU(name=f"{name}.out")(out)


def _resnet(spec: BackboneSpec, in_channels: int, depths: tuple[int, ...], bottleneck: bool) -> keras.Model:
    check_options(spec, {})
    inputs = _input(spec, in_channels)
    x = conv_bn_relu(inputs, 64, 7, 2, "conv1", "bn1")
    x = layers.ZeroPadding2D(1, name="maxpool.pad")(x)  # after ReLU, zero padding == torch's -inf padding
    x = layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    block = _bottleneck if bottleneck else _basic_block
    for stage, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
        for j in range(depth):
            stride = 2 if stage > 0 and j == 0 else 1
            x = block(x, planes, stride, f"layer{stage + 1}.{j}")
    out_channels = 512 * (4 if bottleneck else 1)
    return _finish(keras.Model(inputs, x, name=spec.name), 32, out_channels)


def resnet18(spec: BackboneSpec, in_channels: int) -> keras.Model:
    """ResNet-18 without its classifier: 7x7 stem, max pool, BasicBlocks (2, 2, 2, 2); 512 feature channels."""
    return _resnet(spec, in_channels, (2, 2, 2, 2), bottleneck=False)


def resnet34(spec: BackboneSpec, in_channels: int) -> keras.Model:
    """ResNet-34 without its classifier: BasicBlocks (3, 4, 6, 3); 512 feature channels."""
    return _resnet(spec, in_channels, (3, 4, 6, 3), bottleneck=False)


def resnet50(spec: BackboneSpec, in_channels: int) -> keras.Model:
    """ResNet-50 (torchvision v1.5: stride on the 3x3 conv) without its classifier; 2048 feature channels."""
    return _resnet(spec, in_channels, (3, 4, 6, 3), bottleneck=True)


# --- EfficientNet (keras.applications structure) --------------------------------------------------------------

def _correct_pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # keras.applications' correct_pad for an even (or unknown) input size: one pixel less on top/left
    c = kernel // 2
    return ((c - 1, c), (c - 1, c))


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=EFFNET_BN_EPS, momentum=EFFNET_BN_MOMENTUM, name=name)


def _mbconv(x: Any, drop_rate: float, name: str, filters_in: int, filters_out: int, kernel: int, strides: int,
            expand_ratio: int, se_ratio: float = 0.25) -> Any:
    """keras.applications.efficientnet's inverted residual block, same layers and names."""
    inputs = x
    filters = filters_in * expand_ratio
    if expand_ratio != 1:
        x = layers.Conv2D(filters, 1, padding="same", use_bias=False, kernel_initializer=conv_init(),
                          name=f"{name}expand_conv")(x)
        x = _bn(f"{name}expand_bn")(x)
        x = layers.Activation("swish", name=f"{name}expand_activation")(x)
    if strides == 2:
        x = layers.ZeroPadding2D(_correct_pad(kernel), name=f"{name}dwconv_pad")(x)
        pad = "valid"
    else:
        pad = "same"
    x = layers.DepthwiseConv2D(kernel, strides=strides, padding=pad, use_bias=False,
                               depthwise_initializer=conv_init(), name=f"{name}dwconv")(x)
    x = _bn(f"{name}bn")(x)
    x = layers.Activation("swish", name=f"{name}activation")(x)
    filters_se = max(1, int(filters_in * se_ratio))
    se = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}se_squeeze")(x)
    se = layers.Conv2D(filters_se, 1, padding="same", activation="swish", kernel_initializer=conv_init(),
                       name=f"{name}se_reduce")(se)
    se = layers.Conv2D(filters, 1, padding="same", activation="sigmoid", kernel_initializer=conv_init(),
                       name=f"{name}se_expand")(se)
    x = layers.Multiply(name=f"{name}se_excite")([x, se])
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, kernel_initializer=conv_init(),
                      name=f"{name}project_conv")(x)
    x = _bn(f"{name}project_bn")(x)
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = layers.Add(name=f"{name}add")([x, inputs])
    return x


def efficientnet(spec: BackboneSpec, in_channels: int, variant: int) -> keras.Model:
    """EfficientNet-B``variant`` as ``keras.applications.EfficientNetB*(include_top=False, weights=None)``,
    without its Rescaling/Normalization input layers (deepgalaxy images are already in [0, 1]) and with
    ``in_channels`` input channels."""
    drop_connect = drop_connect_rate(spec)
    width, depth, _ = EFFICIENTNET_COEFFICIENTS[variant]
    inputs = _input(spec, in_channels)
    x = layers.ZeroPadding2D(_correct_pad(3), name="stem_conv_pad")(inputs)
    x = layers.Conv2D(round_filters(32, width), 3, strides=2, padding="valid", use_bias=False,
                      kernel_initializer=conv_init(), name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = layers.Activation("swish", name="stem_activation")(x)
    blocks_args = EFFICIENTNET_BLOCKS
    total = float(sum(round_repeats(a[1], depth) for a in blocks_args))
    b = 0
    for i, (kernel, repeats, f_in, f_out, expand, strides) in enumerate(blocks_args):
        f_in, f_out = round_filters(f_in, width), round_filters(f_out, width)
        for j in range(round_repeats(repeats, depth)):
            if j > 0:
                strides, f_in = 1, f_out
            x = _mbconv(x, drop_connect * b / total, f"block{i + 1}{chr(j + 97)}_", f_in, f_out, kernel, strides,
                        expand)
            b += 1
    top = round_filters(1280, width)
    x = layers.Conv2D(top, 1, padding="same", use_bias=False, kernel_initializer=conv_init(), name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = layers.Activation("swish", name="top_activation")(x)
    return _finish(keras.Model(inputs, x, name=f"efficientnetb{variant}"), 32, top)


def _efficientnet_factory(variant: int) -> Any:
    def factory(spec: BackboneSpec, in_channels: int) -> keras.Model:
        return efficientnet(spec, in_channels, variant)

    factory.__name__ = factory.__qualname__ = f"efficientnet_b{variant}"
    factory.__doc__ = f"EfficientNet-B{variant} (keras.applications structure, without top)."
    return factory


efficientnet_b0 = _efficientnet_factory(0)
efficientnet_b1 = _efficientnet_factory(1)
efficientnet_b2 = _efficientnet_factory(2)
efficientnet_b3 = _efficientnet_factory(3)
efficientnet_b4 = _efficientnet_factory(4)
efficientnet_b5 = _efficientnet_factory(5)
efficientnet_b6 = _efficientnet_factory(6)
efficientnet_b7 = _efficientnet_factory(7)
