"""``deepgalaxy serve``: a web page and a JSON API for prediction and similarity search with one loaded model.

One concept per module:

- :mod:`.uploads`: uploaded images checked (size, pixels, content type) and preprocessed as ``predict`` does
- :mod:`.batching`: the micro-batcher that gathers concurrent requests' images into one model call
- :mod:`.service`: the loaded model, latent index and store, answering as JSON-ready dicts
- :mod:`.app`: the FastAPI app (routes, JSON errors, the upload limit) and its pages (``pages/``)
- :mod:`.server`: uvicorn on a socket bound first, telling when it is ready
"""

from __future__ import annotations

from deepgalaxy.runs.serve.service import Service, Upload, open_service
from deepgalaxy.runs.serve.uploads import DEFAULT_MAX_UPLOAD_MB, RequestError, UploadLimits

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "RequestError", "Service", "Upload", "UploadLimits", "open_service"]
