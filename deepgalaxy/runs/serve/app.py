"""The ASGI app of ``deepgalaxy serve`` (FastAPI): the JSON API over a :class:`~deepgalaxy.runs.serve.service.Service`
and the two pages, ``/`` (predict and search an upload) and ``/browse`` (the store by class, mass ratio, camera).

Every error is JSON ``{"error": "what was wrong and what to do"}`` with a 4xx status (413 too large, 415 not an image,
422 a bad field or row, 404/405 no such route), never a traceback; a bug answers 500 with the same shape and the
server keeps serving. A request body above the upload limit is refused by :class:`BodyLimit` before it reaches
the multipart parser (from its Content-Length, or while it streams in). The OpenAPI schema is at /openapi.json,
its interactive docs at /docs.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepgalaxy import __version__
from deepgalaxy.runs.serve.service import MAX_K, MAX_PAGE, Service, Upload
from deepgalaxy.runs.serve.uploads import RequestError

log = logging.getLogger("deepgalaxy.serve")
PAGES = ("index.html", "browse.html", "style.css")
"""The pages and their stylesheet, package data of :mod:`deepgalaxy.runs.serve` (``pages/``)."""


def page(name: str) -> str:
    """The text of page ``name`` (one of :data:`PAGES`)."""
    return (files("deepgalaxy.runs.serve") / "pages" / name).read_text(encoding="utf-8")


class BodyLimit:
    """ASGI middleware: refuse a request body above ``max_bytes`` with 413 JSON before the app parses it.

    A body announced too large by Content-Length is drained (up to ``drain_factor`` times the limit, so the
    client gets to read the answer) and refused; a body without one is counted while it streams and refused once
    it passes the limit (the app then sees the client as gone, and its own answer is dropped)."""

    def __init__(self, app: ASGIApp, max_bytes: int, drain_factor: int = 8) -> None:
        self.app, self.max_bytes, self.drain = app, max_bytes, drain_factor * max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._drain(receive)
            await self._refuse(send, int(length))
            return
        seen, refused, started = 0, False, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send, seen)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is already sent
            started = True
            await send(message)

        await self.app(scope, counted, guarded)

    async def _drain(self, receive: Receive) -> None:
        seen = 0
        while seen <= self.drain:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send: Send, size: int) -> None:
        body = JSONResponse(status_code=413, content={"error": (
            f"the request body ({size:,} bytes or more) is above the upload limit of {self.max_bytes:,} bytes; "
            "send a smaller image (the server's --max-upload-mb sets the limit)")}).body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path"))
        problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return ("; ".join(problems) + " (see /docs for the fields each route takes: images go in the multipart field "
            "'file', a store row in the field 'row')")


def _uploads(files_: list[UploadFile]) -> list[Upload]:
    return [Upload(f.filename or "upload", f.content_type, f.file.read()) for f in files_]


def create_app(service: Service) -> FastAPI:
    """The app serving ``service`` (already loaded: creating the app loads nothing)."""
    info = service.model_info()
    app = FastAPI(title="deepgalaxy", version=__version__,
                  description=f"Merger stages and similar simulated images with {info['name']} v{info['version']}")
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_bytes)
    pages = {name: page(name) for name in PAGES}

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"error": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": _validation_message(exc)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        text = f"{exc.detail}: {request.method} {request.url.path}; see /docs for the routes" if exc.status_code in (
            404, 405) else str(exc.detail)
        return JSONResponse(status_code=exc.status_code, content={"error": text})

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error while answering %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"error": f"internal error ({type(exc).__name__}: {exc}); the "
                                                               "server keeps serving: please report it"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> str:
        return pages["index.html"]

    @app.get("/browse", response_class=HTMLResponse, include_in_schema=False)
    def browse_page() -> str:
        return pages["browse.html"]

    @app.get("/style.css", include_in_schema=False)
    def style() -> Response:
        return Response(pages["style.css"], media_type="text/css")

    @app.get("/healthz", summary="the server answers, with the model it serves")
    def healthz() -> dict[str, Any]:
        return service.health()

    @app.get("/models", summary="the model served: name, version, MLflow run, card, framework")
    def models() -> dict[str, Any]:
        return {"models": [service.model_info()]}

    @app.post("/predict", summary="class probabilities, top classes and properties of uploaded images")
    def predict(file: list[UploadFile] = File(..., description="PNG, JPEG or FITS images (repeat the field)")
                ) -> dict[str, Any]:
        return service.predict(_uploads(file))

    @app.post("/search", summary="the store images nearest in the latent space to an upload or a store row")
    def search(file: UploadFile | None = File(None, description="a PNG, JPEG or FITS image"),
               row: int | None = Form(None, description="a store row (instead of a file)"),
               k_form: int | None = Form(None, alias="k", ge=1, le=MAX_K, description="neighbours"),
               k: int | None = Query(None, ge=1, le=MAX_K, description="neighbours (default: the server's --k)"),
               ) -> dict[str, Any]:
        wanted = k if k is not None else k_form
        if (file is None) == (row is None):
            raise RequestError(422, "give exactly one query: an image in the multipart field 'file', or a store row "
                                    "in the form field 'row'")
        if file is not None:
            return service.search_upload(_uploads([file])[0], wanted)
        assert row is not None
        return service.search_row(row, wanted)

    @app.get("/store", summary="the store: rows, and the classes, cameras and mass ratios to filter on")
    def store() -> dict[str, Any]:
        return service.store_summary()

    @app.get("/store/rows", summary="store rows filtered by class, camera and mass ratio, a page at a time")
    def store_rows(label: int | None = None, camera: int | None = None, mass_ratio_min: float | None = None,
                   mass_ratio_max: float | None = None, offset: int = Query(0, ge=0),
                   limit: int = Query(60, ge=1, le=MAX_PAGE)) -> dict[str, Any]:
        return service.store_rows(label, camera, mass_ratio_min, mass_ratio_max, offset, limit)

    @app.get("/store/image/{row}.png", response_class=Response, summary="the stored image of a row, as PNG",
             responses={200: {"content": {"image/png": {}}}})
    def store_image(row: int) -> Response:
        return Response(service.store_png(row), media_type="image/png",
                        headers={"Cache-Control": "public, max-age=3600"})

    return app


__all__ = ["PAGES", "BodyLimit", "create_app", "page"]
