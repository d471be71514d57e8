#!/usr/bin/env python3
"""Training speed: pneumoscan vs the original Keras/TensorFlow pipeline, end to end from the image folder.

Both run the paper's recipe (PReLU model, batch 16, zoom 0.5 + vertical flip) on the same folder, one
after the other in this one run, each in its own process so peak memory is its own:

- pneumoscan: `pneumoscan train --epochs N` (default 2) with an empty pixel cache. First-epoch time =
  setup (scan, patient split, decoding every JPEG into the cache) + epoch 1 (training and validation).
  Steady state = median training images/s of epochs 2..N (validation excluded, as for Keras).
- Keras: `benchmarks/keras_baseline.py train --epochs 1` in the separate TensorFlow venv made by
  `benchmarks/setup_tf.sh`; steady state excludes its first 10 batches.

    .venv/bin/python benchmarks/bench_train.py [--data DATA_ROOT] [--keras-epochs 1]

    .venv/bin/python benchmarks/bench_train.py --model-alone 60    # model only, in-memory batches

Every figure is also stated against the machine's limit, measured in the same run (`machine_peak.py`):
images/s times the GFLOP of one training image (forward and backward, counted on the paper's network)
gives GFLOP/s, shown as a fraction of the FP32 and (where the CPU has native BF16) BF16 matrix-product
peak. `--precision bf16` trains pneumoscan under BF16 autocast; `--no-keras` leaves the Keras baseline out.

Prints a table and one JSON line. Keras trains on all of train/ (the notebook has no validation split);
pneumoscan on train/ minus its validation patients, so compare images/s, not epoch times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERAS_PY = ROOT / ".venv-tf" / "bin" / "python"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine_peak  # noqa: E402 (the module beside this script)


def run_pneumoscan(data: str, epochs: int, extra: list[str], keep: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PNEUMOSCAN_CACHE": str(Path(tmp) / "cache")}
        out = Path(keep) if keep else Path(tmp) / "run"
        cmd = [sys.executable, "-m", "pneumoscan", "train", "--data", data, "--out", str(out), "--epochs", str(epochs),
               "--no-eval", "--no-progress", *extra]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_seconds": round(wall, 1),
        "setup_seconds": summary["setup_seconds"],
        "first_epoch_seconds": round(summary["setup_seconds"] + history[0]["epoch_seconds"], 1),
        "epoch_seconds": [h["epoch_seconds"] for h in history],
        "images_per_s": summary["train_images_per_s_median"],  # median over epochs 2..N
        "train_images": summary["train_images"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "val_accuracy": [round(h["val_accuracy"], 4) for h in history],
        "val_roc_auc": [round(h["val_roc_auc"], 4) for h in history],
    }


def run_keras(data: str, epochs: int) -> dict | None:
    if not KERAS_PY.exists():
        print(f"skipping the Keras baseline: {KERAS_PY} not found (run benchmarks/setup_tf.sh)", file=sys.stderr)
        return None
    cmd = [str(KERAS_PY), str(ROOT / "benchmarks" / "keras_baseline.py"), "train", "--data", str(Path(data) / "train"),
           "--epochs", str(epochs)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"images_per_s": round(r["images_per_s"], 1), "first_epoch_seconds": round(r["first_epoch_seconds"], 1),
            "train_images": r["n_images"], "peak_memory_mb": round(r["peak_rss_mb"], 1),
            "versions": f"TensorFlow {r['tf_version']}, Keras {r['keras_version']}"}


def pneumoscan_model_alone(steps: int, precision: str = "fp32", warmup: int = 10) -> dict:
    """The paper's model alone, as CPU training runs it (composed stem, channels-last, fused Adam, the forward
    pass under `precision`): steps on in-memory batches of 16 (no data pipeline), like train-arrays."""
    import torch

    from pneumoscan.networks.checkpoint import build_model
    from pneumoscan.core.config import Config
    from pneumoscan.networks.cpu_kernels import for_cpu_training
    from pneumoscan.networks.runtime import autocast, training_arithmetic
    from pneumoscan.tasks.train import make_optimizer, model_loss

    torch.manual_seed(0)
    cfg = Config()
    model = for_cpu_training(build_model(cfg)).to(memory_format=torch.channels_last).train()
    opt = make_optimizer(model, cfg, torch.device("cpu"), cuda_graphs=False)[0]
    x = torch.rand(16, 1, 150, 150).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(16) < 0.74).float()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        opt.zero_grad()
        with training_arithmetic(torch.device("cpu"), precision):
            with autocast(torch.device("cpu"), precision):
                logits = model(x)
            loss, _ = model_loss(model, logits.float(), y)
            loss.backward()
        opt.step()
    return {"images_per_s": round(16 * steps / (time.perf_counter() - t0), 1), "steps": steps}


def yardstick(precision: str) -> dict:
    """The machine, its FP32/BF16 peaks on this process's threads (the pipelines' too), and the GFLOP of one
    training image of the paper recipe: the network as drawn (every pipeline's count) and as run here."""
    from pneumoscan.core.config import recipe

    cfg = recipe("paper")
    return {"machine": machine_peak.machine(), "peak": machine_peak.peaks(),
            "gflop_per_image": round(machine_peak.training_gflop_per_image(cfg), 4),
            "gflop_per_image_executed": round(machine_peak.training_gflop_per_image(cfg, executed=True,
                                                                                  precision=precision), 4)}


def print_limit_rows(limit: dict, ours: dict, keras: dict | None) -> None:
    """GFLOP/s and the fractions of the FP32 and BF16 peaks, for pneumoscan and Keras."""
    k = keras or {}
    for key, label in (("gflops", "GFLOP/s"), ("of_fp32_peak", "of the FP32 peak"), ("of_bf16_peak", "of the BF16 peak")):
        a, b = ours.get(key), k.get(key)
        show = (lambda v: "-" if v is None else f"{v:.1f}") if key == "gflops" else machine_peak.percent
        ratio = f"{a / b:>7.2f}x" if a and b else f"{'-':>8}"
        print(f"{label:24}{show(a):>14}{show(b):>14}{ratio}")
    print(f"(GFLOP/s = images/s x {limit['gflop_per_image']:.3f} GFLOP per training image, forward and backward of "
          f"the paper's network; pneumoscan's CPU form executes {limit['gflop_per_image_executed']:.3f})")


def run_model_alone(steps: int, precision: str, with_keras: bool) -> int:
    limit = yardstick(precision)
    ours = pneumoscan_model_alone(steps, precision)
    keras = None
    if with_keras and KERAS_PY.exists():
        cmd = [str(KERAS_PY), str(ROOT / "benchmarks" / "keras_baseline.py"), "train-arrays", "--steps", str(steps + 10)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        keras = {"images_per_s": round(r["images_per_s"], 1)}
    for result in (ours, keras):
        if result:
            result.update(machine_peak.achieved(result["images_per_s"], limit["gflop_per_image"], limit["peak"]))
    ratio = round(ours["images_per_s"] / keras["images_per_s"], 2) if keras else None
    print(machine_peak.describe(limit["machine"], limit["peak"]))
    print(f"model alone, batches of 16, {precision}: pneumoscan {ours['images_per_s']} images/s, "
          f"Keras {keras['images_per_s'] if keras else 'n/a'} images/s, ratio {ratio}")
    print_limit_rows(limit, ours, keras)
    print(json.dumps({"mode": "model-alone", "precision": precision, "pneumoscan": ours, "keras": keras, "ratio": ratio,
                      "limit": limit, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCAN_DATA"), required="PNEUMOSCAN_DATA" not in os.environ,
                    help="data root (default: $PNEUMOSCAN_DATA)")
    ap.add_argument("--epochs", type=int, default=2, help="pneumoscan epochs (epochs 2..N give the steady state)")
    ap.add_argument("--keras-epochs", type=int, default=1)
    ap.add_argument("--no-keras", action="store_true", help="leave the Keras baseline out")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="pneumoscan's training arithmetic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", metavar="RUN_DIR", help="keep pneumoscan's run folder here (e.g. to evaluate it)")
    ap.add_argument("--model-alone", type=int, metavar="STEPS",
                    help="instead: the model alone on in-memory batches for STEPS steps, vs Keras train-arrays")
    args = ap.parse_args()
    import torch

    from pneumoscan.networks.runtime import check_precision

    try:  # the pneumoscan run would refuse it too, after the peak was measured
        check_precision(args.precision, torch.device("cpu" if args.model_alone else args.device))
    except ValueError as e:
        raise SystemExit(f"bench_train.py: {e}") from None
    if args.model_alone:
        return run_model_alone(args.model_alone, args.precision, not args.no_keras)

    limit = yardstick(args.precision)
    ours = run_pneumoscan(args.data, args.epochs, ["--device", args.device, "--precision", args.precision], args.keep)
    keras = None if args.no_keras else run_keras(args.data, args.keras_epochs)
    for result in (ours, keras):
        if result:
            result.update(machine_peak.achieved(result["images_per_s"], limit["gflop_per_image"], limit["peak"]))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "precision": args.precision, "limit": limit, "pneumoscan": ours, "keras": keras}
    print(machine_peak.describe(limit["machine"], limit["peak"]))
    print(f"{'':24}{'pneumoscan':>14}{'Keras/TF':>14}{'ratio':>8}")
    for key, label, better_high in (("images_per_s", "train images/s", True),
                                    ("first_epoch_seconds", "first epoch s", False),
                                    ("peak_memory_mb", "peak memory MB", False)):
        if not keras:
            result[f"ratio_{key}"] = None
            print(f"{label:24}{ours[key]:>14.1f}{'-':>14}{'-':>8}")
            continue
        k = keras[key]
        ratio = ours[key] / k if better_high else k / ours[key]
        result[f"ratio_{key}"] = round(ratio, 2)
        print(f"{label:24}{ours[key]:>14.1f}{k:>14.1f}{ratio:>7.2f}x")
    print_limit_rows(limit, ours, keras)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
