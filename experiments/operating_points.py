#!/usr/bin/env python3
"""How well a threshold rule travels: patient-level cross-fitting on validation, at other prevalences.

For each checkpoint, its validation split is scored once (raw logits). Then, `--repeats` times, the
validation patients are halved at random: each variant of the operating point (calibration none or
temperature; threshold fixed at 0.5, the rule's optimum on the fitting half, or the median of that
optimum over 200 bootstrap resamples, as training chooses it) is fitted on one half and measured on the
other, both ways round. The held-out half gives sensitivity and specificity, hence the accuracy expected
at any prevalence P: P * sensitivity + (1 - P) * specificity. The threshold's spread across halves
shows how stable the rule is. A last variant keeps 0.5 on temperature-calibrated probabilities moved by
Bayes' rule from the model's prior to each P (`--prevalence P` with the site's true prevalence).

    .venv/bin/python experiments/operating_points.py RUN_A/best.pt RUN_B/best.pt ... --data DATA_ROOT

Prints a Markdown table (mean over repeats and checkpoints; +- the sd over checkpoints), then one JSON
line (the last line) with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prevalence_shift import validation_scores  # noqa: E402

from pneumoscan.core.calibration import fit_temperature  # noqa: E402
from pneumoscan.io.data import load_split  # noqa: E402
from pneumoscan.networks import checkpoint as ckpt_io  # noqa: E402
from pneumoscan.core.metrics import choose_threshold, stable_threshold  # noqa: E402
from pneumoscan.core.prevalence import logit, sigmoid  # noqa: E402

VARIANTS = [(cal, rule) for cal in ("none", "temperature") for rule in ("fixed 0.5", "youden optimum", "youden bootstrap median")]
PREVALENCES = (0.3, 0.5, 0.74, 0.9)


def fit(labels: np.ndarray, z: np.ndarray, calibration: str, rule: str, seed: int) -> tuple[float, float]:
    """(temperature, threshold on calibrated probabilities) fitted on one half."""
    t = fit_temperature(labels, z) if calibration == "temperature" else 1.0
    p = sigmoid(z / t)
    if rule == "fixed 0.5":
        return t, 0.5
    if rule == "youden optimum":
        return t, choose_threshold(labels, p, "youden")
    return t, stable_threshold(labels, p, "youden", n_boot=200, seed=seed)["threshold"]


MOVED = "temperature / 0.5 at the prior moved to P"


def cross_fit(labels: np.ndarray, z: np.ndarray, patients: np.ndarray, repeats: int, seed: int,
              model_prior: float | None) -> dict[str, dict]:
    """Per variant: held-out sensitivity, specificity and accuracy at each prevalence, and the thresholds."""
    rng = np.random.default_rng(seed)
    unique = np.unique(patients)
    out: dict[str, dict] = {f"{c} / {r}": {"sens": [], "spec": [], "thresholds": []} for c, r in VARIANTS}
    moved: dict[float, list[float]] = {p: [] for p in PREVALENCES}
    for rep in range(repeats):
        half = np.isin(patients, rng.permutation(unique)[: len(unique) // 2])
        for fit_rows, test_rows in ((half, ~half), (~half, half)):
            for c, r in VARIANTS:
                t, thr = fit(labels[fit_rows], z[fit_rows], c, r, seed + rep)
                pred = sigmoid(z[test_rows] / t) >= thr
                y = labels[test_rows]
                v = out[f"{c} / {r}"]
                v["sens"].append(float(pred[y == 1].mean()))
                v["spec"].append(float((~pred[y == 0]).mean()))
                v["thresholds"].append(float(thr))
            if model_prior is not None:
                t = fit_temperature(labels[fit_rows], z[fit_rows])
                y = labels[test_rows]
                for p in PREVALENCES:
                    pred = z[test_rows] / t + logit(p) - logit(model_prior) >= 0
                    moved[p].append(p * float(pred[y == 1].mean()) + (1 - p) * float((~pred[y == 0]).mean()))
    result = {k: {"sensitivity": float(np.mean(v["sens"])), "specificity": float(np.mean(v["spec"])),
                "threshold_sd": float(np.std(v["thresholds"])), "threshold_mean": float(np.mean(v["thresholds"])),
                "accuracy_at": {str(p): float(np.mean(p * np.array(v["sens"]) + (1 - p) * np.array(v["spec"])))
                                for p in PREVALENCES}}
              for k, v in out.items()}
    if model_prior is not None:
        result[MOVED] = {"model_prior": model_prior, "accuracy_at": {str(p): float(np.mean(v)) for p, v in moved.items()}}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", default=None, help="data root (default: the one in each checkpoint)")
    ap.add_argument("--repeats", type=int, default=20, help="random patient halvings per checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    per_ckpt = {}
    for path in a.checkpoints:
        labels, z, _ = validation_scores(path, a.data)
        loaded = ckpt_io.load(path, "cpu")
        cfg = loaded.config.override("data", root=a.data)
        patients = np.array([s.patient for s in load_split(cfg.data, "val")])
        prior = loaded.checkpoint.get("model_prior")
        per_ckpt[path] = cross_fit(labels, z, patients, a.repeats, a.seed, None if prior is None else float(prior))
    print(f"Held-out half of validation, {a.repeats} patient halvings x 2 directions per checkpoint, "
          f"{len(per_ckpt)} checkpoint(s); mean (sd over checkpoints). Accuracy at prevalence P = P sens + (1-P) spec.\n")
    print("| calibration / threshold rule | threshold (sd across halves) | sensitivity | specificity | "
          + " | ".join(f"acc at P={p}" for p in PREVALENCES) + " |")
    print("|---" * (4 + len(PREVALENCES)) + "|")
    summary = {}
    for c, r in VARIANTS:
        key = f"{c} / {r}"
        rows = [per_ckpt[p][key] for p in per_ckpt]

        def agg(f):
            vals = np.array([f(x) for x in rows])
            return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        cells = {"threshold": agg(lambda x: x["threshold_mean"]), "threshold_sd": agg(lambda x: x["threshold_sd"]),
                 "sensitivity": agg(lambda x: x["sensitivity"]), "specificity": agg(lambda x: x["specificity"])}
        cells.update({f"acc_{p}": agg(lambda x, p=p: x["accuracy_at"][str(p)]) for p in PREVALENCES})
        summary[key] = cells
        fmt = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"  # noqa: E731
        print(f"| {key} | {cells['threshold'][0]:.3f} ({cells['threshold_sd'][0]:.3f}) | {fmt(cells['sensitivity'])} | "
              f"{fmt(cells['specificity'])} | " + " | ".join(fmt(cells[f'acc_{p}']) for p in PREVALENCES) + " |")
    rows = [per_ckpt[p][MOVED] for p in per_ckpt if MOVED in per_ckpt[p]]
    if rows and len(rows) == len(per_ckpt):
        accs = {p: np.array([x["accuracy_at"][str(p)] for x in rows]) for p in PREVALENCES}
        summary[MOVED] = {f"acc_{p}": (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) for p, v in accs.items()}
        print(f"| {MOVED} (model prior {rows[0]['model_prior']:.3f}) | – | – | – | "
              + " | ".join(f"{summary[MOVED][f'acc_{p}'][0]:.4f} ± {summary[MOVED][f'acc_{p}'][1]:.4f}" for p in PREVALENCES) + " |")
    print(json.dumps({"checkpoints": a.checkpoints, "repeats": a.repeats, "summary": summary, "per_checkpoint": per_ckpt,
                      "machine": platform.processor() or platform.machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
