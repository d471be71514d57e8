"""The tables of docs/experiments.md "Honest at a new site", from the files experiments/shift_candidates.sh writes.

Per training option and adaptation option: mean ± sd over the three seeds of each figure averaged over the
synthetic sites (RECIPE-sites.json) and over the held-out group of normals (RECIPE-group.json), and the worst
site; then the held-out group per seed and class mix.

    .venv/bin/python experiments/shift_table.py runs/shift
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OPTIONS = ("none", "em", "bn", "adapt", "labels")
RECIPES = ("paper", "tuned", "tuned-appearance")


def per_seed(rows: list[dict], method: str, key: str) -> list[float]:
    """The mean of `key` over a checkpoint's sites, one value per checkpoint (seed)."""
    out = []
    for ckpt in sorted({r["checkpoint"] for r in rows}):
        vals = [_value(r, key) for r in rows if r["checkpoint"] == ckpt and r["method"] == method]
        vals = [v for v in vals if v is not None]
        if vals:
            out.append(float(np.mean(vals)))
    return out


def _value(row: dict, key: str) -> float | None:
    if key == "prevalence_error":
        return None if row.get("prevalence_estimate") is None else abs(row["prevalence_estimate"] - row["mix"])
    return row.get(key)


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def summary_table(runs: Path) -> list[str]:
    lines = ["| training | adaptation | synthetic sites: accuracy | ROC AUC | prevalence error | worst site | "
             "held-out normals: accuracy | ROC AUC | specificity | prevalence error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        sites, group = (_rows(runs / f"{recipe}-{kind}.json") for kind in ("sites", "group"))
        if not sites and not group:
            continue
        for method in OPTIONS:
            worst = min((r for r in sites if r["method"] == method), key=lambda r: r["accuracy"], default=None)
            lines.append(f"| `{recipe}` | {method} | " + " | ".join(
                [cell(per_seed(sites, method, k)) for k in ("accuracy", "roc_auc", "prevalence_error")]
                + [f"{worst['accuracy']:.3f} ({worst['shift']}, {worst['mix']:.1f})" if worst else "–"]
                + [cell(per_seed(group, method, k)) for k in ("accuracy", "roc_auc", "specificity", "prevalence_error")])
                + " |")
    return lines


def group_table(runs: Path) -> list[str]:
    lines = ["| training | seed | pneumonia share | " + " | ".join(OPTIONS) + " | prevalence estimate (adapt) |",
             "|---|---|---|" + "---|" * (len(OPTIONS) + 1)]
    for recipe in RECIPES:
        rows = _rows(runs / f"{recipe}-group.json")
        for seed, mix in sorted({(r["seed"], round(r["mix"], 2)) for r in rows}):
            at = {r["method"]: r for r in rows if r["seed"] == seed and round(r["mix"], 2) == mix}
            adapt = at.get("adapt", {}).get("prevalence_estimate")
            lines.append(f"| `{recipe}` | {seed} | {mix:.2f} | " + " | ".join(
                f"{at[m]['accuracy']:.3f}" if m in at else "–" for m in OPTIONS)
                + f" | {adapt:.3f} |" if adapt is not None else " | – |")
    return lines


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


if __name__ == "__main__":
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shift")
    print("\n".join(summary_table(runs)) + "\n\n" + "\n".join(group_table(runs)))
