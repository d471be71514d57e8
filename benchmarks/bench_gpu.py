#!/usr/bin/env python3
"""GPU training speed: the paper's full recipe end to end, with and without CUDA graphs, and the model alone.

1. End to end: `pneumoscan train` (11 epochs over all of train, validation every epoch, checkpoints
   written) from the JPEG folder, timed from the process start to its exit: interpreter start,
   imports, CUDA start-up, scanning, decoding every image (when the pixel cache is cold) and training.
   Runs, in this order: the paper's recipe with CUDA graphs on a cold cache (pixels and split), the
   same on the warm cache and, with --baseline-src (repeatable), the same again with each earlier
   version's source, alternating --rounds times; with --full also cuDNN timing its algorithms
   (--cudnn-benchmark), the `large-batch` recipe and the paper's recipe with eager steps (warm).
   Each run's time is split into start-up (process start to the training function), the phases of
   the training function (summary.json's `timings`: split, decode, to GPU, model, epochs, after the
   epochs) and exit; the first epoch's training and validation are shown apart from the later ones'.
2. First uses (benchmarks/gpu_first_use.py in a fresh interpreter; with --full also with cuDNN's search):
   starting CUDA, the first training steps, capturing the graph, the first validation, the first checkpoint.
3. With --full, the model alone: training steps on in-memory batches already on the GPU
   (augmentation included), eager vs CUDA graph, at batch 16 and 256.

    python benchmarks/bench_gpu.py --data DATA_ROOT [--full] [--json FILE] [--baseline-src DIR ...] [--rounds N]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def end_to_end(data: str, cache: str, extra: list[str], src: str | None = None) -> dict:
    """One `pneumoscan train` process, timed; `src`: run the pneumoscan source in that folder instead."""
    env = {**os.environ, "PNEUMOSCAN_CACHE": cache, **({"PYTHONPATH": src} if src else {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "pneumoscan", "train", "--data", data, "--out", str(out), "--device", "cuda",
               "--no-eval", "--no-progress", *extra]
        t0, t0_unix = time.perf_counter(), time.time()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        wall, end_unix = time.perf_counter() - t0, time.time()
        s = json.loads((out / "summary.json").read_text())
        exit_s = end_unix - (out / "summary.json").stat().st_mtime
        epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = epochs[1:] or epochs
    return {"wall_seconds": round(wall, 1), "startup_seconds": round(s["started"] - t0_unix, 1),
            "train_function_seconds": s["wall_seconds"], "exit_seconds": round(exit_s, 1),
            "setup_seconds": s["setup_seconds"], **s["timings"], "epochs": s["epochs"],
            "first_epoch_train_seconds": epochs[0]["train_seconds"], "first_epoch_val_seconds": epochs[0]["val_seconds"],
            "later_epoch_train_seconds_median": sorted(e["train_seconds"] for e in later)[len(later) // 2],
            "later_epoch_val_seconds_median": sorted(e["val_seconds"] for e in later)[len(later) // 2],
            "train_images_per_s_median": round(s["train_images_per_s_median"], 1),
            "best_epoch": s["best_epoch"], "val_accuracy": round(s["best_val"]["accuracy"], 4),
            "val_roc_auc": round(s["best_val"]["roc_auc"], 4)}


COLUMNS = {  # printed name: result key
    "wall": "wall_seconds", "start-up": "startup_seconds", "split": "split_seconds", "decode": "decode_seconds",
    "to GPU": "to_device_seconds", "model": "model_seconds", "wait": "warm_up_wait_seconds", "epochs": "epochs_seconds", "after": "after_epochs_seconds",
    "exit": "exit_seconds", "ep1 train": "first_epoch_train_seconds", "ep1 val": "first_epoch_val_seconds",
    "epN train": "later_epoch_train_seconds_median", "epN val": "later_epoch_val_seconds_median",
    "images/s": "train_images_per_s_median", "val acc": "val_accuracy", "val AUC": "val_roc_auc",
}


def model_alone(batch: int, graphs: bool, steps: int, warmup: int = 5) -> float:
    """Training images/s of the paper's model on random in-memory images on the GPU."""
    import torch

    from pneumoscan.networks.augment import draw_augmentation
    from pneumoscan.networks.checkpoint import build_model
    from pneumoscan.core.config import Config
    from pneumoscan.networks.cuda_graphs import CudaGraphStep
    from pneumoscan.networks.runtime import memory_format
    from pneumoscan.tasks.train import DeviceSplit, make_optimizer, make_step

    cfg, dev, gen = Config(), torch.device("cuda"), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = DeviceSplit(torch.randint(0, 256, (2048, 150, 150), dtype=torch.uint8, device=dev),
                       (torch.rand(2048, device=dev) < 0.74).float())
    model = build_model(cfg).to(dev).to(memory_format=memory_format(dev)).train()
    opt = make_optimizer(model, cfg, dev, graphs)[0]
    step = make_step(model, data, cfg, opt)
    batches = [(torch.randint(0, 2048, (batch,), generator=gen).to(dev),
                {k: v.to(dev) for k, v in draw_augmentation(batch, cfg.augmentation, gen).items()})
               for _ in range(warmup + steps)]
    run = CudaGraphStep(step, model, opt, *batches[0]) if graphs else None
    for i, (idx, draws) in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        if run:
            run(idx, draws)
        else:
            opt.zero_grad(set_to_none=True)
            step(idx, draws)
    torch.cuda.synchronize()
    return round(batch * steps / (time.perf_counter() - t0), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCAN_DATA"), required="PNEUMOSCAN_DATA" not in os.environ,
                    help="data root (default: $PNEUMOSCAN_DATA)")
    ap.add_argument("--full", action="store_true", help="also cuDNN's search (end to end and first uses), the large-batch "
                                                        "recipe, the eager end-to-end baseline and the model alone")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--baseline-src", action="append", default=[],
                    help="a `src` folder of an earlier version (repeatable): its warm-cache run is timed right "
                         "after this version's, for a before/after in one call; named after the folder above it")
    ap.add_argument("--rounds", type=int, default=1, help="warm-cache runs of this version and the baselines, alternated")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here", file=sys.stderr)
        return 1
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pneumoscan.apps.cli, pneumoscan.tasks.train"], check=True)
    result["import_seconds"] = round(time.perf_counter() - t0, 2)
    runs = {"paper_graphs_cold_cache": ([], None)}
    for i in range(1, args.rounds + 1):
        suffix = f"_round{i}" if args.rounds > 1 else ""
        runs["paper_graphs_warm_cache" + suffix] = ([], None)
        for src in args.baseline_src:
            runs[f"baseline_{Path(src).resolve().parent.name}_paper_graphs_warm_cache{suffix}"] = ([], src)
    if args.full:
        runs["paper_graphs_warm_cache_cudnn_benchmark"] = (["--cudnn-benchmark"], None)
        runs["large_batch_graphs_warm_cache"] = (["--recipe", "large-batch"], None)
        runs["paper_eager_warm_cache"] = (["--no-cuda-graphs"], None)
    # each figure is printed as soon as it is measured: a run stopped at a time limit still reports what it did
    print(f"GPU: {result['gpu']}, torch {result['torch']}; importing pneumoscan takes {result['import_seconds']} s", flush=True)
    for flags in ([], ["--cudnn-benchmark"]) if args.full else ([],):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_first_use.py"), *flags],
                              capture_output=True, text=True)
        if done.returncode:  # a diagnostic: report it and go on to the end-to-end runs
            print(f"gpu_first_use.py {' '.join(flags)} failed:\n{done.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(done.stdout.splitlines()[-1])
        result["first_use_cudnn_benchmark" if flags else "first_use"] = r
        print("first uses, seconds: " + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    print(f"{'end to end, seconds':58}" + "".join(f"{c:>10}" for c in COLUMNS), flush=True)
    with tempfile.TemporaryDirectory() as cache:
        for name, (extra, src) in runs.items():
            r = result[name] = end_to_end(args.data, cache, extra, src)
            print(f"{name:58}" + "".join(f"{r.get(k, '-'):>10}" for k in COLUMNS.values()), flush=True)
    if args.full:
        for batch, steps in ((16, 300), (256, 40)):
            eager, graphed = model_alone(batch, False, steps), model_alone(batch, True, steps)
            r = result[f"model_alone_batch{batch}"] = {"eager": eager, "graphs": graphed, "ratio": round(graphed / eager, 2)}
            print(f"model alone, batch {batch}: eager {r['eager']} images/s, graphs {r['graphs']} images/s, {r['ratio']}x",
                  flush=True)
        result["ratio_end_to_end_warm"] = round(result["paper_eager_warm_cache"]["wall_seconds"] /
                                                result["paper_graphs_warm_cache"]["wall_seconds"], 2)
        print(f"graphs vs eager, paper recipe end to end (warm cache): {result['ratio_end_to_end_warm']}x")
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
