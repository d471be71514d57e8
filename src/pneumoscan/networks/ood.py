"""Knowing when not to answer: an out-of-distribution score on a model's features from several depths.

A Mahalanobis detector (Lee et al. 2018) on features from several depths: the outputs of the layers a
model names in `ood_layers` (for the paper's network its four convolutional blocks), each averaged over
its spatial positions and concatenated, so that low-level statistics (noise, textures, blank images)
count as well as the classifier's own features. Class-conditional means and one shared covariance are
fitted on the training split (Ledoit-Wolf shrinkage, so the inverse is stable); the threshold is a high
quantile of the validation split's scores (that score times 1 + 1e-4, so float noise between batchings
cannot flip the image at the quantile). The score of an image is its distance to the nearest class
mean; at or above the threshold the image is flagged as outside what the model was trained on.

The detector lives in the checkpoint under "ood" as plain types and tensors (loadable with
`torch.load(weights_only=True)`). A checkpoint without one gets no score (None), never an error.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..core.config import Preprocessing
from .inference import model_input

DEFAULT_QUANTILE = 0.99
THRESHOLD_MARGIN = 1e-4


def layers_of(model: nn.Module) -> tuple[str, ...]:
    """The modules whose outputs make the out-of-distribution features (the model's `ood_layers`)."""
    layers = tuple(getattr(model, "ood_layers", ()))
    if not layers:
        raise ValueError(f"{type(model).__name__} names no `ood_layers` for the out-of-distribution score")
    return layers


def _pooled(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> its mean over positions (N, C); (N, D) as it is."""
    return t.flatten(2).mean(-1) if t.dim() > 2 else t.flatten(1)


@contextlib.contextmanager
def captured_features(model: nn.Module, layers: tuple[str, ...] | list[str]) -> Iterator[Callable[..., torch.Tensor]]:
    """Within the block, each forward pass of `model` records the outputs of `layers` pooled over positions;
    the yielded function gives the last pass's, concatenated (N, D).

    Given `n`, it keeps the first n rows: a model that scores several views of each image in one batch
    (an ensemble with test-time augmentation) puts the images as they are first, and those rows are the
    features."""
    grabbed: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _a, out, name=name: grabbed.__setitem__(name, _pooled(out).detach().float())) for name in layers]
    try:
        yield lambda n=None: torch.cat([grabbed[name][:n] for name in layers], 1)
    finally:
        for h in handles:
            h.remove()


def forward_with_features(model: nn.Module, layers: tuple[str, ...] | list[str], x: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's output, the outputs of `layers` pooled over positions and concatenated (N, D)), in one
    forward pass."""
    with captured_features(model, layers) as features:
        out = model(x)
        return out, features(len(x))


@torch.no_grad()
def features_of(model: nn.Module, pixels: torch.Tensor, prep: Preprocessing, layers: tuple[str, ...],
                batch_size: int = 64) -> np.ndarray:
    """(N, D) float64 features at `layers` for (N, S, S) uint8 pixels on the model's device, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        chunks = [forward_with_features(model, layers, model_input(pixels[i:i + batch_size], prep))[1].double().cpu()
                  for i in range(0, len(pixels), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy()


@dataclass(frozen=True)
class Detector:
    """Mahalanobis distance to the nearest class mean under one shared precision matrix; flagged at or
    above `threshold` (the `quantile` of the validation scores)."""

    layers: tuple[str, ...]
    means: np.ndarray  # (K, D)
    precision: np.ndarray  # (D, D)
    threshold: float
    quantile: float
    val_flagged: float | None = None

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) distances for (N, D) features (non-finite features give +inf: flagged).

        With P = W W' (`_whitening`), (f - m)' P (f - m) = |(f - c)'W - (m - c)'W|^2 for any centre c (the
        mean of the class means): one product reads the D x D factor once for every class mean (it is larger
        than a core's cache, and reading it evicts the model's weights), in float32, the features' own
        precision, on centred features, so the scores keep about six significant digits far from the origin
        too (half the memory read of float64, 0.1 ms less per image beside an inference engine:
        experiments/bench_ood_scoring.py). A batch's product is PyTorch's, on the threads the model runs on:
        numpy's own BLAS threads would keep spinning after it and slow the next batch's convolutions
        (`predict.Predictor` runs it on one thread beside an inference engine). One image's is numpy's, which
        computes a single row on the calling thread alone, without PyTorch's overhead."""
        centre, factor, whitened_means = self._whitening
        f = torch.as_tensor(features).detach().cpu().double().numpy()
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite features: +inf below
            centred = (f - centre).astype(np.float32)
            y = centred @ factor if len(f) == 1 else (torch.from_numpy(centred) @ torch.from_numpy(factor)).numpy()
            d = (y[:, None, :] - whitened_means[None]).astype(np.float64)
            out = np.sqrt(np.einsum("nkd,nkd->nk", d, d).min(1))
        return np.where(np.isfinite(out), out, np.inf)

    @functools.cached_property
    def _whitening(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The centre c (D,), W with W W' = P (float32, from P's eigenvectors, negative rounding eigenvalues
        taken as 0) and (m - c)'W for every class mean (K, D, float32), computed once in float64."""
        values, vectors = np.linalg.eigh(self.precision)
        factor = vectors * np.sqrt(np.clip(values, 0.0, None))
        centre = self.means.mean(0)
        return centre, np.ascontiguousarray(factor, np.float32), ((self.means - centre) @ factor).astype(np.float32)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.threshold

    def to_checkpoint(self) -> dict[str, Any]:
        return {"method": "mahalanobis", "layers": list(self.layers), "means": torch.from_numpy(self.means),
                "precision": torch.from_numpy(self.precision), "threshold": float(self.threshold),
                "quantile": float(self.quantile), "val_flagged": self.val_flagged,
                "fitted_on": "train", "threshold_on": "val"}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> Detector | None:
        """The checkpoint's detector, or None when it has none."""
        d = ckpt.get("ood")
        if not isinstance(d, dict) or d.get("method") != "mahalanobis":
            return None
        return cls(tuple(str(n) for n in d["layers"]), torch.as_tensor(d["means"]).double().numpy(),
                   torch.as_tensor(d["precision"]).double().numpy(), float(d["threshold"]), float(d["quantile"]),
                   d.get("val_flagged"))

    def describe(self) -> dict[str, Any]:
        return {"method": "mahalanobis", "layers": list(self.layers), "threshold": self.threshold, "quantile": self.quantile,
                "val_flagged": self.val_flagged, "features": int(self.precision.shape[0])}


def fit_detector(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                 layers: tuple[str, ...], quantile: float = DEFAULT_QUANTILE) -> Detector:
    """Class means and a shared Ledoit-Wolf covariance from the training features, the threshold at
    `quantile` of the validation scores."""
    from sklearn.covariance import LedoitWolf

    if not 0 < quantile < 1:
        raise ValueError(f"the quantile must be strictly between 0 and 1, not {quantile!r}")
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels).astype(int)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    partial = Detector(tuple(layers), means, precision, np.inf, quantile)
    val_scores = partial.scores(val_features)
    # just above a validation score: a relative margin keeps float noise between batchings from flipping that image
    threshold = float(np.quantile(val_scores, quantile, method="higher")) * (1 + THRESHOLD_MARGIN)
    val_flagged = float(np.mean(val_scores >= threshold))
    return Detector(tuple(layers), means, precision, threshold, quantile, val_flagged)


def fit_for_model(model: nn.Module, train_pixels: torch.Tensor, train_labels: np.ndarray, val_pixels: torch.Tensor,
                  prep: Preprocessing, batch_size: int = 64, quantile: float = DEFAULT_QUANTILE) -> Detector:
    """Fit the detector on a model's features of the training pixels; threshold on the validation pixels.
    A model that averages over test-time views (an ensemble) gives the features of the images as they are
    through its `features_model()`, without scoring the other views."""
    if hasattr(model, "features_model"):
        model = model.features_model()
    layers = layers_of(model)
    train_f = features_of(model, train_pixels, prep, layers, batch_size)
    val_f = features_of(model, val_pixels, prep, layers, batch_size)
    return fit_detector(train_f, train_labels, val_f, layers, quantile)


def result_fields(score: float | None, detector: Detector | None) -> dict[str, Any]:
    """What every output records about one image: its score, the detector's threshold and whether the image is
    flagged (None: no detector, or no score)."""
    if detector is None or score is None:
        return {"ood_score": None, "ood_threshold": None if detector is None else detector.threshold,
                "outside_training": None}
    return {"ood_score": float(score) if np.isfinite(score) else None, "ood_threshold": detector.threshold,
            "outside_training": bool(score >= detector.threshold)}
