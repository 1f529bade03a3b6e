"""``train --init REF`` (issue 14 item 5): ImageNet weights from Keras and timm files, saved folders and registered
versions start a card in both frameworks; what does not fit starts fresh and is listed; bad REFs are one-line errors.

The oracles are the source models themselves: keras.applications' EfficientNetB0 / ResNet50 (random weights, batch
norm statistics included, saved in both Keras formats) and a torch backbone whose state dict is written under timm's
names by :func:`timm_names` below (written from timm's layout, not from the reader's table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from deepgalaxy import registry
from deepgalaxy.core.errors import WeightsMismatchError
from deepgalaxy.registry.store import register_directory
from deepgalaxy.runs.init_weights import check_init, init_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]

SIZE = 32
FRAMEWORKS = ("torch", "tensorflow")


def features(model: Any, x: np.ndarray, upto: str | None = None) -> np.ndarray:
    """The encoder's feature maps M (NHWC) of images ``x``, or with ``upto="layer1"`` the ResNet's first stage."""
    if model.framework == "tensorflow":
        import keras

        enc = model.native.encoder
        if upto:
            enc = keras.Model(enc.inputs, enc.get_layer("layer1.2.out").output)
        return np.asarray(enc(x, training=False))
    import torch

    net = model.native.encoder.eval()
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(t))))) if upto else net(t)
    return out.permute(0, 2, 3, 1).numpy()


def close(a: np.ndarray, b: np.ndarray) -> None:
    scale = float(np.abs(b).max())
    assert scale > 1e-3  # a real signal, not zeros everywhere
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)


def randomize_keras(model: Any, seed: int) -> None:
    """Random biases, betas, means, gammas and variances (kernels keep their random init; Keras starts those at 0
    and 1, which would hide a swapped or dropped statistic)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not layer.weights or layer.name.startswith("normalization"):
            continue
        values = []
        for w in layer.weights:
            v = np.asarray(w.numpy())
            if any(s in w.name for s in ("gamma", "variance")):
                v = rng.uniform(0.5, 1.5, v.shape)
            elif any(s in w.name for s in ("bias", "beta", "mean")):
                v = rng.normal(0, 0.1, v.shape)
            values.append(v.astype(np.float32))
        layer.set_weights(values)


@pytest.fixture(scope="module")
def keras_b0(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    """keras.applications.EfficientNetB0 (no top, random weights) and its weights in Keras 3's ``.weights.h5`` and
    in the legacy ``.h5`` layout of keras.applications' ImageNet files."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    out = tmp_path_factory.mktemp("keras")
    model = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    randomize_keras(model, 0)
    model.save_weights(out / "b0.weights.h5")
    with h5py.File(out / "b0_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return model, {"weights.h5": out / "b0.weights.h5", "legacy": out / "b0_notop.h5"}


def images(channels: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (2, SIZE, SIZE, channels)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["weights.h5", "legacy"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_keras_efficientnet_gives_the_source_models_feature_maps(keras_b0, fmt: str, framework: str) -> None:
    source, files = keras_b0
    x = images(3)
    want = np.asarray(source(x * 255.0, training=False))  # its Rescaling(1/255); Normalization is the identity
    model = registry.create("classifier-b0", framework=framework, input_size=SIZE, channels=3)
    report = init_model(model, str(files[fmt]))
    close(features(model, x), want)
    assert not [f for f in report.fresh if f.startswith("encoder.")]
    assert {f.split(".")[0] for f in report.fresh} == {"head"}
    assert any(u.startswith("normalization") for u in report.unused)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rgb_stem_summed_for_a_grey_card(keras_b0, framework: str) -> None:
    """A 1-channel card from RGB weights: grey x gives the source's feature maps of (x, x, x)."""
    source, files = keras_b0
    grey = images(1)
    want = np.asarray(source(np.repeat(grey, 3, axis=-1) * 255.0, training=False))
    model = registry.create("classifier-b0", framework=framework, input_size=SIZE, channels=1)
    report = init_model(model, str(files["legacy"]))
    close(features(model, grey), want)
    assert any("summed" in note for note in report.notes)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_keras_resnet50_folds_its_conv_biases(tmp_path: Path, framework: str) -> None:
    """Keras' ResNet50 (v1, conv biases) into deepgalaxy's (v1.5, none): the stem and first stage, where v1 and v1.5
    agree, compute what the source computes (the biases folded into the batch norms)."""
    import keras

    source = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    randomize_keras(source, 2)
    source.save_weights(tmp_path / "r50.weights.h5")
    x = images(3)
    want = np.asarray(keras.Model(source.inputs, source.get_layer("conv2_block3_out").output)(x, training=False))
    model = registry.create("classifier-r50", framework=framework, input_size=SIZE, channels=3)
    init_model(model, str(tmp_path / "r50.weights.h5"))
    close(features(model, x, upto="layer1"), want)


# --- timm --------------------------------------------------------------------------------------------------------


def timm_names(ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """deepgalaxy's torch EfficientNet weights under timm's state-dict names: ``conv_stem, bn1``, per stage ``s`` and
    block ``j`` ``blocks.s.j.*`` (stage 0 a DepthwiseSeparableConv: ``conv_dw, bn1, se, conv_pw, bn2``; the others
    InvertedResidual: ``conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3``), ``conv_head, bn2``, ``classifier``."""
    ds = {"dwconv": "conv_dw", "bn": "bn1", "se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand",
          "project_conv": "conv_pw", "project_bn": "bn2"}
    ir = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dwconv": "conv_dw", "bn": "bn2",
          "se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand", "project_conv": "conv_pwl",
          "project_bn": "bn3"}
    top = {"stem_conv": "conv_stem", "stem_bn": "bn1", "top_conv": "conv_head", "top_bn": "bn2"}
    out = {}
    for name, value in ours.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            block, layer, param = parts[1], parts[2], parts[3]
            stage, j = int(block[5:-1]) - 1, ord(block[-1]) - 97
            table = ds if stage == 0 else ir
            out[f"blocks.{stage}.{j}.{table[layer]}.{param}"] = value
        else:
            out[f"{top[parts[0]]}.{parts[1]}"] = value
    out["classifier.weight"] = np.zeros((1000, 1280), np.float32)
    out["classifier.bias"] = np.zeros(1000, np.float32)
    return out


def torch_source(backbone: str, seed: int) -> Any:
    """A deepgalaxy torch backbone (3 channels) with random weights and batch-norm statistics."""
    import torch

    from deepgalaxy.core.specs import BackboneSpec

    torch.manual_seed(seed)
    net = registry.backbone_factory(BackboneSpec(name=backbone), "torch")(BackboneSpec(name=backbone), 3).eval()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(("running_var", ".weight")) and t.ndim == 1:
                t.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", ".bias")):
                t.normal_(0, 0.1)
    return net


def torch_features(net: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(("backbone", "card"), [("efficientnet-b0", "classifier-b0"), ("resnet18", "classifier-r18")])
def test_timm_safetensors_give_the_source_models_feature_maps(tmp_path: Path, framework: str, backbone: str,
                                                               card: str) -> None:
    net = torch_source(backbone, 3)
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}  # num_batches_tracked included, as timm's
    if backbone.startswith("efficientnet"):
        state = timm_names({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    else:
        state["fc.weight"], state["fc.bias"] = np.zeros((1000, 512), np.float32), np.zeros(1000, np.float32)
    save_file(state, str(tmp_path / "timm.safetensors"))
    x = images(3)
    model = registry.create(card, framework=framework, input_size=SIZE, channels=3)
    report = init_model(model, str(tmp_path / "timm.safetensors"))
    close(features(model, x), torch_features(net, x))
    assert not [f for f in report.fresh if f.startswith("encoder.")]
    assert report.unused == sorted(k for k in state if k.startswith(("classifier.", "fc.")))


# --- saved folders and registered versions -----------------------------------------------------------------------


def test_saved_folder_and_registered_version_load_what_fits(tmp_path: Path) -> None:
    """Same card but another num_classes: encoder, decoder, VAE and the hidden head layer load exactly; the head's
    output layer starts fresh and is listed with both shapes. The registered version is pinned by check_init."""
    tiny = {"input_size": SIZE, "head_hidden": [16], "decoder_channels": [16, 8], "backbone.options.widths": [8, 16]}
    source = registry.create("full-simple", framework="torch", seed=1, num_classes=5, **tiny)
    source.save(tmp_path / "saved")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_directory(tmp_path / "saved", name="src", tracking_uri=uri)
    theirs = source.get_weights()
    for ref, framework in ((str(tmp_path / "saved"), "torch"), (str(tmp_path / "saved"), "tensorflow"),
                           ("src", "torch")):
        model = registry.create("full-simple", framework=framework, seed=2, num_classes=7, **tiny)
        pinned = check_init(ref, model.card, uri)
        assert pinned == (ref if ref != "src" else "models:/src/1")
        report = init_model(model, pinned, uri)
        assert sorted(f.split(" ")[0] for f in report.fresh) == ["head.out.bias", "head.out.kernel"] \
            if framework == "tensorflow" else ["head.out.bias", "head.out.weight"]
        assert all("shape" in f for f in report.fresh)
        if framework == "torch":
            mine = model.get_weights()
            for name in report.loaded:
                np.testing.assert_array_equal(mine[name], theirs[name], err_msg=name)
            assert len(report.loaded) == len(theirs) - 2


def test_another_architecture_is_refused(tmp_path: Path) -> None:
    """A saved model whose encoder does not fit (other widths) is an error naming the REF, not a silent fresh
    start; so is a file for another backbone."""
    small = registry.create("classifier-simple", framework="torch", input_size=SIZE,
                            **{"backbone.options.widths": [8, 16]})
    small.save(tmp_path / "small")
    model = registry.create("classifier-simple", framework="torch", input_size=SIZE,
                            **{"backbone.options.widths": [4, 12]})
    with pytest.raises(WeightsMismatchError, match=r"encoder weights .* fit"):
        init_model(model, str(tmp_path / "small"))


# --- the CLI -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.runs_support import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "sims.zarr")


@pytest.mark.parametrize(("ref", "says"), [
    ("missing.safetensors", "no such file"),
    ("weights.pth", "pickle"),
    ("no-such-model", "no-such-model"),
    ("r50.weights.h5", "holds resnet50 weights, but the card's backbone is efficientnet-b0"),
    ("notes.txt", "not .txt"),
])
def test_bad_refs_are_one_line_errors(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str], ref: str,
                                      says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from deepgalaxy.cli import app
    from deepgalaxy.cli.common import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"not even read")
    (tmp_path / "notes.txt").write_text("hello")
    if ref == "r50.weights.h5":
        keras.applications.ResNet50(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)).save_weights(ref)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if ref == "no-such-model":  # a store that holds another model
        register_directory(registry.create("classifier-b0", input_size=SIZE).save(tmp_path / "m"), name="other",
                           tracking_uri=uri)
    capsys.readouterr()
    code = run_cli(app, ["train", "classifier-b0", "--data", str(data), "--init", ref, "--tracking-uri", uri,
                         "--set", f"card.input_size={SIZE}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert says in err
    assert not (tmp_path / "deepgalaxy-runs").exists()


def test_init_with_resume_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from deepgalaxy.cli import app
    from deepgalaxy.cli.common import run_cli

    assert run_cli(app, ["train", "full-simple", "--resume", "--init", "x.safetensors"]) == 2
    assert "--init x.safetensors with --resume" in capsys.readouterr().err


def test_train_from_a_saved_folder_records_the_init(tmp_path: Path, data: Path) -> None:
    """End to end: `deepgalaxy train --init FOLDER` loads the weights before the first step, lists the fresh head
    (another num_classes) on stderr and records init, init.loaded, init.fresh and init.json in the MLflow run."""
    import json

    import mlflow

    from tests.runs_support import CARD, TINY, cli, mlflow_runs

    tiny = {"input_size": SIZE, "head_hidden": [16], "decoder_channels": [16, 8], "backbone.options.widths": [8, 16]}
    registry.create(CARD, framework="torch", num_classes=80, **tiny).save(tmp_path / "saved")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = cli("train", CARD, "--data", str(data), "--init", str(tmp_path / "saved"), "--tracking-uri", uri,
               "--epochs", "1", "--no-register", "--no-progress", *[a for s in TINY for a in ("--set", s)],
               "--set", "train.max_steps_per_epoch=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "init from" in done.stderr and "head.out.weight" in done.stderr
    run = mlflow_runs(uri)[0]
    assert run.data.tags["init"] == str(tmp_path / "saved")
    assert int(run.data.tags["init.fresh"]) == 2 and int(run.data.tags["init.loaded"]) > 10
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="init.json",
                                                tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert sorted(f.split(" ")[0] for f in json.loads(Path(local).read_text())["fresh"]) == [
        "head.out.bias", "head.out.weight"]
