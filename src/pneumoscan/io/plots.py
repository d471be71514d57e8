"""PNG plots of a run: training curves, ROC and PR curves, confusion matrix, reliability diagram, score
histograms per class (matplotlib, no display needed)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_write_bytes  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def training_curves(history: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy.png and loss.png: train and validation per epoch (the paper's Figure 12)."""
    if not history:
        return []
    epochs = [h["epoch"] for h in history]
    paths = []
    for key, title in (("accuracy", "Accuracy"), ("loss", "Loss")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{title} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out_dir / f"{key}.png"))
    return paths


def roc_curve_plot(fpr: Sequence[float], tpr: Sequence[float], auc: float | None, out: Path,
                   operating_point: tuple[float, float] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"ROC (AUC = {auc:.3f})" if auc is not None else "ROC")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    if operating_point:
        ax.plot(*operating_point, "o", color="crimson", label="operating point")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def confusion_matrix_plot(cm: Sequence[Sequence[int]], class_names: Sequence[str], out: Path, threshold: float) -> Path:
    """Counts with the share of their true class (row percentages): a row reads as that class's outcomes."""
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    shares = row_shares(cm)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)  # shaded by share, so a rare class's row is as readable
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            share = "n/a" if math.isnan(shares[i][j]) else f"{100 * shares[i][j]:.1f}%"
            ax.text(j, i, f"{v}\n{share}", ha="center", va="center", fontsize=12,
                    color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (threshold {threshold:.2f})\ncount and % of the true class", fontsize=10)
    return _save(fig, out)


def row_shares(cm: Sequence[Sequence[int]]) -> list[list[float]]:
    """Each count as a fraction of its row (its true class); NaN for a class with no images."""
    return [[v / sum(row) if sum(row) else float("nan") for v in row] for row in cm]


def score_histograms(labels: Sequence[int], probs: Sequence[float], threshold: float, out: Path,
                     class_names: Sequence[str] = ("NORMAL", "PNEUMONIA")) -> Path:
    """P(pneumonia) per true class, as two histograms over [0, 1], with the decision threshold drawn."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bins = np.linspace(0, 1, 26)
    for k, (name, colour) in enumerate(zip(class_names, ("tab:blue", "tab:orange"))):
        scores = probs[labels == k]  # filled and outlined, so a small class stays visible behind a large one
        ax.hist(scores, bins=bins, color=colour, alpha=0.3)
        ax.hist(scores, bins=bins, color=colour, histtype="step", lw=1.8, label=f"true {name} (n = {len(scores)})")
    ax.axvline(threshold, color="crimson", ls="--", lw=1.5, label=f"threshold {threshold:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("predicted probability of pneumonia")
    ax.set_ylabel("images")
    ax.set_title("Scores per true class")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def reliability_plot(calibration: dict[str, Any], out: Path) -> Path:
    """Reliability diagram: mean predicted probability vs observed fraction of pneumonia, per bin."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    bins = calibration["bins"]
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.plot([b["mean_probability"] for b in bins], [b["fraction_positive"] for b in bins], "o-",
            label=f"model (ECE = {calibration['ece']:.3f})")
    for b in bins:
        ax.annotate(str(b["n"]), (b["mean_probability"], b["fraction_positive"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -9))
    ax.set_xlabel("predicted probability of pneumonia")
    ax.set_ylabel("observed fraction with pneumonia")
    ax.set_title("Reliability diagram (n per bin)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def pr_curve_plot(recall: Sequence[float], precision: Sequence[float], ap: float | None, prevalence: float, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(recall, precision, label=f"PR (AP = {ap:.3f})" if ap is not None else "PR")
    ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"chance ({prevalence:.2f})")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall curve")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, out)
