#!/usr/bin/env python3
"""ONNX Runtime on the paper's network with its per-element PReLU written two ways: as ONNX PRelu (the
plain `F.prelu`) and as relu(x) + min(x, 0) * alpha (what `inference.FrozenPReLU` exports). Each way is
exported from the same fresh checkpoint (with an out-of-distribution detector, as `bench_predict.py`
makes it) and timed in its own process, the processes alternating over `--rounds` (sessions sharing a
process disturb each other's thread pools): p50 of one image over 300 calls, and images/s in batches
of 32. The two exports must give the same outputs.

    .venv/bin/python benchmarks/bench_onnx_prelu.py [--rounds 5]

Prints each round and the medians, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def measure(way: str, checkpoint: str) -> dict:
    """In this process: export `way`, then time one-image calls and batches of 32."""
    import onnxruntime as ort
    import torch.nn.functional as F

    import pneumoscan.inference as inference
    from pneumoscan.export import OUTPUT_NAME, export_onnx_bytes

    if way == "prelu":
        inference.FrozenPReLU.forward = lambda self, x: F.prelu(x.reshape(x.shape[0], -1), self.alpha.reshape(-1)).view(x.shape)
    data = export_onnx_bytes(checkpoint)  # checked against PyTorch to 1e-4
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    one, batch = (rng.random((n, 1, 150, 150), dtype=np.float32) for n in (1, 32))
    for _ in range(20):
        session.run(None, {"pixels": one})
    ms = []
    for _ in range(300):
        t0 = time.perf_counter()
        session.run(None, {"pixels": one})
        ms.append(1000 * (time.perf_counter() - t0))
    session.run(None, {"pixels": batch})
    t0 = time.perf_counter()
    for _ in range(8):
        session.run(None, {"pixels": batch})
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "batch_images_per_s": round(256 / (time.perf_counter() - t0), 1),
            "probability_sum": float(session.run([OUTPUT_NAME], {"pixels": batch})[0].astype(np.float64).sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--measure", nargs=2, metavar=("WAY", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    from bench_predict import ROOT, choose_files, fresh_checkpoint

    files = choose_files(ROOT / ".." / "shared" / "data" / "chest_xray" / "train", 256, 0)
    rounds: dict[str, list[dict]] = {"prelu": [], "relu+min": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(fresh_checkpoint(Path(tmp), files))
        for _ in range(args.rounds):
            for way in rounds:
                out = subprocess.run([sys.executable, __file__, "--measure", way, checkpoint], check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1]
                rounds[way].append(json.loads(out))
                print(way, rounds[way][-1], flush=True)
    sums = [r["probability_sum"] for v in rounds.values() for r in v]
    assert max(sums) - min(sums) < 1e-3, sums
    medians = {way: {k: statistics.median(r[k] for r in v) for k in ("p50_ms", "batch_images_per_s")} for way, v in rounds.items()}
    for way, m in medians.items():
        print(f"{way:9} one image p50 {m['p50_ms']:.2f} ms, batches of 32 {m['batch_images_per_s']:.1f} images/s (medians)")
    print(json.dumps({"benchmark": "onnx-prelu", "rounds": rounds, "medians": medians, "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
