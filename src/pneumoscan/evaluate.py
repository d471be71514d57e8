"""Evaluation of a checkpoint on one split: metrics.json, per-image predictions, plots and an HTML report.

This is the only stage that reads a test split. It rebuilds the split and the preprocessing from the
checkpoint (so `--split val` is exactly the validation set the run was trained against).
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from . import plots
from .data import cache_images, load_split, split_summary
from .metrics import binary_metrics, bootstrap_ci, calibration, pr_points, roc_points
from .report import write_eval_report
from .train import DeviceSplit, predict_logits, select_device


def evaluate(checkpoint: str | Path, split: str, out: str | Path, data_root: str | None = None, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """Score `checkpoint` on `split` of the data; writes metrics.json, predictions.csv and PNG plots into `out`."""
    out = Path(out)
    dev = select_device(device)
    loaded = ckpt_io.load(checkpoint, dev)
    cfg = loaded.config
    if data_root:
        cfg = replace(cfg, data=replace(cfg.data, root=str(data_root)))
    samples = load_split(cfg.data, split)
    cached = cache_images(samples, cfg.preprocessing, progress=progress)
    logits = predict_logits(loaded.model, DeviceSplit.from_cache(cached, dev), cfg)
    probs = torch.sigmoid(logits).float().cpu().numpy()
    labels = cached.labels
    metrics = binary_metrics(labels, probs, loaded.threshold)
    calib = calibration(labels, probs)
    result = {
        "checkpoint": str(checkpoint),
        "split": split,
        "data_root": cfg.data.root,
        "model": {"name": cfg.model.name, "activation": cfg.model.activation, "recipe": cfg.recipe,
                  "epoch": loaded.checkpoint.get("epoch")},
        **metrics,
        "threshold_rule": loaded.checkpoint.get("threshold_rule", {"rule": "fixed"}),
        "ci95": bootstrap_ci(labels, probs, loaded.threshold),
        "ci_method": "percentile bootstrap over images, 1000 resamples",
        "calibration": calib,
        "class_names": loaded.class_names,
        "data": split_summary(cached.samples),
        "unreadable_files": cached.errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    ckpt_io.write_json(out / "metrics.json", result)
    _write_predictions(out / "predictions.csv", [s.path for s in cached.samples], labels, probs, loaded.threshold, loaded.class_names)
    plots.training_curves(loaded.checkpoint.get("history", []), out)
    cm = metrics["confusion_matrix"]
    plots.confusion_matrix_plot(cm, loaded.class_names, out / "confusion_matrix.png", loaded.threshold)
    plots.reliability_plot(calib, out / "reliability.png")
    if metrics["roc_auc"] is not None:
        fpr, tpr = roc_points(labels, probs)
        op = (1 - metrics["specificity"], metrics["recall"])
        plots.roc_curve_plot(fpr, tpr, metrics["roc_auc"], out / "roc.png", op)
        recall, precision = pr_points(labels, probs)
        plots.pr_curve_plot(recall, precision, metrics["average_precision"], float(labels.mean()), out / "pr.png")
    write_eval_report(out)
    return result


def _write_predictions(path: Path, paths: list[str], labels, probs, threshold: float, class_names: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true_label", "probability", "predicted_label"])
    for p, y, q in zip(paths, labels, probs):
        w.writerow([p, class_names[int(y)], f"{q:.6f}", class_names[int(q >= threshold)]])
    ckpt_io.atomic_write_text(path, buf.getvalue())
