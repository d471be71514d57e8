"""Prediction on image files and folders, with the checkpoint's own preprocessing.

`Predictor` is the Python API (load once, predict many); `predict_paths` is the batch job behind
`pneumoscan predict`: one CSV row per file, a bad file gets its error in its row and the job goes on.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .images import ImageLoadError, is_image_file, load_for_model
from .train import select_device


@dataclass
class Prediction:
    path: str
    probability: float | None
    label: str | None
    error: str | None = None


class Predictor:
    """A loaded checkpoint ready to score images: `predict_arrays`, `predict_file`, `predict_files`.

    `backend="onnx"` exports the model in memory (nothing is written; it takes seconds) and runs it
    with ONNX Runtime on the CPU (`pip install 'pneumoscan[onnx]'`); `"torch"` runs PyTorch on `device`.
    """

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", batch_size: int = 32,
                 backend: str = "torch"):
        if backend not in ("torch", "onnx"):
            raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'onnx'")
        if backend == "onnx" and device not in ("auto", "cpu"):
            raise ValueError(f"the onnx backend runs on the CPU only (device {device!r} was asked for)")
        self.backend = backend
        self.device = select_device("cpu" if backend == "onnx" else device)
        loaded = ckpt_io.load(checkpoint, self.device)
        self.model, self.config, self.threshold = loaded.model, loaded.config, loaded.threshold
        self.class_names = loaded.class_names
        self.cam_layer = loaded.checkpoint.get("cam_layer") or getattr(self.model, "cam_layer", "")
        self.prep = self.config.preprocessing
        self.batch_size = batch_size
        self.onnx = None
        if backend == "onnx":
            from .export import OnnxPredictor, export_onnx_bytes

            self.onnx = OnnxPredictor(export_onnx_bytes(checkpoint))

    def load(self, source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
        """File or bytes -> uint8 (S, S) pixels exactly as the model was trained on. Raises ImageLoadError."""
        return load_for_model(source, self.prep.image_size, self.prep.resize_filter, name=name)

    @torch.no_grad()
    def predict_arrays(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 -> (N,) probability of the positive class."""
        if self.onnx is not None:
            return self.onnx.predict_arrays(pixels)
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(self.device).unsqueeze(1).float()  # a copy: inputs may be read-only
        x = self.prep.normalize(x).contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.model(x)).float().cpu().numpy()

    def label_of(self, probability: float) -> str:
        return self.class_names[int(probability >= self.threshold)]

    def predict_file(self, source: str | os.PathLike | bytes, name: str | None = None) -> Prediction:
        label = name or str(source)
        try:
            p = float(self.predict_arrays(self.load(source, name=name)[None])[0])
        except ImageLoadError as e:
            return Prediction(label, None, None, str(e))
        return Prediction(label, p, self.label_of(p))

    def predict_files(self, paths: Iterable[str]) -> Iterator[Prediction]:
        """Score files in batches; unreadable files come back with their error, in input order."""
        batch: list[tuple[str, np.ndarray]] = []
        pending: list[Prediction | None] = []

        def flush() -> Iterator[Prediction]:
            probs = self.predict_arrays(np.stack([a for _, a in batch])) if batch else []
            it = iter(zip(batch, probs))
            for slot in pending:
                if slot is None:
                    (path, _), p = next(it)
                    yield Prediction(path, float(p), self.label_of(float(p)))
                else:
                    yield slot
            batch.clear()
            pending.clear()

        for path in paths:
            try:
                batch.append((path, self.load(path)))
                pending.append(None)
            except ImageLoadError as e:
                pending.append(Prediction(path, None, None, str(e)))
            if len(batch) >= self.batch_size:
                yield from flush()
        yield from flush()


def expand_paths(inputs: Iterable[str]) -> list[str]:
    """Files as given, folders searched recursively for images; a missing path is kept so it gets an error row."""
    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and is_image_file(f))
        else:
            found.append(str(p))
    return found


def predict_paths(checkpoint: str | os.PathLike, inputs: Iterable[str], out_csv: str | os.PathLike,
                  device: str = "auto", batch_size: int = 32, backend: str = "torch") -> list[Prediction]:
    predictor = Predictor(checkpoint, device=device, batch_size=batch_size, backend=backend)
    results = list(predictor.predict_files(expand_paths(inputs)))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "probability", "label", "error"])
    for r in results:
        w.writerow([r.path, "" if r.probability is None else f"{r.probability:.6f}", r.label or "", r.error or ""])
    ckpt_io.atomic_write_text(out_csv, buf.getvalue())
    return results
