"""The tables of docs/experiments.md "Honest at a new site", from the files experiments/shift_candidates.sh
writes under RUNS: mean ± sd over the three seeds of each figure averaged over a run's sites, and the worst
site.

    .venv/bin/python experiments/shift_table.py runs/shift
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shift_benchmark import FIGURES, mean_sd, per_checkpoint  # noqa: E402

OPTIONS = ("none", "em", "bn", "adapt", "labels")
HEADER = "| accuracy | ROC AUC | sensitivity | specificity | prevalence error | worst site (accuracy) |"


def cell(values: list[float]) -> str:
    return "–" if not values else mean_sd(values, 3)


def rows_of(rows: list[dict], method: str) -> str:
    worst = min((r for r in rows if r["method"] == method), key=lambda r: r["accuracy"])
    return " | ".join([cell(per_checkpoint(rows, method, k)) for k in FIGURES]
                      + [f"{worst['accuracy']:.3f} ({worst['shift']}, {worst['mix']:.2f})"])


def table(runs: Path, files: list[tuple[str, str]]) -> list[str]:
    """One row per (training, option) present in the files, as (label, file name)."""
    lines = ["| training | adaptation " + HEADER, "|---|---|---|---|---|---|---|---|"]
    for label, name in files:
        rows = _rows(runs / name)
        lines += [f"| {label} | {m} | {rows_of(rows, m)} |" for m in OPTIONS if any(r["method"] == m for r in rows)]
    return lines


def per_site(runs: Path, names: list[str]) -> list[str]:
    lines = ["| training | seed | pneumonia share | " + " | ".join(OPTIONS) + " | prevalence estimate (adapt) |",
             "|---|---|---|" + "---|" * (len(OPTIONS) + 1)]
    for name in names:
        rows = _rows(runs / f"{name}-group.json")
        sites = sorted({(r["seed"], round(r["mix"], 2)) for r in rows if r["method"] == "none"})
        for seed, mix in sites:
            # a labelled row's mix is that of the images it was scored on (the site less its 40 labelled ones)
            at = {r["method"]: r for r in rows if r["seed"] == seed and mix == min(
                (m for s, m in sites if s == seed), key=lambda m: abs(m - r["mix"]))}
            adapt = at.get("adapt", {}).get("prevalence_estimate")
            lines.append(f"| `{name}` | {seed} | {mix:.2f} | " + " | ".join(
                f"{at[m]['accuracy']:.3f}" if m in at else "–" for m in OPTIONS)
                + (f" | {adapt:.3f} |" if adapt is not None else " | – |"))
    return lines


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


if __name__ == "__main__":
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shift")
    print("Synthetic sites, runs trained on all of train:\n")
    print("\n".join(table(runs, [("`tuned`", "tuned-sites.json")])))
    print("\nThe held-out normals, runs trained without them:\n")
    print("\n".join(table(runs, [("`tuned`", "tuned-group.json"), ("`tuned` + appearance", "tuned-appearance-group.json")])))
    print("\nSynthetic sites, the same runs:\n")
    print("\n".join(table(runs, [("`tuned`", "tuned-group-sites.json"),
                                 ("`tuned` + appearance", "tuned-appearance-group-sites.json")])))
    print("\nThe held-out normals per seed and class mix (accuracy):\n")
    print("\n".join(per_site(runs, ["tuned", "tuned-appearance"])))
