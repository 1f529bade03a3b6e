"""Latent-vector search: exact search against brute force, HNSW recall, persistence, stale-index refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepgalaxy.core.errors import DeepGalaxyError, ShapeError
from deepgalaxy.core.search import (
    HNSW_FILE,
    INDEX_FILE,
    LatentIndex,
    LatentIndexError,
    ModelRef,
    StaleIndexError,
    exact_knn,
    recall_at_k,
)

REF = {"name": "vae-b4", "version": "3", "run_id": "abc123"}


def brute_force(q: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(q[:, None, :].astype(np.float64) - base[None, :, :], axis=2)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1500, 16)).astype(np.float32)


@pytest.mark.parametrize("batch_elements", [1 << 25, 5000])  # one batch; many small batches
def test_exact_knn_agrees_with_brute_force(vectors: np.ndarray, batch_elements: int) -> None:
    q = np.random.default_rng(1).standard_normal((37, 16)).astype(np.float32)
    idx, dist = exact_knn(q, vectors, 10, batch_elements=batch_elements)
    want_idx, want_dist = brute_force(q, vectors, 10)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-5, atol=1e-5)
    assert idx.dtype == np.int64 and dist.dtype == np.float32


def test_exact_knn_k_larger_than_set_returns_all_sorted() -> None:
    base = np.array([[0.0], [3.0], [1.0]], dtype=np.float32)
    idx, dist = exact_knn(np.array([[0.2]]), base, 10)
    assert idx.tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(dist, [[0.2, 0.8, 2.8]], rtol=1e-6)


def test_exact_index_search_and_recommend(vectors: np.ndarray) -> None:
    index = LatentIndex.build(vectors, REF)
    assert index.method == "exact" and len(index) == 1500 and index.dim == 16
    idx, _ = index.search(vectors[:5], k=4)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4]  # every vector is its own nearest neighbour
    rec, rec_d = index.recommend([0, 1, 2, 3, 4], k=3)
    np.testing.assert_array_equal(rec, idx[:, 1:])
    assert (rec != np.arange(5)[:, None]).all() and (np.diff(rec_d, axis=1) >= 0).all()


def test_recommend_drops_self_even_among_duplicates() -> None:
    z = np.zeros((4, 2), dtype=np.float32)  # four identical vectors: self may not come first
    z[3] = 1.0
    rec, _ = LatentIndex.build(z, REF).recommend(np.arange(4), k=2)
    for row, neighbours in enumerate(rec):
        assert row not in neighbours and len(neighbours) == 2


def test_hnsw_index_reaches_target_recall(vectors: np.ndarray) -> None:
    index = LatentIndex.build(vectors, REF, method="hnsw", target_recall=0.97, m=8, ef_construction=40)
    assert index.method == "hnsw"
    assert index.recall["recall"] >= 0.97
    q = np.random.default_rng(2).standard_normal((100, 16)).astype(np.float32)
    approx, approx_d = index.search(q, 10)
    exact, exact_d = index.search(q, 10, exact=True)
    assert recall_at_k(approx, exact) >= 0.9
    # whatever HNSW returns, its distances are the true distances of the returned rows
    true_d = np.linalg.norm(vectors[approx] - q[:, None, :], axis=2)
    np.testing.assert_allclose(approx_d, true_d, rtol=1e-4, atol=1e-4)
    assert (approx_d[:, 0] >= exact_d[:, 0] - 1e-5).all()


def test_auto_method_switches_at_threshold(vectors: np.ndarray) -> None:
    assert LatentIndex.build(vectors, REF, exact_threshold=1500).method == "exact"
    assert LatentIndex.build(vectors, REF, exact_threshold=1499, ef_search=32).method == "hnsw"


def test_recall_at_k_hand_computed() -> None:
    assert recall_at_k([[1, 2, 3], [4, 5, 6]], [[3, 2, 9], [7, 8, 9]]) == pytest.approx(2 / 6)
    assert recall_at_k([[1, 2, 3]], [[1, 2, 4]], k=2) == 1.0


@pytest.mark.parametrize("method", ["exact", "hnsw"])
def test_save_load_roundtrip_without_pickle(tmp_path, vectors: np.ndarray, method: str) -> None:
    ids = np.array([f"sim{i // 100:02d}-cam{i % 14:02d}-t{i % 71:02d}" for i in range(1500)])
    labels = np.arange(1500) % 71
    index = LatentIndex.build(vectors, REF, ids=ids, metadata={"label": labels}, data="mergers.zarr",
                              method=method, ef_search=64)  # type: ignore[arg-type]
    index.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert (HNSW_FILE in files) == (method == "hnsw")
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    loaded = LatentIndex.load(tmp_path / "idx", expected_model_ref=REF)
    assert loaded.model == ModelRef("vae-b4", "3", "abc123") and loaded.data == "mergers.zarr"
    np.testing.assert_array_equal(loaded.ids, ids)
    np.testing.assert_array_equal(loaded.metadata["label"], labels)
    q = vectors[:20] + 0.01
    np.testing.assert_array_equal(loaded.search(q, 5)[0], index.search(q, 5)[0])
    assert loaded.rows_of(ids[[7, 3]]).tolist() == [7, 3]
    info = json.loads((tmp_path / "idx" / INDEX_FILE).read_text())
    assert info["model"]["version"] == "3" and info["count"] == 1500


def test_stale_index_is_refused_naming_versions_and_rebuild_command(tmp_path, vectors: np.ndarray) -> None:
    LatentIndex.build(vectors[:50], REF, data="runs/mergers.zarr").save(tmp_path / "idx")
    newer = {"name": "vae-b4", "version": "4", "run_id": "def456"}
    with pytest.raises(StaleIndexError) as info:
        LatentIndex.load(tmp_path / "idx", expected_model_ref=newer)
    message = str(info.value)
    assert "version 3" in message and "version 4" in message
    assert "deepgalaxy latent index vae-b4 --data runs/mergers.zarr" in message
    with pytest.raises(StaleIndexError, match="'vae-b0'"):
        LatentIndex.load(tmp_path / "idx", expected_model_ref={"name": "vae-b0", "version": "3"})
    with pytest.raises(StaleIndexError, match="run def456"):
        LatentIndex.load(tmp_path / "idx", expected_model_ref={**REF, "run_id": "def456"})
    # same version, run unknown on one side: accepted; no expectation: accepted
    assert len(LatentIndex.load(tmp_path / "idx", expected_model_ref={"name": "vae-b4", "version": 3})) == 50
    assert len(LatentIndex.load(tmp_path / "idx")) == 50


def test_bad_input_raises_clear_errors(tmp_path, vectors: np.ndarray) -> None:
    index = LatentIndex.build(vectors[:100], REF)
    with pytest.raises(ShapeError, match="16-dimensional"):
        index.search(np.zeros((2, 8)), 3)
    with pytest.raises(ShapeError, match="NaN"):
        LatentIndex.build(np.full((3, 2), np.nan), REF)
    with pytest.raises(LatentIndexError, match="version"):
        LatentIndex.build(vectors[:10], {"name": "vae-b4"})
    with pytest.raises(LatentIndexError, match="entries"):
        LatentIndex.build(vectors[:10], REF, metadata={"label": [1, 2]})
    with pytest.raises(LatentIndexError, match="k=0"):
        index.search(vectors[:1], 0)
    with pytest.raises(LatentIndexError, match="not a latent index"):
        LatentIndex.load(tmp_path / "nothing")
    index.save(tmp_path / "idx")
    (tmp_path / "idx" / "z.npy").unlink()
    with pytest.raises(DeepGalaxyError, match="incomplete or corrupt"):
        LatentIndex.load(tmp_path / "idx")


@pytest.mark.slow
def test_search_benchmark_runs_small(tmp_path) -> None:
    """benchmarks/search.py end to end at a tiny size (keeps the benchmark from rotting), and its SSIM-part hook."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "search.py"
    spec = importlib.util.spec_from_file_location("bench_search", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "3000", "--dim", "8", "--queries", "100", "--latency-queries", "20",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["n"] == 3000 and result["chosen"]["recall"] >= 0.95
    images = np.random.default_rng(0).random((30, 16, 16))
    z = images.reshape(30, -1)[:, :4].astype(np.float32)
    summary = bench.ssim_part(z, images, np.arange(30) % 5, k=3, n_queries=10, pool_size=20)
    assert summary["ssim_oracle"] >= summary["ssim_top_k"] - 1e-9
