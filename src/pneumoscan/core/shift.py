"""The arithmetic of fitting a model to a site from a batch of its images (`pneumoscan adapt` runs it).

Unlabelled images give two things.

- BatchNorm statistics (AdaBN, Li et al. 2016): every BatchNorm layer's mean and variance are re-estimated
  on the site's images, layer after layer in the order the forward pass meets them, so each layer sees its
  inputs as the adapted layers before it make them. The images are weighted so that the two classes count
  as they did in the batches training normalised with (`batchnorm_mix`): a site with fewer pneumonia cases
  would otherwise shift every feature, a change of mix read as a change of appearance. The weights come
  from the current estimate of the site's prevalence, and the two are refined together a few times. The
  site's statistics are blended with the training ones by n / (n + 16) (Schneider et al. 2020).
- The site's prevalence: EM (Saerens et al. 2002) on the adapted model's calibrated outputs, checked
  against black-box shift estimation (BBSE, Lipton et al. 2018) from the confusion matrix the checkpoint
  recorded on its validation split. When the two disagree beyond their intervals, or the confusion matrix
  barely separates the classes, the estimate is marked as not to be trusted, and why.

Labelled rows (`fit_labels`, a few dozen) then refit the calibration on the site itself, and estimate the
sensitivity and specificity to expect there by leave-one-out, with 95% intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .prevalence import estimate_prevalence, shift_prior, sigmoid

PRIOR_STRENGTH = 16  # images' worth of weight the training statistics keep (Schneider et al. 2020)
ROUNDS = 2  # rounds of (statistics, prevalence): a third moved the estimate by less than 1e-3 on the shift benchmark
MIN_IMAGES = 20  # fewer site images are refused
FEW_IMAGES = 100  # fewer give a warning: the statistics and the prevalence are then imprecise


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer being measured has seen its input."""


def batchnorm_layers(model: nn.Module, probe: torch.Tensor) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers in the order one forward pass of `probe` calls them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: order.append(m) if m not in order else None)
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    return order  # type: ignore[return-value]


@torch.no_grad()
def _weighted_moments(model: nn.Module, layer: nn.Module, batches: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) per channel of `layer`'s input over every image, each image weighted: per image, the
    mean of x and of x**2 over positions, then their weighted mean over images."""
    sums: dict[str, Any] = {"w": 0.0, "x": 0.0, "xx": 0.0}

    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        w = sums["batch_weights"].to(x.device, torch.float64)
        if len(x) != len(w):  # an ensemble's test-time views: every view of an image weighs as the image
            w = w.repeat(len(x) // len(w))
        dims = tuple(range(2, x.dim()))  # per image in the input's precision, across images in float64
        sums["x"] = sums["x"] + (w[:, None] * x.mean(dims).double()).sum(0)
        sums["xx"] = sums["xx"] + (w[:, None] * (x * x).mean(dims).double()).sum(0)
        sums["w"] += float(w.sum()) * (len(x) // len(sums["batch_weights"]))
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x, w in batches():
            sums["batch_weights"] = w
            try:
                model(x)
            except _Reached:
                pass
    finally:
        handle.remove()
    mean = sums["x"] / sums["w"]
    return mean, (sums["xx"] / sums["w"] - mean * mean).clamp(min=0)


def adapt_batchnorm(model: nn.Module, pixels: torch.Tensor, to_input: Callable[[torch.Tensor], torch.Tensor],
                    weights: np.ndarray, batch_size: int = 64, strength: float = PRIOR_STRENGTH) -> int:
    """Re-estimate `model`'s BatchNorm statistics (in place, eval mode) on (N, S, S) `pixels` weighted by
    `weights`, blended with the present statistics by n / (n + strength); returns the layers adapted."""
    model.eval()
    n = len(pixels)
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64) / np.mean(weights))

    def batches():
        for i in range(0, n, batch_size):
            yield to_input(pixels[i:i + batch_size]), w[i:i + batch_size]

    layers = batchnorm_layers(model, to_input(pixels[:1]))
    share = n / (n + strength)
    for layer in layers:
        mean, var = _weighted_moments(model, layer, batches)
        layer.running_mean.mul_(1 - share).add_(share * mean.to(layer.running_mean))
        layer.running_var.mul_(1 - share).add_(share * var.to(layer.running_var))
    return len(layers)


def class_weights(p_site: np.ndarray, site_prior: float, batchnorm_mix: float) -> np.ndarray:
    """Each image's weight so that the classes count as in training's batches: its posterior (at the site's
    prior) of each class times that class's ratio of training mix to site mix."""
    p = np.asarray(p_site, dtype=np.float64)
    return p * batchnorm_mix / site_prior + (1 - p) * (1 - batchnorm_mix) / (1 - site_prior)


def bbse(p_site: np.ndarray, threshold: float, sensitivity: float, specificity: float) -> float | None:
    """Black-box shift estimation for two classes: the prevalence that makes the validation confusion matrix
    give the site's share of positive decisions, clipped to [0, 1]; None when the matrix does not separate
    the classes (sensitivity + specificity <= 1)."""
    denominator = sensitivity + specificity - 1
    if denominator <= 0:
        return None
    q = float(np.mean(np.asarray(p_site) >= threshold))
    return float(np.clip((q + specificity - 1) / denominator, 0.0, 1.0))


@dataclass
class ValidationRecord:
    """What the checkpoint recorded of its validation split: calibrated P(pneumonia) and the truth."""

    probs: np.ndarray
    labels: np.ndarray

    def rates(self, threshold: float) -> tuple[float, float]:
        """(sensitivity, specificity) of decisions at `threshold`."""
        pred = self.probs >= threshold
        pos, neg = self.labels == 1, self.labels == 0
        return float(pred[pos].mean()), float((~pred[neg]).mean())


def prevalence_check(p_model: np.ndarray, model_prior: float, threshold: float,
                     validation: ValidationRecord | None, n_boot: int = 200) -> dict[str, Any]:
    """EM's estimate from calibrated outputs at `model_prior`, BBSE's from the validation confusion matrix
    (both with bootstrap intervals over images), and whether to trust them: `trusted` is False, with the
    reasons, when they disagree beyond both intervals, the matrix barely separates the classes, or the
    interval is wider than 0.2."""
    em = estimate_prevalence(p_model, model_prior, n_boot=n_boot)
    out = {"prevalence": em["prevalence"], "interval": em["interval"], "method": em["method"], "n": em["n"],
           "bbse": None, "bbse_interval": None, "trusted": True, "reasons": []}
    reasons = out["reasons"]
    if validation is None:
        reasons.append("the checkpoint records no validation outputs: no second estimate to check EM against")
    else:
        sens, spec = validation.rates(threshold)
        point = bbse(p_model, threshold, sens, spec)
        if point is None or sens + spec - 1 < 0.5:
            reasons.append(f"the validation decisions separate the classes too little for BBSE (sensitivity "
                           f"{sens:.3f} + specificity {spec:.3f} - 1 < 0.5)")
        if point is not None:
            rng = np.random.default_rng(0)
            boots = [bbse(p_model[rng.integers(0, len(p_model), len(p_model))], threshold, sens, spec)
                     for _ in range(n_boot)]
            lo, hi = np.quantile(boots, [0.025, 0.975])
            out.update(bbse=point, bbse_interval=[float(lo), float(hi)])
            em_lo, em_hi = em["interval"]
            if hi < em_lo or lo > em_hi:
                reasons.append(f"EM ({em['prevalence']:.3f}) and BBSE ({point:.3f}) disagree beyond both intervals: "
                               "the site differs in more than its class mix")
    if em["interval"] and em["interval"][1] - em["interval"][0] > 0.2:
        reasons.append(f"the interval {em['interval'][0]:.3f}-{em['interval'][1]:.3f} is wide: too few images")
    out["trusted"] = not [r for r in reasons if not r.startswith("the checkpoint records no")]
    return out


def em_weights_loop(score: Callable[[np.ndarray], np.ndarray], adapt: Callable[[np.ndarray], None],
                    model_prior: float, batchnorm_mix: float, rounds: int = ROUNDS) -> list[float]:
    """Alternate: weights from the current prevalence -> adapted statistics -> calibrated outputs -> EM's
    prevalence. `score(None)` gives the current model's calibrated P(pneumonia) at `model_prior`;
    `adapt(weights)` re-estimates the statistics from the training ones. Returns the estimates of each round."""
    prior = model_prior
    estimates = []
    for _ in range(rounds):
        p_model = score(None)
        p_site = shift_prior(p_model, model_prior, prior)
        adapt(class_weights(p_site, prior, batchnorm_mix))
        prior = estimate_prevalence(score(None), model_prior, n_boot=0)["prevalence"]
        estimates.append(prior)
    return estimates


def leave_one_out_rates(logits: np.ndarray, labels: np.ndarray, prevalence: float,
                        fit: Callable[[np.ndarray, np.ndarray], tuple[float, float]]) -> np.ndarray:
    """Each labelled row's decision when the calibration is fitted on the other rows, then moved from the
    labelled rows' mix to the site's `prevalence`, at even odds: the decisions that estimate the site's
    sensitivity and specificity without scoring a row with a fit it took part in."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels).astype(int)
    decisions = np.zeros(len(y), dtype=bool)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        temperature, offset = fit(y[keep], z[keep])
        p = sigmoid(z[i] / temperature + offset)
        decisions[i] = shift_prior(np.array([p]), float(y[keep].mean()), prevalence)[0] >= 0.5
    return decisions


def expected_rates(decisions: np.ndarray, labels: np.ndarray, prevalence: float,
                   prevalence_interval: Sequence[float] | None, level: float = 0.95, n_boot: int = 2000) -> dict[str, Any]:
    """Sensitivity and specificity from leave-one-out decisions (Wilson intervals) and the accuracy they give
    at the site's prevalence, with a bootstrap interval over the labelled rows of each class and over the
    prevalence's own interval."""
    from .metrics import wilson_interval

    y = np.asarray(labels).astype(int)
    right = np.asarray(decisions) == (y == 1)
    pos, neg = right[y == 1], right[y == 0]
    sens, spec = float(pos.mean()), float(neg.mean())
    rng = np.random.default_rng(0)
    lo_p, hi_p = prevalence_interval or (prevalence, prevalence)
    boots = []
    for _ in range(n_boot):
        s = pos[rng.integers(0, len(pos), len(pos))].mean()
        c = neg[rng.integers(0, len(neg), len(neg))].mean()
        pi = rng.uniform(lo_p, hi_p)
        boots.append(pi * s + (1 - pi) * c)
    alpha = (1 - level) / 2
    return {"sensitivity": sens, "sensitivity_ci95": wilson_interval(int(pos.sum()), len(pos), level),
            "specificity": spec, "specificity_ci95": wilson_interval(int(neg.sum()), len(neg), level),
            "accuracy": prevalence * sens + (1 - prevalence) * spec,
            "accuracy_ci95": [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))],
            "method": "leave-one-out over the labelled rows; accuracy at the site's estimated prevalence",
            "labelled": {"PNEUMONIA": int(len(pos)), "NORMAL": int(len(neg))}}
