"""A kNN graph over latent vectors: its normalised Laplacian, components, spectrum and spectral clusters.

Plain kNN recommendations depend on the choice of k. Building a k-nearest-neighbour graph, weighting its edges by
a locally scaled Gaussian kernel and clustering it spectrally groups images into clusters whose members are
recommended first, so the result depends less on k (paper, LatentModel section). The Laplacian's spectrum says how
many well-separated groups there are: the multiplicity of eigenvalue 0 is the number of connected components,
and a large gap after the c-th smallest eigenvalue suggests c clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import sparse
from scipy.sparse import csgraph
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

from deepgalaxy.core.errors import DeepGalaxyError, ShapeError
from deepgalaxy.core.search import (
    FloatArray,
    IntArray,
    LatentIndex,
    LatentIndexError,
    as_vectors,
    drop_rows,
    exact_knn,
)


class GraphError(DeepGalaxyError, ValueError):
    """Bad input to the graph functions (unknown weighting, impossible number of clusters)."""


DENSE_EIGEN_LIMIT = 2000
"""Graphs up to this many nodes get their spectrum from a dense eigensolver (exact, no convergence issues)."""


def knn_neighbours(z: ArrayLike | LatentIndex, k: int) -> tuple[IntArray, FloatArray]:
    """Each vector's k nearest *other* vectors ``(rows, distances)``; uses the index's HNSW graph when it has one."""
    if isinstance(z, LatentIndex):
        return z.recommend(np.arange(len(z)), k)
    vectors = as_vectors(z, "latent vectors z")
    n = len(vectors)
    if not 1 <= k < n:
        raise LatentIndexError(f"a kNN graph needs 1 <= k < number of vectors ({n}), got k={k}")
    idx, dist = exact_knn(vectors, vectors, k + 1)
    return drop_rows(idx, dist, np.arange(n, dtype=np.int64), k)


def knn_graph(
    z: ArrayLike | LatentIndex, k: int = 10, weighting: str = "local", mutual: bool = False
) -> sparse.csr_matrix:
    """Symmetric sparse affinity matrix W ``(N, N)`` of the k-nearest-neighbour graph over latent vectors.

    ``weighting``: ``"local"`` (default) is the self-tuning kernel of Zelnik-Manor & Perona,
    ``w_ij = exp(-d_ij^2 / (s_i s_j))`` with ``s_i`` the distance to i's k-th neighbour, which adapts to the local
    density and makes the result less sensitive to k; ``"gaussian"`` uses one global scale (the median kNN
    distance); ``"connectivity"`` puts 1 on every edge. The graph is symmetrised with the maximum (an edge exists
    if either end lists the other), or with the minimum when ``mutual`` (both must list each other).
    """
    rows, dist = knn_neighbours(z, k)
    n = rows.shape[0]
    d = dist.astype(np.float64)
    if weighting == "connectivity":
        w = np.ones_like(d)
    elif weighting == "local":
        scale = np.maximum(d[:, -1], 1e-12)
        w = np.exp(-(d**2) / (scale[:, None] * scale[rows]))
    elif weighting == "gaussian":
        sigma = max(float(np.median(d)), 1e-12)
        w = np.exp(-(d**2) / (2 * sigma**2))
    else:
        raise GraphError(f"unknown edge weighting {weighting!r}; use 'local', 'gaussian' or 'connectivity'")
    w = np.maximum(w, 1e-300)  # keep every edge present even when its weight underflows
    a = sparse.csr_matrix((w.ravel(), (np.repeat(np.arange(n), rows.shape[1]), rows.ravel())), shape=(n, n))
    sym = a.minimum(a.T) if mutual else a.maximum(a.T)
    sym.setdiag(0)
    sym.eliminate_zeros()
    return sparse.csr_matrix(sym)


def normalized_laplacian(w: sparse.spmatrix | NDArray[np.float64]) -> sparse.csr_matrix:
    """The symmetric normalised Laplacian ``L = I - D^-1/2 W D^-1/2`` (isolated nodes get ``L_ii = 0``)."""
    matrix = _square(w)
    return sparse.csr_matrix(csgraph.laplacian(matrix, normed=True))


def connected_components(w: sparse.spmatrix | NDArray[np.float64]) -> tuple[int, IntArray]:
    """Number of connected components of the (undirected) graph and each node's component label."""
    count, labels = csgraph.connected_components(_square(w), directed=False)
    return int(count), labels.astype(np.int64)


def laplacian_spectrum(w: sparse.spmatrix | NDArray[np.float64], n_eigenvalues: int = 20) -> NDArray[np.float64]:
    """The ``n_eigenvalues`` smallest eigenvalues of the normalised Laplacian of W, ascending, in [0, 2].

    The spectrum is the union of the connected components' spectra, so each component is solved on its own:
    that keeps the eigenvalue 0 (one per component) exact, which Lanczos solvers miss when it is repeated.
    Components up to :data:`DENSE_EIGEN_LIMIT` nodes use a dense solver; larger ones ask ARPACK for the largest
    eigenvalues of ``D^-1/2 W D^-1/2`` (``= 1 - eigenvalues of L``), which converges far faster than asking for
    L's smallest directly.
    """
    matrix = _square(w)
    n = matrix.shape[0]
    m = min(n_eigenvalues, n)
    _, component = connected_components(matrix)
    found: list[NDArray[np.float64]] = []
    for label in np.unique(component):
        nodes = np.flatnonzero(component == label)
        lap = normalized_laplacian(matrix[nodes][:, nodes])
        size = len(nodes)
        want = min(m, size)
        if size <= DENSE_EIGEN_LIMIT or want >= size - 1:
            found.append(np.linalg.eigvalsh(lap.toarray())[:want])
            continue
        s = sparse.identity(size, format="csr") - lap
        try:
            top = eigsh(s, k=want, which="LA", return_eigenvectors=False, tol=1e-8, maxiter=size * 20)
        except ArpackNoConvergence as exc:  # keep what converged rather than fail
            top = exc.eigenvalues
        found.append(1.0 - np.asarray(top, dtype=np.float64))
    values = np.sort(np.concatenate(found))[:m]
    return np.clip(values, 0.0, 2.0)


def eigengap_clusters(eigenvalues: ArrayLike, max_clusters: int | None = None) -> int:
    """The number of clusters the largest gap in the ascending Laplacian spectrum suggests (at least 1)."""
    ev = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    if max_clusters is not None:
        ev = ev[: max_clusters + 1]
    if len(ev) < 2:
        return 1
    return int(np.argmax(np.diff(ev))) + 1


def spectral_clustering(
    w: sparse.spmatrix | NDArray[np.float64], n_clusters: int, seed: int = 0, assign_labels: str = "kmeans"
) -> IntArray:
    """Cluster labels ``(N,)`` from scikit-learn's SpectralClustering on the precomputed affinity W."""
    import warnings

    from sklearn.cluster import SpectralClustering

    matrix = _square(w)
    n = matrix.shape[0]
    if not 1 <= n_clusters <= n:
        raise GraphError(f"n_clusters must lie between 1 and the number of nodes ({n}), got {n_clusters}")
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    model = SpectralClustering(
        n_clusters=n_clusters, affinity="precomputed", assign_labels=assign_labels, random_state=seed, n_init=10
    )
    with warnings.catch_warnings():
        # A disconnected graph is fine here: its components simply become (parts of) clusters.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = model.fit_predict(matrix)
    return np.asarray(labels, dtype=np.int64)


def cluster_recommendations(
    z: ArrayLike | LatentIndex, clusters: ArrayLike, rows: ArrayLike, k: int = 6
) -> tuple[IntArray, FloatArray]:
    """Recommendations restricted to the query's cluster, nearest first: ``(rows (Q, k), distances (Q, k))``.

    For each query row, the other members of its cluster ranked by latent distance. A cluster with fewer than
    ``k`` other members leaves the remaining places as row ``-1`` with distance ``inf``.
    """
    vectors = z.z if isinstance(z, LatentIndex) else as_vectors(z, "latent vectors z")
    labels = np.asarray(clusters)
    if labels.shape != (len(vectors),):
        raise ShapeError(f"cluster labels must be ({len(vectors)},), one per vector, got {labels.shape}")
    queries = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    out_d = np.full((len(queries), k), np.inf, dtype=np.float32)
    for label in np.unique(labels[queries]):
        members = np.flatnonzero(labels == label)
        which = np.flatnonzero(labels[queries] == label)
        kk = min(k + 1, len(members))
        idx, dist = exact_knn(vectors[queries[which]], vectors[members], kk)
        found = members[idx]
        found, dist = drop_rows(found, dist, queries[which], kk - 1) if kk > 1 else (found[:, :0], dist[:, :0])
        out_i[which, : found.shape[1]] = found
        out_d[which, : dist.shape[1]] = dist
    return out_i, out_d


def assign_clusters(index: LatentIndex, clusters: ArrayLike, queries: ArrayLike, k: int = 10) -> IntArray:
    """Clusters of new query vectors: the most common cluster among each query's k nearest indexed vectors."""
    labels = np.asarray(clusters, dtype=np.int64)
    idx, _ = index.search(queries, min(k, len(index)))
    neighbour_labels = labels[idx]
    return np.array([np.bincount(row).argmax() for row in neighbour_labels], dtype=np.int64)


def purity(labels_true: ArrayLike, labels_pred: ArrayLike) -> float:
    """Fraction of points whose cluster's most common true class is their own class (1 = every cluster is pure)."""
    true = np.asarray(labels_true)
    pred = np.asarray(labels_pred)
    if true.shape != pred.shape or true.ndim != 1:
        raise ShapeError(f"purity needs two equally long 1-D label arrays, got {true.shape} and {pred.shape}")
    if len(true) == 0:
        return float("nan")
    _, true_codes = np.unique(true, return_inverse=True)
    _, pred_codes = np.unique(pred, return_inverse=True)
    table = np.zeros((pred_codes.max() + 1, true_codes.max() + 1), dtype=np.int64)
    np.add.at(table, (pred_codes, true_codes), 1)
    return float(table.max(axis=1).sum() / len(true))


def adjusted_rand(labels_true: ArrayLike, labels_pred: ArrayLike) -> float:
    """Adjusted Rand index of a clustering against known classes (1 = identical partitions, ~0 = chance)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


@dataclass
class ClusterReport:
    """What :func:`cluster_latents` found: labels, graph facts and the agreement with known classes."""

    labels: IntArray
    n_clusters: int
    k: int
    components: int
    eigenvalues: NDArray[np.float64]
    suggested_clusters: int
    adjusted_rand: float | None = None
    purity: float | None = None

    def summary(self) -> dict[str, float | int | None]:
        """Scalars for logging (MLflow metrics / a results table)."""
        return {
            "n_clusters": self.n_clusters, "k": self.k, "components": self.components,
            "suggested_clusters": self.suggested_clusters, "adjusted_rand": self.adjusted_rand, "purity": self.purity,
        }


def cluster_latents(
    z: ArrayLike | LatentIndex,
    n_clusters: int | None = None,
    k: int = 10,
    classes: ArrayLike | None = None,
    n_eigenvalues: int = 30,
    seed: int = 0,
) -> ClusterReport:
    """kNN graph -> spectrum -> spectral clusters, scored against known ``classes`` when given.

    Without ``n_clusters`` the eigengap of the spectrum picks it.
    """
    w = knn_graph(z, k)
    components, _ = connected_components(w)
    eigenvalues = laplacian_spectrum(w, n_eigenvalues)
    suggested = max(eigengap_clusters(eigenvalues), components)
    chosen = n_clusters or suggested
    labels = spectral_clustering(w, chosen, seed=seed)
    report = ClusterReport(labels, chosen, k, components, eigenvalues, suggested)
    if classes is not None:
        report.adjusted_rand = adjusted_rand(classes, labels)
        report.purity = purity(classes, labels)
    return report


def _square(w: sparse.spmatrix | NDArray[np.float64]) -> sparse.csr_matrix:
    matrix = sparse.csr_matrix(w)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ShapeError(f"an affinity matrix must be square (N, N), got shape {matrix.shape}")
    return matrix


__all__ = [
    "ClusterReport",
    "GraphError",
    "adjusted_rand",
    "assign_clusters",
    "cluster_latents",
    "cluster_recommendations",
    "connected_components",
    "eigengap_clusters",
    "knn_graph",
    "knn_neighbours",
    "laplacian_spectrum",
    "normalized_laplacian",
    "purity",
    "spectral_clustering",
]
