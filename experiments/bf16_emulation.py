#!/usr/bin/env python3
"""BF16 training on a CPU without BF16 hardware: PyTorch's own BF16 kernels against the emulation that
`--precision bf16` uses there (`pneumoscan.networks.emulated_bf16`), for exactness and for speed.

1. Exactness: the stem's second convolution (16 -> 16 channels, 3x3, at 150x150; forward, and its
   input and weight gradients) and the first dense layer's matrix product, from BF16 values. The reference is exact: products
   summed in float64, rounded to BF16 once, as BF16 dot-product hardware does with FP32 sums. Printed:
   the share of elements that differ from it and the largest difference, relative to the largest value.
2. Speed: a training step of the paper's network on a batch of 32 at 150x150 (what `pneumoscan train`
   runs), in FP32, emulated BF16 and PyTorch's BF16 kernels, alternating in each round.

    .venv/bin/python experiments/bf16_emulation.py [--rounds 3] [--steps 2]

Prints both tables and one JSON line. Emulation is for measuring BF16's accuracy, never for speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch

from pneumoscan.core.config import Config
from pneumoscan.networks.cpu_kernels import for_cpu_training
from pneumoscan.networks.emulated_bf16 import EmulatedBF16
from pneumoscan.networks.models import SeedCNN
from pneumoscan.networks.runtime import autocast, cpu_flags, native_bf16_cpu
from pneumoscan.tasks.train import make_optimizer, model_loss

aten = torch.ops.aten


def products(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stem's second convolution (batch 8), its two gradients, and the first dense layer's product
    (batch 32, 4096 -> 512), all from the same BF16 values, computed in `dtype`."""
    g = torch.Generator().manual_seed(0)

    def bf16(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(dtype)

    x = bf16(8, 16, 150, 150).contiguous(memory_format=torch.channels_last)
    w = bf16(16, 16, 3, 3, scale=0.08)
    grad_out = bf16(8, 16, 150, 150).contiguous(memory_format=torch.channels_last)
    args = (1, 1), (1, 1), (1, 1), False, (0, 0), 1
    grad_input, grad_weight, _ = aten.convolution_backward(grad_out, x, w, None, *args, [True, True, False])
    return {"convolution": aten.convolution(x, w, None, *args), "grad_input": grad_input,
            "grad_weight": grad_weight, "dense": aten.mm(bf16(32, 4096), bf16(4096, 512, scale=0.02))}


def exactness() -> dict[str, dict[str, dict[str, float]]]:
    exact = {k: v.to(torch.bfloat16).float() for k, v in products(torch.float64).items()}
    with EmulatedBF16():
        emulated = products(torch.bfloat16)
    ways = {"pytorch_bf16": products(torch.bfloat16), "emulated": emulated}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for way, result in ways.items():
        for name, reference in exact.items():
            error = (result[name].float() - reference).abs()
            out.setdefault(name, {})[way] = {"differ": float((error > 0).float().mean()),
                                             "max_error": float(error.max() / reference.abs().max())}
    return out


def step_times(rounds: int, steps: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    cfg = Config()
    model = for_cpu_training(SeedCNN(image_size=150)).to(memory_format=torch.channels_last).train()
    x = torch.rand(32, 1, 150, 150).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(32) < 0.74).float()
    cpu = torch.device("cpu")
    ways = {"fp32": ("fp32", contextlib.nullcontext), "emulated_bf16": ("bf16", EmulatedBF16),
            "pytorch_bf16": ("bf16", contextlib.nullcontext)}
    nets = {way: copy.deepcopy(model) for way in ways}
    optimizers = {way: make_optimizer(net, cfg, cpu, cuda_graphs=False)[0] for way, net in nets.items()}

    def step(way: str) -> None:
        precision, arithmetic = ways[way]
        optimizers[way].zero_grad(set_to_none=True)
        with arithmetic():
            with autocast(cpu, precision):
                logits = nets[way](x)
            model_loss(nets[way], logits.float(), y)[0].backward()
        optimizers[way].step()

    times: dict[str, list[float]] = {way: [] for way in ways}
    for way in ways:
        step(way)  # warm-up
    for r in range(rounds):
        for way in ways:
            start = time.perf_counter()
            for _ in range(steps):
                step(way)
            times[way].append((time.perf_counter() - start) / steps * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{w} {t[-1]:.0f} ms" for w, t in times.items()), flush=True)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per way per round")
    args = ap.parse_args()
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, native BF16: {native_bf16_cpu()}, "
          f"flags: {' '.join(flags)}")
    exact = exactness()
    print("\nelements differing from the exactly rounded BF16 result (largest difference / largest value):")
    print("| product | PyTorch's BF16 kernels | emulated |\n|---|---|---|")
    for name, ways in exact.items():
        print(f"| {name} | " + " | ".join(f"{w['differ']:.2%} ({w['max_error']:.1e})" for w in ways.values()) + " |")
    print("\ntraining step, batch of 32 at 150x150 (ms):")
    times = step_times(args.rounds, args.steps)
    medians = {way: statistics.median(t) for way, t in times.items()}
    print("| way | median ms | vs FP32 |\n|---|---|---|")
    for way, ms in medians.items():
        print(f"| {way} | {ms:.0f} | {ms / medians['fp32']:.2f}x |")
    print(json.dumps({"exactness": exact, "step_ms": times, "median_ms": medians,
                      "native_bf16": native_bf16_cpu(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
