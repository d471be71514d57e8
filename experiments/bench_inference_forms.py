#!/usr/bin/env python3
"""The frozen inference form's rewrites, each on and off: PReLU in the ONNX graph written three ways
(ONNX PRelu, as the plain `F.prelu` exports; relu(x) + min(x, 0) * alpha; max(x, alpha * x), what
`inference.FrozenPReLU` exports when no slope exceeds 1), and each block's BatchNorm kept or folded into
its pointwise convolution (`inference.fold_batchnorm`).

All on the same fresh checkpoint (with an out-of-distribution detector, as `bench_predict.py` makes it):

- ONNX Runtime: every way is exported in its own process, then all are timed in one process, in
  blocks that alternate over `--rounds` (the machine's slow spells last seconds, so blocks spread them
  over every way): each block runs 10 untimed calls (another session's threads may still be spinning),
  then 50 timed calls on one image and 2 batches of 32. Reported: p50 of one image over all blocks and
  the median of the blocks' images/s. All ways must give the same probabilities and detector features.
- PyTorch (the frozen form has no ONNX PReLU, so only the BatchNorm rewrite changes it): both forms in
  one process, alternating over `--torch-rounds`: images/s over 256 images in batches of 32, p50 of one
  image over 50 calls.

    .venv/bin/python experiments/bench_inference_forms.py [--rounds 15] [--torch-rounds 12]

Prints each round and the medians, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # bench_predict.py

WAYS = {  # name: (ONNX PReLU form, BatchNorm folded)
    "PRelu, BatchNorm kept": ("prelu", False),
    "relu+min, BatchNorm kept": ("relu+min", False),
    "max, BatchNorm kept": ("max", False),
    "relu+min, BatchNorm folded": ("relu+min", True),
    "max, BatchNorm folded (pneumoscan)": ("max", True),
}


def use_way(prelu: str, fold: bool) -> None:
    """Make `inference.freeze` build the frozen form this way (in this process only)."""
    import torch.nn.functional as F

    from pneumoscan.networks import inference

    if not fold:
        inference.fold_batchnorm = lambda block: None
    if prelu == "prelu":
        inference.FrozenPReLU.forward = lambda self, x: F.prelu(x.reshape(x.shape[0], -1), self.alpha.reshape(-1)).view(x.shape)
    elif prelu == "relu+min":
        built = inference.FrozenPReLU.__init__

        def init(self, *args, **kwargs):
            built(self, *args, **kwargs)
            self.slopes_at_most_one = False  # the general form

        inference.FrozenPReLU.__init__ = init


def one_image_p50(run, one, calls: int) -> float:
    """p50 ms of `run(one)` over `calls` calls, after a few untimed ones."""
    for _ in range(max(5, calls // 10)):
        run(one)
    ms = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(one)
        ms.append(1000 * (time.perf_counter() - t0))
    return round(float(np.percentile(ms, 50)), 3)


def images_per_s(run, batches: list) -> float:
    run(batches[0])
    t0 = time.perf_counter()
    for batch in batches:
        run(batch)
    return round(sum(len(b) for b in batches) / (time.perf_counter() - t0), 1)


def export(way: str, checkpoint: str, out: str) -> None:
    """In this process: export the checkpoint built `way` to `out`."""
    use_way(*WAYS[way])
    from pneumoscan.networks.export import export_onnx_bytes

    Path(out).write_bytes(export_onnx_bytes(checkpoint))  # checked against PyTorch to 1e-4


def onnx_ways(files: dict[str, Path], rounds: int) -> dict[str, dict]:
    """Every export in its own ONNX Runtime session, timed in alternating blocks in this process."""
    import onnxruntime as ort

    from pneumoscan.networks.export import FEATURES_NAME, OUTPUT_NAME

    rng = np.random.default_rng(0)
    one, batch = (rng.random((n, 1, 150, 150), dtype=np.float32) for n in (1, 32))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {way: ort.InferenceSession(str(f), sess_options=opts, providers=["CPUExecutionProvider"])
                for way, f in files.items()}
    ms: dict[str, list[float]] = {way: [] for way in sessions}
    rates: dict[str, list[float]] = {way: [] for way in sessions}
    for r in range(rounds):
        for way in (list(sessions) if r % 2 else list(sessions)[::-1]):
            run = lambda a, s=sessions[way]: s.run(None, {"pixels": a})
            for _ in range(10):
                run(one)
            for _ in range(50):
                t0 = time.perf_counter()
                run(one)
                ms[way].append(1000 * (time.perf_counter() - t0))
            rates[way].append(images_per_s(run, [batch] * 2))
    out = {}
    for way, session in sessions.items():
        probability, features = session.run([OUTPUT_NAME, FEATURES_NAME], {"pixels": batch})
        out[way] = {"p50_ms": round(float(np.percentile(ms[way], 50)), 3), "batch_images_per_s": rates[way],
                    "probability_sum": float(probability.astype(np.float64).sum()),
                    "features_sum": float(features.astype(np.float64).sum())}
    return out


def torch_forms(checkpoint: str, rounds: int) -> dict[str, dict[str, list[float]]]:
    """The PyTorch frozen form with each block's BatchNorm kept and folded, alternating in this process."""
    import torch

    from pneumoscan.networks import checkpoint as ckpt_io
    from pneumoscan.networks import inference
    from pneumoscan.networks.runtime import keep_freed_memory

    keep_freed_memory()
    loaded = ckpt_io.load(checkpoint, torch.device("cpu"))
    models = {"BatchNorm folded (pneumoscan)": inference.freeze(loaded.model)}
    fold, inference.fold_batchnorm = inference.fold_batchnorm, lambda block: None
    models["BatchNorm kept"] = inference.freeze(loaded.model)
    inference.fold_batchnorm = fold
    pixels = torch.randint(0, 256, (256, 150, 150), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = [inference.model_input(pixels[i:i + 32], loaded.config.preprocessing) for i in range(0, 256, 32)]
    one = batches[0][:1].contiguous(memory_format=torch.channels_last)
    out: dict[str, dict[str, list[float]]] = {name: {"p50_ms": [], "batch_images_per_s": []} for name in models}
    with torch.no_grad():
        for r in range(rounds):
            for name in sorted(models, reverse=bool(r % 2)):  # alternate which goes first
                out[name]["batch_images_per_s"].append(images_per_s(models[name], batches))
                out[name]["p50_ms"].append(one_image_p50(models[name], one, 50))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the ONNX Runtime blocks")
    ap.add_argument("--torch-rounds", type=int, default=12, help="rounds of the two PyTorch forms")
    ap.add_argument("--export", nargs=3, metavar=("WAY", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export:
        export(*args.export)
        return 0
    from bench_predict import choose_files, fresh_checkpoint

    files = choose_files(Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train", 256, 0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(fresh_checkpoint(Path(tmp), files))
        exports = {way: Path(tmp) / f"way{i}.onnx" for i, way in enumerate(WAYS)}
        for way, out in exports.items():
            subprocess.run([sys.executable, __file__, "--export", way, checkpoint, str(out)], check=True,
                           capture_output=True)
        torch_rounds = torch_forms(checkpoint, args.torch_rounds)
        onnx = onnx_ways(exports, args.rounds)
    for key in ("probability_sum", "features_sum"):  # the detector's features pass through every block
        sums = [r[key] for r in onnx.values()]
        assert max(sums) - min(sums) < 1e-3 * max(1.0, abs(sums[0])), (key, sums)
    keys = ("p50_ms", "batch_images_per_s")
    medians = {"onnx": {way: {"p50_ms": r["p50_ms"], "batch_images_per_s": statistics.median(r["batch_images_per_s"])}
                        for way, r in onnx.items()},
               "torch": {form: {k: statistics.median(v[k]) for k in keys} for form, v in torch_rounds.items()}}
    for backend, label in (("torch", "PyTorch"), ("onnx", "ONNX Runtime")):
        for way, m in medians[backend].items():
            print(f"{label:12} {way:35} one image p50 {m['p50_ms']:.2f} ms, batches of 32 "
                  f"{m['batch_images_per_s']:.1f} images/s (medians)")
    folded, kept = (torch_rounds[f]["batch_images_per_s"] for f in ("BatchNorm folded (pneumoscan)", "BatchNorm kept"))
    print(f"PyTorch: the folded form was faster in {sum(a > b for a, b in zip(folded, kept))} of {len(kept)} rounds")
    print(json.dumps({"benchmark": "inference-forms", "onnx": onnx, "torch_rounds": torch_rounds,
                      "medians": medians, "threads": 2, "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
