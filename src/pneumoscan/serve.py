"""The server: an HTTP API (FastAPI, OpenAPI docs at /docs) and a web page, around one loaded checkpoint.

`create_app(checkpoint)` loads the model once; every request reuses it. Images of concurrent requests
are scored together by the one scoring service (`scoring.ScoringService`), whose single inference
thread takes every image waiting. Uploads are read into memory (never written to disk), capped in
size (413) and in the time the client may take to send them (408); at most one decode per core runs at
once (`DecodeSlots`), and a request that finds them all busy for too long gets 503 with Retry-After.
Each file is decoded by the same loader as every other command, so a bad file gets its own error while
the others are scored. User file names are only echoed back, never used as paths. Requests naming a
host the server does not serve (DNS rebinding) and cross-site form posts are refused, and every refusal
closes its connection. An optional bearer token protects every path but the page, /health and the
documentation page's files (the OpenAPI document included). Every answer carries a Content-Security-Policy
of 'self' and the other security headers (`security_headers`). (`pip install 'pneumoscan[serve]'`)
"""

# no `from __future__ import annotations`: FastAPI must see the real types of the route parameters

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import numpy as np

from . import __version__
from .explain import overlay, png_bytes
from .fileio import optional_import
from .images import ImageLoadError
from .modelcard import model_card, validation_metrics
from .page import PAGE_HTML
from .predict import Predictor
from .records import ImageResult, result_json
from .scoring import ScoringService, WorkerStopped
from .serve_docs import DOCS_PATHS, add_docs_routes

DISCLAIMER = "Research tool, not a medical device: not for diagnosis or treatment decisions."
# the names a server on loopback answers to; "testserver" is the name Starlette's in-process test client sends
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "testserver")
RETRY_AFTER_S = 2
# the answers that refuse a request outright: each closes its connection
REFUSALS = frozenset({400, 401, 403, 408, 413})
# what a token does not protect: the page, the health check, the documentation page and its files (the
# OpenAPI document they show is protected)
OPEN_PATHS = frozenset({"/", "/health", *DOCS_PATHS})


class Refused(Exception):
    """A request the server declines with `status` and a one-line `detail` (and optional headers)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def host_name(host_header: str) -> str:
    """The host name of a Host header or URL authority, without port, brackets or trailing dot, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).rstrip(".")


class Guard:
    """ASGI middleware in front of the app: refuses foreign Host headers (400), cross-site posts (403), requests
    without the token where one is set (401, except on `open_paths`), bodies over `limit` bytes (413, announced
    or chunked) and bodies not received within `body_timeout_s` (408). Every answer carries the security
    headers; a refusal, and any answer sent before the request's body was read to its end, closes the connection."""

    def __init__(self, app: Any, limit: int, allowed_hosts: Iterable[str] = LOCAL_HOSTS, body_timeout_s: float = 60,
                 token: str | None = None, open_paths: Iterable[str] = ("/", "/health"),
                 headers: Iterable[tuple[str, str]] = ()):
        self.app, self.limit, self.body_timeout_s = app, limit, body_timeout_s
        self.allowed = {host_name(h) for h in allowed_hosts}
        self.token, self.open_paths = token, frozenset(open_paths)
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = BodyReader(receive, scope, self.limit, self.body_timeout_s, self.too_large())
        started = False

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": self.answer_headers(message, body.complete)}
            await send(message)

        try:
            self.check_headers(scope)
            await self.app(scope, body, guarded_send)
        except Refused as e:  # from the head, or raised while the body was read by a route that did not answer it
            if not started:
                await send_problem(guarded_send, e)

    def answer_headers(self, start: dict, body_read: bool) -> list[tuple[bytes, bytes]]:
        """The app's headers, the security headers it did not set, and `connection: close` for a refusal or
        an answer sent before the body was read to its end (the client may still be sending it)."""
        headers = list(start.get("headers") or [])
        names = {k.lower() for k, _ in headers}
        headers += [(k, v) for k, v in self.headers if k not in names]
        if (start["status"] in REFUSALS or not body_read) and b"connection" not in names:
            headers.append((b"connection", b"close"))
        return headers

    def check_headers(self, scope: dict) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        if "*" not in self.allowed and host_name(host) not in self.allowed:
            raise Refused(400, f"host {host_name(host)!r} is not served here (start the server with --allow-host NAME)")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            site = headers.get("sec-fetch-site")
            origin = headers.get("origin")
            if (site is not None and site not in ("same-origin", "none")) or (
                    origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower())):
                raise Refused(403, "cross-site request refused: post from the server's own page or a non-browser client")
        if self.token is not None and route_path(scope) not in self.open_paths:
            check_bearer(headers.get("authorization"), self.token)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise Refused(413, self.too_large())

    def too_large(self) -> str:
        return f"upload too large: the limit is {self.limit / (1024 * 1024):g} MB per request"


def route_path(scope: dict) -> str:
    """The request's path below the server's root path (the path the routes match)."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root):] if root and path.startswith(root) else path


def check_bearer(authorization: str | None, token: str) -> None:
    """Refuse (401, with `WWW-Authenticate: Bearer`) an Authorization header that is not the bearer `token`;
    the scheme's name is case-insensitive (RFC 7235), the token is compared in constant time."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if not authorization:
        raise Refused(401, "missing API token: send 'Authorization: Bearer <token>'",
                      {"WWW-Authenticate": 'Bearer realm="pneumoscan"'})
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Refused(401, "wrong API token or scheme: send 'Authorization: Bearer <token>'",
                      {"WWW-Authenticate": 'Bearer realm="pneumoscan", error="invalid_token"'})


class BodyReader:
    """The request body as the app receives it (an ASGI `receive`): counted against `limit` (413), due within
    `timeout_s` of the head (408); `complete` once it was read to its end (at once for a request without one)."""

    def __init__(self, receive: Any, scope: dict, limit: int, timeout_s: float, too_large: str):
        self.receive, self.limit, self.timeout_s, self.too_large = receive, limit, timeout_s, too_large
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        headers = dict(scope.get("headers") or [])
        self.complete = b"transfer-encoding" not in headers and headers.get(b"content-length", b"0").strip() in (b"", b"0")
        self.seen = 0

    async def __call__(self) -> dict:
        if self.complete:  # after the body, only the disconnect remains: no deadline on waiting for it
            return await self.receive()
        loop = asyncio.get_running_loop()
        try:
            message = await asyncio.wait_for(self.receive(), max(self.deadline - loop.time(), 0.001))
        except TimeoutError:
            raise Refused(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit:
            raise Refused(413, self.too_large)
        self.complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message


async def send_problem(send: Any, e: Refused) -> None:
    body = json.dumps({"detail": e.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def content_security_policy(*pages: str) -> str:
    """Only the server's own files, plus the inline <script> and <style> blocks of `pages` by their SHA-256
    (so any change to them is refused until the server reads them again); images may also be data: and
    blob: URLs (the heatmaps and the uploads shown); no page may frame this one."""
    def hashes(tag: str) -> str:
        blocks = [b for page in pages for b in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)]
        return "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'self'; script-src 'self'{hashes('script')}; style-src 'self'{hashes('style')}; "
            "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def security_headers(*pages: str) -> list[tuple[str, str]]:
    """The headers every answer carries: the Content-Security-Policy for `pages`, no MIME sniffing, no
    framing (for browsers that predate frame-ancestors too), no Referer sent from the page."""
    return [("Content-Security-Policy", content_security_policy(*pages)), ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")]


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


def describe_model(predictor: Predictor, checkpoint_name: str, validation: dict[str, Any] | None = None) -> dict[str, Any]:
    """What /api/model and every prediction response say about the model (a file name, never a local path)."""
    cfg = predictor.config
    return {"name": cfg.model.name, "activation": cfg.model.activation, "recipe": cfg.recipe,
            "checkpoint": os.path.basename(checkpoint_name), "pneumoscan_version": __version__,
            "class_names": predictor.class_names, "threshold": predictor.threshold,
            "threshold_interval": predictor.output.threshold_interval,
            "calibration": predictor.output.describe()["calibration"], "assumed_prevalence": predictor.output.prior_used,
            "prevalence_source": predictor.output.source, "train_prevalence": predictor.output.train_prevalence,
            "model_prior": predictor.output.model_prior,
            "ood_threshold": None if predictor.ood is None else predictor.ood.threshold,
            "image_size": cfg.preprocessing.image_size, "ensemble": predictor.ensemble or None,
            "adaptation": predictor.adaptation, "validation": validation, "disclaimer": DISCLAIMER}


@functools.cache
def api_models() -> Any:
    """The pydantic models that the OpenAPI document gives for each answer."""
    from types import SimpleNamespace

    from pydantic import BaseModel, Field

    class Validation(BaseModel):
        split: str
        n: int | None = Field(description="images scored, or null for the checkpoint's own validation record")
        accuracy: float | None = None
        precision: float | None = Field(None, description="null when the model called nothing pneumonia")
        recall: float | None = None
        specificity: float | None = None
        f1: float | None = None
        roc_auc: float | None = None

    class ModelInfo(BaseModel):
        name: str
        activation: str
        recipe: str
        checkpoint: str = Field(description="the checkpoint's file name")
        pneumoscan_version: str
        class_names: list[str]
        threshold: float = Field(description="label the image pneumonia at or above this probability (at "
                                             "`assumed_prevalence`)")
        threshold_interval: list[float] | None = Field(
            description="95% bootstrap interval of the threshold chosen on validation (calibrated scale, model "
                        "prior); null for the fixed rule or a checkpoint that does not record one")
        calibration: dict[str, Any] = Field(description="method ('none', 'temperature' or 'platt'), temperature "
                                                             "and offset: reported = sigmoid(logit / temperature + offset)")
        assumed_prevalence: float | None = Field(
            description="the share of pneumonia among the images that probabilities assume by default (Bayes' prior); "
                        "null when the checkpoint does not record its training prevalence")
        prevalence_source: str = Field(description="'model': the model's own prior; 'given': the server's --prevalence; "
                                                    "'adapted': the site's prevalence recorded by `pneumoscan adapt`")
        train_prevalence: float | None = Field(description="pneumonia fraction of the training split, if known")
        model_prior: float | None = Field(description="the prior the calibrated probabilities refer to (0.5 when "
                                                      "training balanced the classes)")
        ood_threshold: float | None = Field(description="an image whose `ood_score` is at or above this is outside "
                                                        "what the model was trained on; null without a detector")
        image_size: int
        ensemble: str | None = Field(description="an ensemble's members (seeds) and test-time views; null for one model")
        adaptation: dict[str, Any] | None = Field(
            None, description="a checkpoint fitted to a site by `pneumoscan adapt`: images, BatchNorm, the site's "
                              "prevalence, its interval and whether to trust it, labelled rows and the expected rates; "
                              "null when not adapted")
        validation: Validation | None = Field(description="validation figures; an undefined one is null")
        disclaimer: str

    class FileResult(BaseModel):
        filename: str = Field(description="the uploaded file's name, shown only")
        p_pneumonia: float | None = Field(ge=0, le=1, description="the probability of pneumonia, at "
                                                                  "`assumed_prevalence`; null when the file could not be read")
        label: str | None = Field(description="PNEUMONIA when `p_pneumonia` is at or above `threshold` (three-class "
                                              "models: then the likelier type); null for an unreadable file")
        threshold: float = Field(description="the decision threshold for `p_pneumonia`")
        class_names: list[str]
        model: str
        heatmap_png: str | None = Field(description="the Grad-CAM overlay as a base64 PNG (at most 512 px), or null")
        probabilities: dict[str, float] | None = Field(description="per class (three-class models), else null")
        warnings: list[str] = Field(description="what about the image may make the answer less reliable: what its "
                                    "DICOM header says the model was not trained for (a lateral view, another body "
                                    "part or modality, an adult, colour, bits, field of view), then its size")
        error: str | None = Field(description="why the file could not be read, or null")
        assumed_prevalence: float | None = Field(description="the share of pneumonia among the images that "
                                                             "`p_pneumonia` assumes (Bayes' prior)")
        prevalence_source: str = Field(description="'model' (the model's own prior), 'given' (the server's "
                                                   "--prevalence or this request's `prevalence`)")
        ood_score: float | None = Field(ge=0, description="Mahalanobis distance of the image's features to the "
                                                          "training split's; null without a detector, for an "
                                                          "unreadable file, or when infinite (flagged)")
        ood_threshold: float | None = Field(description="the score at or above which an image is flagged; null "
                                                        "without a detector")
        outside_training: bool | None = Field(description="true: the image is outside what this model was trained "
                                                          "on (its probability means little); null without a detector")

    class PredictResponse(BaseModel):
        results: list[FileResult]
        model: ModelInfo

    class Problem(BaseModel):
        detail: str

    class ValidationProblem(BaseModel):
        detail: list[dict[str, Any]]

    class Health(BaseModel):
        status: str = Field(description="'ok', or why the inference worker stopped")

    return SimpleNamespace(ModelInfo=ModelInfo, FileResult=FileResult, PredictResponse=PredictResponse, Problem=Problem,
                           ValidationProblem=ValidationProblem, Health=Health)


def predict_openapi(max_files: int) -> tuple[dict, dict]:
    """The request body and the answers of POST /api/predict, for the OpenAPI document."""
    m = api_models()
    body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"], "properties": {"files": {
            "type": "array", "minItems": 1, "maxItems": max_files, "items": {"type": "string", "format": "binary"},
            "description": "the images: JPEG, PNG or DICOM, one part each"}}}}}}}
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    answers = {
        400: {"model": m.Problem, "description": "a malformed multipart body, no file in `files`, or too many files"},
        401: {"model": m.Problem, "description": "a token is set and the request does not carry it"},
        403: {"model": m.Problem, "description": "a cross-site request from a browser"},
        408: {"model": m.Problem, "description": "the body did not arrive in time"},
        413: {"model": m.Problem, "description": "the body is over the upload limit"},
        415: {"model": m.Problem, "description": "the body is not multipart/form-data"},
        422: {"model": m.PredictResponse | m.ValidationProblem,
              "description": "every file was unreadable (each result gives its reason), or a bad query parameter"},
        503: {"model": m.Problem, "headers": retry,
              "description": "busy (all decoding slots taken) or the inference worker stopped; retry later"},
    }
    return body, answers


def file_json(predictor: Predictor, result: ImageResult, heatmap_png: str | None = None) -> dict[str, Any]:
    """One file's entry of /api/predict's `results`: the record, with the model's names and the overlay."""
    return {"filename": result.path, **result_json(result), "class_names": predictor.class_names,
            "model": predictor.config.model.name, "heatmap_png": heatmap_png}


def create_app(checkpoint: str | os.PathLike, device: str = "cpu", token: str | None = None, max_upload_mb: float = 20,
               max_files: int = 16, metrics_json: str | os.PathLike | None = None, max_batch: int = 16,
               allowed_hosts: Iterable[str] = LOCAL_HOSTS, decode_slots: int | None = None,
               max_waiting: int | None = None, decode_wait_s: float = 10, body_timeout_s: float = 60,
               inference_timeout_s: float = 120, prevalence: float | None = None) -> Any:
    """The ASGI app (`Guard` around the FastAPI app, which is its `.app`; the scoring service is `.app.state.service`)."""
    optional_import("fastapi", "serve", "serving")
    from fastapi import FastAPI
    from starlette.formparsers import MultiPartParser

    limit = int(max_upload_mb * 1024 * 1024)
    # keep every upload in memory: the spool only rolls over to a temporary file above this size
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, limit + 1)
    predictor = Predictor(checkpoint, device=device, prevalence=prevalence)
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
