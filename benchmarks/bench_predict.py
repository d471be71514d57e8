#!/usr/bin/env python3
"""Prediction speed on this machine: pneumoscan's backends side by side, against OpenVINO's defaults and the Keras original.

One run measures, on the same N images (a seeded sample across NORMAL/ and PNEUMONIA/):

(a) folder of JPEGs -> probabilities with `Predictor` (torch backend, CPU), decoding included, through the
    reference loop (`Predictor.predict_files`) and through the pipeline `pneumoscan predict` runs
    (`pipeline.predict_files_pipelined`: decoding the next batch while scoring, simplejpeg);
(b) the same with `backend="onnx"`, `"openvino"` (FP32) and `"openvino-bf16"` (the last two when OpenVINO is
    installed), each also timed on the network alone (the engine on ready model input: a batch of
    ``--batch-size`` and one image);
(r) the reference to beat: OpenVINO with its default settings (no configuration at all; on a CPU with
    native BF16 it picks BF16) on the exported ONNX file, network only;
(c) the paper's Keras pipeline: ``.venv-tf/bin/python benchmarks/keras_baseline.py predict`` in a
    subprocess (its LAST stdout line is JSON; ``images_per_s`` is read), skipped when ``.venv-tf`` is
    missing (``bash benchmarks/setup_tf.sh`` creates it);
(a)-(c) run `--rounds` times, alternated, and each reports its median (the Keras figure swings between
about 45 and 100 images/s from one run to the next on the 2-core machine);
(d) single-image latency, p50 / p99 of ``Predictor.predict_file(jpeg_bytes)`` (reference) and of
    ``pipeline.predict_file_fast`` over ``--repeats`` calls after a warm-up, for every backend.

"Done when" (issue 32) is printed at the end: the best backend whose accuracy is verified (the exact ones;
openvino-bf16 passed ``bf16_accuracy.py``) against the reference: its pipelined folder throughput over the
reference's network-only throughput (target >= 0.75), its fast single-image p50 over the reference's
single-image p50 (target <= 1.3).

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
from pneumoscan.tasks.pipeline import predict_file_fast, predict_files_pipelined
from pneumoscan.tasks.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "onnx", "openvino", "openvino-bf16")
VERIFIED = ("torch", "onnx", "openvino", "openvino-bf16")  # exact, or (BF16) passed bf16_accuracy.py on 3 seeds
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


def time_folder(predictor: Predictor, paths: list[str], pipelined: bool = False) -> tuple[dict, np.ndarray]:
    size = predictor.prep.image_size
    predictor.predict_arrays(np.zeros((predictor.batch_size, size, size), np.uint8))  # warm-up, not timed
    t0 = time.perf_counter()
    rows = list(predict_files_pipelined(predictor, paths) if pipelined else predictor.predict_files(paths))
    seconds = time.perf_counter() - t0
    errors = [r for r in rows if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} files failed, e.g. {errors[0].error}")
    return {"images_per_s": len(paths) / seconds, "seconds": seconds}, np.array([r.probability for r in rows])


def time_parts(predictor: Predictor, paths: list[str]) -> dict:
    """The folder's two halves apart: decoding every file (one core), then scoring the decoded pixels in
    batches (the network and the detector, on every thread)."""
    from pneumoscan.io.fast_decode import load_for_model_fast

    prep = predictor.prep
    t0 = time.perf_counter()
    fast = [load_for_model_fast(p, prep.image_size, prep.resize_filter).grey for p in paths]
    fast_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels = np.stack([predictor.load(p) for p in paths])
    decode_s = time.perf_counter() - t0
    if not np.array_equal(np.stack(fast), pixels):
        raise SystemExit("the fast loader's pixels differ from the reference loader's")
    t0 = time.perf_counter()
    for i in range(0, len(pixels), predictor.batch_size):
        predictor.score(pixels[i:i + predictor.batch_size])
    return {"decode": len(paths) / decode_s, "decode_fast": len(paths) / fast_s,
            "score": len(paths) / (time.perf_counter() - t0)}


def latency(fn, repeats: int, warmup: int = 10) -> dict:
    """p50 / p99 / mean milliseconds of `fn()` over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ms.append(1000.0 * (time.perf_counter() - t0))
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(np.mean(ms)), "repeats": repeats}


def time_latency(predictor: Predictor, jpeg: bytes, repeats: int) -> dict:
    """One image, decoding included: the reference `predict_file`, then the fast one."""
    ref = latency(lambda: predictor.predict_file(jpeg, name="latency.jpeg"), repeats)
    fast = latency(lambda: predict_file_fast(predictor, jpeg, name="latency.jpeg"), repeats)
    return {**ref, **{f"fast_{k}": v for k, v in fast.items()}}


def network_only(predictor: Predictor, pixels: np.ndarray, repeats: int) -> dict:
    """The engine alone on ready model input (the detector's features included where the graph gives them):
    images/s at a batch of len(pixels), and one image's p50 / p99."""
    if predictor.onnx is not None:
        run, x = predictor.onnx.run_all, predictor.onnx.model_input(pixels)
    else:
        from pneumoscan.networks.inference import model_input

        model, x = predictor.model, model_input(pixels, predictor.prep, predictor.device)

        @torch.no_grad()
        def run(batch):
            return model(batch)
    return engine_figures(run, x, repeats)


def engine_figures(run, x, repeats: int) -> dict:
    batch = latency(lambda: run(x), max(5, repeats // 20), warmup=2)
    one = latency(lambda: run(x[:1]), repeats)
    return {"net_images_per_s": len(x) / (batch["p50_ms"] / 1000), "net_p50_ms": one["p50_ms"], "net_p99_ms": one["p99_ms"]}


def openvino_defaults(checkpoint: Path, pixels: np.ndarray, repeats: int) -> dict:
    """The reference to beat: OpenVINO compiling the exported ONNX file with no configuration, network only."""
    import openvino as ov

    from pneumoscan.networks.export import OnnxPredictor, remembered_onnx_bytes

    data = remembered_onnx_bytes(checkpoint)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(data, ov.Tensor(np.empty(0, np.uint8))), "CPU")
    request = compiled.create_infer_request()
    x = OnnxPredictor(data).model_input(pixels)
    figures = engine_figures(lambda batch: request.infer({0: batch}), x, repeats)
    settings = {k: str(compiled.get_property(k)) for k in ("PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT",
                                                         "NUM_STREAMS", "INFERENCE_NUM_THREADS")}
    return {**figures, "settings": settings, "openvino": ov.__version__}


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
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma-separated backends to time, those installed (default: {','.join(BACKENDS)}; torch always)")
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

        results, probs, keras, reference, threads = measure(args, checkpoint, files, paths, folder)
        cfg = ckpt_io.load(checkpoint).config
    summary = summarize(args, n, cfg, results, probs, keras, reference, limit, threads)
    report(summary, args)
    print(json.dumps(summary), flush=True)
    return 0


def installed_backends(wanted: list[str]) -> list[str]:
    """The backends of `wanted` that are installed, in BACKENDS' order; torch always (its loader gives the pixels)."""
    import importlib.util

    return [b for b in BACKENDS if (b in wanted or b == "torch")
            and (not b.startswith("openvino") or importlib.util.find_spec("openvino"))]


def measure(args, checkpoint: Path, files: list[Path], paths: list[str], folder: Path):
    """Every figure of every backend: folder rounds alternated (reference loop and pipeline), then each
    backend's network alone and single-image latency, then OpenVINO's defaults."""
    predictors, results, probs = {}, {}, {}
    for backend in installed_backends(args.backends.split(",")):
        t0 = time.perf_counter()
        predictors[backend] = Predictor(checkpoint, device="cpu", batch_size=args.batch_size, backend=backend)
        results[backend] = {"startup_s": time.perf_counter() - t0, "rounds_images_per_s": [],
                            "rounds_pipelined_images_per_s": [], "rounds_decode_images_per_s": [],
                            "rounds_decode_fast_images_per_s": [],
                            "rounds_score_images_per_s": []}
    keras_rounds: list[dict] = []
    for _ in range(args.rounds):  # alternated, so a noisy minute does not land on one pipeline only
        for backend, predictor in predictors.items():
            folder_result, probs[backend] = time_folder(predictor, paths)
            results[backend]["rounds_images_per_s"].append(folder_result["images_per_s"])
            results[backend]["rounds_pipelined_images_per_s"].append(time_folder(predictor, paths, True)[0]["images_per_s"])
            for part, rate in time_parts(predictor, paths).items():
                results[backend][f"rounds_{part}_images_per_s"].append(rate)
        keras_rounds.append({"skipped": "--no-keras"} if args.no_keras else run_keras(folder, len(files), args.keras_python))
    jpeg = files[0].read_bytes()
    pixels = np.stack([predictors["torch"].load(f) for f in paths[:args.batch_size]])
    for backend, predictor in predictors.items():
        for key in ("images_per_s", "pipelined_images_per_s", "decode_images_per_s", "decode_fast_images_per_s",
                    "score_images_per_s"):
            results[backend][key] = float(np.median(results[backend][f"rounds_{key}"]))
        results[backend].update({f"latency_{k}": v for k, v in time_latency(predictor, jpeg, args.repeats).items()})
        results[backend].update(network_only(predictor, pixels, args.repeats))
    threads = {b: getattr(p.onnx, "threads", torch.get_num_threads()) for b, p in predictors.items()}
    del predictors
    reference = None
    if "openvino" in results:
        try:
            reference = openvino_defaults(checkpoint, pixels, args.repeats)
        except RuntimeError as e:  # e.g. its default BF16 where ONEDNN_MAX_CPU_ISA hides the CPU's BF16 kernels
            print(f"reference left out: OpenVINO's defaults failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
    keras = next((k for k in keras_rounds if "skipped" in k), None) or {
        **keras_rounds[0], "rounds_images_per_s": [k["images_per_s"] for k in keras_rounds],
        "images_per_s": float(np.median([k["images_per_s"] for k in keras_rounds]))}
    return results, probs, keras, reference, threads


def summarize(args, n: int, cfg, results: dict, probs: dict, keras: dict, reference: dict | None, limit: dict,
              threads: dict) -> dict:
    keras_ips = keras.get("images_per_s")
    for r in (*results.values(), keras):
        r.update(machine_peak.achieved(r.get("images_per_s"), limit["gflop_per_image"], limit["peak"]))
    for r in results.values():
        r["pipelined_of_peak"] = machine_peak.achieved(r["pipelined_images_per_s"], limit["gflop_per_image"], limit["peak"])
    return {
        "benchmark": "predict", "n_images": n, "data": str(args.data),
        "checkpoint": str(args.checkpoint) if args.checkpoint else "fresh paper model (untrained) with a detector",
        "image_size": cfg.preprocessing.image_size, "activation": cfg.model.activation, "batch_size": args.batch_size,
        **results, "openvino_defaults": reference, "rounds": args.rounds,
        "keras": {k: keras[k] for k in ("images_per_s", "rounds_images_per_s", "tf_version", "keras_version", "gflops",
                                        "of_fp32_peak", "of_bf16_peak") if k in keras}
        if "skipped" not in keras else keras,
        "limit": limit,
        **{f"ratio_{b}_to_keras": results[b]["images_per_s"] / keras_ips if keras_ips else None for b in results},
        "ratio_onnx_to_torch": results["onnx"]["images_per_s"] / results["torch"]["images_per_s"] if "onnx" in results else None,
        **{f"max_abs_prob_diff_torch_{b}": float(np.max(np.abs(probs["torch"] - probs[b]))) for b in results if b != "torch"},
        "done_when": done_when(results, reference),
        "env": {
            "cpu": limit["machine"]["cpu"], "cpu_count": os.cpu_count(), "threads": threads,
            "pneumoscan": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "loadavg_1m": os.getloadavg()[0],
        },
    }


def done_when(results: dict, reference: dict | None) -> dict | None:
    """Issue 32's targets for every verified backend; `backend` names the best: the fastest pipelined folder
    among those that meet both targets, else the fastest pipelined folder."""
    if reference is None:
        return None
    per = {}
    for b in (b for b in results if b in VERIFIED):
        r = results[b]
        folder = r["pipelined_images_per_s"] / reference["net_images_per_s"]
        single = r["latency_fast_p50_ms"] / reference["net_p50_ms"]
        per[b] = {"folder_over_reference_network": folder, "folder_met": folder >= 0.75,
                  "single_p50_over_reference": single, "single_met": single <= 1.3,
                  "single_p50_minus_own_network_ms": r["latency_fast_p50_ms"] - r["net_p50_ms"]}
    both = [b for b in per if per[b]["folder_met"] and per[b]["single_met"]]
    best = max(both or per, key=lambda b: results[b]["pipelined_images_per_s"])
    return {"backend": best, "folder_target": 0.75, "single_target": 1.3, "backends": per}


def report(summary: dict, args) -> None:
    limit, pct = summary["limit"], machine_peak.percent
    backends = [b for b in BACKENDS if b in summary]
    print(f"prediction benchmark: {summary['n_images']} images, {summary['image_size']} px, {summary['activation']}, "
          f"{summary['env']['cpu']} ({summary['env']['cpu_count']} CPUs, load {summary['env']['loadavg_1m']:.2f}; "
          f"threads: {summary['env']['threads']})")
    print(machine_peak.describe(limit["machine"], limit["peak"]))
    print(f"folder images/s: median of {args.rounds} alternated rounds; network: the engine alone on ready input, a batch "
          f"of {args.batch_size} (img/s) and one image (ms); GFLOP/s = images/s x {limit['gflop_per_image']:.3f} GFLOP "
          f"per image; % of peak: of the BF16 peak for openvino-bf16, else of the FP32 peak")
    print(f"{'pipeline':<16}{'net img/s':>10}{'net p50':>9}{'folder ref':>11}{'folder fast':>12}{'% peak':>8}"
          f"{'p50 ref':>9}{'p99 ref':>9}{'p50 fast':>10}{'p99 fast':>10}")
    for b in backends:
        r = summary[b]
        share = r["pipelined_of_peak"]["of_bf16_peak" if b.endswith("bf16") else "of_fp32_peak"]
        print(f"{b:<16}{r['net_images_per_s']:>10.1f}{r['net_p50_ms']:>9.2f}{r['images_per_s']:>11.1f}"
              f"{r['pipelined_images_per_s']:>12.1f}{pct(share):>8}{r['latency_p50_ms']:>9.2f}{r['latency_p99_ms']:>9.2f}"
              f"{r['latency_fast_p50_ms']:>10.2f}{r['latency_fast_p99_ms']:>10.2f}")
    ref = summary["openvino_defaults"]
    if ref:
        print(f"{'reference':<16}{ref['net_images_per_s']:>10.1f}{ref['net_p50_ms']:>9.2f}  OpenVINO {ref['openvino']} "
              f"defaults on the exported ONNX file, network only: {ref['settings']}")
    keras = summary["keras"]
    print(f"keras (paper): {keras['images_per_s']:.1f} images/s" if "images_per_s" in keras else f"keras (paper): skipped: {keras['skipped']}")
    for b in backends:
        r = summary[b]
        print(f"{b}: decoding alone {r['decode_images_per_s']:.1f} images/s (one core; the fast loader "
              f"{r['decode_fast_images_per_s']:.1f}, the same pixels), scoring decoded pixels "
              f"{r['score_images_per_s']:.1f} images/s; folder rounds ref {rounded(r['rounds_images_per_s'])}, "
              f"fast {rounded(r['rounds_pipelined_images_per_s'])}; startup {r['startup_s']:.2f} s")
    print("max |p_torch - p_backend|: " + ", ".join(f"{k.rsplit('_', 1)[-1]} {v:.2g}" for k, v in summary.items()
                                                 if k.startswith("max_abs_prob_diff_torch_"))
          + ("" if args.checkpoint else " (untrained model: its outputs hardly vary, so this says little)"))
    d = summary["done_when"]
    if d:
        for b, v in d["backends"].items():
            print(f"done when, {b}{' (best)' if b == d['backend'] else ''}: folder {v['folder_over_reference_network']:.2f}x "
                  f"the reference's network-only throughput (target >= 0.75: {'met' if v['folder_met'] else 'NOT met'}); "
                  f"single-image p50 {v['single_p50_over_reference']:.2f}x the reference's (target <= 1.3: "
                  f"{'met' if v['single_met'] else 'NOT met'}), {v['single_p50_minus_own_network_ms']:.2f} ms above its own network")


if __name__ == "__main__":
    sys.exit(main())
