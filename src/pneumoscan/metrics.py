"""Classification metrics as pure functions of numpy arrays (labels 0/1, probabilities of class 1)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Confusion matrix [[tn, fp], [fn, tp]] and the usual rates at `threshold`; ROC AUC over all thresholds.

    Rates with an empty denominator are reported as None rather than a misleading 0.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    preds = (probs >= threshold).astype(int)
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
        "roc_auc": float(skm.roc_auc_score(labels, probs)) if both_classes else None,
        "average_precision": float(skm.average_precision_score(labels, probs)) if both_classes else None,
        "log_loss": float(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def roc_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = skm.roc_curve(np.asarray(labels).astype(int), np.asarray(probs))
    return fpr, tpr
