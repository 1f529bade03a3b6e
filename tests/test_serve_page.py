"""The page of ``deepgalaxy serve`` in a real browser (issue 17 item 4): Debian's headless Chromium driven by
Playwright's Python package. Upload a simulated image and see its class, probabilities and six neighbours rendered
(checked against the JSON API's answer for the same image); a bad upload shows an error and the page keeps working;
/browse lists thumbnails and filters them by class.

Every wait is bounded (``WAIT_MS``); the browser and the server are the module's own, closed when it ends.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.prereq import require, require_program
from tests.serve_support import served, write_store_png

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]

NEIGHBOURS = 6
LOADED = "img => img.complete && img.naturalWidth > 0"


def load_benchmark() -> Any:
    """benchmarks/serve_load.py as a module (its load client, PNG writer and Chromium driver; not a package)."""
    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = load_benchmark()
WAIT_MS = BENCH.WAIT_MS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    with served(tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium (a persistent context in a new, empty profile folder), closed at the end of the module.
    The tests ask for ``page`` before ``server``: a machine without Chromium skips before training a model."""
    require(importlib.util.find_spec("playwright") is not None, "the Python package playwright is not installed "
            "(pip install playwright; its browser download is not needed: it drives /usr/bin/chromium)")
    require_program(BENCH.CHROMIUM, "apt-get install chromium")
    with BENCH.chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A new tab; JavaScript errors on it fail the test."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        tab.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def api_predict(base: str, path: Path) -> dict[str, Any]:
    answer = requests.post(f"{base}/predict", files={"file": (path.name, path.read_bytes(), "image/png")}, timeout=60)
    answer.raise_for_status()
    return dict(answer.json()["results"][0])


def test_upload_shows_class_probabilities_neighbours_and_model(page: Any, server: tuple[str, dict[str, Any]],
                                                               tmp_path: Path) -> None:
    base, info = server
    image = write_store_png(info["data"], 3, tmp_path / "row3.png")
    page.goto(f"{base}/")
    assert BENCH.upload(page, image).status == 200
    page.wait_for_function(BENCH.rendered(NEIGHBOURS), timeout=WAIT_MS)

    want = api_predict(base, image)  # the JSON API's answer for the same file: the page must show the same class
    shown = page.text_content("#predicted-class") or ""
    assert str(want["predicted_class"]) in re.findall(r"\d+", shown), (shown, want["predicted_class"])
    assert page.eval_on_selector("#preprocessed", LOADED)
    box = page.eval_on_selector("#probabilities", "e => e.querySelector('svg, canvas, img') !== null || "
                                "['svg', 'canvas', 'img'].includes(e.tagName.toLowerCase())")
    assert box and page.is_visible("#probabilities")
    for neighbour in page.query_selector_all("#neighbours .neighbour"):
        assert len(re.findall(r"\d+\.\d+", neighbour.text_content() or "")) >= 2  # its distance and SSIM
    model = requests.get(f"{base}/models", timeout=30).json()["models"][0]
    text = page.text_content("#model-info") or ""
    assert model["name"] in text and str(model["version"]) in text and model["run_id"] in text, text


def test_bad_upload_shows_an_error_and_the_page_keeps_working(page: Any, server: tuple[str, dict[str, Any]],
                                                              tmp_path: Path) -> None:
    base, info = server
    page.goto(f"{base}/")
    bad = BENCH.upload(page, {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image\n" * 10})
    assert 400 <= bad.status < 500
    page.wait_for_selector("#error", state="visible", timeout=WAIT_MS)
    message = (page.text_content("#error") or "").strip()
    assert len(message) > 10 and bad.json()["error"] in message, message  # the server's message, shown

    image = write_store_png(info["data"], 5, tmp_path / "row5.png")
    assert BENCH.upload(page, image).status == 200
    page.wait_for_function(BENCH.rendered(NEIGHBOURS), timeout=WAIT_MS)
    want = api_predict(base, image)
    assert str(want["predicted_class"]) in re.findall(r"\d+", page.text_content("#predicted-class") or "")


def test_browse_lists_thumbnails_and_filters_by_class(page: Any, server: tuple[str, dict[str, Any]]) -> None:
    from deepgalaxy.core.dataset import open_dataset

    base, info = server
    labels = open_dataset(info["data"]).labels
    page.goto(f"{base}/browse")
    thumbnails = f"() => {{ const imgs = [...document.querySelectorAll('#grid img')]; return imgs.length > 0 && " \
                 f"imgs.every({LOADED}); }}"
    page.wait_for_function(thumbnails, timeout=WAIT_MS)
    assert len(page.query_selector_all("#grid img")) == min(len(labels), 60)  # the first page of the whole store

    label = int(labels[len(labels) // 2])
    page.select_option("#label", str(label))
    with page.expect_response(lambda r: "/store/rows?" in r.url and f"label={label}" in r.url, timeout=WAIT_MS):
        page.click("#filters button[type=submit]")
    page.wait_for_function(thumbnails, timeout=WAIT_MS)
    captions = [c.text_content() or "" for c in page.query_selector_all("#grid .cell")]
    assert len(captions) == min(int((labels == label).sum()), 60)
    assert all(f"class {label}," in c for c in captions), captions
