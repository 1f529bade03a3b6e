"""Load benchmark of ``deepgalaxy serve``: requests/s and latency of one 128 px image predicted and searched (top 6).

Prepares (or reuses, with ``--workdir``) a small simulated store at 128 px and a small trained model, the two
commands it runs being printed (run them by hand the same way)::

    deepgalaxy data simulate WORKDIR/store.zarr --sims 4 --size 128 --cameras 2 --snapshots 16 --particles 2000
    deepgalaxy train vae-simple --data WORKDIR/store.zarr --epochs 1 --set train.max_steps_per_epoch=4 \\
        --set train.batch_size=8 --tracking-uri sqlite:///WORKDIR/mlflow.db --run-dir WORKDIR/run-vae-simple

then starts ``deepgalaxy serve CARD --data STORE`` on 127.0.0.1 and sends ``--requests`` requests (default 400)
from ``--clients`` threads (default 8), each with its own ``requests.Session``. One request is one store image sent
as a PNG: POST /predict, then POST /search (k=6); its latency covers both. A card without a classifier head (the
vae-* cards) predicts no class: its /predict answers the preprocessed image only (the in-process reference then
runs no ``Model.predict``). Every response is checked; a wrong one counts as failed. Side by side in the same run,
the same work in-process without HTTP, one image at a time: ``Model.predict`` + ``Model.similar`` on the
preprocessed image, and ``runs.predict.predict`` on the PNG file (decoding and preprocessing included), so the cost
of HTTP and batching is visible; and the same HTTP requests from one client, one at a time (latency without
queueing).
Goal (issue 17): p95 <= 150 ms for vae-simple at 128 px on 2 cores, no failed request.

    python benchmarks/serve_load.py                                   # vae-simple, 400 requests, 8 clients
    python benchmarks/serve_load.py --workdir /tmp/serve-bench        # keep the store and model for the next run
    python benchmarks/serve_load.py --card full-simple --requests 100 --json out.json
    python benchmarks/serve_load.py --card full-simple --requests 0 --screenshot docs/serve.png   # README's picture
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

GOAL_P95_MS = 150.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""What Debian's Chromium needs as root (../shared/FACTS.md); Playwright adds --headless and the profile folder."""
WAIT_MS = 60_000
READY = re.compile(r"serving \S+ v\d+ at (http://\S+)")
SIMULATE = ["--sims", "4", "--size", "128", "--cameras", "2", "--snapshots", "16", "--particles", "2000"]
TRAIN = ["--epochs", "1", "--set", "train.max_steps_per_epoch=4", "--set", "train.batch_size=8"]


def deepgalaxy(*args: str, timeout: float = 900) -> None:
    """Run ``deepgalaxy ARGS`` as a user would (printed first); stop with its message if it fails."""
    print("$ deepgalaxy " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "deepgalaxy", *args, "--no-progress"], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"deepgalaxy {args[0]} failed:\n{done.stdout}{done.stderr}")


def prepare(workdir: Path, card: str) -> tuple[Path, str]:
    """The simulated store and the tracking URI with a trained ``card`` registered: made if missing, else reused."""
    store, uri = workdir / "store.zarr", f"sqlite:///{workdir / 'mlflow.db'}"
    if not (store / "zarr.json").is_file():
        deepgalaxy("data", "simulate", str(store), *SIMULATE)
    if not (workdir / f"run-{card}" / "result.json").is_file():
        deepgalaxy("train", card, "--data", str(store), *TRAIN, "--tracking-uri", uri, "--run-dir",
                   str(workdir / f"run-{card}"))
    return store, uri


@contextmanager
def serving(args: Sequence[str], timeout: float = 300) -> Iterator[str]:
    """``deepgalaxy serve ARGS`` on any free port of 127.0.0.1; yields its URL once it printed that it serves; stopped
    (SIGTERM, then killed) on exit. Its output goes to a temporary file, so a full pipe never blocks it."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deepgalaxy", "serve", *args, "--host", "127.0.0.1",
                                 "--port", "0", "--no-progress"], stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            while not (found := READY.search(_read(log))):
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = "ended" if proc.poll() is not None else f"did not say it serves within {timeout:.0f} s"
                    raise RuntimeError(f"deepgalaxy serve {why}:\n{_read(log)}")
                time.sleep(0.1)
            yield found.group(1)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _read(log: Any) -> str:
    log.seek(0)
    return str(log.read())


def store_png(store: Path | str, row: int) -> bytes:
    """Store image ``row`` as PNG bytes (what a user uploads)."""
    import io

    from PIL import Image

    from deepgalaxy.core.dataset import open_dataset

    image = open_dataset(store).images(np.array([row]))[0]
    out = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
    return out.getvalue()


def check_predict(body: dict[str, Any]) -> None:
    """One result with a preprocessed image and a class with 71 probabilities (or, for a card without a classifier
    head, no class), else AssertionError (a wrong answer is a failed request)."""
    (result,) = body["results"]
    assert result["preprocessed_png"], result
    if result["predicted_class"] is not None:
        assert 0 <= result["predicted_class"] < 71 and len(result["probabilities"]) == 71, result


def check_search(body: dict[str, Any], k: int) -> None:
    neighbours = body["neighbours"]
    assert len(neighbours) == k and all(isinstance(n["row"], int) and n["png"] for n in neighbours), body


def one_request(session: Any, url: str, png: bytes, k: int) -> tuple[int | None, list[int]]:
    """One image predicted and searched (top ``k``) over HTTP, as the page does; raises if an answer is wrong.
    Returns the predicted class (None for a card without a classifier head) and the neighbours' rows."""
    answer = session.post(f"{url}/predict", files={"file": ("query.png", png, "image/png")}, timeout=60)
    answer.raise_for_status()
    check_predict(answer.json())
    predicted = answer.json()["results"][0]["predicted_class"]
    answer = session.post(f"{url}/search", files={"file": ("query.png", png, "image/png")}, data={"k": str(k)},
                          timeout=60)
    answer.raise_for_status()
    check_search(answer.json(), k)
    return predicted, [int(n["row"]) for n in answer.json()["neighbours"]]


def load(url: str, pngs: Sequence[bytes], requests: int, clients: int, k: int = 6) -> dict[str, Any]:
    """``requests`` requests (image ``i % len(pngs)``) from ``clients`` threads, one ``requests.Session`` each.
    Returns the wall time, each request's latency in seconds, the failures as ``(request, message)`` and the answers
    (request -> what :func:`one_request` returns)."""
    import requests as http

    local = threading.local()
    latencies: list[float] = []
    failures: list[tuple[int, str]] = []
    answers: dict[int, tuple[int | None, list[int]]] = {}
    lock = threading.Lock()

    def send(i: int) -> None:
        if not hasattr(local, "session"):
            local.session = http.Session()
        start = time.perf_counter()
        try:
            answer = one_request(local.session, url, pngs[i % len(pngs)], k)
        except Exception as exc:  # every failure is counted and reported, none stops the run
            with lock:
                failures.append((i, f"{type(exc).__name__}: {exc}"[:300]))
            return
        with lock:
            latencies.append(time.perf_counter() - start)
            answers[i] = answer

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(requests)))
    return {"wall_s": time.perf_counter() - start, "latencies_s": latencies, "failures": failures,
            "answers": answers}


def summary(latencies_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1e3
    if not len(ms):
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "max_ms": float("nan")}
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "max_ms": float(ms.max())}


def in_process(card: str, uri: str, store: Path, pngs: Sequence[bytes], reps: int, k: int,
               with_predict: bool) -> dict[str, dict[str, float]]:
    """The same work without HTTP, one image at a time: the model on the preprocessed image, and
    ``runs.predict.predict`` on the PNG file (decoding and preprocessing included)."""
    from deepgalaxy import registry
    from deepgalaxy.runs.predict import open_prediction_index, predict

    model = registry.load(card, tracking_uri=uri)
    index = open_prediction_index(model, store)
    with tempfile.TemporaryDirectory(prefix="dg-serve-bench-") as tmp:
        files = [Path(tmp) / f"query{i}.png" for i in range(len(pngs))]
        for path, png in zip(files, pngs, strict=True):
            path.write_bytes(png)
        arrays = [predict(model, [f], index=index, k=k).records[0].image for f in files]
        assert all(a is not None for a in arrays)

        def model_only(i: int) -> None:
            x = arrays[i % len(arrays)][None]  # type: ignore[index]
            if with_predict:
                model.predict(x, batch_size=1)
            model.similar(x, index, k, batch_size=1)

        def from_file(i: int) -> None:
            predict(model, [files[i % len(files)]], index=index, k=k, batch_size=1)

        return {"model": summary(timed(model_only, reps)), "file": summary(timed(from_file, reps))}


def timed(fn: Callable[[int], None], reps: int) -> list[float]:
    fn(0)  # warm-up
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return times


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright: a persistent context in the empty folder ``profile``, 1200x900,
    every wait bounded by ``WAIT_MS``; closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, timeout=WAIT_MS,
            viewport={"width": 1200, "height": 900})
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            context.close()


def upload(page: Any, files: Any) -> Any:
    """Choose ``files`` (a path, or Playwright's ``{"name", "mimeType", "buffer"}``) in the page's #file input;
    returns the response to the POST /predict that the upload starts."""
    with page.expect_response(lambda r: r.url.endswith("/predict") and r.request.method == "POST",
                              timeout=WAIT_MS) as answer:
        page.set_input_files("#file", files)
    return answer.value


def rendered(neighbours: int) -> str:
    """A JavaScript predicate: the page shows a class number and ``neighbours`` neighbours whose images loaded, and
    no error."""
    return f"""() => {{
        const cls = document.querySelector('#predicted-class');
        const items = [...document.querySelectorAll('#neighbours .neighbour')];
        const error = document.querySelector('#error');
        return cls !== null && /\\d/.test(cls.textContent) && items.length === {neighbours}
            && items.every(n => [...n.querySelectorAll('img')].some(img => img.complete && img.naturalWidth > 0))
            && (error === null || error.offsetParent === null || error.textContent.trim() === '');
    }}"""


def screenshot(url: str, png: Path, out: Path, k: int) -> None:
    """The page at ``url`` after uploading ``png``, once rendered, as a 1200x900 PNG in ``out``."""
    with tempfile.TemporaryDirectory(prefix="dg-chromium-") as profile, chromium(Path(profile)) as browser:
        page = browser.new_page()
        page.goto(f"{url}/")
        upload(page, png)
        page.wait_for_function(rendered(k), timeout=WAIT_MS)
        page.screenshot(path=str(out))


def has_head(card: str) -> bool:
    from deepgalaxy import registry

    return "head" in registry.card(card).parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--card", default="vae-simple", help="card to train and serve (default vae-simple)")
    parser.add_argument("--workdir", type=Path, help="keep the store and model here and reuse them (default: a "
                        "temporary folder)")
    parser.add_argument("--requests", type=int, default=400, help="0: no load (e.g. only --screenshot)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--images", type=int, default=16, help="distinct store images sent in turn")
    parser.add_argument("--reference-reps", type=int, default=100, help="in-process images timed one at a time")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--screenshot", type=Path, help="save the page after uploading the first image here (PNG, "
                        "1200x900; needs playwright and /usr/bin/chromium)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dg-serve-bench-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        store, uri = prepare(workdir, args.card)
        pngs = [store_png(store, row) for row in range(args.images)]
        with_predict = has_head(args.card)
        with serving([args.card, "--data", str(store), "--tracking-uri", uri, "--k", str(args.k)]) as url:
            if args.screenshot:
                (Path(tmp) / "query.png").write_bytes(pngs[0])
                screenshot(url, Path(tmp) / "query.png", args.screenshot, args.k)
                print(f"wrote {args.screenshot}", file=sys.stderr)
            if args.requests:
                load(url, pngs, 2 * args.clients, args.clients, args.k)  # warm-up
                run = load(url, pngs, args.requests, args.clients, args.k)
                alone = load(url, pngs, args.reference_reps, 1, args.k)
        if args.requests:
            reference = in_process(args.card, uri, store, pngs, args.reference_reps, args.k, with_predict)
            report(args, with_predict, run, summary(alone["latencies_s"]), reference)


def report(args: argparse.Namespace, with_predict: bool, run: dict[str, Any], one_client: dict[str, float],
           reference: dict[str, dict[str, float]]) -> None:
    """Print the figures (and write them to ``--json``)."""
    http_ms = summary(run["latencies_s"])
    rate = len(run["latencies_s"]) / run["wall_s"]
    what = "predicted and searched" if with_predict else (
        f"predicted and searched ({args.card} has no classifier head: /predict preprocesses, predicts no class)")
    print(f"\ndeepgalaxy serve {args.card} at 128 px on 127.0.0.1: {args.requests} requests from {args.clients} "
          f"clients, one image {what} (top {args.k}) per request (machine: {os.cpu_count()} cores)")
    print(f"  requests/s     {rate:8.1f}")
    print(f"  latency p50    {http_ms['p50_ms']:8.1f} ms")
    print(f"  latency p95    {http_ms['p95_ms']:8.1f} ms   p95/150 ms = {http_ms['p95_ms'] / GOAL_P95_MS:.2f} "
          f"(goal <= 1)")
    print(f"  latency max    {http_ms['max_ms']:8.1f} ms")
    print(f"  failed         {len(run['failures']):8d}   (goal 0)")
    for i, message in run["failures"][:5]:
        print(f"    request {i}: {message}")
    print(f"one image at a time ({args.reference_reps} images): p50 / p95 ms")
    print(f"  {'HTTP, one client':<34} {one_client['p50_ms']:7.1f} / {one_client['p95_ms']:7.1f}")
    for key, label in (("model", "in-process: model on the array"), ("file", "in-process: runs.predict on the PNG")):
        r = reference[key]
        print(f"  {label:<34} {r['p50_ms']:7.1f} / {r['p95_ms']:7.1f}   "
              f"(sequential {1e3 / r['p50_ms']:.0f} images/s at p50)")
    print(f"  HTTP one client p50 / in-process PNG p50 = {one_client['p50_ms'] / reference['file']['p50_ms']:.1f}; "
          f"{args.clients} clients keep {args.clients} requests in flight, so latency = {args.clients} / "
          f"requests/s (p50 <= 150 ms needs >= {args.clients / 0.150:.0f} requests/s)")
    if args.json:
        args.json.write_text(json.dumps({
            "card": args.card, "requests": args.requests, "clients": args.clients, "k": args.k,
            "with_predict": with_predict, "requests_per_s": rate, "http": http_ms, "failed": len(run["failures"]),
            "p95_over_goal": http_ms["p95_ms"] / GOAL_P95_MS, "http_one_client": one_client, "in_process": reference,
            "cpus": os.cpu_count(),
        }, indent=2))


if __name__ == "__main__":
    main()
