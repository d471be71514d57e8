"""The shift benchmark: how checkpoints and adaptation options fare at synthetic new sites built from train.

Each site is a checkpoint's own validation split (patients it never trained on) changed by one of
`pneumoscan.core.sites.SHIFTS` (scanner-like changes of appearance) and resampled to a class mix. On every
site, every adaptation option is scored:

- none: the checkpoint as it is;
- em: its outputs moved to the prevalence EM estimates from them (`--prevalence estimated`);
- bn: BatchNorm statistics re-estimated on the site's images, unweighted (plain AdaBN), model prior kept;
- adapt: `pneumoscan adapt` without labels (class-weighted statistics, EM after adapting, checked by BBSE);
- labels: `pneumoscan adapt` with 20 labelled images of each class, scored on the site's other images.

It prints, per option, accuracy, ROC AUC, sensitivity, specificity and the prevalence error, as the mean
over sites, its spread over checkpoints (seeds) and the worst site, and writes every row to --json.

    .venv/bin/python benchmarks/shift_benchmark.py --checkpoints runs/tuned-s0/best.pt runs/tuned-s1/best.pt \\
        runs/tuned-s2/best.pt --json runs/shift-tuned.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.tasks.adapt import _raw_logits, adapt_model
from pneumoscan.core.calibration import output_map
from pneumoscan.io.data import split_samples
from pneumoscan.io.fileio import atomic_write_text
from pneumoscan.io.images import load_grey, resize
from pneumoscan.core.metrics import binary_metrics
from pneumoscan.core.prevalence import estimate_prevalence, shift_prior, sigmoid
from pneumoscan.core.shift import adapt_batchnorm
from pneumoscan.networks.inference import model_input
from pneumoscan.core.sites import SHIFTS, mixed_subset, shifted

METHODS = ("none", "em", "bn", "adapt", "labels")
LABELLED_PER_CLASS = 20


def site_pixels(greys: list[np.ndarray], shift: str, prep) -> np.ndarray:
    """Every validation image changed by `shift` at its own resolution, then resized as the model expects."""
    return np.stack([resize(shifted(g, SHIFTS[shift], seed=i), prep.image_size, prep.resize_filter)
                     for i, g in enumerate(greys)])


def figures(labels: np.ndarray, probs: np.ndarray, threshold: float, prevalence: float | None) -> dict:
    m = binary_metrics(labels, probs, threshold)
    return {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"], "sensitivity": m["recall"],
            "specificity": m["specificity"], "prevalence_estimate": prevalence}


def score_methods(loaded, path: str, pixels: np.ndarray, labels: np.ndarray, methods, seed: int) -> dict[str, dict]:
    """Each adaptation option's figures on one site."""
    prep = loaded.config.preprocessing
    output = output_map(loaded.checkpoint, path, loaded.threshold).with_prior(None)
    p_model = output.apply(sigmoid(_raw_logits(loaded.model, pixels, prep)))[0]
    out = {}
    if "none" in methods:
        out["none"] = figures(labels, p_model, output.threshold, None)
    if "em" in methods:
        est = estimate_prevalence(p_model, output.model_prior, n_boot=0)["prevalence"]
        moved = output.with_prior(est, "estimated")
        out["em"] = figures(labels, shift_prior(p_model, output.model_prior, est), moved.decision_threshold, est)
    if "bn" in methods:
        import copy

        import torch

        model = copy.deepcopy(loaded.model)
        adapt_batchnorm(model, torch.from_numpy(pixels), lambda p: model_input(p, prep), np.ones(len(pixels)))
        out["bn"] = figures(labels, output.apply(sigmoid(_raw_logits(model, pixels, prep)))[0], output.threshold, None)
    if "adapt" in methods:
        model, record = adapt_model(loaded, path, pixels)
        est = record["prevalence"]["prevalence"]
        moved = output.with_prior(est, "adapted")
        probs = moved.apply(sigmoid(_raw_logits(model, pixels, prep)))[0]
        out["adapt"] = {**figures(labels, probs, moved.decision_threshold, est),
                        "trusted": record["prevalence"]["trusted"], "bbse": record["prevalence"]["bbse"]}
    if "labels" in methods:
        out["labels"] = _with_labels(loaded, path, pixels, labels, seed)
    return out


def _with_labels(loaded, path: str, pixels: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """`adapt` given 20 labelled images of each class, scored on the others."""
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), LABELLED_PER_CLASS, replace=False) for c in (0, 1)])
    given = np.full(len(labels), -1)
    given[chosen] = labels[chosen]
    model, record = adapt_model(loaded, path, pixels, given)
    cal = record["labelled"]["calibration"]
    est = record["prevalence"]["prevalence"]
    rest = given < 0
    z = _raw_logits(model, pixels[rest], loaded.config.preprocessing)
    probs = shift_prior(sigmoid(z / cal["temperature"] + cal["offset"]), cal["model_prior"], est)
    expected = record["labelled"]["expected"]
    return {**figures(labels[rest], probs, 0.5, est), "mix": float(labels[rest].mean()), "expected_accuracy": expected["accuracy"],
            "expected_accuracy_ci95": expected["accuracy_ci95"]}


def group_root(data: str, group: str, out: Path) -> Path:
    """A copy of `data` (symlinks) without the normal images whose names start with `group`."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (out / "train" / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(data) / "train" / cls).iterdir()):
            if not (cls == "NORMAL" and f.name.startswith(group)) and not (out / "train" / cls / f.name).exists():
                os.symlink(f.resolve(), out / "train" / cls / f.name)
    return out


def site_samples(cfg, data: str | None, group_site: str | None) -> list:
    """The site's labelled images: the checkpoint's validation split (under `data` when given); or, for a run
    trained without the normals named `group_site`*, its validation pneumonia images and those normals."""
    from pneumoscan.io.data import Sample

    if not group_site:
        return split_samples(replace(cfg.data, root=data) if data else cfg.data)["val"]
    val = split_samples(cfg.data)["val"]  # carved from the run's own data, which lacks the group
    held = sorted((Path(data) / "train" / "NORMAL").iterdir())
    return [s for s in val if s.label > 0] + [Sample(str(f), 0, f.stem) for f in held if f.name.startswith(group_site)]


def run_checkpoint(path: str, data: str | None, shifts, mixes, size: int, methods, group_site: str | None = None
                   ) -> list[dict]:
    loaded = ckpt_io.load(path, "cpu")
    cfg = loaded.config
    val = site_samples(cfg, data, group_site)
    greys = [load_grey(s.path) for s in val]
    labels = np.array([int(s.label > 0) for s in val])
    rows = []
    for shift in shifts:
        pixels = site_pixels(greys, shift, cfg.preprocessing)
        for mix in mixes:
            idx = mixed_subset(labels, mix, size, seed=int(mix * 1000)) if mix else np.arange(len(labels))
            started = time.perf_counter()
            found = score_methods(loaded, path, pixels[idx], labels[idx], methods, seed=int((mix or 0) * 1000))
            for method, f in found.items():
                rows.append({"checkpoint": path, "seed": cfg.train.seed, "recipe": cfg.recipe,
                             "shift": f"{group_site} normals, {shift}" if group_site else shift,
                             "mix": float(labels[idx].mean()), "n": int(len(idx)), "method": method, **f})
            print(f"{Path(path).parent.name} {shift:>34} mix {labels[idx].mean():.2f}: " + "  ".join(
                f"{m} {f['accuracy']:.3f}/{f['roc_auc']:.3f}" for m, f in found.items())
                + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


FIGURES = ("accuracy", "roc_auc", "sensitivity", "specificity", "prevalence_error")


def per_checkpoint(rows: list[dict], method: str, key: str) -> list[float]:
    """The mean of `key` over each checkpoint's sites for one option: one value per checkpoint (seed)."""
    out = []
    for ckpt in sorted({r["checkpoint"] for r in rows}):
        vals = [_value(r, key) for r in rows if r["checkpoint"] == ckpt and r["method"] == method]
        vals = [v for v in vals if v is not None]
        if vals:
            out.append(float(np.mean(vals)))
    return out


def mean_sd(values: list[float], digits: int) -> str:
    """'mean ± sd' over checkpoints (sd 0 for one), or 'n/a' for none."""
    if not values:
        return "n/a"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.{digits}f}"


def summarise(rows: list[dict]) -> list[str]:
    """Per method: mean over sites of each figure, its sd over checkpoints, and the worst site."""
    lines = ["| option | accuracy | ROC AUC | sensitivity | specificity | prevalence error | worst accuracy |",
             "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        cells = [mean_sd(per_checkpoint(mine, method, key), 4) for key in FIGURES]
        worst = min(mine, key=lambda r: r["accuracy"])
        cells.append(f"{worst['accuracy']:.3f} ({worst['shift']}, mix {worst['mix']:.2f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _value(row: dict, key: str) -> float | None:
    if key == "prevalence_error":
        return None if row.get("prevalence_estimate") is None else abs(row["prevalence_estimate"] - row["mix"])
    return row.get(key)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCAN_DATA"), help="data root (default: $PNEUMOSCAN_DATA)")
    ap.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    ap.add_argument("--mixes", nargs="+", type=float, default=[0.3, 0.6, 0.9],
                    help="pneumonia shares of the sites (0: the validation split's own)")
    ap.add_argument("--size", type=int, default=300, help="images per site (fewer when a class runs out)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--json", help="write every row here once every checkpoint is scored (JSON.partial until "
                                    "then: a run resumes from it, scoring only the options it lacks)")
    ap.add_argument("--group-site", metavar="PREFIX",
                    help="checkpoints trained without the normals named PREFIX* (see --make-group-root): the site is "
                         "those normals and the run's validation pneumonia images (--data: the full data set)")
    ap.add_argument("--make-group-root", nargs=2, metavar=("PREFIX", "OUT"),
                    help="write OUT, the data set without the normals named PREFIX* (symlinks), and stop")
    a = ap.parse_args()
    if a.make_group_root:
        print(group_root(a.data, a.make_group_root[0], Path(a.make_group_root[1])))
        return 0
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU: {_cpu_name()}", flush=True)
    partial = Path(f"{a.json}.partial") if a.json else None
    rows = json.loads(partial.read_text()) if partial and partial.is_file() else []  # a run cut short resumes
    for path in a.checkpoints:
        todo = [m for m in a.methods if not any(r["checkpoint"] == path and r["method"] == m for r in rows)]
        if todo:  # options missing from the rows kept (all, for a checkpoint not scored yet)
            rows += run_checkpoint(path, a.data, a.shifts, a.mixes, a.size, todo, a.group_site)
        if partial:
            atomic_write_text(partial, json.dumps(rows, indent=1))
    if partial:  # the finished file appears only once every checkpoint is in it
        atomic_write_text(a.json, json.dumps(rows, indent=1))
        partial.unlink()
    print("\n".join(summarise(rows)))
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
