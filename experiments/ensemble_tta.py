#!/usr/bin/env python3
"""Seed ensembles and test-time augmentation against single runs, on the validation split.

Given K >= 3 runs of one recipe (different seeds), everything is scored on the same validation images,
on this machine's device:
- each run alone;
- each run with test-time augmentation (`pneumoscan ensemble RUN --tta zoom`: a one-member ensemble);
- every ensemble of K - 1 runs (K of them, so the ensembles have a spread too), and the one of all K.

Accuracy, sensitivity and specificity are at 0.5 on the checkpoint's calibrated probabilities (the
`tuned` recipe's rule); ROC AUC and log loss need no threshold. Rows give mean +- sd over runs (or over
ensembles); each candidate is compared with the single runs by Welch's t-test, and the ensemble of all K
by a paired bootstrap of the ROC AUC difference over validation images (1,000 resamples).

    .venv/bin/python experiments/ensemble_tta.py RUN0/best.pt RUN1/best.pt RUN2/best.pt --data DATA_ROOT --work DIR

Prints a Markdown table and one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import log_loss, roc_auc_score

from pneumoscan.tasks.ensemble import build_ensemble
from pneumoscan.tasks.evaluate import evaluate


def scored(checkpoint: Path, out: Path, data: str | None, device: str) -> dict:
    """Labels (1 = pneumonia) and probabilities on validation, by `evaluate` (reused when already there)."""
    csv_path = out / "predictions.csv"
    if not csv_path.is_file():
        evaluate(checkpoint, "val", out, data_root=data, device=device, progress=False)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {"labels": np.array([r["true_label"] == "PNEUMONIA" for r in rows], dtype=int),
            "probs": np.array([float(r["p_pneumonia"]) for r in rows])}


def figures(s: dict) -> dict:
    y, p = s["labels"], s["probs"]
    pred = p >= 0.5
    return {"accuracy": float((pred == y).mean()), "roc_auc": float(roc_auc_score(y, p)),
            "log_loss": float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))),
            "sensitivity": float(pred[y == 1].mean()), "specificity": float((~pred[y == 0]).mean())}


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """Mean and 95% interval of AUC(a) - AUC(b) over bootstrap resamples of the images."""
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < n:
        i = rng.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    return [float(np.mean(diffs)), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", default=None, help="data root (default: the one in each checkpoint)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the ensembles and evaluations (reused)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    if len(a.checkpoints) < 3:
        ap.error("give at least three runs")
    w = a.work
    w.mkdir(parents=True, exist_ok=True)

    def combined(members: tuple[int, ...], tta: str) -> Path:
        path = w / f"ens-{'-'.join(map(str, members))}-{tta}.pt"
        if not path.is_file():
            build_ensemble([a.checkpoints[i] for i in members], path, tta=tta, data_root=a.data, device=a.device,
                           progress=False)
        return path

    k = len(a.checkpoints)
    runs = {f"run {i}": scored(c, w / f"eval-run{i}", a.data, a.device) for i, c in enumerate(a.checkpoints)}
    tta = {f"run {i} + TTA": scored(combined((i,), "zoom"), w / f"eval-tta{i}", a.data, a.device) for i in range(k)}
    smaller = {f"ensemble {m}": scored(combined(m, "none"), w / f"eval-ens{''.join(map(str, m))}", a.data, a.device)
               for m in itertools.combinations(range(k), k - 1)}
    whole = scored(combined(tuple(range(k)), "none"), w / "eval-ens-all", a.data, a.device)
    groups = {"single runs": runs, "single runs + TTA (zoom 0.9, 1.1)": tta, f"ensembles of {k - 1}": smaller,
              f"ensemble of all {k}": {"all": whole}}
    table = {g: {name: figures(s) for name, s in members.items()} for g, members in groups.items()}
    columns = ("accuracy", "roc_auc", "log_loss", "sensitivity", "specificity")
    print(f"Validation split, {len(whole['labels'])} images; accuracy, sensitivity, specificity at 0.5 of the "
          "calibrated probabilities; mean ± sd over runs or ensembles; p: Welch's t-test against the single runs.\n")
    print("| candidate | n | " + " | ".join(columns) + " | p (ROC AUC) | p (accuracy) |")
    print("|---" * (len(columns) + 4) + "|")
    summary = {}
    base = table["single runs"]
    for g, rows in table.items():
        cells = {c: [r[c] for r in rows.values()] for c in columns}
        p = {c: (float(stats.ttest_ind(cells[c], [r[c] for r in base.values()], equal_var=False).pvalue)
                 if g != "single runs" and len(rows) > 1 else None) for c in ("roc_auc", "accuracy")}
        summary[g] = {"members": rows, "p": p}
        fmt = lambda v: f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"  # noqa: E731
        pf = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {g} | {len(rows)} | " + " | ".join(fmt(cells[c]) for c in columns) + f" | {pf(p['roc_auc'])} | {pf(p['accuracy'])} |")
    y = whole["labels"]
    diffs = {name: paired_auc_difference(y, whole["probs"], s["probs"]) for name, s in runs.items()}
    print(f"\nEnsemble of all {k} minus each run, ROC AUC (paired bootstrap over images, mean [95% interval]):")
    for name, d in diffs.items():
        print(f"- {name}: {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]")
    print(json.dumps({"checkpoints": [str(c) for c in a.checkpoints], "summary": summary, "ensemble_minus_run_auc": diffs,
                      "machine": platform.processor() or platform.machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
