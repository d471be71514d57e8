"""Evaluation of a checkpoint on one split: metrics.json, per-image predictions, plots and an HTML report.

This is the only stage that reads a test split. It rebuilds the split and the preprocessing from the
checkpoint (so `--split val` is exactly the validation set the run was trained against).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.calibration import OutputMap, move, output_map
from ..core.metrics import (CI_METHOD, binary_metrics, calibration, confidence_intervals, multiclass_metrics, pr_points,
                            roc_points)
from ..core.overlap import training_overlap
from ..io import plots
from ..io.data import DataError, cache_images, load_split, split_summary, task_labels
from ..io.fileio import write_json
from ..io.provenance import provenance
from ..io.records import result_cells, result_columns, write_results_csv
from ..networks import checkpoint as ckpt_io
from ..networks.ensemble_model import describe as describe_ensemble
from ..networks.inference import freeze, model_input, predict_logits
from ..networks.models import probabilities
from ..networks.ood import Detector, forward_with_features
from ..networks.runtime import keep_freed_memory, select_device
from .adapt import summary as adaptation_summary
from .predict import backend_for_model, choose_backend, engine_scores, estimate_and_apply, exported_engine, image_result, parse_prevalence
from .report import write_eval_report
from .review import write_review

# Fewer images of a class than this, or an accuracy interval wider than MAX_INTERVAL, gets a warning.
MIN_PER_CLASS = 30
MAX_INTERVAL = 0.10


def evaluate(checkpoint: str | Path, split: str, out: str | Path, data_root: str | None = None, device: str = "auto",
             progress: bool = True, prevalence: float | str | None = None, estimate: bool = False,
             allow_training_images: bool = False, backend: str = "torch") -> dict[str, Any]:
    """Score `checkpoint` on `split` of the data; writes metrics.json, predictions.csv and PNG plots into `out`.

    Probabilities go through the checkpoint's `OutputMap`, as in predict: calibration, then `prevalence`
    (a number, or "estimated": the EM estimate from the images alone, never their labels). `estimate`
    records the estimate without using it. When the prior moved, the figures at the model's own prior are
    kept under "at_model_prior" for comparison. Images the checkpoint was trained on are refused (DataError)
    unless `split` is "train" or `allow_training_images`; what makes the figures weak is in "warnings".
    `backend` scores as predict's does (torch is the reference); it is recorded as "backend"."""
    keep_freed_memory()
    asked, backend = backend, choose_backend(backend, device)
    dev = select_device("cpu" if backend != "torch" else device)
    loaded = ckpt_io.load(checkpoint, dev, data_root)
    backend = backend_for_model(asked, backend, loaded.class_names)
    cfg = loaded.config
    samples = load_split(cfg.data, split)
    cached = cache_images(samples, cfg.preprocessing, progress=progress)
    overlap = _checked_overlap(loaded, checkpoint, split, cached, allow_training_images)
    classes = task_labels(cached.samples, cfg.data.task)
    detector = Detector.from_checkpoint(loaded.checkpoint)
    raw_probs, raw_class_probs, ood_scores = _raw_scores(loaded, checkpoint, backend, cached.pixels, dev, detector)
    base, output, estimated, model_probs, probs, class_probs = _mapped(loaded, checkpoint, raw_probs, raw_class_probs,
                                                                      prevalence, estimate)
    threshold = output.decision_threshold
    labels = (classes > 0).astype(int)
    metrics = binary_metrics(labels, probs, threshold)
    calib = calibration(labels, probs)
    intervals, degenerate = confidence_intervals(labels, probs, threshold)
    result = {
        "checkpoint": str(checkpoint),
        "split": split,
        "backend": backend,
        "data_root": cfg.data.root,
        "model": {"name": cfg.model.name, "activation": cfg.model.activation, "recipe": cfg.recipe,
                  "epoch": loaded.checkpoint.get("epoch"), "ensemble": describe_ensemble(loaded.checkpoint) or None},
        **metrics,
        "threshold_rule": loaded.checkpoint.get("threshold_rule", {"rule": "fixed"}),
        "operating_point": output.describe(),
        "prior": output.prior_used,
        "prior_source": output.source,
        "prevalence_estimate": estimated,
        "adaptation": adaptation_summary(loaded.checkpoint),
        "at_model_prior": _unadjusted(labels, model_probs, base) if output.prior is not None else None,
        "ci95": intervals,
        "ci_method": CI_METHOD,
        "warnings": evaluation_warnings(split, labels, intervals, degenerate, overlap),
        "training_overlap": overlap,
        "calibration": calib,
        "class_names": loaded.class_names,
        "data": split_summary(cached.samples),
        "unreadable_files": cached.errors,
        "ood": _ood_summary(detector, ood_scores),
        "provenance": provenance(checkpoint, cfg.data.root, split, dev),
    }
    if class_probs is not None:  # the figures above are pneumonia vs normal; these are per class
        result["three_class"] = multiclass_metrics(classes, class_probs, threshold, loaded.class_names)
    _write_outputs(Path(out), result, loaded, cached, classes, labels, probs, class_probs, output, ood_scores, detector, dev)
    return result


def _write_outputs(out: Path, result: dict[str, Any], loaded: Any, cached: Any, classes: np.ndarray, labels: np.ndarray,
                   probs: np.ndarray, class_probs: np.ndarray | None, output: OutputMap, ood_scores: Any, detector: Any,
                   dev: torch.device) -> None:
    """Everything `evaluate` writes into `out`: metrics.json, predictions.csv, the plots, the review and the report."""
    threshold = output.decision_threshold
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    _write_predictions(out / "predictions.csv", [s.path for s in cached.samples], classes, probs, class_probs,
                       loaded.class_names, output, ood_scores, detector)
    _plots(out, loaded, result, labels, probs, threshold)
    write_review(out, loaded, [s.path for s in cached.samples], cached.pixels, labels, probs, threshold, dev)
    write_eval_report(out)


def _checked_overlap(loaded: Any, checkpoint: str | Path, split: str, cached: Any,
                     allow_training_images: bool) -> dict[str, Any]:
    """The scored images' overlap with the checkpoint's training images (`training_overlap`); DataError when
    there is any and `split` is not "train", unless `allow_training_images`."""
    overlap = training_overlap(loaded.checkpoint, cached.pixels, [s.path for s in cached.samples],
                               [s.patient for s in cached.samples])
    if split != "train" and overlap["images"] and not allow_training_images:
        raise DataError(f"{overlap['images']} of the {len(cached.samples)} images of the {split} split under "
                        f"{loaded.config.data.root} are images {checkpoint} was trained on (pixel for pixel), e.g. "
                        f"{', '.join(overlap['examples'][:3])}: their figures would say nothing about new patients. "
                        "Evaluate on images the model has not seen, or pass --allow-training-images to score them anyway")
    return overlap


def _mapped(loaded: Any, checkpoint: str | Path, raw_probs: np.ndarray, raw_class_probs: np.ndarray | None,
            prevalence: float | str | None, estimate: bool
            ) -> tuple[OutputMap, OutputMap, dict[str, Any] | None, np.ndarray, np.ndarray, np.ndarray | None]:
    """The raw probabilities through the checkpoint's `OutputMap`, as in predict: (the map at the model's own
    prior, the map used, the prevalence estimate, probabilities at the model's prior, probabilities used, per-class
    probabilities used)."""
    default = output_map(loaded.checkpoint, checkpoint, loaded.threshold)  # an adapted site's prior, or the model's
    base = default.with_prior(None)
    model_probs, model_class_probs = base.apply(raw_probs, raw_class_probs)
    output, estimated = estimate_and_apply(model_probs, default, parse_prevalence(prevalence), estimate)
    probs, class_probs = move(model_probs, model_class_probs, base.prior_used, output.prior_used)
    return base, output, estimated, model_probs, probs, class_probs


def evaluation_warnings(split: str, labels: np.ndarray, intervals: dict[str, Any], degenerate: list[str],
                        overlap: dict[str, Any]) -> list[str]:
    """What a reader of these figures must know: too few images, intervals that collapsed, training images
    or training patients among the scored ones, or a checkpoint that cannot tell."""
    found = []
    counts = {"NORMAL": int((labels == 0).sum()), "PNEUMONIA": int((labels == 1).sum())}
    few = [f"{n} {name}" for name, n in counts.items() if n < MIN_PER_CLASS]
    acc = intervals.get("accuracy")
    if few or (acc and acc[1] - acc[0] > MAX_INTERVAL):
        found.append(f"few images: {len(labels)} ({', '.join(few) or 'both classes'} under {MIN_PER_CLASS} or an "
                     f"accuracy interval of {acc[0]:.3f}-{acc[1]:.3f}); these figures are imprecise")
    if degenerate:
        found.append(f"the bootstrap intervals of {', '.join(degenerate)} collapsed to one value: too few images "
                     "(or errors) to resample, not certainty")
    if split != "train":
        if overlap["images"]:
            found.append(f"{overlap['images']} images are training images of this checkpoint, pixel for pixel")
        if overlap["patients"]:
            found.append(f"{overlap['patients']} images belong to patients the checkpoint was trained on (by file "
                         "name): figures overstate what to expect on new patients")
        if not overlap["checked"]:
            found.append("the checkpoint records no training images (written before pneumoscan recorded them; "
                         "`pneumoscan fit-ood` adds the record): overlap with its training split was not checked")
    return found


def _raw_scores(loaded: Any, checkpoint: str | Path, backend: str, pixels: np.ndarray, dev: torch.device,
                detector: Detector | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(P(pneumonia) before the output map, per-class probabilities for three classes else None, OOD scores
    or None) of the cached pixels, from `backend`."""
    prep, batch_size = loaded.config.preprocessing, loaded.config.train.eval_batch_size
    if backend == "torch":
        logits, ood_scores = _scores(freeze(loaded.model), torch.from_numpy(pixels).to(dev), prep, batch_size, detector)
        return (*probabilities(logits), ood_scores)  # P(pneumonia) for either task; per class for three classes
    raw_probs, ood_scores = _engine_scores(checkpoint, backend, pixels, batch_size, detector)
    return raw_probs, None, ood_scores


@torch.no_grad()
def _scores(model: torch.nn.Module, pixels: torch.Tensor, prep: Any, batch_size: int, detector: Detector | None):
    """(the model's outputs, out-of-distribution scores or None without a detector), in one pass."""
    if detector is None:
        return predict_logits(model, pixels, prep, batch_size), None
    outs, scores = [], []
    for i in range(0, len(pixels), batch_size):
        out, features = forward_with_features(model, detector.layers, model_input(pixels[i:i + batch_size], prep))
        outs.append(out)
        scores.append(detector.scores(features))
    return torch.cat(outs), np.concatenate(scores)


def _engine_scores(checkpoint: str | Path, backend: str, pixels: np.ndarray, batch_size: int, detector: Detector | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(P(pneumonia) before calibration, out-of-distribution scores or None) from the exported model in
    `backend`, batch by batch, as `predict.Predictor.score` computes them."""
    engine = exported_engine(checkpoint, backend)
    batches = [engine_scores(engine, detector, pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return np.concatenate([p for p, _ in batches]), np.concatenate([o for _, o in batches]) if detector is not None else None


def _ood_summary(detector: Detector | None, scores) -> dict[str, Any]:
    """metrics.json's out-of-distribution figures: the detector and the fraction of this split it flags."""
    if detector is None:
        return {"available": False, "flagged": None, "fraction_flagged": None}
    flagged = detector.flags(scores)
    return {"available": True, **detector.describe(), "flagged": int(flagged.sum()),
            "fraction_flagged": float(flagged.mean()) if len(flagged) else None}


def _plots(out: Path, loaded: Any, result: dict[str, Any], labels, probs, threshold: float) -> None:
    """The PNG figures of one evaluation: training curves, confusion matrices, reliability, ROC and PR."""
    plots.training_curves(loaded.checkpoint.get("history", []), out)
    plots.confusion_matrix_plot(result["confusion_matrix"], ["NORMAL", "PNEUMONIA"], out / "confusion_matrix.png",
                                threshold)
    if "three_class" in result:
        plots.confusion_matrix_plot(result["three_class"]["confusion_matrix"], loaded.class_names,
                                    out / "confusion_matrix_3class.png", threshold)
    plots.reliability_plot(result["calibration"], out / "reliability.png")
    if result["roc_auc"] is not None:
        fpr, tpr = roc_points(labels, probs)
        op = (1 - result["specificity"], result["recall"])
        plots.roc_curve_plot(fpr, tpr, result["roc_auc"], out / "roc.png", op)
        recall, precision = pr_points(labels, probs)
        plots.pr_curve_plot(recall, precision, result["average_precision"], float(labels.mean()), out / "pr.png")


def _unadjusted(labels, probs, output) -> dict[str, Any]:
    """The headline figures at the model's own prior and threshold, for comparison with a moved prior."""
    m = binary_metrics(labels, probs, output.decision_threshold)
    keys = ("threshold", "accuracy", "recall", "specificity", "f1", "log_loss", "confusion_matrix")
    return {"prior": output.prior_used, **{k: m[k] for k in keys}}


def _write_predictions(path: Path, paths: list[str], labels, probs, class_probs, class_names: list[str],
                       output: OutputMap, ood_scores=None, detector=None) -> None:
    """One row per image: its path and true class, then predict's result record (`records.result_columns`)."""
    rows = []
    for i, (p, y, q) in enumerate(zip(paths, labels, probs)):
        r = image_result(p, float(q), None if class_probs is None else class_probs[i], class_names, output, detector,
                         None if ood_scores is None else float(ood_scores[i]))
        rows.append({"path": p, "true_label": class_names[int(y)], **result_cells(r, class_names)})
    write_results_csv(path, ["path", "true_label", *result_columns(class_names)], rows)
