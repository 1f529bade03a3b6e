"""Model artifacts and model loading that must be safe and say what is wrong (issue 12 cases 3, 8, 15, 16, 17, 18).

Real SQLite MLflow stores in temporary directories, real artifacts tampered with on disk, the real CLI in a fresh
interpreter (``tests.conftest.run_cli``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import DeepGalaxyError, ModelNotFoundError, ShapeError, WeightsMismatchError
from deepgalaxy.core.specs import ModelSpec, with_overrides
from deepgalaxy.registry import store
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

NAME = "full-simple"


def tiny_card() -> ModelSpec:
    return with_overrides(registry.card(NAME), {
        "input_size": 32, "backbone.options.widths": [8, 16], "decoder_channels": [16, 8], "head_hidden": [16],
    })


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SQLite store and a saved tiny full-simple model; each test registers the versions it tampers with."""
    root = tmp_path_factory.mktemp("safety")
    model = registry.create(tiny_card(), framework="torch", seed=1)
    model.save(root / "saved")
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 1), dtype=np.uint8)
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "root": root, "saved": root / "saved", "model": model,
            "images": images}


def register(reg: dict, name: str = NAME) -> int:
    return store.register_directory(reg["saved"], name=name, tracking_uri=reg["uri"])


def artifact_dir(reg: dict, name: str, version: int) -> Path:
    """The registered version's artifact directory inside the store (what a tamperer with disk access edits)."""
    uri = store._client(reg["uri"]).get_model_version_download_uri(name, str(version))
    path = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
    assert path.is_dir(), uri
    return path


def payload(marker: Path) -> str:
    return f"import pathlib; pathlib.Path({str(marker)!r}).write_text('code from the artifact ran')"


def tamper_every_file(directory: Path, marker: Path) -> list[str]:
    """Put code that writes ``marker`` into every file of an artifact, keeping each file parseable.

    Python files get the code appended; YAML, text and requirement files get it as a trailing comment line; the
    card gets it as its description; the weights get it in their safetensors metadata. Returns the files changed.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    code = payload(marker)
    changed = []
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        if f.suffix == ".py":
            f.write_text(f.read_text() + f"\n{code}\n")
        elif f.name == "card.json":
            card = json.loads(f.read_text())
            card["description"] = code
            f.write_text(json.dumps(card))
        elif f.suffix == ".safetensors":
            with safe_open(str(f), framework="numpy") as st:
                meta = st.metadata() or {}
            save_file(load_file(str(f)), str(f), metadata={**meta, "note": code})
        elif f.suffix in (".yaml", ".yml", ".txt", ".json", "") or f.name == "MLmodel":
            f.write_text(f.read_text().rstrip("\n") + f"\n# {code}\n")
        else:  # pragma: no cover - a file kind this test does not know: fail rather than skip it silently
            raise AssertionError(f"do not know how to tamper with {f}")
        changed.append(f.relative_to(directory).as_posix())
    return changed


# --- case 3: no code from an artifact runs ------------------------------------------------------------------


def test_tampered_artifact_runs_no_code_in_either_loader(reg: dict, tmp_path: Path) -> None:
    """issue 12 case 3: code put into every file of a registered artifact runs neither in registry.load nor in
    mlflow.pyfunc.load_model (+ predict)."""
    import mlflow

    version = register(reg)
    marker = tmp_path / "marker"
    changed = tamper_every_file(artifact_dir(reg, NAME, version), marker)
    names = {Path(c).name for c in changed}
    assert {"MLmodel", "requirements.txt", "python_env.yaml", "card.json", "weights.safetensors"} <= names, changed
    images = reg["images"]

    model = registry.load(NAME, version=version, tracking_uri=reg["uri"])
    z = model.encode(images)
    assert not marker.exists(), "registry.load ran code from the artifact"

    mlflow.set_tracking_uri(reg["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    np.testing.assert_allclose(pyfunc.predict(images, params={"op": "encode"}), z, rtol=1e-5, atol=1e-6)
    probs = pyfunc.predict(images, params={"op": "predict"})
    assert probs.shape == (3, 71)
    assert not marker.exists(), f"mlflow.pyfunc.load_model ran code from the artifact (tampered: {changed})"


def test_pyfunc_is_served_by_the_installed_package_and_matches_registry_load(reg: dict) -> None:
    """issue 12 case 3: the pyfunc flavour's loader is a module of deepgalaxy, the artifact holds no Python file,
    and mlflow.pyfunc's encode equals registry.load(...).encode."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    version = register(reg)
    directory = artifact_dir(reg, NAME, version)
    flavor = yaml.safe_load((directory / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"].startswith("deepgalaxy."), flavor
    assert "python_model" not in flavor and not flavor.get("code"), flavor
    assert not [p for p in directory.rglob("*") if p.suffix in (".py", ".pkl", ".pickle", ".pt", ".pth")]
    mlflow.set_tracking_uri(reg["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    images = reg["images"]
    model = registry.load(NAME, version=version, tracking_uri=reg["uri"])
    np.testing.assert_allclose(pyfunc.predict(images, params={"op": "encode"}), model.encode(images),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict(images), reg["model"].predict(images).probabilities,
                               rtol=1e-5, atol=1e-6)  # no op: class probabilities for a card with a head
    recon = pyfunc.predict(images, params={"op": "reconstruct"})
    assert recon.shape == (3, 32, 32, 1)
    assert pyfunc.predict(model.encode(images), params={"op": "decode"}).shape == (3, 32, 32, 1)
    # bad input: an MlflowException with deepgalaxy's message (the scoring server answers 400 with it)
    with pytest.raises(MlflowException, match="unknown op 'bogus'"):
        pyfunc.predict(images, params={"op": "bogus"})
    with pytest.raises(MlflowException, match=r"predict_properties\(\) needs a properties"):
        pyfunc.predict(images, params={"op": "properties"})  # this card has no property heads


OLD_PYFUNC_CODE = '''"""deepgalaxy pyfunc model (models from code)."""
import mlflow
from deepgalaxy.registry.store import DeepGalaxyPythonModel

mlflow.models.set_model(DeepGalaxyPythonModel())
'''


def test_versions_registered_the_old_way_still_load_without_running_their_code(reg: dict, tmp_path: Path) -> None:
    """issue 12 case 3: a version logged as "models from code" (before the fix) loads through registry.load, which
    never runs its script, even a tampered one."""
    import mlflow

    from deepgalaxy.tracking import prepare_store

    uri = reg["uri"]
    prepare_store(uri, "old-way")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("old-way")
    code = tmp_path / "deepgalaxy_pyfunc.py"
    code.write_text(OLD_PYFUNC_CODE)
    saved = reg["saved"]
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), pip_requirements=["deepgalaxy"],
                                       artifacts={"card": str(saved / "card.json"),
                                                  "weights": str(saved / "weights.safetensors")})
    version = store.register_version(info.model_uri, "old-way", run.info.run_id, tracking_uri=uri)
    marker = tmp_path / "marker"
    changed = tamper_every_file(artifact_dir(reg, "old-way", version), marker)
    assert any(c.endswith(".py") for c in changed), changed
    model = registry.load("old-way", tracking_uri=uri)
    np.testing.assert_allclose(model.encode(reg["images"]), reg["model"].encode(reg["images"]), rtol=1e-5, atol=1e-6)
    assert model.source["version"] == version
    assert not marker.exists()


# --- case 8: a corrupt artifact names the model, the file and the remedy -------------------------------------


def corrupt(reg: dict, what: str) -> tuple[int, Path]:
    version = register(reg)
    directory = artifact_dir(reg, NAME, version)
    if what == "weights":
        target = next(directory.rglob("weights.safetensors"))
        target.write_bytes(b"this is not a safetensors file" * 10)
    else:
        target = next(directory.rglob("card.json"))
        card = json.loads(target.read_text())
        card["bogus_field"] = 1
        card["input_size"] = "big"
        target.write_text(json.dumps(card))
    return version, target


@pytest.mark.parametrize("what", ["weights", "card"])
def test_corrupt_registered_artifact_names_model_file_and_remedy(reg: dict, what: str, tmp_path: Path) -> None:
    """issue 12 case 8: weights that are not safetensors, a card with wrong or extra fields: a DeepGalaxyError
    naming the model, version, store and file, what is wrong and what to do; the CLI exits 2 with one line."""
    from tests._data_helpers import tiny_store

    version, target = corrupt(reg, what)
    with pytest.raises(WeightsMismatchError) as err:
        registry.load(NAME, version=version, tracking_uri=reg["uri"])
    text = str(err.value)
    assert f"{NAME!r} version {version}" in text and reg["uri"] in text and target.name in text, text
    if what == "weights":
        assert "not a valid safetensors file" in text, text
    else:
        assert "bogus_field" in text and "input_size" in text, text
    assert "register a new version" in text and "\n" not in text, text

    data = tiny_store(tmp_path / "tiny.zarr", sims=2, size=32)
    out = run_cli("latent", "index", NAME, "--data", str(data), "--model-version", str(version), "--tracking-uri",
                  reg["uri"], "--no-progress")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"{NAME!r} version {version}" in out.stderr and target.name in out.stderr, out.stderr


# --- case 15: non-finite images and weights ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(reg: dict):  # type: ignore[no-untyped-def]
    return reg["model"]


@pytest.mark.parametrize("op", ["predict", "encode", "reconstruct"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images_are_refused_for_every_op(model, op: str, bad: float) -> None:  # type: ignore[no-untyped-def]
    """issue 12 case 15: NaN/inf pixels are refused, naming how many and which images, instead of NaN vectors or
    class 0."""
    images = np.full((3, 32, 32, 1), 0.5, np.float32)
    images[1, 4, 5, 0] = bad
    with pytest.raises(ShapeError, match=r"1 non-finite value.*image 1\b"):
        getattr(model, op)(images)


def test_non_finite_latent_vectors_are_refused_by_decode(model) -> None:  # type: ignore[no-untyped-def]
    """issue 12 case 15: decode refuses NaN/inf in z."""
    z = np.zeros((2, model.card.latent_dim), np.float32)
    z[0, 3] = np.nan
    with pytest.raises(ShapeError, match=r"non-finite.*row 0\b"):
        model.decode(z)


def test_non_finite_weights_are_refused_at_load_naming_the_tensors(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """issue 12 case 15: weights holding NaN or inf do not load silently; the error names the file and the
    tensors."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    saved = model.save(tmp_path / "nan-model")
    weights_file = saved / "weights.safetensors"
    with safe_open(str(weights_file), framework="numpy") as st:
        meta = st.metadata()
    weights = load_file(str(weights_file))
    floats = sorted(k for k, v in weights.items() if v.dtype.kind == "f")
    weights[floats[0]] = np.full_like(weights[floats[0]], np.nan)
    weights[floats[-1]] = weights[floats[-1]].copy()
    weights[floats[-1]].flat[0] = np.inf
    save_file(weights, str(weights_file), metadata=meta)
    with pytest.raises(WeightsMismatchError) as err:
        registry.load(saved)
    text = str(err.value)
    assert str(weights_file) in text and floats[0] in text and floats[-1] in text and "NaN" in text, text


# --- case 16: a registered name is never taken for a folder ----------------------------------------------------


def test_folder_named_like_a_model_is_not_loaded_instead_of_the_registered_one(
        reg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12 case 16: registry.load("NAME") loads the registered model even when ./NAME is a folder; a folder
    loads only when given as a Path or a string that is clearly a path."""
    version = register(reg)
    monkeypatch.chdir(tmp_path)
    registry.create(tiny_card(), framework="torch", seed=99).save(tmp_path / NAME)
    images = reg["images"]
    loaded = registry.load(NAME, version=version, tracking_uri=reg["uri"])
    assert loaded.source.get("version") == version
    np.testing.assert_allclose(loaded.encode(images), reg["model"].encode(images), rtol=1e-5, atol=1e-6)
    newest = registry.load(NAME, tracking_uri=reg["uri"])
    assert newest.source.get("name") == NAME and "version" in newest.source
    # a models:/ URI (as mlflow.pyfunc takes) is a registered model, not a path, though it holds a '/'
    assert registry.load(f"models:/{NAME}/{version}", tracking_uri=reg["uri"]).source["version"] == version
    for spelling in (Path(NAME), f"./{NAME}", str(tmp_path / NAME), f"{NAME}/"):
        folder = registry.load(spelling)
        assert "version" not in folder.source and Path(folder.source["path"]).resolve() == tmp_path / NAME
        assert not np.allclose(folder.encode(images), loaded.encode(images))


def test_unregistered_name_with_a_folder_of_that_name_says_how_to_load_the_folder(
        reg: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12 case 16: a name with no registered version, beside a folder of that name: the error says how to
    load the folder instead of loading it silently."""
    monkeypatch.chdir(tmp_path)
    registry.create(tiny_card(), framework="torch", seed=5).save(tmp_path / "vae-simple")
    with pytest.raises(ModelNotFoundError, match=r"registry\.load\(Path\('vae-simple'\)\).*\./vae-simple"):
        registry.load("vae-simple", tracking_uri=reg["uri"])
    registry.create(tiny_card(), framework="torch", seed=5).save(tmp_path / "my-model")
    with pytest.raises(DeepGalaxyError, match=r"\./my-model"):
        registry.load("my-model", tracking_uri=reg["uri"])


def test_cli_takes_a_bare_name_for_the_registered_model_and_dot_slash_for_a_folder(
        reg: dict, tmp_path: Path) -> None:
    """issue 12 case 16: at the CLI too, NAME is the registered model and ./NAME the folder."""
    from tests._data_helpers import tiny_store

    data = tiny_store(tmp_path / "tiny.zarr", sims=2, size=32)
    registry.create(with_overrides(registry.card("vae-simple"), {
        "input_size": 32, "backbone.options.widths": [8, 16], "decoder_channels": [16, 8],
    }), framework="torch", seed=3).save(tmp_path / "vae-simple")
    out = run_cli("latent", "index", "vae-simple", "--data", str(data), "--tracking-uri", reg["uri"],
                  "--no-progress", cwd=tmp_path)
    assert out.returncode == 2 and "./vae-simple" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run_cli("latent", "index", "./vae-simple", "--data", str(data), "--tracking-uri", reg["uri"],
                  "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


# --- case 17: an allow-list naming no plugin ---------------------------------------------------------------------


def test_allow_list_naming_no_installed_plugin_warns_and_the_card_error_mentions_it(tmp_path: Path) -> None:
    """issue 12 case 17: DEEPGALAXY_PLUGINS naming no installed plugin warns at plugin load, naming the unknown
    names and the installed ones; the later unknown-card error mentions the allow-list."""
    env = {"DEEPGALAXY_PLUGINS": "tourch,cards-typo"}
    out = run_cli("models", "show", "vae-simple", env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    err = out.stderr
    assert "DEEPGALAXY_PLUGINS" in err and "'tourch'" in err and "'cards-typo'" in err, err
    for installed in ("cards", "torch", "simulation"):
        assert installed in err, err
    assert "unknown model card 'vae-simple'" in err and "Traceback" not in err, err
    assert [line.startswith(("warning: ", "error: ")) for line in err.splitlines()] == [True, True], err
    card_line = next(line for line in err.splitlines() if "unknown model card" in line)
    assert "DEEPGALAXY_PLUGINS" in card_line, err


def test_allow_list_of_installed_plugins_does_not_warn(tmp_path: Path) -> None:
    """issue 12 case 17: the warning is only for names no plugin has."""
    out = run_cli("models", "show", "vae-simple", env={"DEEPGALAXY_PLUGINS": "cards"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DEEPGALAXY_PLUGINS" not in out.stderr, out.stderr


# --- case 18: the rebuild command of a stale index works from where the user stands ------------------------------


def test_stale_index_rebuild_command_works_from_the_users_directory(reg: dict, tmp_path: Path) -> None:
    """issue 12 case 18 (stale index): an index built from one directory, found stale from another: the printed
    rebuild command's --data path names the store from the user's working directory."""
    from tests._data_helpers import tiny_store

    v1, v2 = register(reg), register(reg)
    project = tmp_path / "project"
    project.mkdir()
    tiny_store(project / "sims.zarr", sims=2, size=32)
    built = run_cli("latent", "index", NAME, "--data", "sims.zarr", "--model-version", str(v1), "--tracking-uri",
                    reg["uri"], "--no-progress", cwd=project)
    assert built.returncode == 0, built.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_cli("latent", "search", NAME, "--index-of", "0", "--data", "../project/sims.zarr", "--model-version",
                  str(v2), "--tracking-uri", reg["uri"], cwd=elsewhere)
    assert out.returncode == 2, out.stderr[-3000:]
    command = out.stderr.split("`deepgalaxy latent index ", 1)[1].split("`", 1)[0]
    data = command.split("--data ", 1)[1].strip()
    assert (elsewhere / data).resolve() == (project / "sims.zarr").resolve(), out.stderr
    # the Python API says the same from another directory
    from deepgalaxy.core.search import StaleIndexError
    from deepgalaxy.runs import latent

    cwd = os.getcwd()
    try:
        os.chdir(elsewhere)
        model2 = latent.load_model(NAME, v2, reg["uri"])
        with pytest.raises(StaleIndexError) as err:
            latent.open_index(model2, Path("../project/sims.zarr"))
        index_v1 = latent.open_index(latent.load_model(NAME, v1, reg["uri"]), Path("../project/sims.zarr"))
        with pytest.raises(StaleIndexError) as err2:
            model2.similar(np.zeros((1, 32, 32, 1), np.uint8), index_v1, 2)
    finally:
        os.chdir(cwd)
    for e in (err, err2):
        data = str(e.value).split("--data ", 1)[1].split("`", 1)[0]
        assert (elsewhere / data).resolve() == (project / "sims.zarr").resolve(), str(e.value)



def test_missing_index_of_a_saved_folder_names_a_command_that_builds_it(reg: dict, tmp_path: Path) -> None:
    """issue 12 case 18 (index advice): for a model loaded from a saved folder, the "no latent index" message's
    command names that folder (a bare card name would load the registered model instead), and running the printed
    command builds the index the search then uses."""
    import shlex

    from tests._data_helpers import tiny_store

    tiny_store(tmp_path / "sims.zarr", sims=2, size=32)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}  # nothing registered there
    out = run_cli("latent", "search", str(reg["saved"]), "--index-of", "0", "--data", "sims.zarr", env=env,
                  cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    command = shlex.split(out.stderr.split("`deepgalaxy ", 1)[1].split("`", 1)[0])
    assert command[:2] == ["latent", "index"] and Path(command[2]).resolve() == reg["saved"].resolve(), out.stderr
    built = run_cli(*command, "--no-progress", env=env, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    again = run_cli("latent", "search", str(reg["saved"]), "--index-of", "0", "--data", "sims.zarr", env=env,
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]


def test_reading_models_from_a_store_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    """issue 12 (nothing written that the user did not ask for): looking up models where no MLflow store exists
    says so, naming the file, and leaves no mlflow.db behind (MLflow would create one on first use)."""
    missing = tmp_path / "none.db"
    with pytest.raises(ModelNotFoundError, match=r"no MLflow store at .*none\.db"):
        registry.load(NAME, tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()
    for args in (["models", "versions", NAME], ["models", "promote", NAME, "1"]):
        r = run_cli(*args, env={"MLFLOW_TRACKING_URI": ""}, cwd=tmp_path)
        assert r.returncode == 2 and "no MLflow store at" in r.stderr and "mlflow.db" in r.stderr, r.stderr
        assert not (tmp_path / "mlflow.db").exists(), args
