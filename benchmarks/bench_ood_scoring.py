#!/usr/bin/env python3
"""Folder prediction with the out-of-distribution detector scored three ways, in alternating rounds:
numpy's einsum loop (the earlier code), numpy's matrix product, and PyTorch's matrix product (what
`ood.Detector.scores` uses). The same images, model and detector as `bench_predict.py`'s default; the
scores must agree to 1e-9 (relative) for every image.

    .venv/bin/python benchmarks/bench_ood_scoring.py [--limit 512] [--rounds 3]

Prints each way's images/s per round and the medians, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import ROOT, choose_files, fresh_checkpoint  # noqa: E402 (the module beside this script)

from pneumoscan import ood  # noqa: E402
from pneumoscan.predict import Predictor  # noqa: E402


def _finish(best: np.ndarray) -> np.ndarray:
    out = np.sqrt(np.maximum(best, 0.0))
    return np.where(np.isfinite(out), out, np.inf)


def numpy_einsum(self: ood.Detector, features) -> np.ndarray:
    f = torch.as_tensor(features).double().cpu().numpy()
    best = np.full(len(f), np.inf)
    for mu in self.means:
        d = f - mu
        best = np.minimum(best, np.einsum("nd,de,ne->n", d, self.precision, d))
    return _finish(best)


def numpy_matmul(self: ood.Detector, features) -> np.ndarray:
    f = torch.as_tensor(features).double().cpu().numpy()
    best = np.full(len(f), np.inf)
    for mu in self.means:
        d = f - mu
        best = np.minimum(best, ((d @ self.precision) * d).sum(1))
    return _finish(best)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data" / "chest_xray" / "train")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    files = choose_files(args.data, args.limit, 0)
    paths = [str(f) for f in files]
    ways = {"numpy einsum": numpy_einsum, "numpy matmul": numpy_matmul, "torch matmul": ood.Detector.scores}
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    with tempfile.TemporaryDirectory() as tmp:
        predictor = Predictor(fresh_checkpoint(Path(tmp), files), device="cpu")
        reference = None
        for _ in range(args.rounds):
            for name, scores in ways.items():
                ood.Detector.scores = scores
                list(predictor.predict_files(paths[:64]))  # warm-up
                t0 = time.perf_counter()
                rows = list(predictor.predict_files(paths))
                rounds[name].append(round(len(paths) / (time.perf_counter() - t0), 1))
                got = np.array([r.ood_score for r in rows])
                reference = got if reference is None else reference
                np.testing.assert_allclose(got, reference, rtol=1e-9)
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    for name, v in rounds.items():
        print(f"{name:14} {medians[name]:8.1f} images/s  rounds {v}")
    print(json.dumps({"benchmark": "ood-scoring", "n_images": len(paths), "rounds": rounds, "median_images_per_s": medians,
                      "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
