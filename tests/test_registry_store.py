"""The MLflow Model Registry binding, against a real SQLite MLflow store in a temporary directory.

Versions are registered from saved model directories (``register_directory``); the trainings that register
versions at the end are tested in ``test_runs*.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import ModelNotFoundError, ShapeError, UnknownNameError, WeightsMismatchError
from deepgalaxy.core.specs import ModelSpec, with_overrides
from deepgalaxy.registry import store
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

NAME = "full-simple"


def tiny_card(widths: tuple[int, ...] = (8, 16)) -> ModelSpec:
    return with_overrides(registry.card(NAME), {
        "input_size": 32, "backbone.options.widths": list(widths), "decoder_channels": [16, 8], "head_hidden": [16],
    })


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SQLite store with two versions of ``full-simple`` (different seeds); version 1 aliased 'champion'."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    models = {}
    for seed in (1, 2):
        model = registry.create(tiny_card(), framework="torch", seed=seed)
        model.save(root / f"saved{seed}")
        version = store.register_directory(root / f"saved{seed}", tags={"seed": seed}, description=f"seed {seed}",
                                           tracking_uri=uri)
        models[version] = model
    store.promote(NAME, 1, "champion", tracking_uri=uri)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 1), dtype=np.uint8)
    return {"uri": uri, "root": root, "models": models, "images": images}


def test_load_newest_version_alias_and_number(registered: dict) -> None:
    uri, images, models = registered["uri"], registered["images"], registered["models"]
    newest = registry.load(NAME, tracking_uri=uri)
    assert newest.source["version"] == 2 and newest.framework == "torch"
    np.testing.assert_allclose(newest.predict(images).probabilities, models[2].predict(images).probabilities,
                               rtol=1e-5, atol=1e-6)
    champion = registry.load(f"{NAME}@champion", tracking_uri=uri)
    assert champion.source["version"] == 1 and "champion" in champion.source["aliases"]
    np.testing.assert_allclose(champion.encode(images), models[1].encode(images), rtol=1e-5, atol=1e-6)
    by_number = registry.load(NAME, version=1, tracking_uri=uri)
    np.testing.assert_allclose(by_number.reconstruct(images), models[1].reconstruct(images), rtol=1e-5, atol=1e-6)
    z = by_number.encode(images)
    assert by_number.decode(z).shape == (3, 32, 32, 1)
    # rebuilt from the card: the fully convolutional part serves a larger input too
    assert by_number.reconstruct(np.zeros((1, 64, 64, 1), np.float32)).shape == (1, 64, 64, 1)


def test_versions_list_tags_and_description(registered: dict) -> None:
    found = store.versions(NAME, registered["uri"])
    assert [v.version for v in found] == [2, 1]
    assert found[1].aliases == ["champion"] and found[0].aliases == []
    assert found[0].tags["seed"] == "2" and found[0].description == "seed 2"


def test_mlflow_pyfunc_loads_without_deepgalaxy_calls(registered: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(registered["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    images = registered["images"]
    probs = pyfunc.predict(images)
    np.testing.assert_allclose(probs, registered["models"][1].predict(images).probabilities, rtol=1e-5, atol=1e-6)
    z = pyfunc.predict(images, params={"op": "encode"})
    assert z.shape == (3, 32)
    # served by the installed loader module: the artifact holds no pickle and no Python file
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(registered["root"] / "dl")))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"card.json", "weights.safetensors", "MLmodel"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".py"))]


def test_unknown_name_suggests_close_names(registered: dict) -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'full-simple'"):
        registry.load("full-simpel", tracking_uri=registered["uri"])


def test_card_without_trained_version_says_how_to_train(registered: dict) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no trained version.*deepgalaxy train vae-b4 --data"):
        registry.load("vae-b4", tracking_uri=registered["uri"])


def test_missing_alias_and_version(registered: dict) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no alias 'staging'.*champion -> v1.*models promote full-simple"):
        registry.load(f"{NAME}@staging", tracking_uri=registered["uri"])
    with pytest.raises(ModelNotFoundError, match=r"no version 9 .*versions: 1, 2"):
        registry.load(NAME, version=9, tracking_uri=registered["uri"])


def test_wrong_image_shape_or_channels(registered: dict) -> None:
    model = registry.load(NAME, tracking_uri=registered["uri"])
    with pytest.raises(ShapeError, match="3 channels but card 'full-simple' expects 1"):
        model.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ShapeError, match="64x64 but card 'full-simple' expects 32x32"):
        model.encode(np.zeros((2, 64, 64, 1), np.uint8))
    with pytest.raises(ShapeError, match=r"\(N, H, W, C\)"):
        model.predict(np.zeros((2, 2, 32, 32, 1), np.uint8))


def test_weights_that_do_not_match_the_card(registered: dict, tmp_path: Path) -> None:
    uri = registered["uri"]
    bad = tmp_path / "bad"
    registry.create(tiny_card((8, 16)), framework="torch", seed=0).save(bad)
    (bad / "card.json").write_text(tiny_card((12, 24)).model_dump_json())  # the card now says other widths
    version = store.register_directory(bad, tracking_uri=uri)
    with pytest.raises(WeightsMismatchError, match=rf"'full-simple' version {version}: its weights do not match"):
        registry.load(NAME, version=version, tracking_uri=uri)


def test_promote_errors(registered: dict) -> None:
    with pytest.raises(ModelNotFoundError, match="no version 42"):
        store.promote(NAME, 42, "champion", tracking_uri=registered["uri"])
    with pytest.raises(Exception, match="not allowed"):
        store.promote(NAME, 1, "latest", tracking_uri=registered["uri"])


@pytest.mark.slow
def test_cli_versions_and_promote(registered: dict) -> None:
    uri = registered["uri"]
    out = run_cli("models", "promote", NAME, "2", "--alias", "production", "--tracking-uri", uri)
    assert out.returncode == 0, out.stderr
    assert "full-simple@production -> version 2" in out.stdout
    out = run_cli("models", "versions", NAME, "--tracking-uri", uri)
    assert out.returncode == 0, out.stderr
    assert "production" in out.stdout and "champion" in out.stdout
    bad = run_cli("models", "versions", "full-simpel", "--tracking-uri", uri)
    assert bad.returncode == 2 and "Did you mean 'full-simple'" in bad.stderr


@pytest.mark.slow
def test_concurrent_registrations_each_get_a_version(tmp_path: Path) -> None:
    """Processes that register at the same moment all get their own version: nothing is lost."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    saved = tmp_path / "saved"
    registry.create(tiny_card(), framework="torch", seed=0).save(saved)
    store.register_directory(saved, name="warmup", tracking_uri=uri)  # create the schema once
    go = time.time() + 12  # every process imports first, then all register at this moment
    script = textwrap.dedent(f"""
        import sys, time, json
        from pathlib import Path
        from deepgalaxy.registry import store
        import mlflow
        time.sleep(max(0.0, {go} - time.time()))
        out = [store.register_directory(Path({str(saved)!r}), name="race", tracking_uri={uri!r}) for _ in range(2)]
        print(json.dumps(out))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        got += json.loads(out.strip().splitlines()[-1])
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert sorted(v.version for v in store.versions("race", uri)) == [1, 2, 3, 4, 5, 6]
