"""Latent-space commands end to end: a tiny full-simple card trained for real and registered in a SQLite MLflow
store, a real Zarr store, the real CLI (in-process) and the real figures.

The commands run in this process (``run_cli``), so torch and MLflow are imported once for the whole module.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from deepgalaxy.cli import app
from deepgalaxy.cli.common import run_cli
from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.search import LatentIndex, StaleIndexError
from deepgalaxy.runs import latent
from tests.runs_support import CARD, mlflow_runs, train_tiny

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Version 1 of full-simple (1 short epoch on 64 images of 32 px) and its index, built through the CLI."""
    root = tmp_path_factory.mktemp("latent")
    result, data, uri = train_tiny(root)
    rc = run_cli(app, ["latent", "index", CARD, "--data", str(data), "--model-version", "1", "--tracking-uri", uri,
                       "--no-progress"])
    assert rc in (0, None)
    return {"root": root, "data": data, "uri": uri, "run_id": result.run_id, "run_dir": result.run_dir}


def cli(*args: str) -> int:
    rc = run_cli(app, list(args))
    return 0 if rc is None else int(rc)


def model_v(trained: dict, version: int = 1):  # type: ignore[no-untyped-def]
    return latent.load_model(CARD, version, trained["uri"])


def test_index_holds_the_encoders_z_and_exact_search_is_brute_force(trained: dict) -> None:
    model = model_v(trained)
    ds = open_dataset(trained["data"])
    images = ds.images(ds.indices)
    path = latent.index_path(trained["data"], latent.model_ref(model))
    assert path == trained["data"].with_name("tiny.zarr.index") / f"{CARD}-v1"
    index = latent.open_index(model, trained["data"])
    assert index.model.version == "1" and index.model.run_id == trained["run_id"] and index.method == "exact"
    z = model.encode(images)
    np.testing.assert_allclose(index.z, z, rtol=1e-5, atol=1e-6)
    for column in ("label", "camera", "mass_ratio", "sim_id"):
        np.testing.assert_array_equal(index.metadata[column], ds.metadata[column])
    # exact search == brute force over all pairwise distances
    queries = np.concatenate([z[:5] + 0.01, np.random.default_rng(0).standard_normal((5, z.shape[1]))])
    idx, dist = index.search(queries, 7)
    full = np.linalg.norm(queries[:, None, :] - z[None, :, :], axis=2)
    order = np.argsort(full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(dist, np.take_along_axis(full, order, axis=1), rtol=1e-5, atol=1e-5)
    # Model.similar encodes and searches: its own images come back first, at distance ~0
    rows, d = model.similar(images[[3, 17]], index, 4)
    assert rows[:, 0].tolist() == [3, 17] and np.all(d[:, 0] < 1e-4)
    np.testing.assert_array_equal(rows, np.argsort(np.linalg.norm(z[[3, 17], None] - z[None], axis=2), axis=1)[:, :4])


def test_search_cli_table_json_figure_and_ssim_of_itself_is_one(trained: dict, capsys: pytest.CaptureFixture) -> None:
    from skimage import io
    from skimage.metrics import structural_similarity

    ds = open_dataset(trained["data"])
    query = ds.images([5])[0]
    png = trained["root"] / "query.png"
    io.imsave(png, query[:, :, 0], check_contrast=False)
    fig, out = trained["root"] / "fig6.png", trained["root"] / "n.json"
    rc = cli("latent", "search", CARD, str(png), "--index-of", "7", "--data", str(trained["data"]), "-k", "4",
             "--out", str(fig), "--json", str(out), "--model-version", "1", "--tracking-uri", trained["uri"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "SSIM" in text and "query row 7" in text and "query query.png" in text
    found = json.loads(out.read_text())
    assert found["model"]["version"] == "1" and found["k"] == 4
    by_query: dict[str, list[dict]] = {}
    for nb in found["neighbours"]:
        by_query.setdefault(nb["query"], []).append(nb)
    # the PNG of row 5 finds row 5 first, at distance 0, with SSIM exactly 1 (an image against itself)
    first = by_query["query.png"][0]
    assert first["row"] == 5 and first["distance"] < 1e-4 and first["ssim"] == pytest.approx(1.0, abs=1e-12)
    # a store row is not its own recommendation; SSIM and metadata match scikit-image and the store
    rec = by_query["row 7"]
    assert [r["rank"] for r in rec] == [1, 2, 3, 4] and 7 not in [r["row"] for r in rec]
    assert all(a["distance"] <= b["distance"] for a, b in itertools.pairwise(rec))
    q7 = ds.images([7])[0, :, :, 0].astype(np.float64) / 255
    for r in rec:
        other = ds.images([r["row"]])[0, :, :, 0].astype(np.float64) / 255
        assert r["ssim"] == pytest.approx(structural_similarity(q7, other, data_range=1.0), abs=1e-9)
        assert r["label"] == int(ds.metadata["label"][r["row"]]) and r["camera"] == int(ds.metadata["camera"][r["row"]])
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 10_000


def test_stale_index_is_refused_naming_both_versions(trained: dict, capsys: pytest.CaptureFixture) -> None:
    from deepgalaxy.registry import store

    v2 = store.register_directory(trained["run_dir"] / "model", name=CARD, tracking_uri=trained["uri"])
    assert v2 == 2
    capsys.readouterr()
    rc = cli("latent", "search", CARD, "--index-of", "0", "--data", str(trained["data"]), "--model-version", "2",
             "--tracking-uri", trained["uri"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "version 1" in err and "version 2" in err and f"deepgalaxy latent index {CARD} --data" in err, err
    # the Python API refuses the same way: v2's encoder with v1's index
    index_v1 = latent.open_index(model_v(trained, 1), trained["data"])
    model2 = model_v(trained, 2)
    with pytest.raises(StaleIndexError, match=r"version 1.*version 2"):
        model2.similar(np.zeros((1, 32, 32, 1), np.uint8), index_v1, 3)
    with pytest.raises(StaleIndexError, match=r"[Rr]ebuild"):
        latent.open_index(model2, trained["data"])
    # after `latent index` with version 2 the search works again, beside the version-1 index
    assert cli("latent", "index", CARD, "--data", str(trained["data"]), "--model-version", "2", "--tracking-uri",
               trained["uri"], "--no-progress") == 0
    assert latent.open_index(model2, trained["data"]).model.version == "2"
    assert latent.open_index(model_v(trained, 1), trained["data"]).model.version == "1"


def test_the_spellings_before_the_latent_group_still_work_and_warn_once_each(
        trained: dict, capsys: pytest.CaptureFixture) -> None:
    """issue 13 item 4: `index build`, `search`, ... and -V/--version (the model version), -n (interpolate's steps)
    still work for one release: the same result as the new spelling, and one warning line per old spelling."""
    data, uri = str(trained["data"]), trained["uri"]
    new = ["--index-of", "3", "--data", data, "-k", "2", "--model-version", "1", "--tracking-uri", uri]
    capsys.readouterr()
    assert cli("latent", "search", CARD, *new) == 0
    expected = capsys.readouterr()
    assert expected.err == ""
    assert cli("search", CARD, "--index-of", "3", "--data", data, "-k", "2", "-V", "1", "--tracking-uri", uri) == 0
    found = capsys.readouterr()
    assert found.out.splitlines()[:-1] == expected.out.splitlines()[:-1]  # the same table (the timing differs)
    assert found.err.splitlines() == [
        "warning: --version/-V for the model version is deprecated and will be removed in the next release: use "
        "--model-version",
        "warning: `deepgalaxy search` is deprecated and will be removed in the next release: use "
        "`deepgalaxy latent search`"], found.err
    line = trained["root"] / "old-interpolate.png"
    assert cli("interpolate", CARD, "--from", "2", "--to", "50", "-n", "3", "--out", str(line), "--data", data,
               "--version", "1", "--tracking-uri", uri) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 3 and "-n for the interpolation steps is deprecated" in err and (
        "use `deepgalaxy latent interpolate`" in err), err
    assert line.stat().st_size > 5_000
    assert cli("index", "build", CARD, "--data", data, "--version", "1", "--tracking-uri", uri, "--no-progress") == 0
    assert "use `deepgalaxy latent index`" in capsys.readouterr().err
    assert latent.open_index(model_v(trained), trained["data"]).model.version == "1"


def test_spectral_clustering_recovers_planted_clusters() -> None:
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((3, 16)) * 8
    truth = np.repeat(np.arange(3), 40)
    z = centres[truth] + rng.standard_normal((120, 16))
    perm = rng.permutation(120)
    index = LatentIndex.build(z[perm], {"name": "planted", "version": "1"}, metadata={"label": truth[perm] * 10})
    report, labels, used = latent.cluster_index(index, None, k=8)
    assert used == 120 and report.n_clusters == 3 and report.components == 3  # eigengap: 3 components
    scores = latent.score_clusters(labels, index.metadata)
    assert scores["label"]["adjusted_rand"] == pytest.approx(1.0) and scores["label"]["purity"] == pytest.approx(1.0)
    # a sample clusters too, and the others join their nearest sampled neighbours' cluster
    _, sampled, used = latent.cluster_index(index, 3, k=8, sample=60)
    assert used == 60 and latent.score_clusters(sampled, index.metadata)["label"]["adjusted_rand"] == pytest.approx(1.0)


def test_cluster_cli_logs_to_mlflow_and_search_stays_in_the_cluster(trained: dict,
                                                                   capsys: pytest.CaptureFixture) -> None:
    import mlflow

    rc = cli("latent", "cluster", CARD, "--data", str(trained["data"]), "--n-clusters", "4", "-k", "6",
             "--model-version", "1", "--tracking-uri", trained["uri"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "adjusted Rand index" in text and "purity" in text
    (run,) = [r for r in mlflow_runs(trained["uri"], "deepgalaxy-latent")
              if r.data.tags["deepgalaxy.kind"] == "cluster"]
    assert run.data.params["model_version"] == "1" and run.data.params["n_clusters"] == "4"
    assert run.data.tags["model_run_id"] == trained["run_id"]
    for key in ("ari_label", "purity_label", "ari_mass_ratio", "components"):
        assert np.isfinite(run.data.metrics[key]), key
    assert 0 < run.data.metrics["purity_label"] <= 1
    history = mlflow.MlflowClient(trained["uri"]).get_metric_history(run.info.run_id, "laplacian_eigenvalue")
    assert len(history) >= 5 and history[0].value == pytest.approx(0.0, abs=1e-6)
    clusters = np.load(latent.index_path(trained["data"], latent.model_ref(model_v(trained))) / latent.CLUSTERS_FILE)
    assert clusters.shape == (64,) and set(clusters.tolist()) == {0, 1, 2, 3}
    result = latent.search(model_v(trained), trained["data"], rows=[3, 30], k=3, within_cluster=True)
    for q in result.queries:
        assert q.cluster == clusters[q.row]
        assert all(clusters[nb.row] == q.cluster for nb in q.neighbours)


def test_evaluate_search_cli_logs_ssim_and_class_error_with_the_model_version(
        trained: dict, capsys: pytest.CaptureFixture) -> None:
    rc = cli("latent", "evaluate", CARD, "--data", str(trained["data"]), "-k", "3", "--queries", "0",
             "--model-version", "1", "--tracking-uri", trained["uri"], "--no-progress")
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "SSIM oracle" in text and "random pairs" in text and "mean absolute error" in text
    (run,) = [r for r in mlflow_runs(trained["uri"], "deepgalaxy-latent")
              if r.data.tags["deepgalaxy.kind"] == "evaluate-search"]
    p, m = run.data.params, run.data.metrics
    assert p["model_name"] == CARD and p["model_version"] == "1" and p["model_run_id"] == trained["run_id"]
    assert p["queries"] == "64" and p["candidates"] == "64" and p["k"] == "3"
    # the oracle searched every other image: no k images can have a higher mean SSIM
    assert m["ssim_oracle"] >= m["ssim_top_k"] - 1e-12 and m["ssim_oracle"] >= m["ssim_random"]
    assert 0 <= m["knn_class_mae"] < 71 and m["class_diff_random"] > 0
    assert m["full_ssim_top_k"] == pytest.approx(m["ssim_top_k"]) and m["full_knn_class_mae"] == pytest.approx(
        m["knn_class_mae"])
    # a pool smaller than the store: 16 queries + a pool of 20 candidates; recommendations, random pairs and the
    # oracle all come from those candidates (so the oracle still bounds them), the whole-index scores separately
    ev = latent.evaluate_search(model_v(trained), trained["data"], k=3, n_queries=16, pool_size=20, log=False,
                                progress=False)
    assert ev.pooled and 20 <= ev.candidates < 36 and ev.report.queries == 16
    assert ev.report.ssim_oracle >= ev.report.ssim_top_k - 1e-12 and ev.report.pool_size == ev.candidates - 1
    assert 0 < ev.full["ssim_top_k"] <= 1 and ev.full["knn_class_mae"] >= 0


def test_interpolation_endpoints_are_the_reconstructions_of_a_and_b(trained: dict,
                                                                   capsys: pytest.CaptureFixture) -> None:
    model = model_v(trained)
    ds = open_dataset(trained["data"])
    a, b = ds.images([2, 50])
    interp = latent.interpolate(model, a, b, steps=5)
    assert interp.images.shape == (5, 32, 32, 1)
    np.testing.assert_allclose(interp.images[0], model.decode(model.encode(a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(interp.images[-1], model.decode(model.encode(b[None]))[0], atol=1e-5)
    np.testing.assert_allclose(interp.z[2], (interp.z[0] + interp.z[-1]) / 2, atol=1e-6)
    latent.latent_grid(model, interp, latent.open_index(model, trained["data"]).z, rows=3)
    assert interp.grid is not None and interp.grid.shape == (3, 5, 32, 32, 1)
    np.testing.assert_allclose(interp.grid[1], interp.images, atol=1e-5)  # middle row: the A -> B line
    assert not np.allclose(interp.grid[0], interp.grid[2])
    line, grid = trained["root"] / "fig5.png", trained["root"] / "grid.png"
    rc = cli("latent", "interpolate", CARD, "--from", "2", "--to", "50", "--steps", "6", "--out", str(line),
             "--grid", str(grid), "--data", str(trained["data"]), "--model-version", "1", "--tracking-uri",
             trained["uri"])
    assert rc == 0, capsys.readouterr().err
    assert line.stat().st_size > 10_000 and grid.stat().st_size > 10_000
    capsys.readouterr()
    assert cli("latent", "interpolate", CARD, "--from", "2", "--to", "nope.png", "--model-version", "1",
               "--tracking-uri", trained["uri"]) == 2
    assert "'2' looks like a row number: give --data" in capsys.readouterr().err
    assert cli("latent", "interpolate", CARD, "--from", "nope.png", "--to", "50", "--data", str(trained["data"]),
               "--model-version", "1", "--tracking-uri", trained["uri"]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
