#!/usr/bin/env python3
"""A trained checkpoint at other sites' prevalences: validation resampled to a new class mix.

The validation split the checkpoint was trained against is rebuilt (as `pneumoscan evaluate --split val`
does) and scored once. For each target prevalence P, `--n` images (default: as many as validation holds)
are drawn with replacement, per class, so that a fraction P is pneumonia (seeded). For each resample:

- the EM estimate of its prevalence from the probabilities alone (Saerens et al. 2002) with its 95%
  bootstrap interval, using the checkpoint's own map (`calibration.output_map`; a checkpoint without a
  stored calibration keeps its raw probabilities);
- accuracy at the checkpoint's threshold unadjusted, moved to the estimated prevalence, and moved to
  the true one (an upper reference);
- the EM estimate after a temperature fitted on the whole validation split (in sample: the resamples
  are drawn from the same images, so this column shows what calibration can do, not a held-out figure).

    .venv/bin/python experiments/prevalence_shift.py runs/paper-quickstart/best.pt \\
        --data DATA_ROOT

Prints a Markdown table, then one JSON line (the last line) with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace

import numpy as np
import torch

from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.core.calibration import fit_temperature, output_map
from pneumoscan.io.data import cache_images, load_split, task_labels
from pneumoscan.networks.inference import freeze, predict_logits
from pneumoscan.core.metrics import binary_metrics
from pneumoscan.networks.models import pneumonia_logit
from pneumoscan.core.prevalence import estimate_prevalence, shift_prior, sigmoid


def validation_scores(checkpoint: str, data_root: str | None) -> tuple[np.ndarray, np.ndarray, object]:
    """(labels, raw logits of pneumonia, the checkpoint's output map) on its validation split."""
    loaded = ckpt_io.load(checkpoint, "cpu")
    cfg = loaded.config if not data_root else replace(loaded.config, data=replace(loaded.config.data, root=data_root))
    cached = cache_images(load_split(cfg.data, "val"), cfg.preprocessing, progress=False)
    labels = (task_labels(cached.samples, cfg.data.task) > 0).astype(int)
    logits = predict_logits(freeze(loaded.model), torch.from_numpy(cached.pixels), cfg.preprocessing,
                            cfg.train.eval_batch_size)
    z = pneumonia_logit(logits.float()).numpy().astype(np.float64)
    return labels, z, output_map(loaded.checkpoint, checkpoint, loaded.threshold)


def resample(labels: np.ndarray, prevalence: float, n: int, rng: np.random.Generator) -> np.ndarray:
    n_pos = round(n * prevalence)
    return np.concatenate([rng.choice(np.flatnonzero(labels == 1), n_pos),
                           rng.choice(np.flatnonzero(labels == 0), n - n_pos)])


def accuracy(labels: np.ndarray, probs: np.ndarray, om, prior: float | None) -> float:
    """Accuracy of probabilities at the model's prior, moved to `prior` (None: unmoved), at the threshold
    that applies there."""
    moved = om.with_prior(prior) if prior is not None else om
    at = shift_prior(probs, om.model_prior, prior) if prior is not None else probs
    return binary_metrics(labels, at, moved.decision_threshold)["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default=None, help="data root (default: the checkpoint's)")
    ap.add_argument("--prevalences", type=float, nargs="+", default=[0.3, 0.5, 0.62, 0.9])
    ap.add_argument("--n", type=int, default=None, help="images per resample (default: the validation size)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    labels, z, om = validation_scores(a.checkpoint, a.data)
    probs = om.apply(sigmoid(z))[0]
    prior = om.model_prior
    t_fit = fit_temperature(labels, z / om.temperature)
    probs_t = sigmoid(z / om.temperature / t_fit)
    rng = np.random.default_rng(a.seed)
    n = a.n or len(labels)
    rows = []
    for p in a.prevalences:
        idx = resample(labels, p, n, rng)
        y, q = labels[idx], probs[idx]
        est = estimate_prevalence(q, prior, seed=a.seed)
        est_t = estimate_prevalence(probs_t[idx], prior, seed=a.seed)
        rows.append({"prevalence": p, "n": n, "em": est["prevalence"], "em_interval": est["interval"],
                     "em_temperature": est_t["prevalence"], "em_temperature_interval": est_t["interval"],
                     "accuracy_unadjusted": accuracy(y, q, om, None),
                     "accuracy_estimated_prior": accuracy(y, q, om, est["prevalence"]),
                     "accuracy_true_prior": accuracy(y, q, om, p)})
    print(f"checkpoint {a.checkpoint}: {len(labels)} validation images ({labels.mean():.3f} pneumonia); model prior "
          f"{prior:.3f}; stored temperature {om.temperature:.3f}; in-sample temperature {t_fit:.3f}\n")
    print("| prevalence | EM estimate [95% interval] | EM after temperature | accuracy unadjusted | "
          "moved to estimate | moved to true prior |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["em_interval"]
        tlo, thi = r["em_temperature_interval"]
        gain = r["accuracy_estimated_prior"] - r["accuracy_unadjusted"]
        print(f"| {r['prevalence']:.2f} | {r['em']:.3f} [{lo:.3f}, {hi:.3f}] | {r['em_temperature']:.3f} [{tlo:.3f}, "
              f"{thi:.3f}] | {r['accuracy_unadjusted']:.3f} | {r['accuracy_estimated_prior']:.3f} ({gain:+.3f}) | "
              f"{r['accuracy_true_prior']:.3f} |")
    print(json.dumps({"checkpoint": a.checkpoint, "val_images": int(len(labels)), "model_prior": prior,
                      "temperature_stored": om.temperature, "temperature_in_sample": t_fit, "seed": a.seed,
                      "machine": platform.processor() or platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
