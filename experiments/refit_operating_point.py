#!/usr/bin/env python3
"""A checkpoint's operating point chosen again on validation under other settings, with the same weights.

The operating point (calibration, threshold rule, threshold and its interval, model prior) is chosen
after training, on validation, by `fitting.operating_point`; this rewrites it as a run trained with the
given `--threshold-rule` / `--calibration` would have it, so a rule can be compared on checkpoints that
already exist without training them again. The out-of-distribution detector is kept as it is.

    .venv/bin/python experiments/refit_operating_point.py RUN/best.pt OUT.pt --threshold-rule fixed [--data DATA_ROOT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prevalence_shift import validation_scores  # noqa: E402

from pneumoscan.core.config import Config  # noqa: E402
from pneumoscan.io.fileio import save_torch  # noqa: E402
from pneumoscan.tasks.fitting import operating_point  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--data", default=None, help="data root (default: the one in the checkpoint)")
    ap.add_argument("--threshold-rule", choices=["fixed", "youden", "sensitivity"])
    ap.add_argument("--calibration", choices=["none", "temperature", "platt"])
    a = ap.parse_args()
    ckpt = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    labels, z, _ = validation_scores(a.checkpoint, a.data)
    cfg = Config.from_dict(ckpt["config"]).override("train", threshold_rule=a.threshold_rule, calibration=a.calibration)
    ckpt["config"] = cfg.to_dict()
    ckpt.update(operating_point(cfg, labels > 0, z, ckpt["train_prevalence"]))
    save_torch(ckpt, a.out)
    print(f"{a.out}: threshold {ckpt['threshold']:.4f} ({cfg.train.threshold_rule}), calibration {ckpt['calibration']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
