"""A deepgalaxy backbone plugin: one module, one hook per thing it provides, one factory per framework."""

from deepgalaxy.core import BackboneInfo, BackboneSpec, ModelSpec, hookimpl


def torch_tinycnn(spec: BackboneSpec, in_channels: int):
    """Two stride-2 convolutions: feature maps at 1/4 of the input size with 2*width channels."""
    from torch import nn

    width = int(spec.options.get("width", 8))
    net = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
    )
    net.reduction, net.out_channels = 4, 2 * width
    return net


@hookimpl
def deepgalaxy_backbones():
    return [BackboneInfo("tinycnn", factories={"torch": torch_tinycnn}, reduction=4,
                         description="two-layer CNN (example plugin)")]


@hookimpl
def deepgalaxy_model_cards():
    return [ModelSpec(name="classifier-tinycnn", task="classifier", backbone=BackboneSpec(name="tinycnn"),
                      input_size=32, description="71-class classifier over the example two-layer CNN")]
