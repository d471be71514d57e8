"""How `adapt --labels` should use 20 labelled images per class: the trial behind docs/experiments.md
("Labelled images at the site"). On each site, the checkpoint is adapted without labels once; then, for five
random draws of 20 + 20 labelled images, each way of using them is scored on the site's other images:

- A: no use of the labels (the unlabelled adaptation: validation's calibration, EM's prevalence);
- B: Platt scaling (temperature and offset) refitted on the labels, EM on the rest with it;
- C: B with Platt's smoothed targets, (n+ + 1) / (n+ + 2) and 1 / (n- + 2);
- D: the offset alone refitted on the labels, validation's temperature kept, EM on the rest with it;
- E: D's calibration with the unlabelled estimate of the prevalence.

    OMP_NUM_THREADS=1 PNEUMOSCAN_DATA=... .venv/bin/python experiments/labelled_calibration.py runs/shift

needs the runs experiments/shift_candidates.sh trains (tuned-s0, tuned-group-s0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import shift_benchmark as sb  # noqa: E402

from pneumoscan.networks import checkpoint as ckpt_io  # noqa: E402
from pneumoscan.tasks.adapt import _raw_logits, adapt_model  # noqa: E402
from pneumoscan.core.calibration import fit_offset, fit_platt, output_map  # noqa: E402
from pneumoscan.io.images import load_grey  # noqa: E402
from pneumoscan.core.prevalence import estimate_prevalence, shift_prior, sigmoid  # noqa: E402
from pneumoscan.core.sites import mixed_subset  # noqa: E402

SITES = [("tuned-s0", None, "none", 0.3), ("tuned-s0", None, "site B (bright, harsh, lossy)", 0.3),
         ("tuned-s0", None, "gamma 1.6", 0.6), ("tuned-group-s0", "NORMAL2", "none", 0.3),
         ("tuned-group-s0", "NORMAL2", "none", 0.6)]


def smoothed_platt(y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    t = np.where(y == 1, (y.sum() + 1) / (y.sum() + 2), 1 / ((1 - y).sum() + 2))
    res = minimize(lambda ab: float(np.mean(np.logaddexp(0, ab[0] * z + ab[1]) - t * (ab[0] * z + ab[1]))),
                   np.array([1.0, 0.0]), method="BFGS")
    return 1 / res.x[0], res.x[1]


def site(runs: Path, run: str, group: str | None, shift: str, mix: float) -> tuple:
    path = str(runs / run / "best.pt")
    loaded = ckpt_io.load(path, "cpu")
    val = sb.site_samples(loaded.config, os.environ["PNEUMOSCAN_DATA"], group)
    labels = np.array([int(s.label > 0) for s in val])
    pixels = sb.site_pixels([load_grey(s.path) for s in val], shift, loaded.config.preprocessing)
    idx = mixed_subset(labels, mix, 300, seed=int(mix * 1000))
    model, record = adapt_model(loaded, path, pixels[idx])
    out = output_map(loaded.checkpoint, path, loaded.threshold).with_prior(None)
    return labels[idx], _raw_logits(model, pixels[idx], loaded.config.preprocessing), out, record


def variants(labels: np.ndarray, z: np.ndarray, out, est_u: float, draw: int) -> dict[str, float]:
    rng = np.random.default_rng(draw)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), 20, replace=False) for c in (0, 1)])
    rest = np.ones(len(labels), bool)
    rest[chosen] = False
    y, zl, zr, yr = labels[chosen], z[chosen], z[rest], labels[rest]

    def acc(p: np.ndarray, threshold: float = 0.5) -> float:
        return float(np.mean((p >= threshold) == (yr == 1)))

    def with_em(t: float, b: float) -> float:
        p = sigmoid(zr / t + b)
        return acc(shift_prior(p, 0.5, estimate_prevalence(p, 0.5, n_boot=0)["prevalence"]))

    moved = out.with_prior(est_u, "adapted")
    offset = fit_offset(y, zl, out.temperature)
    return {"A": acc(moved.apply(sigmoid(zr))[0], moved.decision_threshold), "B": with_em(*fit_platt(y, zl)),
            "C": with_em(*smoothed_platt(y, zl)), "D": with_em(out.temperature, offset),
            "E": acc(shift_prior(sigmoid(zr / out.temperature + offset), 0.5, est_u))}


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shift")
    means = []
    for run, group, shift, mix in SITES:
        labels, z, out, record = site(runs, run, group, shift, mix)
        est_u = record["prevalence"]["prevalence"]
        found = [variants(labels, z, out, est_u, draw) for draw in range(5)]
        means.append({k: np.mean([f[k] for f in found]) for k in found[0]})
        print(f"{run} {shift} {mix}: truth {labels.mean():.3f}, unlabelled estimate {est_u:.3f}; "
              + " ".join(f"{k} {v:.3f}" for k, v in means[-1].items()), flush=True)
    print("mean over sites: " + " ".join(f"{k} {np.mean([m[k] for m in means]):.3f}" for k in means[0]))


if __name__ == "__main__":
    main()
