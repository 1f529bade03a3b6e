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


def keras_tinycnn(spec: BackboneSpec, in_channels: int):
    """The same network in Keras: NHWC images of any size -> feature maps, the weighted layers in the same order."""
    import keras
    from keras import layers

    width = int(spec.options.get("width", 8))
    images = keras.Input((None, None, in_channels))
    x = layers.ZeroPadding2D(1)(images)  # torch's padding=1: Keras' "same" pads a strided convolution unevenly
    x = layers.Conv2D(width, 3, strides=2, activation="relu", name="conv1")(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Conv2D(2 * width, 3, strides=2, activation="relu", name="conv2")(x)
    net = keras.Model(images, x, name="tinycnn")
    net.reduction, net.out_channels = 4, 2 * width
    return net


@hookimpl
def deepgalaxy_backbones():
    return [BackboneInfo("tinycnn", factories={"torch": torch_tinycnn, "tensorflow": keras_tinycnn}, reduction=4,
                         description="two-layer CNN (example plugin)")]


@hookimpl
def deepgalaxy_model_cards():
    return [ModelSpec(name="classifier-tinycnn", task="classifier", backbone=BackboneSpec(name="tinycnn"),
                      input_size=32, description="71-class classifier over the example two-layer CNN")]
