"""A run's report: one Markdown page from the files a run and its evaluation wrote (nothing is re-computed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text

# Soric, Pongrac, Inza: PReLU model on the official 624-image test split, checkpoint chosen on that split.
PAPER_TEST = {"accuracy": 0.9038, "precision": 0.8784, "recall": 0.9821, "specificity": 181 / 234, "f1": 0.9274,
              "roc_auc": 0.9521, "confusion_matrix": [[181, 53], [7, 383]], "n": 624}
METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def write_run_report(run_dir: str | Path, eval_dir: str | Path) -> Path:
    """run_dir/report.md: data, recipe, training, validation metrics beside the paper's published ones."""
    run_dir, eval_dir = Path(run_dir), Path(eval_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    m = json.loads((eval_dir / "metrics.json").read_text())
    rel = os.path.relpath(eval_dir, run_dir)
    lines = [
        f"# pneumoscan run report: {run_dir.name}",
        "",
        "Research tool, not a medical device.",
        "",
        "## Data",
        "",
        f"Data root `{cfg['data']['root']}`; validation carved out of train by patient "
        f"(fraction {cfg['data']['val_fraction']}, split seed {cfg['data']['split_seed']}).",
        "",
        "| split | images | patients | normal | pneumonia |",
        "|---|---|---|---|---|",
        *[f"| {name} | {s['summary']['images']} | {s['summary']['patients']} | {s['summary']['normal']} | {s['summary']['pneumonia']} |"
          for name, s in split.items()],
        "",
        "## Recipe",
        "",
        f"Recipe `{cfg['recipe']}`: model `{cfg['model']['name']}` ({cfg['model']['activation']}), "
        f"{cfg['preprocessing']['image_size']} px, {cfg['train']['epochs']} epochs, batch {cfg['train']['batch_size']}, "
        f"Adam lr {cfg['train']['lr']}, seed {cfg['train']['seed']}. Full configuration: `config.json`.",
        "",
        "## Training",
        "",
        f"Best epoch (lowest validation loss): {summary['best_epoch']} of {summary['epochs']}. "
        f"Wall time {summary['wall_seconds']} s on {summary['device']} ({summary['threads']} threads), "
        f"median {summary['train_images_per_s_median']} training images/s, peak memory {summary['peak_memory_mb']} MB.",
        "",
        f"![accuracy]({rel}/accuracy.png) ![loss]({rel}/loss.png)",
        "",
        f"## Validation metrics (threshold {m['threshold']:.3f}, rule: {m['threshold_rule']['rule']}, n = {m['n']})",
        "",
        "| metric | this run, validation split [95% CI] | paper, official test split (theirs) |",
        "|---|---|---|",
        *[f"| {k} | {_fmt(m[k])} {_ci(m['ci95'].get(k))} | {_fmt(PAPER_TEST[k])} |" for k in METRIC_NAMES],
        f"| confusion matrix [[tn, fp], [fn, tp]] | {m['confusion_matrix']} | {PAPER_TEST['confusion_matrix']} |",
        "",
        "The paper's figures are theirs: measured on the official test split, with the checkpoint chosen on that same",
        "split, so they are optimistic and not directly comparable with a validation score.",
        "",
        f"Calibration: expected calibration error {m['calibration']['ece']:.3f}, Brier score {m['calibration']['brier']:.3f}. "
        f"Confidence intervals: {m['ci_method']}.",
        "",
        f"![ROC]({rel}/roc.png) ![confusion matrix]({rel}/confusion_matrix.png) ![reliability]({rel}/reliability.png)",
        "",
    ]
    if summary.get("unreadable_files"):
        lines += ["## Unreadable files (skipped)", "", *[f"- `{p}`: {r}" for p, r in summary["unreadable_files"].items()], ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
