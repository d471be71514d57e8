#!/usr/bin/env python3
"""Prediction with the out-of-distribution detector scored eight ways, in alternating rounds: numpy's
einsum loop, numpy's matrix product, PyTorch's matrix product once per class mean, PyTorch with the
quadratic form expanded so that the precision matrix is read once (in float64, on all of PyTorch's
threads or, as `Predictor.score` runs any way beside an engine, on one), and the float32 whitened form
|(f − c)ᵀW − (m − c)ᵀW| (P = WWᵀ) with numpy's product always or, as `ood.Detector.scores` does, numpy's
for one image and PyTorch's for a batch (on one thread beside an engine, the shipped way, or on all). One backend per process (another engine's idle threads in the
same process distort the figures): each way is timed on folder prediction through the pipeline
`pneumoscan predict` runs (images/s), on scoring the decoded pixels (`Predictor.score`, batches of 32,
no decoding) and on single images (`pipeline.predict_file_fast` on JPEG bytes,
p50 of 300 calls after 30), the latency where the detector's share is largest. The same images, model and
detector as `bench_predict.py`'s default; the scores must agree to 1e-5 (relative) for every image.

    .venv/bin/python experiments/bench_ood_scoring.py [--backend openvino-bf16|onnx|openvino|torch] [--limit 512] [--rounds 3]
        [--ways "torch read once all threads,whitened all threads,whitened (shipped)"]

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
from pneumoscan.networks.runtime import torch_threads  # noqa: E402
from pneumoscan.tasks.pipeline import predict_file_fast, predict_files_pipelined  # noqa: E402
from pneumoscan.tasks.predict import Predictor  # noqa: E402


ALL_THREADS = torch.get_num_threads()
SHIPPED = ood.Detector.scores


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


def torch_read_once(self: ood.Detector, features) -> np.ndarray:
    """fᵀPf − 2fᵀ(Pm) + mᵀPm, P read once for both class means (`Detector.scores` before the whitened form)."""
    f = torch.as_tensor(features).double().cpu()
    precision, means = torch.from_numpy(self.precision), torch.from_numpy(self.means)
    by_mean = means @ precision
    q = ((f @ precision) * f).sum(1, keepdim=True) - 2.0 * (f @ by_mean.T) + (by_mean * means).sum(1)
    return _finish(q.min(1).values.numpy())


def torch_read_once_all_threads(self: ood.Detector, features) -> np.ndarray:
    """`torch_read_once` on all of PyTorch's threads even beside an inference engine (the behaviour before
    `Predictor.score` ran the detector on one thread there)."""
    with torch_threads(ALL_THREADS):
        return torch_read_once(self, features)


def whitened_numpy(self: ood.Detector, features) -> np.ndarray:
    """`Detector.scores` with numpy's product for every batch size (it takes PyTorch's for batches)."""
    centre, factor, whitened_means = self._whitening
    centred = (torch.as_tensor(features).double().cpu().numpy() - centre).astype(np.float32)
    d = ((centred @ factor)[:, None, :] - whitened_means[None]).astype(np.float64)
    return _finish((d * d).sum(-1).min(1))


def whitened_all_threads(self: ood.Detector, features) -> np.ndarray:
    """`Detector.scores` on all of PyTorch's threads even beside an inference engine."""
    with torch_threads(ALL_THREADS):
        return SHIPPED(self, features)


def scoring_rate(predictor: Predictor, pixels: np.ndarray, batch: int = 32) -> float:
    """Images/s of `Predictor.score` (the network and the detector, no decoding) over `pixels` in batches."""
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch):
        predictor.score(pixels[i:i + batch])
    return round(len(pixels) / (time.perf_counter() - t0), 1)


def one_image_p50(predictor: Predictor, jpeg: bytes, calls: int = 300) -> float:
    """p50 ms of `predict_file_fast(jpeg)` over `calls` calls, after 30 untimed ones."""
    ms = []
    for i in range(30 + calls):
        t0 = time.perf_counter()
        predict_file_fast(predictor, jpeg, name="latency.jpeg")
        if i >= 30:
            ms.append(1000 * (time.perf_counter() - t0))
    return round(float(np.percentile(ms, 50)), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train", help="default: $PNEUMOSCAN_DATA/train")
    ap.add_argument("--backend", default="openvino-bf16", help="the one backend this process runs (default openvino-bf16)")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ways", help="comma-separated names of the ways to time (default: all eight)")
    args = ap.parse_args()
    files = choose_files(args.data, args.limit, 0)
    paths = [str(f) for f in files]
    ways = {"numpy einsum": numpy_einsum, "numpy matmul": numpy_matmul, "torch per class mean": torch_per_class,
            "torch read once all threads": torch_read_once_all_threads, "torch read once": torch_read_once,
            "whitened numpy always": whitened_numpy, "whitened all threads": whitened_all_threads,
            "whitened (shipped)": SHIPPED}
    if args.ways:
        unknown = set(args.ways.split(",")) - set(ways)
        if unknown:
            raise SystemExit(f"unknown ways {sorted(unknown)}; choose from {list(ways)}")
        ways = {name: f for name, f in ways.items() if name in args.ways.split(",")}
    folder: dict[str, list[float]] = {name: [] for name in ways}
    scoring: dict[str, list[float]] = {name: [] for name in ways}
    latency: dict[str, list[float]] = {name: [] for name in ways}
    jpeg = files[0].read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        predictor = Predictor(fresh_checkpoint(Path(tmp), files), device="cpu", backend=args.backend)
        pixels = np.stack([predictor.load(f) for f in paths])
        reference = None
        for i in range(args.rounds):  # the ways' order reversed every other round
            for name in (list(ways) if i % 2 else list(ways)[::-1]):
                ood.Detector.scores = ways[name]
                list(predict_files_pipelined(predictor, paths[:64]))  # warm-up
                t0 = time.perf_counter()
                rows = list(predict_files_pipelined(predictor, paths))
                folder[name].append(round(len(paths) / (time.perf_counter() - t0), 1))
                got = np.array([r.ood_score for r in rows])
                reference = got if reference is None else reference
                np.testing.assert_allclose(got, reference, rtol=1e-5)
                scoring[name].append(scoring_rate(predictor, pixels))
                latency[name].append(one_image_p50(predictor, jpeg))
    medians = {name: statistics.median(v) for name, v in folder.items()}
    p50s = {name: statistics.median(v) for name, v in latency.items()}
    scoring_medians = {name: statistics.median(v) for name, v in scoring.items()}
    for name in ways:
        print(f"{name:28} folder {medians[name]:7.1f} images/s, rounds {folder[name]}; scoring decoded pixels "
              f"{scoring_medians[name]:7.1f}, rounds {scoring[name]}; one image p50 {p50s[name]:.2f} ms, rounds {latency[name]}")
    print(json.dumps({"benchmark": "ood-scoring", "backend": args.backend, "n_images": len(paths), "folder_rounds": folder,
                      "median_images_per_s": medians, "scoring_rounds": scoring,
                      "median_scoring_images_per_s": scoring_medians, "one_image_p50_ms": latency, "median_one_image_p50_ms": p50s,
                      "torch_threads": ALL_THREADS, "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
