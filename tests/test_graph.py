"""kNN graph, normalised Laplacian, spectrum and spectral clustering over latent vectors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from deepgalaxy.core import graph
from deepgalaxy.core.graph import (
    adjusted_rand,
    assign_clusters,
    cluster_latents,
    cluster_recommendations,
    connected_components,
    eigengap_clusters,
    knn_graph,
    laplacian_spectrum,
    normalized_laplacian,
    purity,
    spectral_clustering,
)
from deepgalaxy.core.search import LatentIndex


def planted(n_per: int = 50, n_clusters: int = 4, dim: int = 16, spread: float = 0.6, seed: int = 0):
    """Gaussian blobs around well-separated centres: z and the true cluster of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 4
    truth = np.repeat(np.arange(n_clusters), n_per)
    z = centres[truth] + rng.standard_normal((len(truth), dim)) * spread
    perm = rng.permutation(len(truth))
    return z[perm].astype(np.float32), truth[perm]


def two_triangles() -> sparse.csr_matrix:
    w = np.zeros((6, 6))
    for a, b in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5)]:
        w[a, b] = w[b, a] = 1.0
    return sparse.csr_matrix(w)


def test_laplacian_of_triangles_hand_computed() -> None:
    w = two_triangles()
    lap = normalized_laplacian(w).toarray()
    # every node has degree 2: L = I - W / 2
    np.testing.assert_allclose(lap, np.eye(6) - w.toarray() / 2)
    count, labels = connected_components(w)
    assert count == 2 and len(set(labels[:3])) == 1 and labels[0] != labels[3]
    # a triangle's normalised Laplacian has eigenvalues 0, 1.5, 1.5; two triangles double each
    np.testing.assert_allclose(laplacian_spectrum(w, 6), [0, 0, 1.5, 1.5, 1.5, 1.5], atol=1e-10)
    assert eigengap_clusters(laplacian_spectrum(w, 6)) == 2


def test_knn_graph_is_symmetric_sparse_without_self_loops() -> None:
    z, _ = planted(n_per=20)
    for weighting in ("local", "gaussian", "connectivity"):
        w = knn_graph(z, k=5, weighting=weighting)
        assert sparse.issparse(w) and w.shape == (80, 80)
        assert abs(w - w.T).max() == 0 and w.diagonal().sum() == 0
        assert (w.getnnz(axis=1) >= 5).all() and w.data.max() <= 1.0
    mutual = knn_graph(z, k=5, mutual=True)
    assert mutual.nnz <= knn_graph(z, k=5).nnz
    with pytest.raises(ValueError, match="weighting"):
        knn_graph(z, k=5, weighting="cosine")


def test_sparse_spectrum_agrees_with_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    z, _ = planted(n_per=60)
    w = knn_graph(z, k=8)
    dense = laplacian_spectrum(w, 8)
    monkeypatch.setattr(graph, "DENSE_EIGEN_LIMIT", 10)
    np.testing.assert_allclose(laplacian_spectrum(w, 8), dense, atol=1e-6)


@pytest.mark.parametrize("k", [5, 10, 30])
def test_spectral_clustering_recovers_planted_clusters(k: int) -> None:
    z, truth = planted()
    report = cluster_latents(z, k=k, classes=truth)
    assert report.suggested_clusters == 4 and report.n_clusters == 4
    assert report.adjusted_rand == pytest.approx(1.0) and report.purity == pytest.approx(1.0)
    assert report.summary()["purity"] == report.purity
    # the test can fail: a wrong clustering scores far lower
    assert adjusted_rand(truth, np.roll(report.labels, 7)) < 0.2


def test_spectral_clustering_on_index_with_hnsw_graph() -> None:
    z, truth = planted(n_per=40, n_clusters=3, seed=3)
    index = LatentIndex.build(z, {"name": "vae-b0", "version": "1"}, method="hnsw", ef_search=64)
    labels = spectral_clustering(knn_graph(index, k=10), 3)
    assert adjusted_rand(truth, labels) == pytest.approx(1.0)


def test_cluster_recommendations_stay_inside_cluster_and_pad() -> None:
    z, truth = planted(n_per=10, n_clusters=3, seed=1)
    clusters = truth.copy()
    clusters[0] = 99  # a singleton cluster: no recommendation possible
    rows = np.arange(len(z))
    rec, dist = cluster_recommendations(z, clusters, rows, k=6)
    for r in rows[1:]:
        assert (clusters[rec[r]] == clusters[r]).all() and r not in rec[r]
        assert (np.diff(dist[r]) >= 0).all()
        members = np.flatnonzero(clusters == clusters[r])
        others = members[members != r]
        nearest = others[np.argsort(np.linalg.norm(z[others] - z[r], axis=1))[:6]]
        np.testing.assert_array_equal(rec[r][: len(nearest)], nearest)
    assert (rec[0] == -1).all() and np.isinf(dist[0]).all()
    # a cluster with 9 members (10 minus the relabelled row) gives at most 8 others: pad the rest
    small = np.flatnonzero(clusters == clusters[rows[clusters != 99][0]])
    assert len(small) >= 9


def test_assign_clusters_of_new_queries() -> None:
    z, truth = planted(n_per=30, n_clusters=3, seed=2)
    index = LatentIndex.build(z, {"name": "vae-b0", "version": "1"})
    queries = z[:10] + 0.05
    np.testing.assert_array_equal(assign_clusters(index, truth, queries, k=5), truth[:10])


def test_purity_and_ari_hand_computed() -> None:
    truth = [0, 0, 0, 1, 1, 1]
    pred = [5, 5, 7, 7, 7, 7]
    # cluster 5: {0, 0} -> 2 correct; cluster 7: {0, 1, 1, 1} -> 3 correct
    assert purity(truth, pred) == pytest.approx(5 / 6)
    assert adjusted_rand(truth, [1, 1, 1, 0, 0, 0]) == pytest.approx(1.0)
    assert purity(truth, [0, 1, 2, 3, 4, 5]) == 1.0
    with pytest.raises(ValueError):
        purity(truth, pred[:3])
    with pytest.raises(ValueError, match="n_clusters"):
        spectral_clustering(two_triangles(), 10)
