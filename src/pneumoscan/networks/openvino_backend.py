"""OpenVINO CPU inference on the exported ONNX model (see `export` for the graph's contract).

This module owns the OpenVINO backend: `OpenVinoPredictor` takes the same exported ONNX model as
`export.OnnxPredictor` (a .onnx file or its bytes) and offers the same methods (`run`, `run_all`,
`model_input`, `predict_arrays`, `predict_with_features`, `calibrated`, `label_of`), so `Predictor`
uses either one the same way.

Precision: ``"f32"`` (the default) sets ``INFERENCE_PRECISION_HINT=f32``: OpenVINO's default on a
CPU with native BF16 is BF16, which moves probabilities by up to about 0.01 (docs/performance.md);
in f32 they equal PyTorch's to about 1e-6. ``"bf16"`` is opt-in (`--backend openvino-bf16`); its
accuracy on validation is measured by ``benchmarks/bf16_accuracy.py``.

Compiling takes about 0.1 s; `compiled_model` keeps each compiled model for the life of the process,
keyed by the model's bytes, the precision and the thread count. One compiled model serves every
`OpenVinoPredictor` built on it; each predictor has its own infer request, used under a lock
(the web server scores from several threads).
OpenVINO is optional: ``pip install 'pneumoscan[openvino]'``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import numpy as np

from ..io.fileio import optional_import
from .export import INPUT_NAME, OnnxPredictor, default_threads, model_bytes, read_metadata

PRECISIONS = ("f32", "bf16")
_COMPILED: dict[tuple[str, str, int], Any] = {}
_COMPILE_LOCK = threading.Lock()


def _openvino() -> Any:
    return optional_import("openvino", "openvino", "the OpenVINO backend")


def native_bf16() -> bool:
    """True when OpenVINO's CPU plugin runs BF16 natively here (AVX-512 BF16 or AMX)."""
    return "BF16" in _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compiled_model(data: bytes, precision: str = "f32", threads: int | None = None, label: str = "<ONNX model>") -> Any:
    """The ONNX model `data` compiled for the CPU at `precision`, once per process (see the module docstring).

    The latency hint with one stream: pneumoscan scores one batch at a time, and on a small machine
    more streams only split the cores between requests that never run together."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    threads = threads or default_threads()
    key = (hashlib.sha256(data).hexdigest(), precision, threads)
    with _COMPILE_LOCK:
        if key not in _COMPILED:
            ov = _openvino()
            core = ov.Core()
            try:
                model = core.read_model(data, ov.Tensor(np.empty(0, np.uint8)))
            except Exception as e:  # OpenVINO's frontends raise several types for a bad file; all mean the same
                raise ValueError(f"{label}: not a readable ONNX model ({type(e).__name__}: {e})") from None
            config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads,
                      "INFERENCE_PRECISION_HINT": precision}
            _COMPILED[key] = core.compile_model(model, "CPU", config)
        return _COMPILED[key]


class OpenVinoPredictor(OnnxPredictor):
    """An exported model compiled by OpenVINO for the CPU: the methods of `OnnxPredictor`, another engine.

    `source` is a .onnx file written by `export_onnx` or its bytes; `precision` is ``"f32"`` or
    ``"bf16"``; `threads` as in `OnnxPredictor`."""

    def __init__(self, source: str | os.PathLike | bytes, precision: str = "f32", threads: int | None = None):
        label, data = model_bytes(source)
        self.compiled = compiled_model(data, precision, threads, label)
        self.metadata = read_metadata(data, label)
        self._set_fields(label)
        self.precision = precision
        self.threads = threads or default_threads()
        self.outputs = [o.get_any_name() for o in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Model input float32 (N, 1, S, S) -> (N,) probabilities."""
        return self.run_all(x)[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Model input float32 (N, 1, S, S) -> every output: probabilities, and features where the graph has them.
        The engine reads `x` in place; the results are copies: the infer request's own buffers are reused by
        its next run."""
        with self._lock:
            self._request.infer({INPUT_NAME: x}, share_inputs=True)
            return [self._request.get_tensor(name).data.copy() for name in self.outputs]
