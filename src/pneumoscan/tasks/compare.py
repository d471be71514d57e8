"""The paper's Table IV, re-run properly: each activation trained with the same recipe over several seeds,
in one training precision or several (FP32 against BF16).

Each (activation, seed) run is an ordinary run folder under the comparison folder; a run that already
finished is reused (with its evaluation, when that is newer than the training) and an interrupted one is
resumed, so a long comparison can be stopped and restarted, or its runs made by several processes at once:
each run is trained and evaluated under a lock (`run_lock`), and a process skips a run another one holds,
coming back to it, waiting, once it has done the others.
The table gives mean +- sd over seeds of train accuracy and loss (at the best epoch), the evaluated
split's accuracy, loss and ROC AUC; pairs of rows (activations, or precisions) are compared with
Welch's t-test on each metric across seeds.
"""

from __future__ import annotations

import itertools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.config import ACTIVATIONS, Config
from ..io.fileio import atomic_write_text, write_json
from .evaluate import evaluate
from .report import write_compare_report
from .train import train

# Soric et al., Table IV: single runs, evaluated (and checkpoint chosen) on the official test split.
PAPER_TABLE_IV = {
    "relu": {"train_accuracy": 0.9460, "accuracy": 0.8750, "train_loss": 0.1952, "loss": 0.5904},
    "leaky_relu": {"train_accuracy": 0.9378, "accuracy": 0.8894, "train_loss": 0.2106, "loss": 0.2640},
    "leaky_relu_30": {"train_accuracy": 0.9372, "accuracy": 0.8702, "train_loss": 0.2296, "loss": 0.2754},
    "prelu": {"train_accuracy": 0.9445, "accuracy": 0.9038, "train_loss": 0.2088, "loss": 0.3339},
}
COLUMNS = ("train_accuracy", "accuracy", "train_loss", "loss", "roc_auc")


@contextmanager
def run_lock(run_dir: Path, wait: bool) -> Iterator[bool]:
    """Hold the lock of one run folder (`.NAME.lock` beside it, an flock; released when the process
    ends, however it ends). Yields whether it is held: with `wait`, once no other process holds it;
    without, at once, False when another process holds it."""
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cfg: Config, run_dir: Path, split: str, device: str, progress: bool, cuda_graphs: bool | None) -> dict[str, Any]:
    if not (run_dir / "summary.json").is_file():
        train(cfg, run_dir, device=device, resume=(run_dir / "last.pt").is_file(), overwrite=True, progress=progress,
              cuda_graphs=cuda_graphs)
    summary_file, metrics_file = run_dir / "summary.json", run_dir / f"eval-{split}" / "metrics.json"
    if metrics_file.is_file() and metrics_file.stat().st_mtime >= summary_file.stat().st_mtime:
        result = json.loads(metrics_file.read_text())  # evaluated after this training finished: reuse it
    else:
        result = evaluate(run_dir / "best.pt", split, run_dir / f"eval-{split}", data_root=cfg.data.root, device=device,
                          progress=progress)
    summary = json.loads(summary_file.read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = next(h for h in history if h["epoch"] == summary["best_epoch"])
    return {"train_accuracy": best["train_accuracy"], "train_loss": best["train_loss"], "accuracy": result["accuracy"],
            "loss": result["log_loss"], "roc_auc": result["roc_auc"], "wall_seconds": summary["wall_seconds"]}


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    from scipy import stats

    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(base: Config, out: str | Path, activations: Sequence[str] = ACTIVATIONS, seeds: Sequence[int] = (0, 1, 2),
            split: str = "val", device: str = "auto", progress: bool = True, alpha: float = 0.05,
            cuda_graphs: bool | None = None, precisions: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and evaluate every (activation, precision, seed); write compare.json and compare.md into `out`.

    `precisions` (default: the recipe's one) name the rows 'ACTIVATION PRECISION' when there are several;
    a run folder is ACTIVATION-sSEED in FP32, ACTIVATION-PRECISION-sSEED otherwise."""
    out = Path(out)
    precisions = list(precisions or [base.train.precision])
    if base.model.name != "seed":  # activations belong to the paper's model: other models get one row, by name
        activations = [base.model.name]
    todo: dict[tuple[str, int], tuple[Config, Path]] = {}
    for activation in activations:
        cfg = base.override("model", activation=activation) if base.model.name == "seed" else base
        for precision in precisions:
            row = f"{activation} {precision}" if len(precisions) > 1 else activation
            folder = activation if precision == "fp32" else f"{activation}-{precision}"
            for seed in seeds:
                todo[row, seed] = cfg.override("train", seed=seed, precision=precision), out / f"{folder}-s{seed}"
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for wait in (False, True):  # first the runs no other process holds, then wait for the others
        for key, (cfg, run_dir) in todo.items():
            if key not in results:
                with run_lock(run_dir, wait) as held:
                    if held:
                        results[key] = _run(cfg, run_dir, split, device, progress, cuda_graphs)
    runs: dict[str, list[dict[str, Any]]] = {}
    for row, seed in todo:
        runs.setdefault(row, []).append(results[row, seed])
    table = {a: {c: {"mean": float(np.mean([r[c] for r in rs])), "sd": float(np.std([r[c] for r in rs], ddof=1)) if len(rs) > 1 else None}
                 for c in COLUMNS} for a, rs in runs.items()}
    tests = []
    for a, b in itertools.combinations(runs, 2):
        for c in ("accuracy", "roc_auc", "loss"):
            p = welch_p([r[c] for r in runs[a]], [r[c] for r in runs[b]])
            tests.append({"a": a, "b": b, "metric": c, "difference": table[a][c]["mean"] - table[b][c]["mean"],
                          "p": p, "larger_than_noise": p is not None and p < alpha})
    result = {"split": split, "seeds": list(seeds), "recipe": base.recipe, "config": base.to_dict(),
              "activations": list(activations), "precisions": precisions, "runs": runs,
              "table": table, "tests": tests, "alpha": alpha, "paper_table_iv": PAPER_TABLE_IV}
    write_json(out / "compare.json", result)
    lines = table_markdown(result)
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    write_compare_report(out, lines)
    return result


def table_markdown(r: dict[str, Any]) -> list[str]:
    def cell(v: dict[str, float | None]) -> str:
        return f"{v['mean']:.4f} ± {v['sd']:.4f}" if v["sd"] is not None else f"{v['mean']:.4f}"

    split = r["split"]
    lines = [f"Mean ± sd over seeds {r['seeds']} (recipe `{r['recipe']}`); 'accuracy', 'loss' and ROC AUC on the `{split}` split.",
             "Train figures are at the best epoch (train loss includes the L2 penalty, as Keras reports it); "
             f"{split} loss is the log loss (BCE) of the best checkpoint.",
             "", f"| model | train acc | {split} acc | train loss | {split} loss | {split} ROC AUC |", "|---|---|---|---|---|---|"]
    lines += [f"| {a} | " + " | ".join(cell(t[c]) for c in COLUMNS) + " |" for a, t in r["table"].items()]
    lines += ["", "Paper, Table IV (theirs: single runs, test split, checkpoint chosen on test):", "",
              "| activation | train acc | test acc | train loss | test loss |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {p['train_accuracy']:.4f} | {p['accuracy']:.4f} | {p['train_loss']:.4f} | {p['loss']:.4f} |"
              for a, p in PAPER_TABLE_IV.items() if a in r["activations"]]
    significant = [t for t in r["tests"] if t["larger_than_noise"]]
    lines += ["", f"Differences larger than the seed-to-seed noise (Welch's t-test, p < {r['alpha']}):"]
    if not r["tests"]:
        lines.append("- no pairs to compare (one row).")
    else:
        lines += [f"- {t['a']} vs {t['b']}, {t['metric']}: {t['difference']:+.4f} (p = {t['p']:.3f})" for t in significant] or \
                 ["- none: every difference between rows is within the noise of these seeds."]
    return lines
