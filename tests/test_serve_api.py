"""``deepgalaxy serve`` (issue 17 items 1 and 3): the JSON API over real HTTP on a tiny registered model, every bad
upload answered with JSON and a 4xx while the server keeps serving, the model loaded once, concurrent requests
batched into fewer model calls."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")

from deepgalaxy.core.dataset import open_dataset  # noqa: E402
from deepgalaxy.core.observation import load_observation  # noqa: E402
from tests.serve_support import served, write_store_png  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]

MAX_UPLOAD_MB = 2
BATCH_WAIT_MS = 40
"""The test server gathers requests for 40 ms (5 by default), so that concurrent requests on a busy 2-core machine
reliably meet in one model call."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    with served(tmp_path_factory, "--max-upload-mb", str(MAX_UPLOAD_MB), "--batch-wait-ms", str(BATCH_WAIT_MS)) as s:
        yield s


@pytest.fixture(scope="module")
def model(server: tuple[str, dict[str, Any]]) -> Any:
    """The same registered version, loaded in this process: the oracle of what the server answers."""
    from deepgalaxy import registry

    info = server[1]
    return registry.load(info["model"], version=info["version"], tracking_uri=info["tracking_uri"])


@pytest.fixture(scope="module")
def pngs(server: tuple[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve store rows as PNG files (simulated images to upload)."""
    d = tmp_path_factory.mktemp("uploads")
    return [write_store_png(server[1]["data"], row, d / f"row{row}.png") for row in range(0, 48, 4)]


def post_files(url: str, route: str, paths: list[Path], **kwargs: Any) -> Any:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return requests.post(url + route, files=files, timeout=60, **kwargs)


def png_pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def health(url: str) -> dict[str, Any]:
    r = requests.get(url + "/healthz", timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


# --- the API -----------------------------------------------------------------------------------------------------


def test_ready_line_healthz_and_models_name_the_registered_version(server: tuple[str, dict[str, Any]]) -> None:
    url, info = server
    assert info["ready_line"] == f"serving {info['model']} v{info['version']} at {url}"
    h = health(url)
    assert (h["status"], h["model"], h["version"]) == ("ok", info["model"], info["version"])
    (m,) = requests.get(url + "/models", timeout=30).json()["models"]
    assert (m["name"], m["version"], m["run_id"], m["card"], m["framework"]) == (
        info["model"], info["version"], info["run_id"], "full-simple", "torch")
    assert m["tracking_uri"] == info["tracking_uri"] and m["classes"] == 71


def test_openapi_lists_every_route(server: tuple[str, dict[str, Any]]) -> None:
    url, _ = server
    schema = requests.get(url + "/openapi.json", timeout=30).json()
    assert {"/healthz", "/models", "/predict", "/search", "/store", "/store/rows", "/store/image/{row}.png"} <= set(
        schema["paths"])
    assert "post" in schema["paths"]["/predict"] and "post" in schema["paths"]["/search"]
    assert requests.get(url + "/docs", timeout=30).status_code == 200


def test_predict_one_file_is_what_predict_gives_for_it(server: tuple[str, dict[str, Any]], model: Any,
                                                       pngs: list[Path]) -> None:
    url, _ = server
    r = post_files(url, "/predict", pngs[:1])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == server[1]["model"] and body["model"]["version"] == 1
    (result,) = body["results"]
    expected_image = load_observation(str(pngs[0]), 32, 1).image  # predict's preprocessing of the same file
    np.testing.assert_array_equal(png_pixels(result["preprocessed_png"]), expected_image[..., 0])
    p = np.asarray(result["probabilities"])
    assert p.shape == (71,) and p.sum() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(p, model.predict(expected_image[None]).probabilities[0], atol=1e-5)
    assert result["predicted_class"] == int(p.argmax()) and result["filename"] == pngs[0].name
    top = result["top"]
    assert [t["class"] for t in top] == list(np.argsort(-p, kind="stable")[:5])
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert result["properties"] is None  # full-simple has no property heads
    assert result["probabilities_svg"].startswith("<svg") and result["probabilities_svg"].count('class="bar"') == 71


def test_predict_two_files_gives_one_result_each_in_order(server: tuple[str, dict[str, Any]],
                                                          pngs: list[Path]) -> None:
    url, _ = server
    r = post_files(url, "/predict", [pngs[1], pngs[5]])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [pngs[1].name, pngs[5].name]
    for path, result in zip([pngs[1], pngs[5]], results, strict=True):
        alone = post_files(url, "/predict", [path]).json()["results"][0]
        np.testing.assert_allclose(result["probabilities"], alone["probabilities"], atol=1e-5)
    assert not np.allclose(results[0]["probabilities"], results[1]["probabilities"])


def brute_force(model: Any, data: Path, z: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    """The k store rows nearest to ``z`` by exact Euclidean distance over every row's encoding."""
    ds = open_dataset(data)
    zs = model.encode(ds.images(np.arange(len(ds))))
    d = np.linalg.norm(zs - z, axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    return [int(i) for i in np.argsort(d, kind="stable")[:k]]


def test_search_with_a_file_finds_the_nearest_rows(server: tuple[str, dict[str, Any]], model: Any,
                                                   pngs: list[Path]) -> None:
    url, info = server
    r = post_files(url, "/search", pngs[2:3])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["filename"] == pngs[2].name
    neighbours = body["neighbours"]
    assert len(neighbours) == 6  # the server's default k
    image = load_observation(str(pngs[2]), 32, 1).image
    assert [n["row"] for n in neighbours] == brute_force(model, info["data"], model.encode(image[None])[0], 6)
    distances = [n["distance"] for n in neighbours]
    assert distances == sorted(distances)
    ds = open_dataset(info["data"])
    labels = ds.labels
    for n in neighbours:
        assert -1.0 <= n["ssim"] <= 1.0
        assert n["label"] == labels[n["row"]] == n["meta"]["label"]
        assert {"sim_id", "camera", "mass_ratio", "snapshot"} <= set(n["meta"])
        np.testing.assert_array_equal(png_pixels(n["png"]), ds.images([n["row"]])[0][..., 0])


def test_search_with_a_row_excludes_it_and_takes_k(server: tuple[str, dict[str, Any]], model: Any) -> None:
    url, info = server
    r = requests.post(url + "/search", data={"row": "9"}, params={"k": 4}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["row"] == 9
    rows = [n["row"] for n in body["neighbours"]]
    image = open_dataset(info["data"]).images([9])
    assert rows == brute_force(model, info["data"], model.encode(image)[0], 4, exclude=9)
    form_k = requests.post(url + "/search", data={"row": "9", "k": "2"}, timeout=60).json()
    assert [n["row"] for n in form_k["neighbours"]] == rows[:2]


def test_store_rows_filters_by_class_camera_and_mass_ratio(server: tuple[str, dict[str, Any]]) -> None:
    url, info = server
    ds = open_dataset(info["data"])
    meta, labels = ds.metadata, ds.labels
    summary = requests.get(url + "/store", timeout=30).json()
    assert summary["rows"] == len(ds) and summary["labels"] == sorted(set(labels.tolist()))
    label, camera = int(labels[10]), int(meta["camera"][10])
    q = sorted(set(meta["mass_ratio"].tolist()))
    cases = [({"label": label}, labels == label), ({"camera": camera}, meta["camera"] == camera),
             ({"label": label, "camera": camera}, (labels == label) & (meta["camera"] == camera)),
             ({"mass_ratio_min": q[-1]}, meta["mass_ratio"] >= q[-1]),
             ({"mass_ratio_max": q[0]}, meta["mass_ratio"] <= q[0])]
    for params, expected in cases:
        body = requests.get(url + "/store/rows", params={**params, "limit": 500}, timeout=30).json()
        assert body["total"] == int(expected.sum()) > 0, params
        assert [r["row"] for r in body["rows"]] == np.flatnonzero(expected).tolist(), params
    page = requests.get(url + "/store/rows", params={"offset": 5, "limit": 3}, timeout=30).json()
    assert [r["row"] for r in page["rows"]] == [5, 6, 7] and page["total"] == len(ds)
    png = requests.get(url + "/store/image/7.png", timeout=30)
    assert png.headers["content-type"] == "image/png"
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content))), ds.images([7])[0][..., 0])


def test_pages_have_the_elements_the_browser_test_uses(server: tuple[str, dict[str, Any]]) -> None:
    url, _ = server
    page = requests.get(url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="file"', 'type="file"', 'id="preprocessed"', 'id="predicted-class"', 'id="probabilities"',
                    'id="properties"', 'id="neighbours"', 'id="model-info"', 'id="error"'):
        assert element in page.text, element
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    browse = requests.get(url + "/browse", timeout=30)
    assert browse.status_code == 200 and "/store/rows" in browse.text
    style = requests.get(url + "/style.css", timeout=30)
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css") and "#error" in style.text


# --- bad requests ------------------------------------------------------------------------------------------------


def pixel_bomb() -> bytes:
    """A 20000 x 20000 grey PNG of zeros, a few hundred kB: 400 megapixels once decoded."""
    side = 20_000
    zipper = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(zipper.compress(row) for _ in range(side)) + zipper.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def too_large_chunked() -> Iterator[bytes]:
    """A multipart body without Content-Length (chunked), larger than the limit."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    for _ in range(MAX_UPLOAD_MB * 4):
        yield b"\x89PNG" + b"\x00" * 500_000
    yield b"\r\n--b--\r\n"


def upload(name: str, data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    return {"files": [("file", (name, data, content_type))]}


BAD = {
    "too large": (413, "post", "/predict", upload("big.png", b"\x89PNG" + b"0" * MAX_UPLOAD_MB * 1_000_000)),
    "too large, chunked": (413, "post", "/predict", {
        "data": too_large_chunked, "headers": {"Content-Type": "multipart/form-data; boundary=b"}}),
    "text named .png": (415, "post", "/predict", upload("notes.png", b"just some text\n")),
    "text content type": (415, "post", "/predict", upload("a.png", b"\x89PNG\r\n\x1a\n", "text/plain")),
    "empty file": (415, "post", "/predict", upload("empty.png", b"")),
    "truncated png": (422, "post", "/predict", upload("cut.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR")),
    "missing file field": (422, "post", "/predict", {"data": {"image": "x"}}),
    "no query": (422, "post", "/search", {"data": {"k": "3"}}),
    "row not a number": (422, "post", "/search", {"data": {"row": "../../etc/passwd"}}),
    "row negative": (422, "post", "/search", {"data": {"row": "-1"}}),
    "row past the store": (422, "post", "/search", {"data": {"row": "1000000"}}),
    "k zero": (422, "post", "/search", {"data": {"row": "1"}, "params": {"k": 0}}),
    "image row not a number": (422, "get", "/store/image/abc.png", {}),
    "image row a path": (404, "get", "/store/image/..%2F..%2Fzarr.json", {}),
    "image row past the store": (422, "get", "/store/image/999999.png", {}),
    "page too long": (422, "get", "/store/rows", {"params": {"limit": 100000}}),
    "no such route": (404, "get", "/etc/passwd", {}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_bad_request_is_a_json_4xx_and_the_server_keeps_serving(case: str,
                                                                      server: tuple[str, dict[str, Any]]) -> None:
    url, _ = server
    status, method, route, given = BAD[case]
    kwargs = {key: value() if callable(value) else value for key, value in given.items()}  # a generator each time
    r = requests.request(method, url + route, timeout=60, **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    message = r.json()["error"]
    assert isinstance(message, str) and len(message) > 15 and "Traceback" not in message, message
    assert health(url)["status"] == "ok"


def test_a_pixel_bomb_is_refused_from_its_header(server: tuple[str, dict[str, Any]]) -> None:
    url, _ = server
    bomb = pixel_bomb()
    assert len(bomb) < MAX_UPLOAD_MB * 1_000_000  # small on the wire: only its pixel count gives it away
    r = requests.post(url + "/predict", files=[("file", ("bomb.png", bomb, "image/png"))], timeout=60)
    assert r.status_code == 413, r.text
    assert "pixels" in r.json()["error"] and "bomb.png" in r.json()["error"]
    assert health(url)["status"] == "ok"


# --- one model, batched ------------------------------------------------------------------------------------------


def test_concurrent_requests_share_model_calls(server: tuple[str, dict[str, Any]], pngs: list[Path]) -> None:
    url, _ = server
    alone = [post_files(url, "/predict", [p]).json()["results"][0]["probabilities"] for p in pngs]
    before = health(url)
    barrier = threading.Barrier(len(pngs))

    def one(path: Path) -> Any:
        barrier.wait()
        return post_files(url, "/predict", [path])

    with ThreadPoolExecutor(len(pngs)) as pool:
        answers = list(pool.map(one, pngs))
    after = health(url)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for expected, answer in zip(alone, answers, strict=True):  # batched together, each gets its own answer
        np.testing.assert_allclose(answer.json()["results"][0]["probabilities"], expected, atol=1e-5)
    calls = after["model_calls"] - before["model_calls"]
    assert after["images_inferred"] - before["images_inferred"] == len(pngs)
    assert 1 <= calls < len(pngs), (calls, len(pngs))
    assert after["model_loads"] == 1


def test_the_model_is_loaded_once_whatever_the_requests(tmp_path: Path, server: tuple[str, dict[str, Any]],
                                                        pngs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, with every model load counted: building the service loads once; requests load nothing."""
    from deepgalaxy import registry
    from deepgalaxy.runs.serve import open_service
    from deepgalaxy.runs.serve.app import create_app
    from deepgalaxy.runs.serve.server import bind, make_server

    info = server[1]
    loads: list[str] = []
    real_load = registry.load
    real_build = type(real_load(info["model"], tracking_uri=info["tracking_uri"]).backend).build

    def counted_build(self: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append("build")
        return real_build(self, *args, **kwargs)

    model = real_load(info["model"], tracking_uri=info["tracking_uri"])
    monkeypatch.setattr(type(model.backend), "build", counted_build)
    monkeypatch.setattr(registry, "load", lambda *a, **k: loads.append("load") or real_load(*a, **k))
    service = open_service(model, info["data"])
    sock = bind("127.0.0.1", 0)
    started = threading.Event()
    urls: list[str] = []
    srv = make_server(create_app(service), sock, lambda u: (urls.append(u), started.set()))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert started.wait(60)
        for path in pngs[:4]:
            assert post_files(urls[0], "/predict", [path]).status_code == 200
            assert post_files(urls[0], "/search", [path]).status_code == 200
        assert requests.post(urls[0] + "/search", data={"row": "3"}, timeout=60).status_code == 200
    finally:
        srv.should_exit = True
        thread.join(30)
        service.close()
        sock.close()
    assert loads == [], loads


def test_a_busy_port_is_refused_before_the_model_is_loaded(tmp_path: Path) -> None:
    """The port is taken first: a port in use is one error line at once, before any model lookup (the model named
    here does not exist, so an error about the model would mean the port was checked too late)."""
    import socket
    import subprocess
    import sys

    from tests.runs_support import make_dataset

    data = make_dataset(tmp_path / "tiny.zarr")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "deepgalaxy", "serve", "no-such-model", "--data", str(data),
                              "--port", str(port), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr, out.stderr
