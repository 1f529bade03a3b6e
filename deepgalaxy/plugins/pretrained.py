"""ImageNet weights from Keras and timm files for the built-in ResNets and EfficientNets (``train --init FILE``).

Files read (never a pickle: torch's ``.pth``/``.pt``/``.bin`` are refused before a reader is asked):

- Keras ``.h5``: the ImageNet files keras.applications downloads (``efficientnetb0_notop.h5``), Keras 2
  ``save_weights`` and whole models saved as ``.h5``: layer groups with ``weight_names``, read by layer name.
- Keras 3 ``.weights.h5`` (``model.save_weights``): layers are keyed by class and position
  (``layers/conv2d_3/vars/0``), not by name, so they are read in keras.applications' layer order, rebuilt here from
  the architecture tables of :mod:`deepgalaxy.plugins.backbones`.
- timm safetensors: ``efficientnet_b0`` .. ``b7`` (and ``tf_efficientnet_*``, same names), ``resnet18/34/50``
  (torchvision's ResNets have the same names); read by timm's state-dict names.

Names: Keras' EfficientNet layers are deepgalaxy's tensorflow names (``stem_conv``, ``block2a_expand_conv`` ...);
Keras' ResNet50 ``conv{s}_block{b}_{i}_conv/_bn`` is ``layer{s-1}.{b-1}.conv{i}/bn{i}`` (``_0_`` the
``downsample.0/.1`` shortcut). timm's EfficientNet ``conv_stem, bn1, blocks.{s}.{j}.*, conv_head, bn2`` is
``stem_conv, stem_bn, blocks.block{s+1}{a,b,..}.*, top_conv, top_bn`` in torch naming, each block's
``conv_pw, bn1, conv_dw, bn2, se.conv_reduce, se.conv_expand, conv_pwl, bn3`` its ``expand_conv, expand_bn, dwconv,
bn, se_reduce, se_expand, project_conv, project_bn`` (a first-stage block without expansion: ``conv_dw, bn1, se.*,
conv_pw, bn2`` are ``dwconv, bn, se_*, project_conv, project_bn``). timm's ResNets are deepgalaxy's torch names.
Keras weights come out in deepgalaxy's tensorflow naming, timm's in its torch naming; the other framework converts
them by name (:mod:`deepgalaxy.plugins.convert`).

Adapted, and said so in :attr:`PretrainedWeights.notes`:

- an RGB stem into a 1-channel card: the kernel's three input channels are summed (as timm's
  ``adapt_input_conv``), so a grey image x gives the activations the RGB model gives (x, x, x);
- Keras' ResNet50 convolutions have biases, deepgalaxy's (torchvision's) none: each bias is folded into the next
  batch norm's moving mean, exactly (BN of ``Wx + b`` with mean ``m`` is BN of ``Wx`` with mean ``m - b``).

Kept as they are, documented: keras.applications' ResNet50 is v1 (the stride on a stage's first 1x1 conv),
deepgalaxy's the torchvision v1.5 (on the 3x3): the weights fit and the first stage computes the same, later stages
stride one conv later. timm's ``efficientnet_b*`` (not ``tf_efficientnet_*``) were trained with symmetric padding
and batch-norm eps 1e-5, deepgalaxy's EfficientNet pads like Keras with eps 1e-3. deepgalaxy feeds [0, 1] images
without ImageNet's mean/std normalization: the Keras files' ``normalization`` layer is listed as unused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import WeightsMismatchError, first_few
from deepgalaxy.core.interfaces import PretrainedWeights
from deepgalaxy.core.specs import BackboneSpec
from deepgalaxy.plugins.backbones import (
    EFFICIENTNET_BLOCKS,
    EFFICIENTNET_COEFFICIENTS,
    round_filters,
    round_repeats,
)

KERAS_SUFFIXES = (".h5", ".hdf5")
SAFETENSORS_SUFFIX = ".safetensors"
ENCODER = "encoder."
RESNET_DEPTHS: dict[str, tuple[tuple[int, ...], bool]] = {
    "resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False), "resnet50": ((3, 4, 6, 3), True),
}
"""ResNet name -> (blocks per stage, bottleneck)."""
KERAS_BACKBONES = ("resnet50", *(f"efficientnet-b{v}" for v in EFFICIENTNET_COEFFICIENTS))
"""The backbones keras.applications publishes (it has no ResNet-18/34)."""
_VARS = {"conv2d": ("kernel", "bias"), "depthwise_conv2d": ("kernel", "bias"), "dense": ("kernel", "bias"),
         "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
         "normalization": ("mean", "variance", "count")}
"""Keras 3 layer class (snake case) -> its variables in order (``vars/0``, ``vars/1`` ...)."""
STEMS = {"torch": ("stem_conv.weight", "conv1.weight"), "tensorflow": ("stem_conv.kernel", "conv1.kernel")}
INPUT_AXIS = {"torch": 1, "tensorflow": 2}
"""Where a convolution kernel keeps its input channels: torch (out, in, kh, kw), Keras (kh, kw, in, out)."""
RGB = 3

Layers = dict[str, dict[str, np.ndarray]]
"""``{layer: {variable: array}}``."""


def read(path: Path, spec: BackboneSpec, in_channels: int) -> PretrainedWeights:
    """The weights in ``path`` for backbone ``spec`` with ``in_channels`` input channels, in deepgalaxy's naming.

    A file for another backbone (or variant) raises :class:`WeightsMismatchError` naming both.
    """
    lower = path.name.lower()
    if lower.endswith(KERAS_SUFFIXES):
        framework, (found, layers, unused) = "tensorflow", _keras(path, spec)
    elif lower.endswith(SAFETENSORS_SUFFIX):
        framework, (found, layers, unused) = "torch", _timm(path)
    else:
        raise WeightsMismatchError(
            f"{path}: not a weights file deepgalaxy reads for --init: give Keras' .h5 / .weights.h5 or timm's "
            f".safetensors (ImageNet weights of {spec.name}), a saved model folder or a registered model")
    if found != spec.name:
        raise WeightsMismatchError(
            f"{path} holds {found} weights, but the card's backbone is {spec.name}: use a card with backbone "
            f"{found} (--set card.backbone.name={found}) or the weights of {spec.name}")
    notes = [f"read {path.name} as {found} weights in {'Keras' if framework == 'tensorflow' else 'timm'}' layout"]
    if framework == "tensorflow" and found == "resnet50":
        notes.append("Keras' conv biases folded into the following batch norms' moving means")
    notes += _adapt_stem(layers, framework, in_channels)
    weights = {f"{ENCODER}{layer}.{var}": value for layer, values in layers.items() for var, value in values.items()}
    return PretrainedWeights(framework, weights, unused, notes)


def _adapt_stem(layers: Layers, framework: str, in_channels: int) -> list[str]:
    """Sum an RGB stem kernel's input channels for a 1-channel card (see the module docstring)."""
    for key in STEMS[framework]:
        layer, _, var = key.rpartition(".")
        kernel = layers.get(layer, {}).get(var)
        axis = INPUT_AXIS[framework]
        if kernel is not None and in_channels == 1 and kernel.shape[axis] == RGB:
            layers[layer][var] = kernel.sum(axis=axis, keepdims=True)
            return [f"{layer}: the RGB kernel's 3 input channels summed into the card's 1 channel"]
    return []


# --- what a backbone looks like ---------------------------------------------------------------------------------


def efficientnet_signature(variant: int) -> tuple[int, int, int]:
    """EfficientNet-B``variant``'s (stem channels, number of blocks, top channels): unique per variant."""
    width, depth, _ = EFFICIENTNET_COEFFICIENTS[variant]
    blocks = sum(round_repeats(a[1], depth) for a in EFFICIENTNET_BLOCKS)
    return round_filters(32, width), blocks, round_filters(1280, width)


def _efficientnet_named(stem: int, blocks: int, top: int) -> str:
    for v in EFFICIENTNET_COEFFICIENTS:
        if efficientnet_signature(v) == (stem, blocks, top):
            return f"efficientnet-b{v}"
    return f"an EfficientNet deepgalaxy does not build ({stem} stem channels, {blocks} blocks, {top} top channels)"


def _resnet_named(depths: tuple[int, ...], bottleneck: bool) -> str:
    for name, shape in RESNET_DEPTHS.items():
        if shape == (depths, bottleneck):
            return name
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    return f"a ResNet deepgalaxy does not build ({kind}, blocks per stage {list(depths)})"


def keras_layer_order(backbone: str) -> Iterator[tuple[str, str]]:
    """keras.applications' weighted layers of ``backbone`` as (layer name, class in snake case), in the order of its
    ``model.layers`` (which Keras 3's ``.weights.h5`` keys follow, per class)."""
    if backbone == "resnet50":
        yield "conv1_conv", "conv2d"
        yield "conv1_bn", "batch_normalization"
        for stage, depth in enumerate(RESNET_DEPTHS["resnet50"][0], start=2):
            for block in range(1, depth + 1):
                p = f"conv{stage}_block{block}_"
                order = ("1_conv", "1_bn", "2_conv", "2_bn", "0_conv", "3_conv", "0_bn", "3_bn") if block == 1 \
                    else ("1_conv", "1_bn", "2_conv", "2_bn", "3_conv", "3_bn")
                for name in order:
                    yield p + name, "conv2d" if name.endswith("conv") else "batch_normalization"
        return
    depth_coefficient = EFFICIENTNET_COEFFICIENTS[int(backbone.removeprefix("efficientnet-b"))][1]
    conv, bn = "conv2d", "batch_normalization"
    yield "normalization", "normalization"
    yield "stem_conv", conv
    yield "stem_bn", bn
    for i, (_k, repeats, _fi, _fo, expand, _s) in enumerate(EFFICIENTNET_BLOCKS):
        for j in range(round_repeats(repeats, depth_coefficient)):
            p = f"block{i + 1}{chr(j + 97)}_"
            if expand != 1:
                yield p + "expand_conv", conv
                yield p + "expand_bn", bn
            yield from ((p + "dwconv", "depthwise_conv2d"), (p + "bn", bn), (p + "se_reduce", conv),
                        (p + "se_expand", conv), (p + "project_conv", conv), (p + "project_bn", bn))
    yield "top_conv", conv
    yield "top_bn", bn


# --- Keras ----------------------------------------------------------------------------------------------------


def _keras(path: Path, spec: BackboneSpec) -> tuple[str, Layers, list[str]]:
    """(backbone found, layers in deepgalaxy's tensorflow naming, unused layers) of a Keras weights file."""
    try:
        import h5py
    except ImportError:
        raise WeightsMismatchError(f"{path}: reading Keras .h5 files needs h5py: pip install h5py") from None

    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            if "layer_names" in group.attrs:
                layers = _keras_by_name(group)
            elif "layers" in f:
                layers = _keras_by_order(f["layers"], path, spec)
            else:
                raise WeightsMismatchError(f"{path}: an HDF5 file without Keras weights (no layer_names, no layers/)")
    except OSError as exc:
        raise WeightsMismatchError(f"{path} is not a readable HDF5 (Keras .h5) file ({exc})") from None
    found = _keras_backbone(layers)
    if found == "resnet50":
        ours, unused = _keras_resnet(layers)
        return found, ours, unused
    ours = {k: v for k, v in layers.items() if k.startswith(("stem_", "block", "top_conv", "top_bn"))}
    unused = [f"{k} (Keras' ImageNet input normalization)" if k.startswith("normalization") else k
              for k in layers if k not in ours]
    return found, ours, unused


def _keras_by_name(group: Any) -> Layers:
    """Keras 2 / legacy layout: ``attrs['layer_names']``, each group's ``attrs['weight_names']``."""
    out: Layers = {}
    for raw in group.attrs["layer_names"]:
        layer = raw.decode() if isinstance(raw, bytes) else str(raw)
        g = group[layer]
        for raw_w in g.attrs.get("weight_names", []):
            wname = raw_w.decode() if isinstance(raw_w, bytes) else str(raw_w)
            var = wname.rsplit("/", 1)[-1].split(":")[0]
            out.setdefault(layer, {})["kernel" if var == "depthwise_kernel" else var] = np.asarray(g[wname][()])
    return out


def _class_of(key: str) -> str:
    return re.sub(r"_\d+$", "", key)


def _keras_by_order(layers: Any, path: Path, spec: BackboneSpec) -> Layers:
    """Keras 3 layout: ``layers/{class}_{n}/vars/{i}``, matched to the layer order of the backbone whose layer
    counts and shapes the file has (the card's tried first). Layers left over keep their keys (``dense``)."""
    weighted = [key for key in layers if len(layers[key].get("vars", {})) > 0]
    counts: dict[str, int] = {}
    for key in weighted:
        counts[_class_of(key)] = counts.get(_class_of(key), 0) + 1
    candidates = [spec.name] if spec.name in KERAS_BACKBONES else []
    candidates += [b for b in KERAS_BACKBONES if b not in candidates]
    for backbone in candidates:
        order = list(keras_layer_order(backbone))
        wanted: dict[str, int] = {}
        for _, cls in order:
            wanted[cls] = wanted.get(cls, 0) + 1
        if any(counts.get(cls, 0) != n for cls, n in wanted.items() if cls != "normalization"):
            continue
        out, used = _read_in_order(layers, order)
        if _keras_backbone(out) == backbone:
            return {**out, **{key: {} for key in weighted if key not in used}}
    have = ", ".join(f"{n} {cls}" for cls, n in sorted(counts.items()))
    raise WeightsMismatchError(
        f"{path}: a Keras 3 weights file whose layers ({have}) are not those of keras.applications' "
        f"{first_few(list(KERAS_BACKBONES), 9)} without top: deepgalaxy reads those only")


def _read_in_order(layers: Any, order: list[tuple[str, str]]) -> tuple[Layers, set[str]]:
    """The layers of ``order`` read from their keys (``conv2d``, ``conv2d_1`` ... per class), and the keys read."""
    seen: dict[str, int] = {}
    out: Layers = {}
    for name, cls in order:
        n = seen.get(cls, 0)
        seen[cls] = n + 1
        key = cls if n == 0 else f"{cls}_{n}"
        if key in layers:  # a file may lack the normalization layer
            values = layers[key]["vars"]
            out[name] = {var: np.asarray(values[str(i)][()]) for i, var in enumerate(_VARS[cls]) if str(i) in values}
    return out, {cls if n == 0 else f"{cls}_{n}" for cls, count in seen.items() for n in range(count)}


def _keras_backbone(layers: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """Which backbone Keras layers belong to (from names and shapes)."""
    if "stem_conv" in layers and "top_conv" in layers:
        blocks = {k.split("_")[0] for k in layers if re.match(r"^block\d+[a-z]_", k)}
        return _efficientnet_named(layers["stem_conv"]["kernel"].shape[-1], len(blocks),
                                   layers["top_conv"]["kernel"].shape[-1])
    if "conv1_conv" in layers:
        stages = [len({k.split("_")[1] for k in layers if k.startswith(f"conv{s}_block")}) for s in range(2, 6)]
        return _resnet_named(tuple(stages), bottleneck="conv2_block1_3_conv" in layers)
    return f"no backbone deepgalaxy knows (layers {first_few(list(layers))})"


_KERAS_RESNET = re.compile(r"^conv(?P<stage>\d)_block(?P<block>\d+)_(?P<i>\d)_(?P<kind>conv|bn)$")


def _keras_resnet(layers: Layers) -> tuple[Layers, list[str]]:
    """Keras' ResNet50 layers in deepgalaxy's (torchvision's) naming, conv biases folded into the batch norms."""
    out: Layers = {}
    unused: list[str] = []
    for name, values in layers.items():
        m = _KERAS_RESNET.match(name)
        if name in ("conv1_conv", "conv1_bn"):
            out["conv1" if name == "conv1_conv" else "bn1"] = dict(values)
        elif m:
            base = f"layer{int(m['stage']) - 1}.{int(m['block']) - 1}."
            i = m["i"]
            if m["kind"] == "conv":
                out[base + ("downsample.0" if i == "0" else f"conv{i}")] = dict(values)
            else:
                out[base + ("downsample.1" if i == "0" else f"bn{i}")] = dict(values)
        else:
            unused.append(name)
    for conv, bn in _conv_bn_pairs(out):
        bias = out[conv].pop("bias", None)
        if bias is not None:
            out[bn]["moving_mean"] = out[bn]["moving_mean"] - bias
    return out, unused


def _conv_bn_pairs(layers: Layers) -> Iterator[tuple[str, str]]:
    for name in layers:
        if name == "conv1":
            yield name, "bn1"
        elif name.endswith("downsample.0"):
            yield name, name[:-1] + "1"
        elif re.search(r"\.conv\d$", name):
            yield name, name[:-5] + "bn" + name[-1]


# --- timm -----------------------------------------------------------------------------------------------------

_TIMM_STEM = {"conv_stem": "stem_conv", "bn1": "stem_bn", "conv_head": "top_conv", "bn2": "top_bn"}
_TIMM_DS = {"conv_dw": "dwconv", "bn1": "bn", "se.conv_reduce": "se_reduce", "se.conv_expand": "se_expand",
            "conv_pw": "project_conv", "bn2": "project_bn"}
_TIMM_IR = {"conv_pw": "expand_conv", "bn1": "expand_bn", "conv_dw": "dwconv", "bn2": "bn",
            "se.conv_reduce": "se_reduce", "se.conv_expand": "se_expand", "conv_pwl": "project_conv",
            "bn3": "project_bn"}
"""timm's EfficientNet module names -> deepgalaxy's torch names: the stem and head, a depthwise-separable block
(first stage, no expansion), an inverted-residual block."""
_TIMM_BLOCK = re.compile(r"^blocks\.(?P<stage>\d+)\.(?P<block>\d+)\.(?P<layer>.+)\.(?P<param>[^.]+)$")


def _timm(path: Path) -> tuple[str, Layers, list[str]]:
    """(backbone found, layers in deepgalaxy's torch naming, unused entries) of a timm state dict."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # safe_open has no iteration
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsMismatchError(f"{path} is not a valid safetensors file ({exc})") from None
    if meta.get("framework") in ("torch", "tensorflow") and "card" in meta:
        raise WeightsMismatchError(
            f"{path} is the weights file of a saved deepgalaxy model: give its folder (with card.json) to --init")
    tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    if "conv_stem.weight" in tensors:
        return _timm_efficientnet(tensors)
    if "conv1.weight" in tensors and "layer1.0.conv1.weight" in tensors:
        depths = tuple(len({k.split(".")[1] for k in tensors if k.startswith(f"layer{s}.")}) for s in range(1, 5))
        found = _resnet_named(depths, bottleneck="layer1.0.conv3.weight" in tensors)
        return found, _split({k: v for k, v in tensors.items() if not k.startswith("fc.")}), \
            sorted(k for k in tensors if k.startswith("fc."))
    raise WeightsMismatchError(
        f"{path}: not timm's layout of an EfficientNet (conv_stem.weight, blocks.*) or a ResNet (conv1.weight, "
        f"layer1.*); its tensors: {first_few(sorted(tensors))}")


def _split(weights: Mapping[str, np.ndarray]) -> Layers:
    out: Layers = {}
    for name, value in weights.items():
        layer, _, var = name.rpartition(".")
        out.setdefault(layer, {})[var] = value
    return out


def _timm_efficientnet(tensors: Mapping[str, np.ndarray]) -> tuple[str, Layers, list[str]]:
    blocks = sorted({(int(m["stage"]), int(m["block"])) for m in map(_TIMM_BLOCK.match, tensors) if m})
    expands = {(int(m["stage"]), int(m["block"])) for m in map(_TIMM_BLOCK.match, tensors)
               if m and m["layer"] == "conv_pwl"}
    out: Layers = {}
    unused: list[str] = []
    for name, value in tensors.items():
        m = _TIMM_BLOCK.match(name)
        layer, _, param = name.rpartition(".")
        if m:
            key = (int(m["stage"]), int(m["block"]))
            ours = (_TIMM_IR if key in expands else _TIMM_DS).get(m["layer"])
            if ours is not None:
                out.setdefault(f"blocks.block{key[0] + 1}{chr(key[1] + 97)}.{ours}", {})[m["param"]] = value
                continue
        elif layer in _TIMM_STEM:
            out.setdefault(_TIMM_STEM[layer], {})[param] = value
            continue
        unused.append(name)
    head = tensors.get("conv_head.weight")
    found = _efficientnet_named(tensors["conv_stem.weight"].shape[0], len(blocks),
                                head.shape[0] if head is not None else 0)
    return found, out, unused
