"""Latent-space workflows over a dataset store with a registered VAE: index, search, cluster, evaluate, interpolate.

The framework-free pieces live in :mod:`deepgalaxy.core` (``search``: :class:`LatentIndex`; ``graph``: kNN graph and
spectral clustering; ``ssim``: SSIM and the recommendation evaluation). This package joins them to a model loaded
with :func:`deepgalaxy.registry.load` and to a Zarr store, and logs results to MLflow, one concept per module:

- :mod:`.model`: the VAE a latent space belongs to (:func:`load_model`) and the reference naming its version
- :mod:`.images`: images of store rows and of query files
- :mod:`.index`: build an index beside its store, open it again (refusing one of another version or store)
- :mod:`.queries`: recommendations for rows and image files (:func:`search`)
- :mod:`.clusters`: spectral clusters of an index, scored and saved beside it
- :mod:`.evaluation`: SSIM of the recommendations against random pairs and the oracle
- :mod:`.interpolation`: decoded points between two images, and a 2-D grid
- :mod:`.record`: the MLflow run that ``cluster`` and ``evaluate-search`` log
"""

from __future__ import annotations

from deepgalaxy.runs.latent.clusters import (
    CLUSTER_SAMPLE,
    SCORE_COLUMNS,
    STAGES,
    ClusterOutcome,
    cluster_dataset,
    cluster_index,
    load_clusters,
    score_clusters,
)
from deepgalaxy.runs.latent.evaluation import Evaluation, evaluate_search
from deepgalaxy.runs.latent.images import image_loader, open_store, read_image
from deepgalaxy.runs.latent.index import (
    CLUSTERS_FILE,
    CLUSTERS_INFO,
    INDEX_SUFFIX,
    META_COLUMNS,
    SOURCE_FILE,
    BuiltIndex,
    EncodeJob,
    build_index,
    encode_dataset,
    encode_resumably,
    index_in_memory,
    index_path,
    index_root,
    open_index,
)
from deepgalaxy.runs.latent.interpolation import Interpolation, interpolate, latent_grid, query_images
from deepgalaxy.runs.latent.model import load_model, model_ref
from deepgalaxy.runs.latent.queries import Neighbour, QueryResult, SearchResult, search
from deepgalaxy.runs.latent.record import DEFAULT_EXPERIMENT, log_run

__all__ = [
    "CLUSTERS_FILE",
    "CLUSTERS_INFO",
    "CLUSTER_SAMPLE",
    "DEFAULT_EXPERIMENT",
    "INDEX_SUFFIX",
    "META_COLUMNS",
    "SCORE_COLUMNS",
    "SOURCE_FILE",
    "STAGES",
    "BuiltIndex",
    "ClusterOutcome",
    "EncodeJob",
    "Evaluation",
    "Interpolation",
    "Neighbour",
    "QueryResult",
    "SearchResult",
    "build_index",
    "cluster_dataset",
    "cluster_index",
    "encode_dataset",
    "encode_resumably",
    "evaluate_search",
    "image_loader",
    "index_in_memory",
    "index_path",
    "index_root",
    "interpolate",
    "latent_grid",
    "load_clusters",
    "load_model",
    "log_run",
    "model_ref",
    "open_index",
    "open_store",
    "query_images",
    "read_image",
    "score_clusters",
    "search",
]
