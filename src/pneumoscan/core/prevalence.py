"""Prevalence is a property of the site: moving probabilities to another prior, and estimating a batch's prior.

- `shift_prior`: Bayes' rule for a change of class prior when P(image | class) stays the same (label
  shift): logit(p') = logit(p) + logit(P_new) - logit(P_old).
- `estimate_prevalence`: the EM method of Saerens, Latinne & Decaestecker (2002) on unlabelled images:
  alternately move every posterior to the current prior estimate and take their mean as the next estimate.
  It assumes the posteriors are calibrated at `model_prior`; the interval is a percentile bootstrap over
  images (every resample runs its own EM, all of them at once as one array).
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def shift_prior(probs: np.ndarray, old_prior: float, new_prior: float) -> np.ndarray:
    """Posteriors under class prior `old_prior` moved to `new_prior` (both strictly between 0 and 1)."""
    for name, v in (("old prior", old_prior), ("new prior", new_prior)):
        if v is None or not 0 < v < 1:
            raise ValueError(f"{name} must be strictly between 0 and 1, not {v!r}")
    return sigmoid(logit(probs) + logit(new_prior) - logit(old_prior))


def _em(logits: np.ndarray, model_prior: float, tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    """EM on each row of `logits` (R, n) at once: the prior estimate per row and the iterations run."""
    base = logits - logit(model_prior)
    prior = np.full(logits.shape[0], float(model_prior))
    for it in range(1, max_iter + 1):
        new = sigmoid(base + logit(prior)[:, None]).mean(axis=1)
        new = np.clip(new, 1e-6, 1 - 1e-6)
        if np.max(np.abs(new - prior)) < tol:
            return new, it
        prior = new
    return prior, max_iter


def estimate_prevalence(probs: np.ndarray, model_prior: float, n_boot: int = 200, level: float = 0.95,
                        seed: int = 0, tol: float = 1e-7, max_iter: int = 2000) -> dict[str, Any]:
    """The EM estimate of the pneumonia prevalence of the images whose calibrated posteriors (at
    `model_prior`) are `probs`, with a percentile bootstrap interval over images (`n_boot` resamples,
    seeded: the same input gives the same interval)."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if probs.size == 0:
        raise ValueError("estimating a prevalence needs at least one scored image")
    if model_prior is None or not 0 < model_prior < 1:
        raise ValueError("estimating a prevalence needs the model's training prevalence, which this checkpoint "
                         "does not record")
    z = logit(probs)
    point, iterations = _em(z[None], model_prior, tol, max_iter)
    interval = None
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, z.size, (n_boot, z.size))
        boots, _ = _em(z[idx], model_prior, tol, max_iter)
        alpha = (1 - level) / 2
        interval = [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))]
    return {"prevalence": float(point[0]), "interval": interval, "level": level, "n": int(z.size),
            "method": "EM (Saerens, Latinne & Decaestecker 2002)", "interval_method":
            f"percentile bootstrap over images, {n_boot} resamples", "iterations": iterations,
            "model_prior": float(model_prior), "mean_probability": float(probs.mean())}
