"""From a model's raw P(pneumonia) to the probabilities every command reports: calibration and the prior.

Two maps, both monotone in the logit, applied by one object (`OutputMap`) that evaluate, predict, explain
and serve all use:

1. Calibration fitted on validation only: temperature scaling (`fit_temperature`, logit / T) leaves the
   ranking (ROC AUC) unchanged and never moves a logit across 0, so decisions at 0.5 stay as they were;
   Platt scaling (`fit_platt`, logit / T + offset) also corrects a bias (a model trained with balanced
   class weights, or one whose outputs all sit on one side of 0.5), so that 0.5 means even odds at the
   validation split's prevalence, at the price of moving 0.5 decisions. Either keeps the ranking.
2. The prior (`prevalence.shift_prior`): the calibrated probabilities refer to the prevalence the model
   learnt (`model_prior`: the training split's pneumonia fraction, or 0.5 when the loss or the sampling
   balanced the classes; after Platt scaling, the validation split's); `--prevalence P` moves them to another site's prior by Bayes' rule.

The training loop's in-loop validation stays raw (it picks the best epoch). `evaluate` reports mapped
figures: for a recipe that does not calibrate (the paper's) they are the in-loop ones; with a temperature
they share the in-loop ranking (ROC AUC) and decisions, and differ in log loss and calibration error.

Convention: a checkpoint's threshold is on the calibrated scale at the model's prior. Under another prior
the fixed rule keeps its threshold (0.5 keeps meaning even odds, so decisions follow the new prior);
the youden and sensitivity rules pick a point of the ROC curve, which does not depend on prevalence, so
their threshold moves with the probabilities and their decisions stay the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .prevalence import logit, shift_prior, sigmoid

TEMPERATURE_BOUNDS = (0.05, 20.0)


def nll(labels: np.ndarray, logits: np.ndarray, temperature: float = 1.0, offset: float = 0.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / temperature + offset), computed stably from the logits."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(logits, dtype=np.float64) / temperature + offset
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T minimising the validation NLL of sigmoid(logit / T), searched over log T in
    [log 0.05, log 20] (scipy's bounded scalar minimiser). Needs both classes."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("fitting a temperature needs both classes in the validation labels")
    z = np.asarray(logits, dtype=np.float64)
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    res = minimize_scalar(lambda log_t: nll(y, z, math.exp(log_t)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    t = float(math.exp(res.x))
    return t if nll(y, z, t) <= nll(y, z, 1.0) else 1.0  # never worse on validation than leaving it alone


def fit_platt(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(temperature, offset) minimising the validation NLL of sigmoid(logit / temperature + offset): Platt
    scaling on the logit, fitted with scipy's BFGS from (1, 0). A fit whose slope is not positive (it would
    reverse the ranking) or that is no better than leaving the logits alone gives (1, 0)."""
    from scipy.optimize import minimize

    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("fitting a calibration needs both classes in the validation labels")
    z = np.asarray(logits, dtype=np.float64)

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        s = ab[0] * z + ab[1]
        r = sigmoid(s) - y  # d loss / d s
        return float(np.mean(np.logaddexp(0.0, s) - y * s)), np.array([np.mean(r * z), np.mean(r)])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="BFGS")
    a, b = (float(v) for v in res.x)
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 1e-6 or nll(y, z, 1 / a, b) > nll(y, z):
        return 1.0, 0.0
    return 1 / a, b


def fit_offset(labels: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    """The offset minimising the NLL of sigmoid(logit / temperature + offset), the temperature kept: Platt
    scaling's intercept alone. For a few dozen labelled images, which a model often separates perfectly, a
    fitted slope runs away (probabilities of 0 and 1); one parameter stays well determined."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("fitting an offset needs both classes in the labels")
    s = np.asarray(logits, dtype=np.float64) / temperature
    res = minimize_scalar(lambda b: float(np.mean(np.logaddexp(0.0, s + b) - y * (s + b))), bounds=(-30.0, 30.0),
                          method="bounded", options={"xatol": 1e-8})
    return float(res.x)


def model_prior_of(train_prevalence: float | None, class_weight: str, sampling: str) -> float | None:
    """The prior the model's probabilities refer to: 0.5 when the loss or the sampling balanced the classes,
    else the training split's prevalence (None when unknown)."""
    if class_weight == "balanced" or sampling == "balanced":
        return 0.5
    return train_prevalence


@dataclass(frozen=True)
class OutputMap:
    """Raw P(pneumonia) -> reported probability: logit / temperature, then a shift from `model_prior` to
    `prior`. `threshold` is the checkpoint's (calibrated scale, model prior); `decision_threshold` is the
    one to apply to the reported probabilities."""

    temperature: float = 1.0
    offset: float = 0.0  # Platt scaling's intercept, added to logit / temperature
    model_prior: float | None = None
    prior: float | None = None  # None: the model's own prior
    source: str = "model"  # model | given | estimated | adapted
    threshold: float = 0.5
    moves_threshold: bool = False  # youden / sensitivity: an ROC point, moved with the probabilities
    train_prevalence: float | None = None
    threshold_interval: list[float] | None = None

    @property
    def prior_used(self) -> float | None:
        return self.model_prior if self.prior is None else self.prior

    def with_prior(self, prior: float | None, source: str = "given") -> OutputMap:
        """This map moving outputs to `prior` (None: back to the model's prior). ValueError when the
        model's prior is unknown or `prior` is not strictly between 0 and 1."""
        if prior is None:
            return replace(self, prior=None, source="model")
        if not 0 < prior < 1:
            raise ValueError(f"prevalence must be strictly between 0 and 1, not {prior!r}")
        if self.model_prior is None:
            raise ValueError("the checkpoint does not record the prevalence it was trained at (no train_prevalence "
                             "and no split.json beside it), so its probabilities cannot be moved to another prior")
        return replace(self, prior=float(prior), source=source)

    def apply(self, probs: np.ndarray, class_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(reported P(pneumonia), per-class probabilities or None). The identity, bit for bit, when there is
        nothing to do; for three classes the pneumonia types keep their ratio and NORMAL gets the rest."""
        probs = np.asarray(probs)
        if self.temperature == 1.0 and self.offset == 0.0 and self.prior is None:
            return probs, class_probs
        q = sigmoid(logit(probs) / self.temperature + self.offset)
        if self.prior is not None:
            q = shift_prior(q, self.model_prior, self.prior)
        return _with_pneumonia(probs, class_probs, q)

    @property
    def decision_threshold(self) -> float:
        if not self.moves_threshold or self.prior is None:
            return self.threshold
        return float(shift_prior(np.array([self.threshold]), self.model_prior, self.prior)[0])

    def describe(self) -> dict[str, Any]:
        """What every output records about the map: calibration, prior used and where it came from."""
        method = "platt" if self.offset != 0.0 else "temperature" if self.temperature != 1.0 else "none"
        return {"calibration": {"method": method, "temperature": self.temperature, "offset": self.offset},
                "prior": self.prior_used, "prior_source": self.source, "model_prior": self.model_prior,
                "train_prevalence": self.train_prevalence, "threshold": self.decision_threshold,
                "checkpoint_threshold": self.threshold, "threshold_interval": self.threshold_interval}


def _with_pneumonia(probs: np.ndarray, class_probs: np.ndarray | None, q: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """`q` (float64: moved probabilities keep their order against a moved threshold to float64 precision) as
    the new P(pneumonia); per-class probabilities rescaled to it (the pneumonia types keep their ratio,
    NORMAL gets the rest)."""
    if class_probs is None:
        return q, None
    p = probs.astype(np.float64)
    cp = np.asarray(class_probs, dtype=np.float64)
    scale = np.divide(q, p, out=np.ones_like(q), where=p > 0)
    moved = np.concatenate([(1 - q)[:, None], cp[:, 1:] * scale[:, None]], axis=1)
    return q, moved


def move(probs: np.ndarray, class_probs: np.ndarray | None, old_prior: float | None, new_prior: float | None
         ) -> tuple[np.ndarray, np.ndarray | None]:
    """Reported probabilities at `old_prior` moved to `new_prior` (the identity when the two are equal)."""
    if new_prior is None or old_prior == new_prior:
        return np.asarray(probs), class_probs
    return _with_pneumonia(probs, class_probs, shift_prior(probs, old_prior, new_prior))


def calibration_of(ckpt: dict[str, Any]) -> tuple[float, float]:
    """(temperature, offset) a checkpoint stores; (1, 0) when it has no calibration."""
    cal = ckpt.get("calibration") or {}
    if cal.get("method") not in ("temperature", "platt"):
        return 1.0, 0.0
    return float(cal.get("temperature", 1.0)), float(cal.get("offset", 0.0))


def split_prevalence(checkpoint_path: str | Path) -> float | None:
    """The train split's pneumonia fraction from split.json beside a checkpoint, or None."""
    path = Path(checkpoint_path).parent / "split.json"
    try:
        summary = json.loads(path.read_text())["train"]["summary"]
        return float(summary["pneumonia"]) / float(summary["images"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def output_map(ckpt: dict[str, Any], path: str | Path, threshold: float) -> OutputMap:
    """The map a checkpoint asks for. A checkpoint without these fields keeps its raw probabilities
    (temperature 1) and takes its training prevalence from split.json beside it, when there is one. An
    adapted checkpoint (`pneumoscan adapt`) reports at its site's prevalence (source "adapted");
    `.with_prior(None)` gives the map at the model's own prior."""
    from .config import Config

    temperature, offset = calibration_of(ckpt)
    train_prev = ckpt.get("train_prevalence")
    train_prev = float(train_prev) if train_prev is not None else split_prevalence(path)
    model_prior = ckpt.get("model_prior")
    if model_prior is None:
        t = Config.from_dict(ckpt["config"]).train
        model_prior = model_prior_of(train_prev, t.class_weight, t.sampling)
    rule = (ckpt.get("threshold_rule") or {}).get("rule", "fixed")
    interval = ckpt.get("threshold_interval")
    at_model = OutputMap(temperature=temperature, offset=offset,
                         model_prior=None if model_prior is None else float(model_prior), threshold=float(threshold),
                         moves_threshold=rule in ("youden", "sensitivity"), train_prevalence=train_prev,
                         threshold_interval=list(interval) if interval else None)
    site = (ckpt.get("adaptation") or {}).get("prevalence")
    return at_model.with_prior(float(site["prevalence"]), "adapted") if site else at_model
