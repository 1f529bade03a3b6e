"""The torch backbones: Keras-identical EfficientNet parameter counts and padding, torchvision-identical ResNets,
the configurable ``simple`` stack, option checking, stochastic depth, and the parts' shape rules."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")

from deepgalaxy import registry  # noqa: E402
from deepgalaxy.core.specs import BackboneSpec  # noqa: E402
from deepgalaxy.plugins.torch import backbones  # noqa: E402
from deepgalaxy.plugins.torch.backbones.efficientnet import KerasConv2d, drop_path, round_filters  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(("variant", "expected"), [(0, 4_007_548), (4, 17_548_616)])
def test_efficientnet_trainable_parameters_equal_keras(variant: int, expected: int) -> None:
    spec = BackboneSpec(name=f"efficientnet-b{variant}")
    factory = getattr(backbones, f"efficientnet_b{variant}")
    rgb, gray = factory(spec, 3), factory(spec, 1)
    assert trainable(rgb) == expected
    # one input channel: only the stem conv (3x3, round_filters(32) filters) has fewer weights
    stem = round_filters(32, {0: 1.0, 4: 1.4}[variant])
    assert trainable(rgb) - trainable(gray) == 2 * 9 * stem
    assert rgb.out_channels == {0: 1280, 4: 1792}[variant]


@pytest.mark.parametrize(("name", "expected", "channels"),
                         [("resnet18", 11_176_512, 512), ("resnet34", 21_284_672, 512), ("resnet50", 23_508_032, 2048)])
def test_resnets_match_torchvision_without_fc(name: str, expected: int, channels: int) -> None:
    """torchvision's resnet18/34/50 have 11,689,512 / 21,797,672 / 25,557,032 parameters with the 1000-class fc."""
    net = getattr(backbones, name)(BackboneSpec(name=name), 3)
    assert trainable(net) == expected
    assert net.out_channels == channels and net.reduction == 32
    gray = getattr(backbones, name)(BackboneSpec(name=name), 1)
    assert gray(torch.rand(1, 1, 64, 64)).shape == (1, channels, 2, 2)


def test_efficientnet_widths_and_feature_maps() -> None:
    net = backbones.efficientnet_b0(BackboneSpec(name="efficientnet-b0"), 1).eval()
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 1280, 2, 2)
    assert list(net.blocks)[:4] == ["block1a", "block2a", "block2b", "block3a"]
    assert len(net.blocks) == 16
    b4 = backbones.efficientnet_b4(BackboneSpec(name="efficientnet-b4"), 1)
    assert len(b4.blocks) == 32 and "block6h" in b4.blocks
    # stochastic depth grows linearly from 0 to drop_connect_rate * (n-1)/n over the blocks
    rates = [b.drop_rate for b in net.blocks.values()]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2 * 15 / 16)
    assert all(a < b for a, b in itertools.pairwise(rates))
    assert not net.blocks["block1a"].residual and net.blocks["block2b"].residual
    # batch norm as Keras: eps 1e-3, momentum 0.99 (torch 0.01)
    assert net.stem_bn.eps == 1e-3 and net.stem_bn.momentum == pytest.approx(0.01)


def test_stride_two_convs_pad_like_keras() -> None:
    """Keras pads stride-2 convs after ``correct_pad``: less at top/left than bottom/right (here 0 and 1)."""
    conv = KerasConv2d(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 4, 4))
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    conv5 = KerasConv2d(1, 1, 5, stride=2)
    torch.nn.init.ones_(conv5.weight)
    assert conv5(torch.ones(1, 1, 8, 8)).shape == (1, 1, 4, 4)


def test_drop_path_is_per_sample_and_off_in_eval() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 1, 1)
    y = drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0, 0]
    assert per_sample.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert torch.equal(y[:, 0], y[:, 1])  # the whole sample is dropped, not single values
    assert float(per_sample.mean()) == pytest.approx(1.0, abs=0.05)
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_simple_backbone_widths_and_reduction() -> None:
    spec = BackboneSpec(name="simple", options={"widths": [8, 16, 24]})
    net = backbones.simple(spec, 1)
    assert net.reduction == 8 == registry.reduction(spec) and net.out_channels == 24
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 24, 4, 4)
    assert registry.reduction(BackboneSpec(name="simple")) == 16
    # per width: conv3x3/2 + BN + conv3x3 + BN, no biases
    assert trainable(net) == sum(9 * a * b + 2 * b + 9 * b * b + 2 * b for a, b in [(1, 8), (8, 16), (16, 24)])


def test_plugin_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, deepgalaxy.plugins.torch.plugin as p; p.deepgalaxy_backbones(); p.deepgalaxy_frameworks(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
