"""A registered version served by MLflow's own server (``mlflow models serve``), asked over real HTTP (issue 17).

A tiny full-simple with trained-looking property heads is registered in a SQLite store in a temporary directory and
aliased; ``mlflow models serve -m models:/NAME@ALIAS --env-manager local`` runs as a subprocess (the venv's mlflow,
as a user runs it) and every answer is compared with the same :class:`Model` in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from deepgalaxy import registry
from deepgalaxy.core.model import Model
from deepgalaxy.core.properties import PROPERTIES
from deepgalaxy.registry import store
from tests.postgres import free_port

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

NAME = "full-simple"
ALIAS = "staging"
START_TIMEOUT_S = 120
TINY: dict[str, Any] = {"input_size": 32, "backbone.options.widths": [8, 16], "decoder_channels": [16, 8],
                        "head_hidden": [16]}
SCALE = [[-50.0, 300.0], [800.0, 400.0], [0.0, 0.3], [15.0, 8.0], [0.1, 0.6], [-0.2, 0.5], [0.3, 0.55]]
"""(mean, std) of the seven property columns, as a training would record them (untrained heads are refused)."""


class Served:
    """The running ``mlflow models serve``, the model it serves (as loaded here) and test images."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path, model: Model,
                 images: np.ndarray) -> None:
        self.process, self.url, self.log, self.model, self.images = process, url, log, model, images

    def invoke(self, body: Any) -> requests.Response:
        return requests.post(f"{self.url}/invocations", json=body, timeout=60)

    def predictions(self, inputs: Any, op: str | None = None) -> Any:
        body = {"inputs": inputs, **({"params": {"op": op}} if op else {})}
        answer = self.invoke(body)
        assert answer.status_code == 200, answer.text[-2000:]
        return answer.json()["predictions"]


def wait_until_up(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll /ping until it answers 200; fail with the server's log if it exits or takes over START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer /ping within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (mlflow starts uvicorn as a child), SIGKILL it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("mlflow-serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model = registry.create(NAME, framework="torch", seed=4, **TINY,
                            properties={"hidden": [16], "normalisation": SCALE})
    version = store.register_directory(model.save(root / "saved"), tracking_uri=uri)
    store.promote(NAME, version, ALIAS, tracking_uri=uri)
    bin_dir = Path(sys.executable).parent  # the venv's mlflow, and the uvicorn it starts by name from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    log = root / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@{ALIAS}", "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(process, url, log)
        images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 1), dtype=np.uint8)
        yield Served(process, url, log, model, images)
    finally:
        stop(process)


def test_the_logged_signature_declares_the_op_param_with_the_cards_default(served: Served) -> None:
    """The scoring server passes only params a signature declares: ``op``, a string defaulting to the card's op."""
    import mlflow

    info = mlflow.models.get_model_info(f"models:/{NAME}@{ALIAS}")
    assert info.signature is not None and info.signature.params is not None
    spec = {p.name: p for p in info.signature.params.params}["op"]
    assert (spec.dtype.name, spec.default) == ("string", "predict")
    assert info.signature.inputs is None  # images of any accepted dtype, or latent vectors for decode


def test_predict_answers_the_class_probabilities_of_the_model(served: Served) -> None:
    images, model = served.images, served.model
    want = model.predict(images).probabilities
    for op in (None, "predict"):  # None: the signature's default op
        probs = np.asarray(served.predictions(images.tolist(), op))
        assert probs.shape == (3, 71)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-6)


def test_encode_answers_the_latent_means_for_uint8_and_float_pixels(served: Served) -> None:
    images, model = served.images, served.model
    want = model.encode(images)
    for inputs in (images.tolist(), (images / 255.0).tolist()):
        z = np.asarray(served.predictions(inputs, "encode"))
        assert z.shape == (3, model.card.latent_dim)
        np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)
    back = np.asarray(served.predictions(want.tolist(), "decode"))
    np.testing.assert_allclose(back, model.decode(want), rtol=1e-4, atol=1e-5)


def test_properties_answers_physical_values_with_intervals_and_units(served: Served) -> None:
    images, model = served.images, served.model
    got = served.predictions(images.tolist(), "properties")
    want = model.predict_properties(images)
    assert len(got) == 3 and list(got[0]) == want.names
    for i, row in enumerate(got):
        for name, estimate in want.row(i).items():
            answer = row[name]
            assert answer["unit"] == PROPERTIES[name]
            assert answer["low"] <= answer["high"]
            np.testing.assert_allclose([answer["value"], answer["low"], answer["high"]], estimate,
                                       rtol=1e-4, atol=1e-3, err_msg=f"image {i} {name}")


@pytest.mark.parametrize(("body", "says"), [
    ({"inputs": [[[[0]] * 32] * 32], "params": {"op": "bogus"}}, "unknown op 'bogus'"),
    ({"inputs": [[[[300]] * 32] * 32], "params": {"op": "encode"}}, "0..255"),
    ({"inputs": [[[[0.5]] * 16] * 16], "params": {"op": "predict"}}, "16x16"),
    ({"inputs": [[[[0.5, 0.5, 0.5]] * 32] * 32]}, "channels"),
    ({"inputs": [[1, 2], [3]]}, "Invalid input"),
    ({"nothing": 1}, "inputs"),
])
def test_a_bad_request_answers_4xx_json_saying_what_is_wrong_and_the_server_keeps_serving(
        served: Served, body: Any, says: str) -> None:
    answer = served.invoke(body)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[-2000:])
    message = answer.json()["message"]
    assert says in message, message
    assert served.process.poll() is None
    assert np.asarray(served.predictions(served.images.tolist(), "encode")).shape == (3, served.model.card.latent_dim)
