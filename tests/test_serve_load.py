"""A small load on ``deepgalaxy serve`` (issue 17 item 4): 40 requests from 8 concurrent clients on 127.0.0.1, each
one image predicted and searched, through the load client of benchmarks/serve_load.py. No request may fail, every
answer must be valid and the same as the image's answer alone (batched requests are not mixed up); no timing is
asserted (the benchmark measures it)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.serve_support import served
from tests.test_serve_page import BENCH

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    with served(tmp_path_factory) as running:
        yield running


def test_forty_requests_from_eight_clients_all_answered_as_alone(server: tuple[str, dict[str, Any]]) -> None:
    base, info = server
    pngs = [BENCH.store_png(info["data"], row) for row in range(0, 40, 5)]  # 8 different images
    with requests.Session() as session:
        alone = [BENCH.one_request(session, base, png, 6) for png in pngs]
    assert len({rows[0] for _, rows in alone}) > 1  # different images find different neighbours
    run = BENCH.load(base, pngs, requests=40, clients=8, k=6)
    assert run["failures"] == [] and len(run["latencies_s"]) == 40
    for i, answer in sorted(run["answers"].items()):
        assert answer == alone[i % len(pngs)], f"request {i}: {answer} under load, {alone[i % len(pngs)]} alone"


def test_benchmark_reports_a_short_run_beside_the_in_process_reference(server: tuple[str, dict[str, Any]],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/serve_load.py's measuring and reporting end to end at a tiny size (keeps the benchmark from
    rotting; the store, training and server start it shares with the fixture)."""
    import argparse

    base, info = server
    pngs = [BENCH.store_png(info["data"], row) for row in range(2)]
    run = BENCH.load(base, pngs, requests=8, clients=4, k=6)
    alone = BENCH.load(base, pngs, requests=3, clients=1, k=6)
    reference = BENCH.in_process(info["model"], info["tracking_uri"], info["data"], pngs, 3, 6, True)
    args = argparse.Namespace(card=info["model"], requests=8, clients=4, k=6, reference_reps=3, json=None)
    BENCH.report(args, True, run, BENCH.summary(alone["latencies_s"]), reference)
    out = capsys.readouterr().out
    assert "8 requests from 4 clients" in out and re.search(r"failed\s+0\s", out), out
    for key in ("model", "file"):
        assert 0 < reference[key]["p50_ms"] <= reference[key]["p95_ms"] <= reference[key]["max_ms"]
