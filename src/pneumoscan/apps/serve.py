"""The server: an HTTP API (FastAPI, OpenAPI docs at /docs) and a web page, around one loaded checkpoint.

`create_app(checkpoint)` loads the model once; every request reuses it. Images are decoded and scored
by the one scoring service (`scoring.ScoringService`), whose single inference thread scores the images
of concurrent requests together. Uploads are read into memory (never written to disk), capped in size
(413) and in the time the client may take to send them (408); at most one decode per core runs at once
(`DecodeSlots`), and a request that finds them all busy for too long gets 503 with Retry-After. A bad
file gets its own error while the others are scored. User file names are only echoed back, never used
as paths. What is refused before a request reaches the app (foreign hosts, cross-site posts, a missing
token, oversized or slow bodies) and the security headers of every answer are `serve_guard`'s; what the
API says about its model and answers is `serve_api`'s. An optional bearer token protects every path but
the page, /health and the documentation page's files (the OpenAPI document included).
(`pip install 'pneumoscan[serve]'`)
"""

# no `from __future__ import annotations`: FastAPI must see the real types of the route parameters

import base64
import os
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .. import __version__
from ..io.fileio import optional_import
from ..io.images import ImageLoadError
from ..io.records import ImageResult, result_json
from ..tasks.explain import overlay, png_bytes
from ..tasks.predict import Predictor
from ..tasks.scoring import ScoringService, WorkerStopped
from .modelcard import model_card, validation_metrics
from .page import PAGE_HTML
from .serve_api import DISCLAIMER, api_models, describe_model, predict_openapi
from .serve_docs import DOCS_PATHS, add_docs_routes
from .serve_guard import LOCAL_HOSTS, Guard, Refused, security_headers

RETRY_AFTER_S = 2
# what a token does not protect: the page, the health check, the documentation page and its files (the
# OpenAPI document they show is protected)
OPEN_PATHS = frozenset({"/", "/health", *DOCS_PATHS})


def declare_bearer(app: Any, required: bool) -> None:
    """Make the OpenAPI document declare the bearer token scheme, and (`required`) require it on every
    operation but those of `OPEN_PATHS`, so that a client generated from it sends the token."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "the server's --token, sent as 'Authorization: Bearer <token>'"}}
            if required:
                schema["security"] = [{"bearer": []}]
                for path in OPEN_PATHS & set(schema["paths"]):
                    for operation in schema["paths"][path].values():
                        operation["security"] = []
        return app.openapi_schema

    app.openapi = openapi


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else all of them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity on this OS
        return os.cpu_count() or 1


class DecodeSlots:
    """At most `slots` decodes at once (one per core by default); at most `max_waiting` more wait, each for
    at most `wait_s` seconds; any other request is refused with 503 and Retry-After at once."""

    def __init__(self, slots: int | None = None, max_waiting: int | None = None, wait_s: float = 10):
        self.slots = slots or usable_cores()
        self.max_waiting = 4 * self.slots if max_waiting is None else max_waiting
        self.wait_s = wait_s
        self._free = threading.Semaphore(self.slots)
        self._lock = threading.Lock()
        self._waiting = 0

    def run(self, fn: Any, *args: Any) -> Any:
        """fn(*args) in a free slot (blocking: call it from a worker thread), or `Refused` 503."""
        if not self._free.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.max_waiting:
                    raise self.busy()
                self._waiting += 1
            try:
                if not self._free.acquire(timeout=self.wait_s):
                    raise self.busy()
            finally:
                with self._lock:
                    self._waiting -= 1
        try:
            return fn(*args)
        finally:
            self._free.release()

    def busy(self) -> Refused:
        return Refused(503, f"busy: all {self.slots} decoding slots are taken; retry in {RETRY_AFTER_S} s",
                       {"Retry-After": str(RETRY_AFTER_S)})


def encode_overlay(shown: np.ndarray, heat: np.ndarray) -> str:
    # fast PNG compression: at the default level encoding took longer than the Grad-CAM itself
    return base64.b64encode(png_bytes(overlay(shown, heat), compress_level=1)).decode("ascii")


def file_json(predictor: Predictor, result: ImageResult, heatmap_png: str | None = None) -> dict[str, Any]:
    """One file's entry of /api/predict's `results`: the record, with the model's names and the overlay."""
    return {"filename": result.path, **result_json(result), "class_names": predictor.class_names,
            "model": predictor.config.model.name, "heatmap_png": heatmap_png}


def create_app(checkpoint: str | os.PathLike, device: str = "cpu", token: str | None = None, max_upload_mb: float = 20,
               max_files: int = 16, metrics_json: str | os.PathLike | None = None, max_batch: int = 16,
               allowed_hosts: Iterable[str] = LOCAL_HOSTS, decode_slots: int | None = None,
               max_waiting: int | None = None, decode_wait_s: float = 10, body_timeout_s: float = 60,
               inference_timeout_s: float = 120, prevalence: float | None = None, backend: str = "torch") -> Any:
    """The ASGI app (`Guard` around the FastAPI app, which is its `.app`; the scoring service is `.app.state.service`)."""
    optional_import("fastapi", "serve", "serving")
    from fastapi import FastAPI
    from starlette.formparsers import MultiPartParser

    limit = int(max_upload_mb * 1024 * 1024)
    # keep every upload in memory: the spool only rolls over to a temporary file above this size
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, limit + 1)
    predictor = Predictor(checkpoint, device=device, prevalence=prevalence, backend=backend)  # "auto" logs its choice
    metrics_path = Path(metrics_json) if metrics_json else Path(checkpoint).parent / "eval-val" / "metrics.json"
    # /docs is served from local files (serve_docs); ReDoc is left out: its script injects inline styles
    app = FastAPI(title="pneumoscan", version=__version__, description=f"Pneumonia vs normal on chest X-rays. {DISCLAIMER}",
                  docs_url=None, redoc_url=None)
    app.state.predictor = predictor
    app.state.service = ScoringService(predictor, max_batch)
    app.state.slots = DecodeSlots(decode_slots, max_waiting, decode_wait_s)
    metrics = metrics_path if metrics_path.is_file() else None
    app.state.card = model_card(checkpoint, metrics)
    app.state.info = describe_model(predictor, Path(checkpoint).name, validation_metrics(checkpoint, metrics))
    app.state.inference_timeout_s = inference_timeout_s
    _add_routes(app, limit, max_files)
    add_docs_routes(app)
    declare_bearer(app, required=token is not None)
    return Guard(app, limit, allowed_hosts, body_timeout_s, token=token, open_paths=OPEN_PATHS,
                 headers=security_headers(PAGE_HTML))


def _add_routes(app: Any, limit: int, max_files: int) -> None:
    from fastapi import HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    m = api_models()
    state = app.state

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused) -> Any:
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE_HTML

    @app.get("/health", response_model=m.Health, responses={503: {"model": m.Health, "description": "the inference worker stopped"}})
    async def health() -> Any:
        """Whether the inference worker is alive (200) or stopped (503); needs no token and never waits."""
        if state.service.alive:
            return {"status": "ok"}
        return JSONResponse({"status": f"inference worker stopped: {state.service.stopped}"}, status_code=503)

    @app.get("/api/model", response_model=m.ModelInfo, responses={401: {"model": m.Problem}})
    async def model_info() -> Any:
        return state.info

    @app.get("/api/model-card", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401: {"model": m.Problem}})
    async def model_card_md() -> str:
        return state.card

    body, answers = predict_openapi(max_files)

    @app.post("/api/predict", response_model=m.PredictResponse, responses=answers, openapi_extra=body)
    async def predict(request: Request, heatmap: bool = True,
                      prevalence: float | None = Query(None, gt=0, lt=1, description=(
                          "this site's pneumonia prevalence: probabilities are moved to it by Bayes' rule "
                          "(default: the server's prior)"))) -> Any:
        """Score one or several uploaded images (multipart field `files`): JPEG, PNG or DICOM."""
        try:
            output = state.predictor.output.with_prior(prevalence) if prevalence is not None else state.predictor.output
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        uploads = await read_uploads(request, limit, max_files)
        results = []
        for i, up in enumerate(uploads):
            name = os.path.basename(up.filename or "") or f"upload-{i + 1}"  # shown only, never a path
            results.append(await score_file(state, name, await up.read(), heatmap, output))
        status = 422 if all(r["error"] for r in results) else 200
        return JSONResponse({"results": results, "model": state.info}, status_code=status)


async def read_uploads(request: Any, limit: int, max_files: int) -> list[Any]:
    """The uploaded files of a multipart request's field `files`; 415, 400 or the size limits' refusals otherwise."""
    from fastapi import HTTPException

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send the images as multipart/form-data in the field 'files'")
    try:
        form = await request.form(max_files=max_files, max_part_size=limit)
    except (Refused, HTTPException):
        raise
    except Exception as e:  # malformed multipart bodies raise several types
        raise HTTPException(400, f"malformed multipart upload ({e})") from None
    uploads = [f for f in form.getlist("files") if hasattr(f, "read")]
    if not uploads:
        raise HTTPException(400, "no file in the field 'files'")
    return uploads


async def score_file(state: Any, name: str, data: bytes, heatmap: bool, output: Any = None) -> dict[str, Any]:
    """One uploaded file's result: decoded in a slot, scored by the inference thread within the time limit,
    reported at the prior of `output` (an `OutputMap`; default: the server's)."""
    from starlette.concurrency import run_in_threadpool

    service = state.service
    try:
        decoded = await run_in_threadpool(state.slots.run, service.decode, data, name)
    except ImageLoadError as e:
        return file_json(service.predictor, service.unreadable(name, e.reason, output))
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    try:
        scored = await service.score_decoded(decoded, name, heatmap, output, state.inference_timeout_s)
    except WorkerStopped as e:
        raise Refused(503, f"{e}; restart the server", retry) from None
    except TimeoutError:
        raise Refused(503, f"busy: inference did not finish within {state.inference_timeout_s:g} s", retry) from None
    png = await run_in_threadpool(encode_overlay, scored.shown, scored.heat) if heatmap else None
    return file_json(service.predictor, scored.result, png)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, allow_hosts: Iterable[str] = (),
          max_connections: int = 64, head_timeout_s: float | None = None, **kwargs: Any) -> None:
    """Run the app under uvicorn (`serve_http.server_config`): 503 beyond `max_connections`, idle keep-alive
    connections closed after 5 s, request heads due within `head_timeout_s` (default `serve_http.HEAD_TIMEOUT_S`).
    The server answers to loopback names, the address it listens on and `allow_hosts` ("*": any)."""
    import uvicorn

    from .serve_http import HEAD_TIMEOUT_S, server_config

    hosts = [*LOCAL_HOSTS, *([host] if host not in ("0.0.0.0", "::") else []), *allow_hosts]
    app = create_app(checkpoint, allowed_hosts=hosts, **kwargs)
    uvicorn.Server(server_config(app, host, port, max_connections, head_timeout_s or HEAD_TIMEOUT_S)).run()
