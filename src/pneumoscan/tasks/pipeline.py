"""The fast prediction pipeline: `Predictor.predict_files` with decoding overlapped with scoring.

This module owns `predict_files_pipelined`, a second implementation of the reference loop
`Predictor.predict_files` (which stays the plain, readable one), and `predict_file_fast`, the same for
`Predictor.predict_file` (one image: the fast loader only). Two differences, neither of which
changes a number (tests/test_pipeline.py holds the two equal on a trained checkpoint, with every backend):

* the next batch is decoded by a background thread while the current one is scored; at most `ahead`
  decoded batches wait, so memory stays bounded whatever the folder's size (Pillow, simplejpeg and the
  inference engines release the GIL, so the two overlap);
* files are decoded by `fast_decode.load_for_model_fast`: the same pixels as the reference loader.

The network and the out-of-distribution detector are scored in one pass (`Predictor.score`), the same
call the reference makes. The records come back in input order, a bad file with its error.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Protocol

import numpy as np

from ..io.fast_decode import load_for_model_fast
from ..io.images import ImageLoadError, LoadedImage
from ..io.records import ImageResult as Prediction

_DONE = object()


class Predictor(Protocol):
    """What the pipeline uses of `predict.Predictor` (named here, not imported: predict imports this module)."""

    batch_size: int
    prep: Any

    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]: ...

    def prediction(self, path: str, probability: float, class_probs: np.ndarray | None = None,
                   ood_score: float | None = None, warnings: list[str] | None = None) -> Prediction: ...

    def failure(self, path: str, error: str) -> Prediction: ...


def _decoded_batches(predictor: Predictor, paths: Iterable[str], out: queue.Queue, stop: threading.Event) -> None:
    """Fill `out` with lists of (path, LoadedImage or error text), `predictor.batch_size` decoded images
    each (failures ride along), then _DONE. Stops early when `stop` is set."""
    prep = predictor.prep
    batch: list[tuple[str, LoadedImage | str]] = []
    count = 0
    try:
        for path in paths:
            if stop.is_set():
                return
            try:
                batch.append((path, load_for_model_fast(path, prep.image_size, prep.resize_filter)))
                count += 1
            except ImageLoadError as e:
                batch.append((path, str(e)))
            if count >= predictor.batch_size:
                out.put(batch)
                batch, count = [], 0
        out.put(batch)
    except BaseException as e:  # handed to the consumer, which raises it where the caller can see it
        out.put(e)
    finally:
        out.put(_DONE)


def _records(predictor: Predictor, batch: list[tuple[str, LoadedImage | str]]) -> Iterator[Prediction]:
    """Score the decoded images of `batch` in one pass; records in the batch's order."""
    images = [(path, item) for path, item in batch if isinstance(item, LoadedImage)]
    probs, class_probs, ood = predictor.score(np.stack([im.grey for _, im in images])) if images else ([], None, None)
    i = 0
    for path, item in batch:
        if isinstance(item, str):
            yield predictor.failure(path, item)
            continue
        yield predictor.prediction(path, probs[i], None if class_probs is None else class_probs[i],
                                   None if ood is None else ood[i], item.warnings)
        i += 1


def predict_files_pipelined(predictor: Predictor, paths: Iterable[str], ahead: int = 2) -> Iterator[Prediction]:
    """`predictor.predict_files(paths)`, the same records in the same order, decoding while scoring
    (at most `ahead` decoded batches held)."""
    batches: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()
    worker = threading.Thread(target=_decoded_batches, args=(predictor, paths, batches, stop),
                              name="pneumoscan-decode", daemon=True)
    worker.start()
    try:
        while (batch := batches.get()) is not _DONE:
            if isinstance(batch, BaseException):
                raise batch
            yield from _records(predictor, batch)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            try:
                batches.get(timeout=0.05)
            except queue.Empty:
                pass


def predict_file_fast(predictor: Predictor, source: str | bytes, name: str | None = None) -> Prediction:
    """`predictor.predict_file(source, name)` through the fast loader: the same record, sooner."""
    label = name or str(source)
    try:
        image = load_for_model_fast(source, predictor.prep.image_size, predictor.prep.resize_filter, name=name)
        probs, class_probs, ood = predictor.score(image.grey[None])
    except ImageLoadError as e:
        return predictor.failure(label, str(e))
    return predictor.prediction(label, probs[0], None if class_probs is None else class_probs[0],
                                None if ood is None else ood[0], image.warnings)
