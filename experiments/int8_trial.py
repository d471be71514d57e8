#!/usr/bin/env python3
"""Is int8 (NNCF post-training quantization) faster than BF16 for pneumoscan's model on this CPU?

Quantizes the exported ONNX model of a checkpoint with NNCF (`nncf.quantize`, default preset, calibrated on
`--calibration` training images decoded as pneumoscan decodes them) and times, in one process, the network
alone in OpenVINO: FP32 (`INFERENCE_PRECISION_HINT=f32`), BF16 and the int8 model, each a batch of 32
(images/s) and one image (p50 ms), in alternated rounds. Also prints the largest probability change of
int8 against FP32 on the calibration images. With `--run RUN` (a trained run folder) the model is its
best.pt, the calibration images are training images outside its validation split, and its validation
images (split.json) are scored too: ROC AUC of FP32, BF16 and int8 and their largest probability change.

    .venv/bin/python experiments/int8_trial.py [--run RUN] [--calibration 300] [--rounds 3]

Without --run a freshly initialised paper model with a detector is used (as bench_predict.py does).
Needs `pip install nncf` (not a pneumoscan dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_predict import choose_files, fresh_checkpoint, latency  # noqa: E402

import machine_peak  # noqa: E402
from pneumoscan.core.metrics import binary_metrics  # noqa: E402
from pneumoscan.networks.export import INPUT_NAME, OnnxPredictor, remembered_onnx_bytes  # noqa: E402
from pneumoscan.tasks.predict import Predictor  # noqa: E402


def compiled(core, model, precision: str | None):
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 2}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(model, "CPU", config)


def validation_figures(probs: dict, skip: int, val: list[str]) -> dict:
    """ROC AUC of each engine's probabilities on the validation files (after the first `skip` rows), and
    each reduced precision's AUC change and largest probability change against FP32."""
    labels = np.array([int(Path(f).parent.name != "NORMAL") for f in val])
    out: dict = {"images": len(val)}
    for k, p in probs.items():
        out[k] = {"roc_auc": binary_metrics(labels, p[skip:])["roc_auc"]}
        if k != "fp32":
            out[k]["auc_change"] = out[k]["roc_auc"] - out["fp32"]["roc_auc"]  # fp32 comes first
            out[k]["max_probability_change"] = float(np.abs(p[skip:] - probs["fp32"][skip:]).max())
    return out


def main() -> int:
    import nncf
    import openvino as ov

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a trained run folder (best.pt, split.json)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train")
    ap.add_argument("--calibration", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    val = json.loads((args.run / "split.json").read_text())["val"]["files"] if args.run else []
    held_out = set(val)
    files = [f for f in choose_files(args.data, args.calibration + len(val), 1) if str(f) not in held_out]
    files = files[:args.calibration]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.run / "best.pt" if args.run else fresh_checkpoint(Path(tmp), files)
        data = remembered_onnx_bytes(checkpoint)
        prep = OnnxPredictor(data)
        loader = Predictor(checkpoint, device="cpu")
        calib = prep.model_input(np.stack([loader.load(str(f)) for f in files]))
        x = np.concatenate([calib, prep.model_input(np.stack([loader.load(f) for f in val]))]) if val else calib
        core = ov.Core()
        model = core.read_model(data, ov.Tensor(np.empty(0, np.uint8)))
        t0 = time.perf_counter()
        int8 = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                             subset_size=len(calib))
        quantize_s = time.perf_counter() - t0
        engines = {"fp32": compiled(core, model, "f32"), "bf16": compiled(core, model, "bf16"),
                   "int8": compiled(core, int8, None)}
        requests = {k: c.create_infer_request() for k, c in engines.items()}

        def run(name, batch):
            return requests[name].infer({INPUT_NAME: batch})[0].copy()

        probs = {k: np.concatenate([run(k, x[i:i + 32]) for i in range(0, len(x), 32)]) for k in engines}
        validation = validation_figures(probs, len(calib), val) if val else None
        figures = {k: {"images_per_s": [], "p50_ms": []} for k in engines}
        for r in range(args.rounds):
            for name in (list(engines) if r % 2 else list(engines)[::-1]):
                batch = latency(lambda: run(name, x[:32]), 40, warmup=5)
                one = latency(lambda: run(name, x[:1]), 300)
                figures[name]["images_per_s"].append(round(32 / (batch["p50_ms"] / 1000), 1))
                figures[name]["p50_ms"].append(round(one["p50_ms"], 3))
    summary = {"benchmark": "int8-trial", "machine": machine_peak.machine(), "nncf": nncf.__version__,
               "openvino": ov.__version__, "quantize_s": round(quantize_s, 1), "calibration_images": len(calib),
               "checkpoint": str(checkpoint) if args.run else "fresh paper model (untrained)",
               "validation": validation,
               **{k: {**v, "median_images_per_s": statistics.median(v["images_per_s"]),
                      "median_p50_ms": statistics.median(v["p50_ms"])} for k, v in figures.items()},
               "max_abs_prob_change_vs_fp32_calibration": {
                   k: float(np.abs(probs[k][:len(calib)] - probs["fp32"][:len(calib)]).max()) for k in ("bf16", "int8")},
               "date": time.strftime("%Y-%m-%d")}
    for k in engines:
        s = summary[k]
        print(f"{k}: {s['median_images_per_s']:.1f} images/s (batch 32), one image p50 {s['median_p50_ms']:.2f} ms; "
              f"rounds {s['images_per_s']} / {s['p50_ms']}")
    if validation:
        print(f"validation ({validation['images']} images): " + ", ".join(
            f"{k} ROC AUC {validation[k]['roc_auc']:.5f}" + (f" (change {validation[k]['auc_change']:+.5f}, largest "
                                                             f"probability change {validation[k]['max_probability_change']:.4f})"
                                                             if k != "fp32" else "") for k in ("fp32", "bf16", "int8")))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
