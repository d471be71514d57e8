"""Model card (Markdown) generated from a checkpoint and, when given, its evaluation's metrics.json.

The card is served to anyone who can reach the server, so it names no local path; a metric that is
undefined on the data (precision when nothing was called pneumonia) reads "n/a".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..networks import checkpoint as ckpt_io
from ..networks.ensemble_model import describe as describe_ensemble

METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def fmt(value: Any, spec: str = ".4f") -> str:
    """A metric as text: "n/a" when it is undefined (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def validation_metrics(checkpoint: str | os.PathLike, metrics_json: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"split", "n", metric: value or None}: from the evaluation's metrics.json when given, else the checkpoint's
    validation at its best epoch (then "n" is None)."""
    if metrics_json and Path(metrics_json).is_file():
        m = json.loads(Path(metrics_json).read_text())
        return {"split": m.get("split", "val"), "n": m.get("n"), **{k: m.get(k) for k in METRICS}}
    val = ckpt_io.read(checkpoint).get("metrics", {}).get("val", {})
    return {"split": "val", "n": None, **{k: val.get(k) for k in METRICS if k in val}}


def _calibration_text(ckpt: dict[str, Any]) -> str:
    cal = ckpt.get("calibration") or {}
    if cal.get("method") == "platt":
        return (f"Platt scaling (temperature {cal.get('temperature', 1.0):.3f}, offset {cal.get('offset', 0.0):.3f}), "
                "fitted on the validation split")
    if cal.get("method") == "temperature":
        return f"temperature {cal.get('temperature', 1.0):.3f}, fitted on the validation split"
    return "none (raw model probabilities)"


def model_card(checkpoint: str | os.PathLike, metrics_json: str | os.PathLike | None = None) -> str:
    ckpt = ckpt_io.read(checkpoint)
    cfg = Config.from_dict(ckpt["config"])
    rule = ckpt.get("threshold_rule", {"rule": "fixed"})
    lines = [
        f"# Model card: {Path(checkpoint).name}",
        "",
        "**Research tool, not a medical device.** Not for diagnosis or treatment decisions.",
        "",
        "## Model",
        f"- Architecture `{cfg.model.name}`" + (f" ({cfg.model.activation})" if cfg.model.name == "seed" else "")
        + f", recipe `{cfg.recipe}`, pneumoscan {ckpt.get('version')}, "
        + (f"{describe_ensemble(ckpt)}; the output is the mean of the members' logits over members and views."
           if "ensemble" in ckpt else f"best epoch {ckpt.get('epoch')}."),
        f"- Input: grey image resized to {cfg.preprocessing.image_size}x{cfg.preprocessing.image_size} "
        f"({cfg.preprocessing.resize_filter}), scaled by {cfg.preprocessing.scale:.6g}.",
        f"- Output: probability of `{ckpt['class_names'][1]}`; label `{ckpt['class_names'][1]}` at or above "
        f"{ckpt['threshold']:.3f} (rule `{rule.get('rule')}`"
        + (f", target sensitivity {rule.get('target_sensitivity')}" if rule.get("rule") == "sensitivity" else "")
        + ", chosen on the validation split)"
        + (f"; 95% bootstrap interval {ckpt['threshold_interval'][0]:.3f}-{ckpt['threshold_interval'][1]:.3f}"
           if ckpt.get("threshold_interval") else "") + ".",
        f"- Calibration: {_calibration_text(ckpt)}; probabilities refer to a pneumonia prevalence of "
        f"{fmt(ckpt.get('model_prior'), '.3f')} (training split: {fmt(ckpt.get('train_prevalence'), '.3f')}). "
        "Another site's prevalence: `--prevalence P` (Bayes' rule) or `--prevalence estimated`.",
        "",
        *_adaptation_lines(ckpt),
        "## Intended use",
        "- Research and teaching: studying pneumonia classifiers on pediatric chest X-rays, comparing methods.",
        "- Not intended for clinical use, for adults, for other views than anterior-posterior, or for other hospitals'",
        "  images without local validation.",
        "",
        "## Data",
        "- Trained on the pediatric chest X-ray set of Kermany et al. (2018), children aged 1-5,",
        "  one centre (Guangzhou Women and Children's Medical Center), labels NORMAL / PNEUMONIA (bacterial or viral).",
        f"- Validation: {cfg.data.val_fraction:.0%} of the training patients, split by patient (seed {cfg.data.split_seed}).",
        "",
        "## Metrics",
    ]
    lines += _metrics_lines(ckpt, metrics_json)
    lines += [
        "",
        "## Limitations",
        "- Pediatric, single centre, one scanner population: performance elsewhere is unknown.",
        "- Class imbalance (about 74% pneumonia in training) and label noise in the public data set.",
        "- Validation figures come from patients of the training distribution; the paper's published test",
        "  accuracy (90.4%) shows how much lower an independent split can be.",
        "- Grad-CAM maps are coarse and show where the model looked, not why it is right; they may highlight",
        "  areas outside the lungs.",
        _ood_line(ckpt.get("ood")),
        "",
    ]
    return "\n".join(lines)


def _metrics_lines(ckpt: dict[str, Any], metrics_json: str | os.PathLike | None) -> list[str]:
    """The card's metrics: the evaluation's figures with their 95% intervals when metrics_json is given, else the
    checkpoint's validation at its best epoch."""
    if not (metrics_json and Path(metrics_json).is_file()):
        val = ckpt.get("metrics", {}).get("val", {})
        return ["Validation at the best epoch (no evaluation file given, so no confidence intervals): " +
                ", ".join(f"{k} {fmt(v)}" for k, v in val.items() if v is None or isinstance(v, (int, float)))]
    m = json.loads(Path(metrics_json).read_text())
    ci = m.get("ci95", {})
    lines = [f"On the `{m['split']}` split ({m['n']} images), threshold {fmt(m['threshold'], '.3f')}; 95% CI by "
             f"{m.get('ci_method', 'bootstrap')}:", "", "| metric | value | 95% CI |", "|---|---|---|"]
    for k in METRICS:
        c = ci.get(k)
        lines.append(f"| {k} | {fmt(m.get(k))} | " + (f"{fmt(c[0])} - {fmt(c[1])}" if c else "n/a") + " |")
    lines.append(f"| confusion matrix [[tn, fp], [fn, tp]] | {m['confusion_matrix']} | |")
    if m.get("calibration"):
        lines.append(f"\nExpected calibration error {fmt(m['calibration'].get('ece'), '.3f')}.")
    return lines


def _adaptation_lines(ckpt: dict) -> list[str]:
    """The card's section on a checkpoint fitted to a site by `pneumoscan adapt` (none for one that was not)."""
    record = ckpt.get("adaptation")
    if not record:
        return []
    p = record.get("prevalence", {})
    interval = p.get("interval") or [float("nan")] * 2
    lines = ["## Adapted to a site",
             f"- Fitted by `pneumoscan adapt` to {record.get('images')} images of the site: BatchNorm statistics "
             + ("re-estimated on them (classes weighted as in training)" if record.get("batchnorm") else "kept") + ".",
             f"- Probabilities are reported at the site's estimated pneumonia prevalence {fmt(p.get('prevalence'), '.3f')} "
             f"(95% interval {interval[0]:.3f}-{interval[1]:.3f}; {p.get('source')}); "
             + ("the estimate passed its check." if p.get("trusted") else
                "the estimate is NOT to be trusted: " + "; ".join(p.get("reasons", [])) + ".")]
    expected = (record.get("labelled") or {}).get("expected")
    if expected:
        lines.append("- Expected at the site (leave-one-out over {} labelled images): ".format(
            sum(expected["labelled"].values())) + ", ".join(
            f"{k} {expected[k]:.3f} ({expected[k + '_ci95'][0]:.3f}-{expected[k + '_ci95'][1]:.3f})"
            for k in ("accuracy", "sensitivity", "specificity")) + "; calibration refitted on those images.")
    lines += [f"- Warning: {w}" for w in record.get("warnings", [])]
    return lines + [""]


def _ood_line(ood: dict | None) -> str:
    """The limitation line about images unlike the training data, with the detector's threshold when there is one."""
    if not isinstance(ood, dict):
        return ("- No out-of-distribution detector in this checkpoint: a photograph or a CT slice still gets a "
                "probability (`pneumoscan fit-ood` adds one).")
    return (f"- Images whose out-of-distribution score (Mahalanobis distance of pooled features) is at or above "
            f"{float(ood['threshold']):.2f} (the {float(ood['quantile']):.2f} quantile of validation) are flagged as "
            "outside what this model was trained on; it catches images unlike every training radiograph, not "
            "every shift (another hospital's radiographs may pass).")
