#!/usr/bin/env python3
"""CPU speed of each way the paper's model runs: a training step, in-loop validation, and inference.

Each figure is taken in a fresh process (the model as `pneumoscan train` or `Predictor` builds it):

- train step: forward, backward and fused Adam on a batch of 16 at 150 px (median ms of --steps);
- validation: eval-mode outputs for --val-images images in batches of the config's eval_batch_size,
  as the training loop computes them after every epoch (seconds, median of --repeats);
- predict batch 32 / single image: `Predictor.predict_details` (the frozen inference form), median ms.

With --baseline-src DIR (another version's `src/` folder) the same probe runs with that code too, in
alternating rounds, and the ratios baseline / this version are printed: above 1, this version is faster.

    .venv/bin/python benchmarks/bench_cpu_paths.py [--rounds 2] [--baseline-src /path/to/old/src]

Prints a table, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

SRC = Path(__file__).resolve().parents[1] / "src"
FIGURES = ("train_step_ms", "validation_s", "predict_batch32_ms", "predict_single_ms")


def probe(val_images: int, steps: int, repeats: int) -> dict:
    """Runs inside the measured process: the figures of whichever pneumoscan is on sys.path."""
    import importlib.util
    import time

    import numpy as np
    import torch

    from pneumoscan.networks import checkpoint as ckpt_io
    from pneumoscan.core.config import Config
    from pneumoscan.tasks.predict import Predictor

    def timed(fn, n):
        fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return median(out)

    torch.manual_seed(0)
    cfg = Config()
    model = ckpt_io.build_model(cfg)
    if importlib.util.find_spec("pneumoscan.networks.cpu_kernels"):  # the training form, as `train` builds it
        from pneumoscan.networks.cpu_kernels import for_cpu_training

        model = for_cpu_training(model)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, eps=cfg.train.adam_eps, fused=True)
    x = torch.rand(16, 1, 150, 150).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(16) < 0.74).float()

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model.train()(x)
        (torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + model.regularization_loss()).backward()
        optimizer.step()

    result = {"train_step_ms": 1000 * timed(step, steps)}
    val = torch.rand(val_images, 1, 150, 150).contiguous(memory_format=torch.channels_last)
    bs = cfg.train.eval_batch_size

    @torch.no_grad()
    def validation():
        model.eval()
        torch.cat([model(val[i:i + bs]) for i in range(0, val_images, bs)])

    result["validation_s"] = timed(validation, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pt"
        ckpt_io.save(ckpt_io.make_checkpoint(model, cfg, threshold=0.5), path)
        predictor = Predictor(path, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 150, 150), dtype=np.uint8)
    result["predict_batch32_ms"] = 1000 * timed(lambda: predictor.predict_details(pixels), 4 * repeats)
    result["predict_single_ms"] = 1000 * timed(lambda: predictor.predict_details(pixels[:1]), 20 * repeats)
    result["threads"] = torch.get_num_threads()
    return result


def run_probe(src: Path, args: argparse.Namespace) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_cpu_paths as b; "
            f"print(json.dumps(b.probe({args.val_images}, {args.steps}, {args.repeats})))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-src", type=Path, help="another version's src/ folder, measured in the same rounds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--val-images", type=int, default=745, help="validation split size (default: the paper split's 745)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    versions = {"this": SRC, **({"baseline": args.baseline_src} if args.baseline_src else {})}
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, src in versions.items():
            runs[name].append(run_probe(src, args))
    result = {name: {k: round(median(r[k] for r in rs), 3) for k in FIGURES} for name, rs in runs.items()}
    result["rounds"] = {name: rs for name, rs in runs.items()}
    print(f"{'figure':<22}" + "".join(f"{name:>12}" for name in versions) + ("       ratio" if args.baseline_src else ""))
    for k in FIGURES:
        ratio = f"{result['baseline'][k] / result['this'][k]:>11.2f}x" if args.baseline_src else ""
        print(f"{k:<22}" + "".join(f"{result[name][k]:>12.3f}" for name in versions) + ratio)
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
