#!/usr/bin/env python3
"""How often the out-of-distribution score flags images that are not chest radiographs, and radiographs.

Fits the detector for an existing checkpoint on its own training split (rebuilt from the checkpoint's
config and split.json, as `pneumoscan fit-ood` does), threshold at the 0.99 quantile of its validation
split, into a copy (the checkpoint itself is left as it is). Then scores, through `Predictor`, images
nobody here made (tests/foreign.py: scikit-learn's and scikit-image's sample photographs, pydicom's
CT_small and MR_small, blank and uniform-noise images) and reports the fraction flagged per set, with
the validation split's.

    .venv/bin/python experiments/ood_check.py runs/paper-quickstart/best.pt --data DATA_ROOT

Prints a Markdown table, then one JSON line (the last line) with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumoscan.tasks.fitting import fit_checkpoint  # noqa: E402
from pneumoscan.tasks.predict import Predictor  # noqa: E402
from tests.foreign import foreign_sets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default=None, help="data root (default: the checkpoint's)")
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "best.pt"
        shutil.copy(a.checkpoint, copy)
        src_split = Path(a.checkpoint).with_name("split.json")
        if src_split.is_file():
            shutil.copy(src_split, copy.with_name("split.json"))  # the remembered split travels with it
        detector = fit_checkpoint(str(copy), a.data, device=a.device, quantile=a.quantile, progress=False)
        predictor = Predictor(copy, device=a.device)
        rows = {"validation radiographs (fit threshold)": (None, detector.val_flagged)}
        per_image = {}
        for name, items in foreign_sets().items():
            pixels = np.stack([predictor.load(src, name=n) for n, src in items])
            _, _, scores = predictor.score(pixels)
            flagged = detector.flags(scores)
            rows[name] = (len(items), float(flagged.mean()))
            per_image.update({n: round(float(s), 2) for (n, _), s in zip(items, scores)})
    foreign_n = sum(n for n, _ in rows.values() if n)
    foreign_flagged = sum(n * f for n, f in rows.values() if n)
    print("| set | images | flagged |\n|---|---:|---:|")
    for name, (n, f) in rows.items():
        print(f"| {name} | {'' if n is None else n} | {f:.1%} |")
    print(f"| all foreign images | {foreign_n} | {foreign_flagged / foreign_n:.1%} |")
    print(json.dumps({"checkpoint": a.checkpoint, "detector": detector.describe(),
                      "sets": {k: {"n": n, "fraction_flagged": f} for k, (n, f) in rows.items()},
                      "foreign_fraction_flagged": foreign_flagged / foreign_n, "scores": per_image,
                      "machine": platform.processor() or platform.machine(), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
