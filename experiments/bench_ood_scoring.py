#!/usr/bin/env python3
"""Prediction with the out-of-distribution detector scored four ways, in alternating rounds: numpy's
einsum loop, numpy's matrix product, PyTorch's matrix product once per class mean, and PyTorch with the
quadratic form expanded so that the precision matrix is read once (what `ood.Detector.scores` does).
Each way is timed on folder prediction with the PyTorch backend (images/s) and on single-image
prediction with the ONNX Runtime backend (`predict_file` on JPEG bytes, p50 of 300 calls, the ways
alternating call by call), the latency where the detector's share is largest. The same images, model and detector as
`bench_predict.py`'s default; the scores must agree to 1e-9 (relative) for every image.

    .venv/bin/python experiments/bench_ood_scoring.py [--limit 512] [--rounds 3]

Prints each way's figures per round and the medians, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_predict import choose_files, fresh_checkpoint  # noqa: E402 (benchmarks/bench_predict.py)

from pneumoscan.networks import ood  # noqa: E402
from pneumoscan.tasks.predict import Predictor  # noqa: E402


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


def torch_per_class(self: ood.Detector, features) -> np.ndarray:
    f = torch.as_tensor(features).double().cpu()
    precision = torch.from_numpy(self.precision)
    best = torch.full((len(f),), torch.inf, dtype=torch.float64)
    for mu in self.means:
        d = f - torch.from_numpy(mu)
        best = torch.minimum(best, ((d @ precision) * d).sum(1))
    return _finish(best.numpy())


def one_image_p50s(predictor: Predictor, jpeg: bytes, ways: dict, calls: int = 300) -> dict[str, float]:
    """p50 ms of `predict_file(jpeg)` for each way, the ways alternating call by call (after 30 untimed
    calls each), so that the machine's slow spells fall on every way alike."""
    ms: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(30 + calls):
        for name in (list(ways) if i % 2 else list(ways)[::-1]):
            ood.Detector.scores = ways[name]
            t0 = time.perf_counter()
            predictor.predict_file(jpeg, name="latency.jpeg")
            if i >= 30:
                ms[name].append(1000 * (time.perf_counter() - t0))
    return {name: round(float(np.percentile(v, 50)), 3) for name, v in ms.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train", help="default: $PNEUMOSCAN_DATA/train")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    files = choose_files(args.data, args.limit, 0)
    paths = [str(f) for f in files]
    ways = {"numpy einsum": numpy_einsum, "numpy matmul": numpy_matmul, "torch, per class mean": torch_per_class,
            "torch, precision read once": ood.Detector.scores}
    rounds: dict[str, list[float]] = {name: [] for name in ways}
    latency: dict[str, list[float]] = {name: [] for name in ways}
    jpeg = files[0].read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = fresh_checkpoint(Path(tmp), files)
        predictor = Predictor(checkpoint, device="cpu")
        onnx_predictor = Predictor(checkpoint, backend="onnx")
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
            for name, p50 in one_image_p50s(onnx_predictor, jpeg, ways).items():
                latency[name].append(p50)
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    p50s = {name: statistics.median(v) for name, v in latency.items()}
    for name in ways:
        print(f"{name:27} folder (PyTorch) {medians[name]:7.1f} images/s, rounds {rounds[name]}; "
              f"one image (ONNX Runtime) p50 {p50s[name]:.2f} ms, rounds {latency[name]}")
    print(json.dumps({"benchmark": "ood-scoring", "n_images": len(paths), "rounds": rounds, "median_images_per_s": medians,
                      "onnx_one_image_p50_ms": latency, "median_onnx_one_image_p50_ms": p50s,
                      "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
