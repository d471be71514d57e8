"""The one scoring service under every front end (the HTTP server, the DICOM node, any later one).

`ScoringService` owns, for one loaded `Predictor`: decoding the bytes a front end received by the one
loader (`prepare_upload`), the single inference thread that scores the images of all callers together
(`InferenceBatcher`: one batch costs less per image than one at a time on a CPU, and two inferences never
run at once, since concurrent OpenMP regions stall each other on few cores), and the per-image record
(`records.ImageResult`) at the prior a caller asks for. Threads call `score(data, name)`; an asyncio front
end decodes where it likes (`decode`) and awaits `score_decoded`. A front end adds only what is its own:
its refusals, its file formats, its identifiers.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..core.calibration import move
from ..io.images import ImageLoadError, load_grey_with_info, resize
from ..io.records import ImageResult
from .explain import cam_for_batch
from .predict import Predictor, image_result

SHOWN_MAX_PX = 512  # the longest side of the image an overlay is drawn on: enough for a browser or a report


class WorkerStopped(RuntimeError):
    """The inference thread has stopped: no image can be scored until the service restarts."""


class Decoded(NamedTuple):
    """One decoded image: the model's input, the image to draw an overlay on, and warnings about it."""

    pixels: np.ndarray
    shown: np.ndarray
    warnings: list[str]


@dataclass
class Scored:
    """One scored (or unreadable) image: its record, and the Grad-CAM map (when asked for) with the image
    to draw it on (None when the image could not be decoded)."""

    result: ImageResult
    heat: np.ndarray | None = None
    shown: np.ndarray | None = None


class InferenceBatcher:
    """One inference thread for the whole service: each caller queues its image and waits; the thread
    takes everything queued (up to `max_batch`), runs it as one batch and hands each result back. If the
    thread dies, every waiting and later caller gets `WorkerStopped`, and `stopped` says why."""

    def __init__(self, predictor: Predictor, max_batch: int = 16):
        self.predictor, self.max_batch = predictor, max_batch
        self.jobs: queue.Queue[tuple[np.ndarray, bool, Future]] = queue.Queue()
        self.stopped: str | None = None
        self._current: list = []
        self.thread = threading.Thread(target=self._serve_until_stopped, name="pneumoscan-inference", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.stopped is None and self.thread.is_alive()

    def submit(self, pixels: np.ndarray, heatmap: bool) -> Future:
        """Queue one (S, S) uint8 image; the future gives (Grad-CAM map or None, P(pneumonia), per-class
        probabilities or None, out-of-distribution score or None)."""
        if not self.alive:
            raise WorkerStopped(f"the inference worker has stopped ({self.stopped or 'thread ended'})")
        done: Future = Future()
        self.jobs.put((pixels, heatmap, done))
        if not self.alive:  # stopped while this job was queued: nobody will take it
            self._fail_pending()
        return done

    def score(self, pixels: np.ndarray, heatmap: bool, timeout: float | None = None) -> tuple:
        """`submit`, then wait (at most `timeout` seconds) for the result."""
        return self.submit(pixels, heatmap).result(timeout)

    def _serve_until_stopped(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: B036  (the thread must record any way it ends)
            self.stopped = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            self.stopped = self.stopped or "thread ended"
            self._fail_pending()

    def _fail_pending(self) -> None:
        pending = list(self._current)
        while True:
            try:
                pending.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for _, _, done in pending:
            try:
                done.set_exception(WorkerStopped(f"the inference worker has stopped ({self.stopped})"))
            except InvalidStateError:  # already answered, or its caller gave up
                pass

    def _serve(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while len(jobs) < self.max_batch and not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            jobs = [j for j in jobs if j[2].set_running_or_notify_cancel()]  # drop those whose caller gave up
            self._current = jobs
            for wants_map in (True, False):
                group = [j for j in jobs if j[1] == wants_map]
                if group:
                    self._run(group, wants_map)
            self._current = []

    def _run(self, group: list, wants_map: bool) -> None:
        try:
            pixels = np.stack([j[0] for j in group])
            if wants_map:
                heats, probs, class_probs, ood = cam_for_batch(self.predictor, pixels)
            else:
                heats = [None] * len(group)
                probs, class_probs, ood = self.predictor.score(pixels)
            for i, (_, _, done) in enumerate(group):
                done.set_result((heats[i], float(probs[i]), None if class_probs is None else class_probs[i],
                                 None if ood is None else float(ood[i])))
        except Exception as e:  # the callers get the error; the thread lives on
            for _, _, done in group:
                if not done.done():
                    done.set_exception(e)


def prepare_upload(predictor: Predictor, name: str, data: bytes) -> Decoded:
    """Decode one received file: the model's input, the image to draw an overlay on (at most
    `SHOWN_MAX_PX`), and warnings about the image: its header's (`dicom.acquisition_warnings`), then its
    size's. Raises `ImageLoadError`."""
    image = load_grey_with_info(data, name=name)
    grey = image.grey
    prep = predictor.config.preprocessing
    h, w = grey.shape
    warnings = list(image.warnings)
    if max(h, w) < prep.image_size:
        warnings.append(f"image is {w}x{h} px, smaller than the model's {prep.image_size}x{prep.image_size} input: enlarged")
    if max(h, w) > 2 * min(h, w):
        warnings.append(f"image is {w}x{h} px: squeezed into a square, which distorts it")
    shown = resize(grey, SHOWN_MAX_PX, "area") if max(grey.shape) > SHOWN_MAX_PX else grey
    return Decoded(resize(grey, prep.image_size, prep.resize_filter), shown, warnings)


class ScoringService:
    """Received bytes in, one `ImageResult` out, for one predictor and its single inference thread.

    `output` (an `OutputMap`; default: the predictor's) sets the prior and threshold a record is reported
    at. `score` and `score_decoded` raise `WorkerStopped` once the inference thread has stopped and
    `TimeoutError` when the image was not scored within `timeout` seconds; an unreadable image is not an
    error but a record whose `error` says why."""

    def __init__(self, predictor: Predictor, max_batch: int = 16):
        self.predictor = predictor
        self.batcher = InferenceBatcher(predictor, max_batch)

    @property
    def alive(self) -> bool:
        return self.batcher.alive

    @property
    def stopped(self) -> str | None:
        """Why the inference thread stopped, or None while it runs."""
        return self.batcher.stopped

    def decode(self, data: bytes, name: str) -> Decoded:
        """`prepare_upload` for this service's model (blocking). Raises `ImageLoadError`."""
        return prepare_upload(self.predictor, name, data)

    def score(self, data: bytes, name: str, heatmap: bool = False, output: Any = None,
              timeout: float | None = None) -> Scored:
        """Decode and score one image, waiting (blocking) for the inference thread."""
        try:
            decoded = self.decode(data, name)
        except ImageLoadError as e:
            return Scored(self.unreadable(name, e.reason, output))
        scores = self.batcher.score(decoded.pixels, heatmap, timeout)
        return self._scored(name, decoded, scores, output)

    async def score_decoded(self, decoded: Decoded, name: str, heatmap: bool = False, output: Any = None,
                            timeout: float | None = None) -> Scored:
        """Score one decoded image on the inference thread without blocking the event loop."""
        waiting = asyncio.wrap_future(self.batcher.submit(decoded.pixels, heatmap))
        scores = await asyncio.wait_for(waiting, timeout)
        return self._scored(name, decoded, scores, output)

    def unreadable(self, name: str, reason: str, output: Any = None) -> ImageResult:
        """The record of an image that could not be decoded, at `output`'s prior and threshold."""
        output = output or self.predictor.output
        ood = self.predictor.ood
        return ImageResult(name, None, None, output.decision_threshold, error=reason,
                           assumed_prevalence=output.prior_used, prevalence_source=output.source,
                           ood_threshold=None if ood is None else ood.threshold)

    def _scored(self, name: str, decoded: Decoded, scores: tuple, output: Any) -> Scored:
        """The inference thread's scores as the record at `output`'s prior (moved there by Bayes' rule)."""
        heat, prob, class_probs, ood = scores
        p = self.predictor
        output = output or p.output
        moved, moved_classes = move(np.array([prob]), None if class_probs is None else np.asarray(class_probs)[None],
                                    p.output.prior_used, output.prior_used)
        result = image_result(name, float(moved[0]), None if moved_classes is None else moved_classes[0],
                              p.class_names, output, p.ood, ood, decoded.warnings)
        return Scored(result, heat, decoded.shown)
