"""Classification metrics as pure functions of numpy arrays (labels 0/1, probabilities of class 1).

The three-class task (normal / bacterial / viral) is scored twice: as pneumonia vs normal with the same
functions as the binary task (P(pneumonia) = P(bacterial) + P(viral)), and per class (`multiclass_metrics`).

scikit-learn is imported inside the functions that use it: it takes 1-2 s to load, which `pneumoscan --help`,
`predict` and a training run until its first validation need not wait for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Probabilities whose logits lie within this fraction of their size (and 1e-5 of each other below 1) rank as
# ties in ROC AUC, average precision and their curves. The inference forms of one model (training's network,
# the frozen form, ONNX) agree to float32's last bits, about 1e-6 of a logit; without a tolerance the ranking
# of a nearly constant model is decided by those bits, and two forms of one checkpoint report different AUCs.
# Measured on logits, the grouping does not change when a temperature rescales them.
TIE_TOLERANCE = 1e-5


def ranking_scores(probs: np.ndarray, tolerance: float = TIE_TOLERANCE) -> np.ndarray:
    """`probs` with each group of values whose logits lie within `tolerance` x max(1, |logit|) of the group's
    lowest replaced by that lowest, so that ranking metrics count them as ties (groups are formed greedily
    from the lowest value up)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.size == 0:
        return p
    z = np.log(np.clip(p, 1e-300, None)) - np.log(np.clip(1 - p, 1e-300, None))
    order = np.argsort(z, kind="stable")
    ranked = z[order]
    out = np.empty_like(p)
    start, first = ranked[0], p[order[0]]
    for i, v in enumerate(ranked):  # sequential by nature; a few milliseconds for 100,000 scores
        if v - start > tolerance * max(1.0, abs(start)):
            start, first = v, p[order[i]]
        out[order[i]] = first
    return out


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Confusion matrix [[tn, fp], [fn, tp]] and the usual rates at `threshold`; ROC AUC over all thresholds.

    Rates with an empty denominator are reported as None rather than a misleading 0.
    """
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    preds = (probs >= threshold).astype(int)
    ranked = ranking_scores(probs)
    (tn, fp), (fn, tp) = skm.confusion_matrix(labels, preds, labels=[0, 1])

    def ratio(a: int, b: int) -> float | None:
        return float(a / b) if b else None

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    both_classes = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": float(2 * precision * recall / (precision + recall)) if precision and recall else (0.0 if precision is not None and recall is not None else None),
        "roc_auc": float(skm.roc_auc_score(labels, ranked)) if both_classes else None,
        "average_precision": float(skm.average_precision_score(labels, ranked)) if both_classes else None,
        "log_loss": float(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def decide(p_pneumonia: np.ndarray, threshold: float, class_probs: np.ndarray | None = None) -> np.ndarray:
    """Predicted class: pneumonia when P(pneumonia) >= threshold; for three classes, then the likelier type."""
    pneumonia = np.asarray(p_pneumonia) >= threshold
    if class_probs is None:
        return pneumonia.astype(int)
    return np.where(pneumonia, 1 + np.argmax(np.asarray(class_probs)[:, 1:], axis=1), 0)


def multiclass_metrics(labels: np.ndarray, class_probs: np.ndarray, threshold: float,
                       class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, confusion matrix (rows true, columns predicted) and per-class figures
    (precision, recall, F1, one-vs-rest ROC AUC) for the decision rule of `decide`."""
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(class_probs, dtype=np.float64)
    k = probs.shape[1]
    preds = decide(1 - probs[:, 0], threshold, probs)
    cm = skm.confusion_matrix(labels, preds, labels=list(range(k)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, preds, labels=list(range(k)), zero_division=0)
    aucs = [float(skm.roc_auc_score(labels == c, ranking_scores(probs[:, c]))) if 0 < (labels == c).sum() < len(labels) else None
            for c in range(k)]
    present = [a for a in aucs if a is not None]
    return {
        "n": int(len(labels)),
        "accuracy": float((preds == labels).mean()),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, preds)),
        "macro_f1": float(np.mean(f1)),
        "macro_roc_auc": float(np.mean(present)) if present else None,
        "log_loss": float(skm.log_loss(labels, probs / probs.sum(1, keepdims=True), labels=list(range(k)))),
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class": {name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                             "roc_auc": aucs[c], "n": int(support[c])} for c, name in enumerate(class_names)},
    }


def roc_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import metrics as skm

    fpr, tpr, _ = skm.roc_curve(np.asarray(labels).astype(int), ranking_scores(probs))
    return fpr, tpr


def pr_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) along the precision-recall curve."""
    from sklearn import metrics as skm

    precision, recall, _ = skm.precision_recall_curve(np.asarray(labels).astype(int), ranking_scores(probs))
    return recall, precision


THRESHOLD_RULES = ("fixed", "youden", "sensitivity")


def choose_threshold(labels: np.ndarray, probs: np.ndarray, rule: str = "youden", target: float = 0.95,
                     fixed: float = 0.5) -> float:
    """A decision threshold chosen on validation data by a named rule.

    - fixed: `fixed` (the paper's 0.5);
    - youden: maximises sensitivity + specificity - 1 (Youden's J);
    - sensitivity: the highest threshold whose sensitivity is at least `target` (most specific such point).
    """
    if rule == "fixed":
        return float(fixed)
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation labels")
    fpr, tpr, thresholds = skm.roc_curve(labels, np.asarray(probs, dtype=np.float64))
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (predict nothing positive)
    if rule == "youden":
        j = np.where(finite, tpr - fpr, -np.inf)
        return float(thresholds[int(np.argmax(j))])
    if rule == "sensitivity":
        ok = np.flatnonzero(finite & (tpr >= target))
        return float(thresholds[ok[0]])  # thresholds decrease along the curve: the first is the highest
    raise ValueError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")


def stable_threshold(labels: np.ndarray, probs: np.ndarray, rule: str = "youden", target: float = 0.95,
                     fixed: float = 0.5, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """A threshold that does not sit at the edge of a plateau: the median of the rule's optimum over
    `n_boot` bootstrap resamples of the validation images (seeded), with its percentile interval.

    Candidate thresholds are the midpoints between neighbouring distinct scores, so a threshold never
    coincides with an image's score; where several candidates tie for the optimum, the middle one is taken.
    On a flat stretch the resamples' optima spread over it and their median lies inside it. `n_boot=0`
    gives the rule's optimum on the data itself (with the same midpoint convention). The fixed rule is
    returned as is, with no interval.
    """
    if rule == "fixed":
        return {"threshold": float(fixed), "interval": None, "resamples": 0, "point": float(fixed)}
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation labels")
    u, inv = np.unique(probs, return_inverse=True)
    cand = np.concatenate([[u[0]], (u[:-1] + u[1:]) / 2, [(u[-1] + 1) / 2]])  # candidate k: scores u[k:] positive
    n = len(labels)
    weights = [np.ones(n)]
    rng = np.random.default_rng(seed)
    weights += [np.bincount(rng.integers(0, n, n), minlength=n).astype(float) for _ in range(n_boot)]
    w = np.stack(weights)
    pos = np.stack([np.bincount(inv, weights=row * labels, minlength=len(u)) for row in w])
    neg = np.stack([np.bincount(inv, weights=row * (1 - labels), minlength=len(u)) for row in w])
    zero = np.zeros((len(w), 1))
    tp = np.concatenate([np.cumsum(pos[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    fp = np.concatenate([np.cumsum(neg[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    ok = (tp[:, 0] > 0) & (fp[:, 0] > 0)  # resamples holding both classes
    tpr, fpr = tp[ok] / tp[ok, :1], fp[ok] / fp[ok, :1]
    if rule == "youden":
        j = tpr - fpr
        best = j >= j.max(axis=1, keepdims=True) - 1e-12
        chosen = [int(np.flatnonzero(row)[(row.sum() - 1) // 2]) for row in best]  # middle of the tied optima
    else:
        reach = tpr >= target
        chosen = [int(np.flatnonzero(row)[-1]) for row in reach]  # the highest threshold reaching the target
    t = cand[np.array(chosen)]
    boots = t[1:] if n_boot else t
    alpha = (1 - level) / 2
    return {"threshold": float(np.median(boots)), "point": float(t[0]),
            "interval": [float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))] if n_boot else None,
            "resamples": int(len(boots)) if n_boot else 0}


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability table over equal-width probability bins and the expected calibration error (ECE)."""
    labels = np.asarray(labels).astype(float)
    probs = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        conf, freq, n = float(probs[mask].mean()), float(labels[mask].mean()), int(mask.sum())
        ece += n / len(probs) * abs(conf - freq)
        table.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "n": n,
                      "mean_probability": conf, "fraction_positive": freq})
    return {"ece": float(ece), "bins": table, "brier": float(np.mean((probs - labels) ** 2))}


CI_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "average_precision")


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict[str, list[float] | None]:
    """Percentile bootstrap confidence intervals (resampling images) for each metric at `threshold`."""
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(labels)
    preds = probs >= threshold
    ranked = ranking_scores(probs)
    samples: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        y, p, q = labels[idx], preds[idx], ranked[idx]
        tp = int(np.sum(p & (y == 1)))
        fp = int(np.sum(p & (y == 0)))
        fn = int(np.sum(~p & (y == 1)))
        tn = n - tp - fp - fn
        vals = {
            "accuracy": (tp + tn) / n,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp else None,
        }
        if 0 < y.sum() < n:
            vals["roc_auc"] = skm.roc_auc_score(y, q)
            vals["average_precision"] = skm.average_precision_score(y, q)
        for k, v in vals.items():
            if v is not None:
                samples[k].append(float(v))
    alpha = (1 - level) / 2
    return {k: ([float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] if len(v) >= n_boot // 2 else None)
            for k, v in samples.items()}


TRADE_OFF_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def threshold_table(labels: np.ndarray, probs: np.ndarray, thresholds: Any = TRADE_OFF_THRESHOLDS) -> list[dict[str, Any]]:
    """One row per distinct threshold, in increasing order: the counts (tp, fp, tn, fn) and sensitivity,
    specificity, PPV, NPV and accuracy when pneumonia is called at P >= threshold. A rate whose denominator is
    empty is None."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    positive = labels == 1

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    rows = []
    for t in sorted({float(t) for t in thresholds}):
        called = probs >= t
        tp, fp = int(np.sum(called & positive)), int(np.sum(called & ~positive))
        fn, tn = int(np.sum(~called & positive)), int(np.sum(~called & ~positive))
        rows.append({"threshold": t, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                     "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
                     "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "accuracy": ratio(tp + tn, len(labels))})
    return rows



# metric: ((true, predicted) cell of the confusion matrix counted as a success, ... as a failure)
PROPORTIONS = {"precision": ((1, 1), (0, 1)), "recall": ((1, 1), (1, 0)), "specificity": ((0, 0), (0, 1))}
CI_METHOD = ("Wilson score intervals for accuracy, precision, sensitivity and specificity; percentile bootstrap "
             "over images (1000 resamples) for F1, ROC AUC and average precision")


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson's score interval for a proportion: never outside [0, 1], and not collapsed to a point when
    every trial succeeded (12 of 12 gives [0.76, 1], where a bootstrap gives [1, 1]). None when n is 0."""
    from statistics import NormalDist

    if n == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def confidence_intervals(labels: np.ndarray, probs: np.ndarray, threshold: float, level: float = 0.95
                         ) -> tuple[dict[str, list[float] | None], list[str]]:
    """(the intervals of every headline metric (`CI_METHOD`), the names of those whose bootstrap collapsed
    to a single value, which a reader must not take for certainty: too few images, or no error to resample)."""
    cm = np.asarray(binary_metrics(labels, probs, threshold)["confusion_matrix"])
    out = {"accuracy": wilson_interval(int(cm[0, 0] + cm[1, 1]), int(cm.sum()), level)}
    for name, (success, failure) in PROPORTIONS.items():
        out[name] = wilson_interval(int(cm[success]), int(cm[success] + cm[failure]), level)
    boot = bootstrap_ci(labels, probs, threshold, level=level)
    out.update({k: boot[k] for k in ("f1", "roc_auc", "average_precision")})
    return out, [k for k, v in out.items() if v and v[0] == v[1]]
