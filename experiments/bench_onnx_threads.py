#!/usr/bin/env python3
"""ONNX Runtime's intra-op threads three ways, for the ONNX backend of `Predictor`: two threads that spin
while waiting for work (ONNX Runtime's default, what `export.OnnxPredictor` uses), two that do not spin,
and one thread.

The same fresh checkpoint as `bench_predict.py` (an untrained paper model with a detector fitted on the
first 256 images). Single-image latency: `predict_file` on JPEG bytes, the three ways interleaved call by
call over `--calls` calls each, after 30 untimed calls; p50 and p99. Folders: `predict_files` on the first
64 images, the ways alternating over `--rounds` after an untimed batch each; the median images/s.

    .venv/bin/python experiments/bench_onnx_threads.py [--calls 400] [--rounds 5]

Prints both tables, then one JSON line.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_predict import choose_files, fresh_checkpoint  # noqa: E402 (benchmarks/bench_predict.py)

from pneumoscan.networks.export import remembered_onnx_bytes  # noqa: E402
from pneumoscan.tasks.predict import Predictor  # noqa: E402

WAYS = {"2 threads, spinning (default)": (2, "1"), "2 threads, not spinning": (2, "0"), "1 thread": (1, "1")}


def predictor(checkpoint: Path, threads: int, spin: str) -> Predictor:
    import onnxruntime as ort

    p = Predictor(checkpoint, backend="onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    p.onnx.session = ort.InferenceSession(remembered_onnx_bytes(checkpoint), sess_options=opts,
                                          providers=["CPUExecutionProvider"])
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train", help="default: $PNEUMOSCAN_DATA/train")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    files = choose_files(args.data, 256, 0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = fresh_checkpoint(Path(tmp), files)
        predictors = {way: predictor(checkpoint, *setting) for way, setting in WAYS.items()}
        jpegs = [f.read_bytes() for f in files[:8]]
        ms: dict[str, list[float]] = {way: [] for way in WAYS}
        for i in range(30 + args.calls):
            for way, p in predictors.items():
                start = time.perf_counter()
                p.predict_file(jpegs[i % len(jpegs)])
                if i >= 30:
                    ms[way].append((time.perf_counter() - start) * 1e3)
        folder = [str(f) for f in files[:64]]
        rates: dict[str, list[float]] = {way: [] for way in WAYS}
        for p in predictors.values():  # untimed: the first batch of 32 sets up its shape
            list(p.predict_files(folder[:32]))
        for _ in range(args.rounds):
            for way, p in predictors.items():
                start = time.perf_counter()
                list(p.predict_files(folder))
                rates[way].append(len(folder) / (time.perf_counter() - start))
    result = {way: {"p50_ms": float(np.percentile(ms[way], 50)), "p99_ms": float(np.percentile(ms[way], 99)),
                    "folder_images_per_s": statistics.median(rates[way]), "rounds": [round(r, 1) for r in rates[way]]}
              for way in WAYS}
    print("| ONNX Runtime threads | one image p50 / p99 | folder of 64, images/s (median; rounds) |\n|---|---|---|")
    for way, r in result.items():
        print(f"| {way} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | {r['folder_images_per_s']:.0f}; {r['rounds']} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
