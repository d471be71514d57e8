#!/usr/bin/env python3
"""The accuracy check of an opt-in reduced-precision backend (default `openvino-bf16`) against PyTorch FP32.

For each run folder given (one per seed), scores that run's validation images (split.json's "val"
files, the images the run chose its threshold on) with the torch backend and with `--backend`, and
prints per run: the ROC AUC of each, the AUC change, the largest probability change, the labels that
change at the run's threshold, and the largest out-of-distribution score change; then one JSON line.
The check passes when every run's |AUC change| is at most `--max-auc-change` (0.001).

    .venv/bin/python benchmarks/bf16_accuracy.py runs/tuned-s0 runs/tuned-s1 runs/tuned-s2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pneumoscan.core.metrics import binary_metrics
from pneumoscan.tasks.predict import Predictor


def check_run(run: Path, backend: str) -> dict:
    files = json.loads((run / "split.json").read_text())["val"]["files"]
    labels = np.array([int(Path(f).parent.name != "NORMAL") for f in files])
    rows = {}
    for name in ("torch", backend):
        predictor = Predictor(run / "best.pt", device="cpu", backend=name, batch_size=64)
        rows[name] = list(predictor.predict_files(files))
    p = {n: np.array([r.p_pneumonia for r in rows[n]]) for n in rows}
    ood = {n: np.array([r.ood_score if r.ood_score is not None else np.nan for r in rows[n]]) for n in rows}
    auc = {n: binary_metrics(labels, p[n])["roc_auc"] for n in rows}
    return {"run": str(run), "images": len(files), "auc_torch": auc["torch"], f"auc_{backend}": auc[backend],
            "auc_change": auc[backend] - auc["torch"], "max_probability_change": float(np.max(np.abs(p[backend] - p["torch"]))),
            "labels_changed": int(sum(a.label != b.label for a, b in zip(rows["torch"], rows[backend]))),
            "max_ood_score_change": float(np.nanmax(np.abs(ood[backend] - ood["torch"])))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (best.pt and split.json), one per seed")
    ap.add_argument("--backend", default="openvino-bf16")
    ap.add_argument("--max-auc-change", type=float, default=0.001)
    a = ap.parse_args(argv)
    results = [check_run(run, a.backend) for run in a.runs]
    for r in results:
        print(f"{r['run']}: {r['images']} images, AUC torch {r['auc_torch']:.5f} {a.backend} {r[f'auc_{a.backend}']:.5f} "
              f"(change {r['auc_change']:+.5f}), largest probability change {r['max_probability_change']:.4f}, "
              f"labels changed {r['labels_changed']}, largest OOD score change {r['max_ood_score_change']:.4f}")
    passed = all(abs(r["auc_change"]) <= a.max_auc_change for r in results)
    print(json.dumps({"backend": a.backend, "passed": passed, "max_auc_change": a.max_auc_change, "runs": results}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
