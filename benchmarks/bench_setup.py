#!/usr/bin/env python3
"""What `pneumoscan train` does before its first step: start-up, the validation split and decoding every image.

0. Start-up, each a fresh interpreter (median of `--repeats`): `pneumoscan --help` (loads neither PyTorch nor
   scikit-learn), importing `pneumoscan.tasks.train`, and for reference importing PyTorch alone and scikit-learn's
   metrics (which training imports in a background thread during the first epoch).
1. Split: `split_samples` on the train folder with nothing remembered (scikit-learn's
   StratifiedGroupKFold over patient groups, each file read once for its digest) vs the remembered
   split. Each in a fresh process that has already imported `pneumoscan.tasks.train`, as a training run has.
2. Decoding train + validation into the pixel cache (cold: an empty cache folder each time): threads
   (the baseline) vs worker processes (the default for 256 images or more), alternated `--repeats`
   times; medians. The pixels must be equal. Reading the warm cache is shown for reference.

    python benchmarks/bench_setup.py [--data DATA_ROOT] [--repeats 3]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLIT_TIMER = """
import sys, time
import pneumoscan.tasks.train
from pneumoscan.core.config import DataConfig
from pneumoscan.io.data import split_samples
t = time.perf_counter()
split_samples(DataConfig(root=sys.argv[1]))
print(time.perf_counter() - t)
"""


STARTUP = {
    "pneumoscan --help": ["-m", "pneumoscan", "--help"],
    "import pneumoscan.tasks.train": ["-c", "import pneumoscan.tasks.train"],
    "import torch (reference)": ["-c", "import torch"],
    "import sklearn.metrics (reference)": ["-c", "import sklearn.metrics"],
}


def startup_seconds(argv: list[str], repeats: int) -> float:
    """Median wall time of a fresh interpreter running `argv`, from launch to exit."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def split_seconds(data: str, cache: str) -> float:
    out = subprocess.run([sys.executable, "-c", SPLIT_TIMER, data], check=True, capture_output=True, text=True,
                         env={**os.environ, "PNEUMOSCAN_CACHE": cache})
    return float(out.stdout.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("PNEUMOSCAN_DATA"), required="PNEUMOSCAN_DATA" not in os.environ,
                    help="data root (default: $PNEUMOSCAN_DATA)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import numpy as np

    from pneumoscan.core.config import Config, DataConfig
    from pneumoscan.io.data import cache_images, split_samples

    result = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "startup": {}}
    for name, argv in STARTUP.items():
        result["startup"][name] = round(startup_seconds(argv, args.repeats), 2)
        print(f"start-up: {name}: {result['startup'][name]:.2f} s (median of {args.repeats}, launch to exit)", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        cold = split_seconds(args.data, cache)
        warm = split_seconds(args.data, cache)
    result["split"] = {"computed": round(cold, 2), "remembered": round(warm, 2), "ratio": round(cold / warm, 1)}
    print(f"split: computed {cold:.2f} s, remembered {warm:.2f} s ({cold / warm:.1f}x)", flush=True)

    prep = Config().preprocessing
    splits = split_samples(DataConfig(root=args.data))
    samples = splits["train"] + splits["val"]
    times: dict[str, list[float]] = {"threads": [], "processes": []}
    pixels = {}
    for _ in range(args.repeats):
        for mode in times:
            with tempfile.TemporaryDirectory() as cache:
                t = time.perf_counter()
                pixels[mode] = cache_images(samples, prep, cache_dir=Path(cache), processes=mode == "processes").pixels
                times[mode].append(time.perf_counter() - t)
                t = time.perf_counter()
                cache_images(samples, prep, cache_dir=Path(cache))
                warm = time.perf_counter() - t
    if not np.array_equal(pixels["threads"], pixels["processes"]):
        print("bench_setup: threads and processes decoded different pixels", file=sys.stderr)
        return 1
    med = {mode: statistics.median(t) for mode, t in times.items()}
    result["decode"] = {"images": len(samples), "threads": round(med["threads"], 2), "processes": round(med["processes"], 2),
                        "ratio": round(med["threads"] / med["processes"], 2), "warm_cache": round(warm, 2),
                        "runs": {mode: [round(x, 2) for x in t] for mode, t in times.items()}}
    print(f"decode {len(samples)} images (median of {args.repeats}): threads {med['threads']:.2f} s, "
          f"processes {med['processes']:.2f} s ({result['decode']['ratio']}x); warm cache {warm:.2f} s", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
