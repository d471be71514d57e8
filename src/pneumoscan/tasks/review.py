"""The error review of an evaluation, written beside its metrics.json for the report to show.

`write_review` owns `score_histogram.png` (P(pneumonia) per true class), `review.json` (the threshold
trade-off table, and the index of the gallery) and `gallery/`: thumbnails of the most confident false
positives and false negatives, and, where Grad-CAM is available (MONAI, `pip install
'pneumoscan[models]'`), their Grad-CAM overlays and those of a few true positives. Everything comes from
the arrays `evaluate` already holds: the thumbnails are the pixels the model was given, nothing is read
from disk again, and the model runs once more on a dozen images only.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.calibration import OutputMap
from ..core.config import Preprocessing
from ..core.metrics import TRADE_OFF_THRESHOLDS, threshold_table
from ..io import plots
from ..io.fileio import atomic_write_bytes, printable, write_json

GALLERY_SIZE = 6  # mistakes of each kind: enough to see a pattern, few enough to keep evaluation quick
TRUE_POSITIVES = 3  # Grad-CAM examples of images called pneumonia rightly, to compare the mistakes with
THUMBNAIL_MAX = 256  # px; larger inputs are shrunk for the report
KINDS = ("false_positive", "false_negative", "true_positive")


def pick_examples(labels: np.ndarray, probs: np.ndarray, threshold: float, n: int = GALLERY_SIZE,
                  n_true: int = TRUE_POSITIVES) -> dict[str, list[int]]:
    """Indices of the `n` most confident false positives (highest P) and false negatives (lowest P), and of
    the `n_true` most confident true positives, most confident first; ties keep the data's order."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    called = probs >= threshold

    def most(mask: np.ndarray, confidence: np.ndarray, k: int) -> list[int]:
        idx = np.flatnonzero(mask)
        return [int(i) for i in idx[np.argsort(-confidence[idx], kind="stable")][:k]]

    return {"false_positive": most(called & (labels == 0), probs, n),
            "false_negative": most(~called & (labels == 1), -probs, n),
            "true_positive": most(called & (labels == 1), probs, n_true)}


def write_review(out: str | os.PathLike, loaded: Any, paths: list[str], pixels: np.ndarray, labels: np.ndarray,
                 probs: np.ndarray, threshold: float, device: torch.device) -> dict[str, Any]:
    """Write the score histograms, `review.json` and `gallery/` of one evaluation into `out`; returns what
    `review.json` holds. `loaded` is the evaluated checkpoint (`checkpoint.load`); `paths`, `pixels` (N, S, S
    uint8, as the model saw them), `labels` (0/1) and `probs` (the reported P(pneumonia)) are aligned."""
    out = Path(out)
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    plots.score_histograms(labels, probs, threshold, out / "score_histogram.png")
    table = threshold_table(labels, probs, (*TRADE_OFF_THRESHOLDS, threshold))
    for row in table:
        row["operating"] = row["threshold"] == float(threshold)
    picks = pick_examples(labels, probs, threshold)
    order = [(kind, rank, i) for kind in KINDS for rank, i in enumerate(picks[kind], 1)]
    heats, reason = gradcam_maps(loaded, pixels[[i for _, _, i in order]], device) if order else (None, None)
    if heats is not None:
        atomic_write_bytes(out / "gallery" / "colour_bar.png", _encode(_colour_bar(), "PNG"))
    entries = []
    for n, (kind, rank, i) in enumerate(order):
        heat = None if heats is None else heats[n]
        if heat is None and kind == "true_positive":
            continue  # true positives are shown for their maps alone
        entries.append(_write_example(out, kind, rank, paths[i], pixels[i], int(labels[i]), float(probs[i]), heat))
    review = {"threshold": float(threshold), "trade_offs": table, "gallery": entries,
              "gradcam": {"available": heats is not None, "reason": reason}}
    write_json(out / "review.json", review)
    _forget_earlier(out / "gallery", {Path(e[k]).name for e in entries for k in ("thumbnail", "gradcam") if e[k]}
                    | ({"colour_bar.png"} if heats is not None else set()))
    return review


def _forget_earlier(folder: Path, kept: set[str]) -> None:
    """Remove what an earlier evaluation into the same folder left in gallery/ (its other mistakes), so the
    folder shows this evaluation's examples only; files of other names are not ours and stay."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        ours = f.name == "colour_bar.png" or f.name.startswith(tuple(f"{k}-" for k in KINDS))
        if ours and f.name not in kept and f.is_file():
            f.unlink(missing_ok=True)


@dataclass
class _Scorer:
    """What `explain.cam_for_batch` reads of a `Predictor`, over a model already loaded (loading the checkpoint
    again would cost more than the maps). The maps do not depend on the output map, whose probabilities are
    not used here."""
    model: nn.Module
    cam_layer: str | list[str]
    prep: Preprocessing
    device: torch.device
    output: OutputMap = field(default_factory=OutputMap)
    ood: None = None
    backend: str = "torch"
    onnx: None = None


def gradcam_maps(loaded: Any, pixels: np.ndarray, device: torch.device) -> tuple[np.ndarray | None, str | None]:
    """((N, S, S) Grad-CAM maps in [0, 1] of the checkpoint's model for `pixels`, None), or (None, why not)."""
    from .explain import cam_for_batch

    cam_layer = loaded.checkpoint.get("cam_layer") or getattr(loaded.model, "cam_layer", "")
    if not cam_layer:
        return None, "this model names no Grad-CAM layer"
    model = copy.deepcopy(loaded.model)  # Grad-CAM freezes parameters and turns off in-place ops: not the caller's
    try:
        heats = cam_for_batch(_Scorer(model, cam_layer, loaded.config.preprocessing, device), pixels)[0]
    except ImportError as e:  # MONAI is not installed: the report says what to install
        return None, str(e)
    return heats, None


def _write_example(out: Path, kind: str, rank: int, path: str, pixels: np.ndarray, label: int, prob: float,
                   heat: np.ndarray | None) -> dict[str, Any]:
    """gallery/<kind>-<rank>.jpg (and -gradcam.jpg with a map), and the gallery's index entry for them."""
    from .explain import overlay

    stem = f"gallery/{kind}-{rank}"
    atomic_write_bytes(out / f"{stem}.jpg", _encode(_shrink(pixels), "JPEG"))
    entry = {"kind": kind, "rank": rank, "path": printable(path), "true_label": label, "p_pneumonia": prob,
             "thumbnail": f"{stem}.jpg", "gradcam": None}
    if heat is not None:
        atomic_write_bytes(out / f"{stem}-gradcam.jpg", _encode(_shrink(overlay(pixels, heat)), "JPEG"))
        entry["gradcam"] = f"{stem}-gradcam.jpg"
    return entry


def _colour_bar() -> np.ndarray:
    from .explain import colour_bar

    return colour_bar(THUMBNAIL_MAX, 12)


def _shrink(image: np.ndarray) -> np.ndarray:
    """`image` at most THUMBNAIL_MAX px on its longer side."""
    h, w = image.shape[:2]
    scale = THUMBNAIL_MAX / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _encode(image: np.ndarray, fmt: str) -> bytes:
    """JPEG (quality 90: a tenth of a PNG's size for these images, which keeps the report light) or PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()
