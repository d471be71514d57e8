#!/usr/bin/env python3
"""What this CPU can do at most, and how much arithmetic one image costs: the yardstick the training and
prediction benchmarks report against.

- The machine: CPU model, its vector extensions (from /proc/cpuinfo), PyTorch's own CPU capability
  string and the thread count.
- The peak: the best of a few timed 2048x2048 matrix products on the threads the pipelines use, in FP32,
  and in BF16 where the CPU computes BF16 natively (AVX-512 BF16 or AMX; elsewhere BF16 is emulated and
  its figure would say nothing about the hardware).
- The work: floating-point operations per image counted by `torch.utils.flop_counter.FlopCounterMode`
  on the actual model (matrix products and convolutions, 2 per multiply-add; element-wise operations are
  not counted). Training: forward and backward of one batch, loss included; inference: a forward pass.
  Each is counted twice: the network as the paper draws it (`SeedCNN`, which the Keras original runs
  too, so every pipeline's fraction uses this count) and the form pneumoscan executes (the composed
  stem in CPU training, the frozen inference form in prediction).

    .venv/bin/python benchmarks/machine_peak.py [--recipe paper] [--image-size 150]

Prints the figures and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pneumoscan.networks.runtime import cpu_flags, native_bf16_cpu

# the vector and matrix extensions that decide a CPU's arithmetic peak, in the order they appeared
EXTENSIONS = ("sse4_2", "avx", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The CPU, its extensions, PyTorch's capability string and thread count."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "extensions": [e for e in EXTENSIONS if e in flags],
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "native_bf16": native_bf16_cpu(), "torch": torch.__version__}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` timed n x n matrix products (after one untimed), in GFLOP/s (2 n^3 per product)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def peaks(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """FP32 and (where native) BF16 matrix-product peaks on this process's threads."""
    out: dict[str, Any] = {"matmul_size": n, "repeats": repeats, "threads": torch.get_num_threads(),
                           "fp32_gflops": round(matmul_gflops(torch.float32, n, repeats), 1)}
    if native_bf16_cpu():
        out["bf16_gflops"] = round(matmul_gflops(torch.bfloat16, n, repeats), 1)
    else:
        out["bf16_gflops"] = None
        out["bf16_note"] = "no native BF16 on this CPU (no avx512_bf16 or amx_bf16 flag): BF16 would be emulated"
    return out


def _counted(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def training_gflop_per_image(cfg, executed: bool = False, precision: str = "fp32") -> float:
    """GFLOP of one training step per image: forward and backward of one batch of cfg.train.batch_size,
    loss included, through the recipe's model (as pneumoscan's CPU training runs it when `executed`)."""
    from pneumoscan.networks.checkpoint import build_model
    from pneumoscan.networks.cpu_kernels import for_cpu_training
    from pneumoscan.networks.runtime import autocast
    from pneumoscan.tasks.train import model_loss

    torch.manual_seed(0)
    model = build_model(cfg)
    model = (for_cpu_training(model) if executed else model).to(memory_format=torch.channels_last).train()
    bs, size = cfg.train.batch_size, cfg.preprocessing.image_size
    x = torch.rand(bs, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(bs) % 2).float()

    def step() -> None:
        with autocast(torch.device("cpu"), precision):
            logits = model(x)
        model_loss(model, logits.float(), y)[0].backward()

    return _counted(step) / bs / 1e9


def inference_gflop_per_image(model: torch.nn.Module, image_size: int, frozen: bool = False, batch: int = 8) -> float:
    """GFLOP of one eval-mode forward pass per image, of `model` or (when `frozen`) its frozen inference form."""
    from pneumoscan.networks.inference import freeze

    net = freeze(model) if frozen else model.eval()
    x = torch.rand(batch, 1, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return _counted(lambda: net(x)) / batch / 1e9


def achieved(images_per_s: float | None, gflop_per_image: float, peak: dict[str, Any]) -> dict[str, Any]:
    """images/s as GFLOP/s and as fractions of the FP32 and BF16 peaks (None where there is no figure)."""
    if not images_per_s:
        return {"gflops": None, "of_fp32_peak": None, "of_bf16_peak": None}
    gflops = images_per_s * gflop_per_image
    bf16 = peak.get("bf16_gflops")
    return {"gflops": round(gflops, 2), "of_fp32_peak": round(gflops / peak["fp32_gflops"], 4),
            "of_bf16_peak": round(gflops / bf16, 4) if bf16 else None}


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def describe(m: dict[str, Any], peak: dict[str, Any]) -> str:
    """One line naming the machine and its peaks."""
    bf16 = f"{peak['bf16_gflops']:.1f} GFLOP/s" if peak.get("bf16_gflops") else "n/a (no native BF16)"
    return (f"{m['cpu']}; extensions {' '.join(m['extensions']) or 'none listed'}; torch capability "
            f"{m['torch_capability']}; {peak['threads']} threads; {peak['matmul_size']}x{peak['matmul_size']} "
            f"matmul peak: FP32 {peak['fp32_gflops']:.1f} GFLOP/s, BF16 {bf16}")


def main(argv: list[str] | None = None) -> int:
    from pneumoscan.networks.checkpoint import build_model
    from pneumoscan.core.config import recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="paper")
    ap.add_argument("--image-size", type=int, help="default: the recipe's")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = recipe(args.recipe)
    if args.image_size:
        cfg = cfg.override("preprocessing", image_size=args.image_size)
    m, peak = machine(), peaks(repeats=args.repeats)
    model = build_model(cfg)
    size = cfg.preprocessing.image_size
    work = {"train_gflop_per_image": training_gflop_per_image(cfg),
            "train_gflop_per_image_executed": training_gflop_per_image(cfg, executed=True),
            "predict_gflop_per_image": inference_gflop_per_image(model, size),
            "predict_gflop_per_image_executed": inference_gflop_per_image(model, size, frozen=True)}
    print(describe(m, peak))
    for key, value in work.items():
        print(f"{key:36}{value:8.3f}")
    print(json.dumps({"benchmark": "machine-peak", "recipe": args.recipe, "image_size": size, "machine": m, "peak": peak,
                      **{k: round(v, 4) for k, v in work.items()}, "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
