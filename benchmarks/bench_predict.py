#!/usr/bin/env python3
"""Prediction speed on this machine: pneumoscan (PyTorch and ONNX Runtime backends) against the Keras original.

One run measures, on the same N images (a seeded sample across NORMAL/ and PNEUMONIA/):

(a) folder of JPEGs -> probabilities with `Predictor` (torch backend, CPU), decoding included;
(b) the same with `Predictor(backend="onnx")`;
(c) the paper's Keras pipeline: ``.venv-tf/bin/python benchmarks/keras_baseline.py predict`` in a
    subprocess (its LAST stdout line is JSON; ``images_per_s`` is read), skipped when ``.venv-tf`` is
    missing (``bash benchmarks/setup_tf.sh`` creates it);
(a)-(c) run `--rounds` times, alternated, and each reports its median (the Keras figure swings between
about 45 and 100 images/s from one run to the next on the 2-core machine);
(d) single-image latency, p50 / p99 of ``Predictor.predict_file(jpeg_bytes)`` over ``--repeats`` calls
    after a warm-up, for both backends.

Each pipeline is warmed up on one batch before it is timed (as keras_baseline.py does), and every
file is read once beforehand so no pipeline pays for a cold disk. The chosen files are linked into a
temporary NORMAL/ + PNEUMONIA/ folder that every pipeline reads. Without ``--checkpoint`` a freshly
initialised paper model (150 px, PReLU) is used, with an out-of-distribution detector as every trained
checkpoint has: speed does not depend on the weights.

    .venv/bin/python benchmarks/bench_predict.py --limit 512
    .venv/bin/python benchmarks/bench_predict.py --checkpoint runs/x/best.pt --data "$PNEUMOSCAN_DATA/train"

Every pipeline's images/s is also stated against the machine's limit, measured in the same run
(``machine_peak.py``): times the GFLOP of one image's forward pass (counted on the paper's network,
which all three pipelines compute) it gives GFLOP/s, shown as a fraction of the FP32 and (where the
CPU has native BF16) BF16 matrix-product peak. ``--no-keras`` leaves the Keras baseline out.

Prints a table, then one JSON line (the last line) with every figure and the ratios to Keras.
Run it on an otherwise idle machine: next to another CPU-bound process, PyTorch's OpenMP threads
stall at every operator (seen on 2 cores beside a training job: ~590 ms per image with 2 threads,
~11 ms with 1). ``OMP_NUM_THREADS=N`` fixes the thread count of both pneumoscan backends.
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

import numpy as np
import onnxruntime
import torch

from pneumoscan import __version__
from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.core.config import Config
from pneumoscan.io.images import is_image_file
from pneumoscan.tasks.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("NORMAL", "PNEUMONIA")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine_peak  # noqa: E402 (the module beside this script)


def choose_files(data: Path, limit: int, seed: int) -> list[Path]:
    """A seeded sample of `limit` images drawn across both class folders (all of them if fewer)."""
    files = [f for cls in CLASSES if (data / cls).is_dir()
             for f in sorted((data / cls).rglob("*")) if f.is_file() and is_image_file(f)]
    if not files:
        raise SystemExit(f"no images under {data}/{{{','.join(CLASSES)}}}")
    if limit and len(files) > limit:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), size=limit, replace=False))]
    return files


def link_folder(files: list[Path], data: Path, dest: Path) -> list[str]:
    """Symlinks to `files` under dest/NORMAL and dest/PNEUMONIA; returns the links' paths."""
    links = []
    for f in files:
        rel = f.relative_to(data)
        link = dest / rel.parts[0] / "__".join(rel.parts[1:])
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
        links.append(str(link))
    return links


def fresh_checkpoint(dest: Path, files: list[Path]) -> Path:
    """An untrained paper model with an out-of-distribution detector, as every checkpoint `train` writes has
    one (the detector's features come from the same forward pass, but its scoring costs time too). The
    detector is fitted on the benchmark's first 256 images: its scores mean nothing, its cost is real."""
    from pneumoscan.io.images import load_for_model
    from pneumoscan.networks.inference import freeze
    from pneumoscan.networks.ood import fit_for_model

    cfg = Config()  # the paper's recipe: seed CNN, PReLU, 150 px
    torch.manual_seed(0)
    model = ckpt_io.build_model(cfg)
    sample = files[:256]
    pixels = torch.from_numpy(np.stack([load_for_model(f, cfg.preprocessing.image_size, cfg.preprocessing.resize_filter)
                                        for f in sample]))
    labels = np.array([int(f.parent.name == "PNEUMONIA") for f in sample])
    ckpt = ckpt_io.make_checkpoint(model, cfg, threshold=cfg.train.threshold)
    ckpt["ood"] = fit_for_model(freeze(model), pixels, labels, pixels, cfg.preprocessing).to_checkpoint()
    path = dest / "fresh-paper-model.pt"
    ckpt_io.save(ckpt, path)
    return path


def time_folder(predictor: Predictor, paths: list[str]) -> tuple[dict, np.ndarray]:
    size = predictor.prep.image_size
    predictor.predict_arrays(np.zeros((predictor.batch_size, size, size), np.uint8))  # warm-up, not timed
    t0 = time.perf_counter()
    rows = list(predictor.predict_files(paths))
    seconds = time.perf_counter() - t0
    errors = [r for r in rows if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} files failed, e.g. {errors[0].error}")
    return {"images_per_s": len(paths) / seconds, "seconds": seconds}, np.array([r.probability for r in rows])


def time_parts(predictor: Predictor, paths: list[str]) -> dict:
    """The folder's two halves apart: decoding every file (one core), then scoring the decoded pixels in
    batches (the network and the detector, on every thread)."""
    t0 = time.perf_counter()
    pixels = np.stack([predictor.load(p) for p in paths])
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(pixels), predictor.batch_size):
        predictor.score(pixels[i:i + predictor.batch_size])
    return {"decode": len(paths) / decode_s, "score": len(paths) / (time.perf_counter() - t0)}


def time_latency(predictor: Predictor, jpeg: bytes, repeats: int, warmup: int = 10) -> dict:
    for _ in range(warmup):
        predictor.predict_file(jpeg, name="latency.jpeg")
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict_file(jpeg, name="latency.jpeg")
        ms.append(1000.0 * (time.perf_counter() - t0))
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(np.mean(ms)), "repeats": repeats}


def run_keras(folder: Path, n: int, python: Path) -> dict:
    if not python.is_file():
        return {"skipped": f"{python} not found; run `bash benchmarks/setup_tf.sh` to create the Keras venv"}
    cmd = [str(python), str(ROOT / "benchmarks" / "keras_baseline.py"), "predict", "--data", str(folder),
           "--limit", str(n), "--array-images", str(min(n, 512))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"skipped": f"keras_baseline.py failed (exit {proc.returncode}): {' | '.join(tail)}"}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"skipped": f"keras_baseline.py's last line is not JSON: {lines[-1][:200]!r}"}
    if result.get("n_images") != n:
        return {"skipped": f"keras_baseline.py scored {result.get('n_images')} images, expected {n}"}
    return result


def rounded(values: list[float]) -> list[float]:
    return [round(v, 1) for v in values]


def inference_limit(checkpoint: Path) -> dict:
    """The machine, its FP32/BF16 peaks on this process's threads, and the GFLOP of one image's forward pass:
    the network as drawn (every pipeline's count) and pneumoscan's frozen inference form."""
    cfg = ckpt_io.load(checkpoint).config
    model, size = ckpt_io.build_model(cfg), cfg.preprocessing.image_size
    return {"machine": machine_peak.machine(), "peak": machine_peak.peaks(),
            "gflop_per_image": round(machine_peak.inference_gflop_per_image(model, size), 4),
            "gflop_per_image_executed": round(machine_peak.inference_gflop_per_image(model, size, frozen=True), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a pneumoscan checkpoint (default: a fresh paper model)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train",
                    help="folder with NORMAL/ and PNEUMONIA/ (default: $PNEUMOSCAN_DATA/train)")
    ap.add_argument("--limit", type=int, default=512, help="number of images (seeded sample; default 512)")
    ap.add_argument("--repeats", type=int, default=200, help="single-image latency repetitions (default 200)")
    ap.add_argument("--batch-size", type=int, default=32, help="pneumoscan batch size (Keras predicts in 32s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="folder timings per pipeline, alternated; medians (default 3)")
    ap.add_argument("--keras-python", type=Path, default=ROOT / ".venv-tf" / "bin" / "python")
    ap.add_argument("--no-keras", action="store_true", help="leave the Keras baseline out")
    args = ap.parse_args(argv)

    files = choose_files(args.data, args.limit, args.seed)
    n = len(files)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        paths = link_folder(files, args.data, folder)
        for f in files:  # warm the page cache so no pipeline pays for a cold disk
            f.read_bytes()
        checkpoint = args.checkpoint or fresh_checkpoint(tmp, files)
        limit = inference_limit(checkpoint)

        predictors, results, probs = {}, {}, {}
        for backend in ("torch", "onnx"):
            t0 = time.perf_counter()
            predictors[backend] = Predictor(checkpoint, device="cpu", batch_size=args.batch_size, backend=backend)
            results[backend] = {"startup_s": time.perf_counter() - t0, "rounds_images_per_s": [],
                                "rounds_decode_images_per_s": [], "rounds_score_images_per_s": []}
        keras_rounds: list[dict] = []
        for _ in range(args.rounds):  # alternated, so a noisy minute does not land on one pipeline only
            for backend, predictor in predictors.items():
                folder_result, probs[backend] = time_folder(predictor, paths)
                results[backend]["rounds_images_per_s"].append(folder_result["images_per_s"])
                for part, rate in time_parts(predictor, paths).items():
                    results[backend][f"rounds_{part}_images_per_s"].append(rate)
            keras_rounds.append({"skipped": "--no-keras"} if args.no_keras else run_keras(folder, n, args.keras_python))
        for backend, predictor in predictors.items():
            for key in ("images_per_s", "decode_images_per_s", "score_images_per_s"):
                results[backend][key] = float(np.median(results[backend][f"rounds_{key}"]))
            results[backend].update({f"latency_{k}": v for k, v in time_latency(predictor, files[0].read_bytes(),
                                                                                 args.repeats).items()})
        onnx_threads = predictors["onnx"].onnx.threads
        del predictors
        keras = next((k for k in keras_rounds if "skipped" in k), None) or {
            **keras_rounds[0], "rounds_images_per_s": [k["images_per_s"] for k in keras_rounds],
            "images_per_s": float(np.median([k["images_per_s"] for k in keras_rounds]))}
        cfg = ckpt_io.load(checkpoint).config

    keras_ips = keras.get("images_per_s")
    for r in (results["torch"], results["onnx"], keras):
        r.update(machine_peak.achieved(r.get("images_per_s"), limit["gflop_per_image"], limit["peak"]))
    summary = {
        "benchmark": "predict",
        "n_images": n,
        "data": str(args.data),
        "checkpoint": str(args.checkpoint) if args.checkpoint else "fresh paper model (untrained) with a detector",
        "image_size": cfg.preprocessing.image_size,
        "activation": cfg.model.activation,
        "batch_size": args.batch_size,
        "torch": results["torch"],
        "onnx": results["onnx"],
        "rounds": args.rounds,
        "keras": {k: keras[k] for k in ("images_per_s", "rounds_images_per_s", "tf_version", "keras_version", "gflops",
                                        "of_fp32_peak", "of_bf16_peak") if k in keras}
        if "skipped" not in keras else keras,
        "limit": limit,
        "ratio_torch_to_keras": results["torch"]["images_per_s"] / keras_ips if keras_ips else None,
        "ratio_onnx_to_keras": results["onnx"]["images_per_s"] / keras_ips if keras_ips else None,
        "ratio_onnx_to_torch": results["onnx"]["images_per_s"] / results["torch"]["images_per_s"],
        "max_abs_prob_diff_torch_onnx": float(np.max(np.abs(probs["torch"] - probs["onnx"]))),
        "env": {
            "cpu": limit["machine"]["cpu"], "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "onnx_threads": onnx_threads,
            "pneumoscan": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "loadavg_1m": os.getloadavg()[0],
        },
    }

    print(f"prediction benchmark: {n} images, {summary['image_size']} px, {summary['activation']}, "
          f"{summary['env']['cpu']} ({summary['env']['cpu_count']} CPUs, load {summary['env']['loadavg_1m']:.2f}; "
          f"threads: torch {summary['env']['torch_threads']}, onnx {onnx_threads})")
    print(machine_peak.describe(limit["machine"], limit["peak"]))
    print(f"folder images/s: median of {args.rounds} alternated rounds (each round's figure in brackets); GFLOP/s = "
          f"images/s x {limit['gflop_per_image']:.3f} GFLOP per image (the paper's network; the frozen form executes "
          f"{limit['gflop_per_image_executed']:.3f})")
    print(f"{'pipeline':<22}{'images/s':>10}{'vs Keras':>10}{'GFLOP/s':>9}{'% FP32':>8}{'% BF16':>8}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'startup s':>11}  rounds")
    pct = machine_peak.percent
    for name, key in (("pneumoscan torch", "torch"), ("pneumoscan onnx", "onnx")):
        r = results[key]
        ratio = f"{r['images_per_s'] / keras_ips:.2f}x" if keras_ips else "-"
        print(f"{name:<22}{r['images_per_s']:>10.1f}{ratio:>10}{r['gflops']:>9.1f}{pct(r['of_fp32_peak']):>8}"
              f"{pct(r['of_bf16_peak']):>8}{r['latency_p50_ms']:>9.2f}{r['latency_p99_ms']:>9.2f}"
              f"{r['startup_s']:>11.2f}  {rounded(r['rounds_images_per_s'])}")
    if keras_ips:
        print(f"{'keras (paper)':<22}{keras_ips:>10.1f}{'1.00x':>10}{keras['gflops']:>9.1f}{pct(keras['of_fp32_peak']):>8}"
              f"{pct(keras['of_bf16_peak']):>8}{'-':>9}{'-':>9}{'-':>11}  {rounded(keras['rounds_images_per_s'])}")
    else:
        print(f"keras (paper): skipped: {keras['skipped']}")
    executed = limit["gflop_per_image_executed"]
    for name, key in (("pneumoscan torch", "torch"), ("pneumoscan onnx", "onnx")):
        r = results[key]
        print(f"{name}, the folder's halves apart (medians): decoding alone {r['decode_images_per_s']:.1f} images/s "
              f"(one core); scoring the decoded pixels {r['score_images_per_s']:.1f} images/s, "
              f"{pct(r['score_images_per_s'] * executed / limit['peak']['fp32_gflops'])} of the FP32 peak by the executed "
              f"count (the whole folder: {pct(r['images_per_s'] * executed / limit['peak']['fp32_gflops'])})")
    print(f"max |p_torch - p_onnx| on these images: {summary['max_abs_prob_diff_torch_onnx']:.2g}"
          + ("" if args.checkpoint else " (untrained model: its outputs hardly vary, so this says little)"))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
