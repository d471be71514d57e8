"""The server: an HTTP API (FastAPI, OpenAPI docs at /docs) and a web page, around one loaded checkpoint.

`create_app(checkpoint)` loads the model once; every request reuses it. Images of concurrent requests
are scored together: one inference thread takes every image waiting (`InferenceBatcher`), which on a
CPU costs less per image than one at a time, and never runs two inferences at once (concurrent OpenMP
regions stall each other on few cores). Uploads are read into memory
(never written to disk), capped in size (413), and each file is decoded by the same loader as every
other command, so a bad file gets its own error while the others are scored. User file names are only
echoed back, never used as paths. An optional bearer token protects the /api routes.
(`pip install 'pneumoscan[serve]'`)
"""

# no `from __future__ import annotations`: FastAPI must see the real types of the route parameters

import base64
import hmac
import os
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .explain import cam_for_batch, overlay, png_bytes
from .fileio import optional_import
from .images import ImageLoadError, load_grey, resize
from .modelcard import model_card
from .page import PAGE_HTML
from .predict import Predictor

DISCLAIMER = "Research tool, not a medical device: not for diagnosis or treatment decisions."


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before they are read."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send: Any) -> None:
        body = f'{{"detail": "upload too large: the limit is {self.limit // (1024 * 1024)} MB per request"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class InferenceBatcher:
    """One inference thread for the whole server: each request queues its image and waits; the thread
    takes everything queued (up to `max_batch`), runs it as one batch and hands each result back."""

    def __init__(self, predictor: Predictor, max_batch: int = 16):
        self.predictor, self.max_batch = predictor, max_batch
        self.jobs: "queue.Queue[tuple[np.ndarray, bool, Future]]" = queue.Queue()
        threading.Thread(target=self._serve, name="pneumoscan-inference", daemon=True).start()

    def score(self, pixels: np.ndarray, heatmap: bool) -> tuple[np.ndarray | None, float, np.ndarray | None]:
        """(Grad-CAM map or None, P(pneumonia), per-class probabilities or None) for one (S, S) uint8 image;
        blocks until it is done."""
        done: Future = Future()
        self.jobs.put((pixels, heatmap, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while len(jobs) < self.max_batch and not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            for wants_map in (True, False):
                group = [j for j in jobs if j[1] == wants_map]
                if group:
                    self._run(group, wants_map)

    def _run(self, group: list, wants_map: bool) -> None:
        try:
            pixels = np.stack([j[0] for j in group])
            if wants_map:
                heats, probs, class_probs = cam_for_batch(self.predictor, pixels)
            else:
                heats = [None] * len(group)
                probs, class_probs = self.predictor.predict_details(pixels)
            for i, (_, _, done) in enumerate(group):
                done.set_result((heats[i], float(probs[i]), None if class_probs is None else class_probs[i]))
        except Exception as e:  # the requests get the error; the thread lives on
            for _, _, done in group:
                done.set_exception(e)


def score_upload(predictor: Predictor, batcher: InferenceBatcher, name: str, data: bytes, heatmap: bool) -> dict[str, Any]:
    """One uploaded file's result: probability, label, per-class probabilities, overlay (base64 PNG), or its error."""
    result: dict[str, Any] = {"filename": name, "probability": None, "label": None, "threshold": predictor.threshold,
                              "class_names": predictor.class_names, "model": predictor.config.model.name,
                              "heatmap_png": None, "probabilities": None, "error": None}
    try:
        grey = load_grey(data, name=name)
    except ImageLoadError as e:
        result["error"] = e.reason
        return result
    prep = predictor.config.preprocessing
    heat, prob, class_probs = batcher.score(resize(grey, prep.image_size, prep.resize_filter), heatmap)
    prediction = predictor.prediction(name, prob, class_probs)
    result.update(probability=prob, label=prediction.label, probabilities=prediction.probabilities)
    if heatmap:
        shown = resize(grey, 512, "area") if max(grey.shape) > 512 else grey  # enough for a browser
        # fast PNG compression: at the default level encoding took longer than the Grad-CAM itself
        result["heatmap_png"] = base64.b64encode(png_bytes(overlay(shown, heat), compress_level=1)).decode("ascii")
    return result


def describe_model(predictor: Predictor, checkpoint_name: str) -> dict[str, Any]:
    """What /api/model and every prediction response say about the model."""
    cfg = predictor.config
    return {"name": cfg.model.name, "activation": cfg.model.activation, "recipe": cfg.recipe,
            "checkpoint": checkpoint_name, "pneumoscan_version": __version__, "class_names": predictor.class_names,
            "threshold": predictor.threshold, "image_size": cfg.preprocessing.image_size, "disclaimer": DISCLAIMER}


def create_app(checkpoint: str | os.PathLike, device: str = "cpu", token: str | None = None, max_upload_mb: float = 20,
               max_files: int = 16, metrics_json: str | os.PathLike | None = None, max_batch: int = 16) -> Any:
    optional_import("fastapi", "serve", "serving")
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.formparsers import MultiPartParser

    limit = int(max_upload_mb * 1024 * 1024)
    # keep every upload in memory: the spool only rolls over to a temporary file above this size
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, limit + 1)
    predictor = Predictor(checkpoint, device=device)
    batcher = InferenceBatcher(predictor, max_batch)
    metrics_path = Path(metrics_json) if metrics_json else Path(checkpoint).parent / "eval-val" / "metrics.json"
    card = model_card(checkpoint, metrics_path if metrics_path.is_file() else None)
    info = describe_model(predictor, Path(checkpoint).name)

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong API token (send 'Authorization: Bearer <token>')")

    app = FastAPI(title="pneumoscan", version=__version__, description=f"Pneumonia vs normal on chest X-rays. {DISCLAIMER}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE_HTML

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/model", dependencies=[Depends(check_token)])
    def model_info() -> dict[str, Any]:
        return info

    @app.get("/api/model-card", response_class=PlainTextResponse, dependencies=[Depends(check_token)])
    def model_card_md() -> str:
        return card

    @app.post("/api/predict", dependencies=[Depends(check_token)])
    async def predict(request: Request, heatmap: bool = True) -> Any:
        """Score one or several uploaded images (multipart field `files`): JPEG, PNG or DICOM."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send the images as multipart/form-data in the field 'files'")
        try:
            form = await request.form(max_files=max_files, max_part_size=limit)
        except _TooLarge:
            raise  # BodyLimit answers 413
        except Exception as e:  # malformed multipart bodies raise several types
            raise HTTPException(400, f"malformed multipart upload ({e})") from None
        uploads = [f for f in form.getlist("files") if hasattr(f, "read")]
        if not uploads:
            raise HTTPException(400, "no file in the field 'files'")
        results = []
        for i, up in enumerate(uploads):
            name = os.path.basename(up.filename or "") or f"upload-{i + 1}"  # shown only, never a path
            data = await up.read()
            results.append(await run_in_threadpool(score_upload, predictor, batcher, name, data, heatmap))
        status = 422 if all(r["error"] for r in results) else 200
        return JSONResponse({"results": results, "model": info}, status_code=status)

    return BodyLimit(app, limit)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    import uvicorn

    uvicorn.run(create_app(checkpoint, **kwargs), host=host, port=port, log_level="info")
