"""Prediction on image files and folders, with the checkpoint's own preprocessing.

`Predictor` is the Python API (load once, predict many); `predict_paths` is the batch job behind
`pneumoscan predict`: one CSV row per file, a bad file gets its error in its row and the job goes on.
`choose_backend` resolves `backend="auto"`. `Predictor.predict_files` is the plain reference loop;
`predict_paths` runs its fast form (`pipeline.predict_files_pipelined`), held equal to it by the tests.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..core.calibration import OutputMap, move, output_map
from ..core.metrics import decide
from ..core.prevalence import estimate_prevalence
from ..io.fileio import write_json
from ..io.images import ImageLoadError, LoadedImage, expand_paths, load_for_model_with_info
from ..io.records import ImageResult, result_cells, result_columns, write_results_csv
from ..networks import checkpoint as ckpt_io
from ..networks.ensemble_model import describe as describe_ensemble
from ..networks.inference import freeze, model_input
from ..networks.models import probabilities
from ..networks.ood import Detector, forward_with_features, result_fields
from ..networks.runtime import keep_freed_memory, select_device, torch_threads
from .adapt import summary as adaptation_summary

Prediction = ImageResult  # the name predict's Python API has always returned
BACKENDS = ("auto", "torch", "onnx", "openvino", "openvino-bf16")
EXACT_BY_SPEED = ("openvino", "onnx", "torch")  # fastest first, measured (docs/performance.md); each equals torch to 1e-5
_NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino"), "torch": ()}

log = logging.getLogger(__name__)


def choose_backend(backend: str, device: str = "auto") -> str:
    """`backend` itself, or for "auto" the fastest exact backend installed that can run on `device`:
    OpenVINO (f32), then ONNX Runtime, then PyTorch; PyTorch when a GPU is asked for or is the
    automatic device. The choice is logged. ValueError for an unknown backend, or an exported one (they
    run on the CPU) with another device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend not in ("auto", "torch") and device not in ("auto", "cpu"):
        raise ValueError(f"the {backend} backend runs on the CPU only (device {device!r} was asked for)")
    if backend != "auto":
        return backend
    if device not in ("auto", "cpu") or (device == "auto" and select_device("auto").type != "cpu"):
        chosen = "torch"
    else:
        chosen = next(b for b in EXACT_BY_SPEED if all(importlib.util.find_spec(m) for m in _NEEDS[b]))
    log.info("backend auto: %s, the fastest exact backend installed for this device", chosen)
    return chosen


def backend_for_model(asked: str, backend: str, class_names: list[str]) -> str:
    """`backend` (what `choose_backend` made of `asked`) for a model with `class_names`: the exported graph gives
    P(pneumonia) only, so "auto" falls back to torch for a three-class model and an exported backend asked
    for by name is a ValueError."""
    if backend == "torch" or len(class_names) <= 2:
        return backend
    if asked == "auto":
        return "torch"
    raise ValueError(f"the {backend} backend exports P(pneumonia) only; run three-class models with the torch backend")


def image_result(path: str, probability: float, class_probs: np.ndarray | None, class_names: list[str],
                 output: OutputMap, detector: Detector | None, ood_score: float | None = None,
                 warnings: list[str] | None = None) -> ImageResult:
    """The record of one scored image at `output`'s prior and threshold, flagged by `detector`."""
    threshold = output.decision_threshold
    chosen = decide(np.array([probability]), threshold, None if class_probs is None else np.asarray(class_probs)[None])
    per_class = None if class_probs is None else {n: float(p) for n, p in zip(class_names, class_probs)}
    return ImageResult(path, float(probability), class_names[int(chosen[0])], threshold, None, list(warnings or []),
                       per_class, output.prior_used, output.source, **result_fields(ood_score, detector))


class Predictor:
    """A loaded checkpoint ready to score images: `predict_arrays`, `predict_file`, `predict_files`.

    Every probability goes through the checkpoint's `OutputMap` (calibration, then `prevalence`: the site's
    prior, moved to by Bayes' rule; None keeps the model's own); `threshold` is the one that applies to them.
    `ood` is the checkpoint's out-of-distribution detector (None for a checkpoint without one): `score`
    gives each image's score with its probability, `ood_scores` the scores alone.

    `backend="onnx"` exports the model (seconds, the first time; the export is remembered in the cache
    folder, never beside the checkpoint) and runs it with ONNX Runtime on the CPU
    (`pip install 'pneumoscan[onnx]'`); `"openvino"` runs the same export with OpenVINO in FP32 and
    `"openvino-bf16"` in BF16 (`pip install 'pneumoscan[openvino]'`); `"torch"` runs PyTorch on `device`;
    `"auto"` picks one (`choose_backend`). `self.backend` is the backend chosen. A three-class model
    runs on torch only (auto picks torch for it).
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", batch_size: int = 32,
                 backend: str = "torch", prevalence: float | None = None):
        asked, backend = backend, choose_backend(backend, device)
        keep_freed_memory()
        self.device = select_device("cpu" if backend != "torch" else device)
        loaded = ckpt_io.load(checkpoint, self.device)
        self.backend = backend = backend_for_model(asked, backend, loaded.class_names)
        self.model = freeze(loaded.model)  # the frozen inference form: derived weights computed once, here
        self.config = loaded.config
        self.output = output_map(loaded.checkpoint, checkpoint, loaded.threshold)  # at an adapted site's prior
        if prevalence is not None:
            self.output = self.output.with_prior(prevalence)
        self.class_names = loaded.class_names
        self.cam_layer = loaded.checkpoint.get("cam_layer") or getattr(self.model, "cam_layer", "")
        self.ood = Detector.from_checkpoint(loaded.checkpoint)
        self.ensemble = describe_ensemble(loaded.checkpoint)  # '' for a single model
        self.adaptation = adaptation_summary(loaded.checkpoint)  # None unless fitted to a site by `adapt`
        self.prep = self.config.preprocessing
        self.batch_size = batch_size
        self.onnx = None if backend == "torch" else exported_engine(checkpoint, backend)

    @property
    def threshold(self) -> float:
        """The decision threshold for the probabilities this predictor reports (at its prior)."""
        return self.output.decision_threshold

    def set_prior(self, prevalence: float | None, source: str = "given") -> None:
        """Report probabilities at `prevalence` from now on (None: the model's own prior)."""
        self.output = self.output.with_prior(prevalence, source)

    def load(self, source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
        """File or bytes -> uint8 (S, S) pixels exactly as the model was trained on. Raises ImageLoadError."""
        return self.load_with_info(source, name).grey

    def load_with_info(self, source: str | os.PathLike | bytes, name: str | None = None) -> LoadedImage:
        """`load`, with the warnings of the file's header (`dicom.acquisition_warnings`). Raises ImageLoadError."""
        return load_for_model_with_info(source, self.prep.image_size, self.prep.resize_filter, name=name)

    def predict_arrays(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 -> (N,) probability of pneumonia."""
        return self.predict_details(pixels)[0]

    def predict_details(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, S, S) uint8 -> (P(pneumonia) (N,), per-class probabilities (N, K) for three-class models, else None)."""
        probs, class_probs, _ = self.score(pixels)
        return probs, class_probs

    @torch.no_grad()
    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(N, S, S) uint8 -> (P(pneumonia), per-class probabilities or None, out-of-distribution scores (N,)
        or None without a detector), from one forward pass on the torch backend."""
        if self.onnx is not None:  # the exported graph (ONNX Runtime, OpenVINO) gives the detector's features too
            probs, ood = engine_scores(self.onnx, self.ood, pixels)
            return (*self.output.apply(probs, None), ood)
        x = model_input(np.array(pixels, dtype=np.uint8), self.prep, self.device)  # a copy: inputs may be read-only
        if self.ood is None:
            return (*self.output.apply(*probabilities(self.model(x))), None)
        out, features = forward_with_features(self.model, self.ood.layers, x)
        return (*self.output.apply(*probabilities(out)), self.ood.scores(features))

    @torch.no_grad()
    def ood_scores(self, pixels: np.ndarray) -> np.ndarray | None:
        """(N, S, S) uint8 -> out-of-distribution scores (N,) from the PyTorch model, or None without a detector."""
        if self.ood is None:
            return None
        x = model_input(np.array(pixels, dtype=np.uint8), self.prep, self.device)
        return self.ood.scores(forward_with_features(self.model, self.ood.layers, x)[1])

    def label_of(self, probability: float, class_probs: np.ndarray | None = None, threshold: float | None = None) -> str:
        """Pneumonia at or above the threshold (default: this predictor's); for three classes, then the likelier type."""
        threshold = self.threshold if threshold is None else threshold
        return self.class_names[int(decide(np.array([probability]), threshold,
                                           None if class_probs is None else np.asarray(class_probs)[None])[0])]

    def prediction(self, path: str, probability: float, class_probs: np.ndarray | None = None,
                   ood_score: float | None = None, warnings: list[str] | None = None) -> ImageResult:
        """The record of one image scored by this predictor, at its prior."""
        return image_result(path, probability, class_probs, self.class_names, self.output, self.ood, ood_score, warnings)

    def failure(self, path: str, error: str) -> ImageResult:
        """The record of an image that could not be scored."""
        return ImageResult(path, None, None, error=error, ood_threshold=None if self.ood is None else self.ood.threshold)

    def predict_file(self, source: str | os.PathLike | bytes, name: str | None = None) -> Prediction:
        label = name or str(source)
        try:
            image = self.load_with_info(source, name=name)
            probs, class_probs, ood = self.score(image.grey[None])
        except ImageLoadError as e:
            return self.failure(label, str(e))
        return self.prediction(label, probs[0], None if class_probs is None else class_probs[0],
                               None if ood is None else ood[0], image.warnings)

    def predict_files(self, paths: Iterable[str]) -> Iterator[Prediction]:
        """Score files in batches; unreadable files come back with their error, in input order."""
        batch: list[tuple[str, LoadedImage]] = []
        pending: list[Prediction | None] = []

        def flush() -> Iterator[Prediction]:
            probs, class_probs, ood = self.score(np.stack([a.grey for _, a in batch])) if batch else ([], None, None)
            it = iter(enumerate(batch))
            for slot in pending:
                if slot is None:
                    i, (path, image) = next(it)
                    yield self.prediction(path, probs[i], None if class_probs is None else class_probs[i],
                                          None if ood is None else ood[i], image.warnings)
                else:
                    yield slot
            batch.clear()
            pending.clear()

        for path in paths:
            try:
                batch.append((path, self.load_with_info(path)))
                pending.append(None)
            except ImageLoadError as e:
                pending.append(self.failure(path, str(e)))
            if len(batch) >= self.batch_size:
                yield from flush()
        yield from flush()


def engine_scores(engine: Any, detector: Detector | None, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, S, S) uint8 -> (P(pneumonia) before the output map, out-of-distribution scores or None) from an
    exported model's engine in one pass. The detector runs on one PyTorch thread: on more, PyTorch's OpenMP
    workers spin after it and slow the engine's own threads on its next call (docs/performance.md)."""
    probs, features = engine.predict_with_features(pixels)
    if detector is None:
        return probs, None
    with torch_threads(1):
        return probs, detector.scores(features)


def exported_engine(checkpoint: str | os.PathLike, backend: str):
    """The exported model of `checkpoint` in ONNX Runtime or OpenVINO (`backend`)."""
    from ..networks.export import OnnxPredictor, remembered_onnx_bytes

    def engine(data: bytes):
        if backend == "onnx":
            return OnnxPredictor(data)
        from ..networks.openvino_backend import OpenVinoPredictor

        return OpenVinoPredictor(data, precision="bf16" if backend == "openvino-bf16" else "f32")

    try:
        return engine(remembered_onnx_bytes(checkpoint))
    except ValueError:  # a damaged cache entry: export again
        return engine(remembered_onnx_bytes(checkpoint, forget=True))


def parse_prevalence(value: str | float | None) -> float | str | None:
    """A `--prevalence` value: a number strictly between 0 and 1, "estimated", or None. ValueError otherwise."""
    if value is None or value == "estimated":
        return value
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--prevalence must be a number between 0 and 1 or 'estimated', not {value!r}") from None
    if not 0 < p < 1:
        raise ValueError(f"--prevalence must be strictly between 0 and 1, not {value!r}")
    return p


def estimate_and_apply(probs: np.ndarray, output: OutputMap, prevalence: float | str | None, estimate: bool
                       ) -> tuple[OutputMap, dict | None]:
    """For probabilities reported at the model's own prior: the EM estimate of their prevalence when asked
    for (`estimate`, or `prevalence="estimated"`), and the map to report with: the given prevalence, the
    estimate when `prevalence="estimated"`, else `output` as the checkpoint gives it (its model's prior,
    or an adapted site's)."""
    estimated = None
    at_model = output.with_prior(None)
    if estimate or prevalence == "estimated":
        estimated = estimate_prevalence(probs, at_model.model_prior)
    if prevalence == "estimated":
        return at_model.with_prior(estimated["prevalence"], "estimated"), estimated
    return at_model.with_prior(prevalence, "given") if prevalence is not None else output, estimated


def score_paths(checkpoint: str | os.PathLike, inputs: Iterable[str], device: str = "auto", batch_size: int = 32,
                backend: str = "torch", prevalence: float | str | None = None, estimate: bool = False
                ) -> tuple[list[Prediction], Predictor, dict | None]:
    """Score every image under `inputs`: (predictions, the predictor at the prior used, the EM estimate or None).
    With an estimate, images are scored at the model's prior and then moved to the prior used."""
    prevalence = parse_prevalence(prevalence)
    fixed = prevalence if isinstance(prevalence, float) and not estimate else None
    from .pipeline import predict_files_pipelined  # the fast form of predictor.predict_files

    predictor = Predictor(checkpoint, device=device, batch_size=batch_size, backend=backend, prevalence=fixed)
    results = list(predict_files_pipelined(predictor, expand_paths(inputs)))
    if fixed is not None or (prevalence is None and not estimate):
        return results, predictor, None
    scored = [i for i, r in enumerate(results) if r.p_pneumonia is not None]
    if not scored:
        raise ValueError("no image could be read, so no prevalence can be estimated")
    old, model_prior = predictor.output.prior_used, predictor.output.model_prior
    at_model, _ = move(np.array([results[i].p_pneumonia for i in scored]), None, old, model_prior)
    predictor.output, estimated = estimate_and_apply(at_model, predictor.output, prevalence, estimate)
    for i in scored:
        r = results[i]
        cp = None if r.probabilities is None else np.array([[r.probabilities[n] for n in predictor.class_names]])
        p, cp = move(np.array([r.p_pneumonia]), cp, old, predictor.output.prior_used)
        results[i] = predictor.prediction(r.path, float(p[0]), None if cp is None else cp[0], r.ood_score, r.warnings)
    return results, predictor, estimated


def predict_paths(checkpoint: str | os.PathLike, inputs: Iterable[str], out_csv: str | os.PathLike,
                  device: str = "auto", batch_size: int = 32, backend: str = "torch",
                  prevalence: float | str | None = None, estimate: bool = False
                  ) -> tuple[list[ImageResult], dict | None]:
    """Score every image under `inputs` and write `out_csv`: `path`, then the result record's columns
    (`records.result_columns`). With an estimate of the prevalence, it is also written to
    OUT_CSV.prevalence.json. Returns (the records, the estimate or None)."""
    results, predictor, estimated = score_paths(checkpoint, inputs, device, batch_size, backend, prevalence, estimate)
    names = predictor.class_names
    write_results_csv(out_csv, ["path", *result_columns(names)],
                      [{"path": r.path, **result_cells(r, names)} for r in results])
    if estimated is not None:
        write_json(f"{out_csv}.prevalence.json", {"estimate": estimated, **predictor.output.describe()})
    return results, estimated
