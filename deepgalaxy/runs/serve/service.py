"""What ``deepgalaxy serve`` answers, without the web framework: one loaded model, the latent index of a store and
the store, turned into JSON-ready results for uploads and store rows.

The model and the index are loaded once (:func:`open_service`) and kept for the server's life; every model call
goes through one :class:`~deepgalaxy.runs.serve.batching.MicroBatcher`, so the images of concurrent requests are
predicted and encoded together. Uploads are preprocessed exactly as ``predict`` preprocesses a file
(:mod:`deepgalaxy.runs.serve.uploads`); neighbours carry their latent distance, their SSIM to the query
(:func:`deepgalaxy.core.ssim.ssim_one_to_many`) and their store metadata. Rows are store positions ``0..N-1``,
checked against the store; floats that are not finite become ``null`` (JSON has no NaN).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.observation import PreprocessOptions
from deepgalaxy.core.properties import PROPERTIES
from deepgalaxy.runs.serve.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT, MicroBatcher
from deepgalaxy.runs.serve.uploads import RequestError, UploadLimits, read_upload

if TYPE_CHECKING:
    from deepgalaxy.core.dataset import Dataset
    from deepgalaxy.core.model import Model
    from deepgalaxy.core.property_prediction import Estimate
    from deepgalaxy.core.search import LatentIndex

TOP = 5
"""Most likely classes listed per image."""
MAX_K = 50
"""Most neighbours one search returns."""
MAX_PAGE = 500
"""Most store rows one /store/rows page lists."""
ROW_CACHE = 4096
"""Store rows kept decoded with their PNG (popular neighbours are not read and encoded again): ~200 MB at 128 px."""
UPLOAD_CACHE = 64
"""Preprocessed uploads kept by content hash (the page sends one file to /predict and then to /search)."""


class LRU:
    """A small thread-safe least-recently-used cache: :meth:`get` computes a missing value with ``make``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Any) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


@dataclass
class Upload:
    """One uploaded file as the request brought it: its name (shown, never opened), declared type and bytes."""

    filename: str
    content_type: str | None
    data: bytes


@dataclass
class _Job:
    image: np.ndarray
    want: Literal["predict", "encode"]


@dataclass
class _Output:
    probabilities: np.ndarray | None = None
    properties: dict[str, Estimate] | None = None
    z: np.ndarray | None = None


def finite(value: Any) -> Any:
    """``value`` as a plain JSON value: numpy scalars unwrapped, NaN and inf as None."""
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def png_base64(image: np.ndarray) -> str:
    """A uint8 ``(H, W, C)`` image as a base64 PNG (grey for one channel)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 ``(H, W, C)`` image as PNG bytes (grey for one channel)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format="PNG")
    return out.getvalue()


class Service:
    """A loaded model with the latent index of ``store`` (same rows), answering predictions, searches and store
    queries; ``loads`` counts the model loads behind it (one: :func:`open_service` is the only place that loads)."""

    def __init__(self, model: Model, index: LatentIndex, store: Dataset, *, k: int = 6,
                 options: PreprocessOptions = PreprocessOptions(), limits: UploadLimits = UploadLimits(),
                 max_wait: float = DEFAULT_MAX_WAIT, max_batch: int = DEFAULT_MAX_BATCH, loads: int = 1) -> None:
        if len(index) != len(store):
            raise DeepGalaxyError(f"the latent index has {len(index)} rows but the store {store.path} has "
                                  f"{len(store)}: give the index built from this store (--index) or none")
        if not 1 <= k <= MAX_K:
            raise DeepGalaxyError(f"--k {k}: give 1..{MAX_K} neighbours")
        self.model, self.index, self.store, self.k = model, index, store, k
        self.options, self.limits, self.loads = options, limits, loads
        self.batcher: MicroBatcher[_Job, _Output] = MicroBatcher(self._infer, max_wait, max_batch)
        self._rows = LRU(ROW_CACHE)
        self._uploads = LRU(UPLOAD_CACHE)

    def close(self) -> None:
        self.batcher.close()

    # -- what is served -------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.model.source.get("name") or self.model.card.name)

    @property
    def version(self) -> int | None:
        version = self.model.source.get("version")
        return None if version is None else int(version)

    def model_info(self) -> dict[str, Any]:
        """The model as /models lists it."""
        card = self.model.card
        return {"name": self.name, "version": self.version, "run_id": self.model.source.get("run_id"),
                "card": card.name, "framework": self.model.framework,
                "tracking_uri": self.model.source.get("tracking_uri"),
                "classes": card.num_classes if "head" in card.parts else None,
                "input_size": card.input_size, "channels": card.channels,
                "properties": list(self._property_units()) or None}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.name, "version": self.version, "model_loads": self.loads,
                "model_calls": self.batcher.calls, "images_inferred": self.batcher.items}

    # -- the model, batched -------------------------------------------------------------------------------------

    def _infer(self, jobs: list[_Job]) -> list[_Output]:
        """One model call per kind for every job gathered by the batcher."""
        out = [_Output() for _ in jobs]
        model = self.model
        for want in ("predict", "encode"):
            chosen = [i for i, job in enumerate(jobs) if job.want == want]
            if not chosen:
                continue
            images = np.stack([jobs[i].image for i in chosen])
            if want == "encode":
                for i, z in zip(chosen, model.encode(images, batch_size=len(images)), strict=True):
                    out[i].z = z
                continue
            if "head" in model.card.parts:
                probs = model.predict(images, batch_size=len(images)).probabilities
                for i, p in zip(chosen, probs, strict=True):
                    out[i].probabilities = p
            if model.card.properties is not None:
                found = model.predict_properties(images, batch_size=len(images))
                for j, i in enumerate(chosen):
                    out[i].properties = found.row(j)
        return out

    def _property_units(self) -> dict[str, str]:
        heads = self.model.card.properties
        if heads is None:
            return {}
        from deepgalaxy.core.properties import needed_properties

        return {name: PROPERTIES[name] for name in needed_properties(heads.targets)}

    def _read(self, upload: Upload) -> np.ndarray:
        """The upload preprocessed (read-only; the same bytes are preprocessed once while they stay cached)."""
        card = self.model.card

        def make() -> np.ndarray:
            image = read_upload(upload.filename, upload.content_type, upload.data, card.input_size, card.channels,
                                self.options, self.limits).image
            image.flags.writeable = False
            return image

        key = (hashlib.sha256(upload.data).digest(), upload.content_type)
        image: np.ndarray = self._uploads.get(key, make)
        return image

    def _row(self, row: int) -> tuple[np.ndarray, bytes]:
        """A store row's image (read-only) and its PNG, cached (search neighbours and /browse thumbnails alike)."""
        def make() -> tuple[np.ndarray, bytes]:
            image = self.store.images([row])[0]
            image.flags.writeable = False
            return image, png_bytes(image)

        found: tuple[np.ndarray, bytes] = self._rows.get(row, make)
        return found

    # -- requests -------------------------------------------------------------------------------------------------

    def predict(self, uploads: Sequence[Upload]) -> dict[str, Any]:
        """/predict: per upload the class probabilities, the top classes, the properties with their 68% intervals
        and the image after preprocessing."""
        from deepgalaxy.core.figures import probability_svg
        from deepgalaxy.runs.predict import class_summary

        if not uploads:
            raise RequestError(422, "no image: send one or more files in the multipart field 'file'")
        if len(uploads) > self.limits.max_files:
            raise RequestError(413, f"{len(uploads)} files in one request; send at most {self.limits.max_files}")
        images = [self._read(u) for u in uploads]
        outputs = self.batcher.submit([_Job(image, "predict") for image in images])
        units = self._property_units()
        results = []
        for upload, image, output in zip(uploads, images, outputs, strict=True):
            result: dict[str, Any] = {"filename": upload.filename, "predicted_class": None, "probabilities": None,
                                      "top": None, "probabilities_svg": None, "properties": None,
                                      "preprocessed_png": png_base64(image)}
            if output.probabilities is not None:
                p = output.probabilities.astype(np.float64)
                summary = class_summary(p[None], self.model.card.class_myr)
                result.update({key: finite(values[0]) for key, values in summary.items()})
                top = np.argsort(-p, kind="stable")[:TOP]
                result["probabilities"] = [float(x) for x in p]
                result["top"] = [{"class": int(c), "probability": float(p[c])} for c in top]
                result["probabilities_svg"] = probability_svg(p)
            if output.properties is not None:
                result["properties"] = {name: {"value": finite(e.value), "low": finite(e.low), "high": finite(e.high),
                                               "unit": units.get(name, "")} for name, e in output.properties.items()}
            results.append(result)
        return {"model": self.model_info(), "results": results}

    def search_upload(self, upload: Upload, k: int | None = None) -> dict[str, Any]:
        """/search with an image: the k store images nearest to it in z."""
        k = self._k(k)
        image = self._read(upload)
        (output,) = self.batcher.submit([_Job(image, "encode")])
        assert output.z is not None
        rows, dist = self.index.search(output.z[None], min(k, len(self.index)))
        return {"query": {"filename": upload.filename, "png": png_base64(image)},
                "neighbours": self._neighbours(image, rows[0], dist[0])}

    def search_row(self, row: int, k: int | None = None) -> dict[str, Any]:
        """/search with a store row: the k other store images nearest to it in z."""
        k = self._k(k)
        self.check_row(row)
        rows, dist = self.index.recommend(np.array([row]), min(k, len(self.index) - 1))
        image, png = self._row(row)
        return {"query": {"row": row, "meta": self.row_meta(row), "png": base64.b64encode(png).decode("ascii")},
                "neighbours": self._neighbours(image, rows[0], dist[0])}

    def _k(self, k: int | None) -> int:
        if k is None:
            return self.k
        if not 1 <= k <= MAX_K:
            raise RequestError(422, f"k={k}: ask for 1..{MAX_K} neighbours")
        return k

    def _neighbours(self, query: np.ndarray, rows: np.ndarray, dist: np.ndarray) -> list[dict[str, Any]]:
        from deepgalaxy.core.ssim import ssim_one_to_many

        keep = rows >= 0
        rows, dist = rows[keep], dist[keep]
        if not len(rows):
            return []
        found = [self._row(int(r)) for r in rows]
        scores = ssim_one_to_many(query, np.stack([image for image, _ in found]))
        return [{"row": int(r), "distance": finite(float(d)), "ssim": finite(float(s)),
                 "label": finite(self.index.metadata["label"][r]) if "label" in self.index.metadata else None,
                 "meta": self.row_meta(int(r)), "png": base64.b64encode(png).decode("ascii")}
                for r, d, s, (_, png) in zip(rows.tolist(), dist.tolist(), scores.tolist(), found, strict=True)]

    # -- the store ------------------------------------------------------------------------------------------------

    def check_row(self, row: int) -> None:
        if not 0 <= row < len(self.store):
            raise RequestError(422, f"row {row} is not a row of the store: give 0..{len(self.store) - 1}")

    def row_meta(self, row: int) -> dict[str, Any]:
        from deepgalaxy.runs.latent.queries import row_meta

        return {key: finite(value) for key, value in row_meta(self.index, row).items()}

    def store_summary(self) -> dict[str, Any]:
        """/store: how many rows, and the values the browse page filters on."""
        meta = self.index.metadata

        def values(key: str) -> list[Any] | None:
            return None if key not in meta else [finite(v) for v in np.unique(meta[key])]

        q = meta.get("mass_ratio")
        q_range = None if q is None or not np.isfinite(q).any() else [float(np.nanmin(q)), float(np.nanmax(q))]
        return {"rows": len(self.store), "name": self.store.path.name, "labels": values("label"),
                "cameras": values("camera"), "mass_ratio": q_range}

    def store_rows(self, label: int | None = None, camera: int | None = None, mass_ratio_min: float | None = None,
                   mass_ratio_max: float | None = None, offset: int = 0, limit: int = 60) -> dict[str, Any]:
        """/store/rows: the rows matching every filter given, a page of them from ``offset``."""
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise RequestError(422, f"offset={offset}, limit={limit}: give offset >= 0 and limit 1..{MAX_PAGE}")
        meta = self.index.metadata
        keep = np.ones(len(self.store), dtype=bool)
        for key, wanted in (("label", label), ("camera", camera)):
            if wanted is not None:
                if key not in meta:
                    raise RequestError(422, f"the store has no {key} column to filter on; leave {key} out")
                keep &= meta[key] == wanted
        for bound, compare in ((mass_ratio_min, np.greater_equal), (mass_ratio_max, np.less_equal)):
            if bound is not None:
                if "mass_ratio" not in meta:
                    raise RequestError(422, "the store has no mass_ratio column; leave mass_ratio_min/max out")
                keep &= compare(meta["mass_ratio"], bound)
        found = np.flatnonzero(keep)
        page = found[offset : offset + limit]
        return {"total": len(found), "offset": offset, "limit": limit,
                "rows": [{"row": int(r), **self.row_meta(int(r))} for r in page]}

    def store_png(self, row: int) -> bytes:
        """/store/image/{row}.png: the stored image of ``row``."""
        self.check_row(row)
        return self._row(row)[1]


def open_service(model: Model, data: str | os.PathLike[str], index: str | os.PathLike[str] | None = None,
                 progress: bool = False, **options: Any) -> Service:
    """The :class:`Service` of an already loaded ``model`` over the store ``data``: its latent index from ``index``
    (an index folder, or a store) or beside ``data``, built in memory when there is none (as ``predict --index``)."""
    from deepgalaxy.runs.latent import open_store
    from deepgalaxy.runs.predict import open_prediction_index

    store = open_store(data, model)
    found = open_prediction_index(model, data if index is None else index, progress)
    return Service(model, found, store, **options)


__all__ = ["MAX_K", "MAX_PAGE", "TOP", "Service", "Upload", "finite", "open_service", "png_base64", "png_bytes"]
