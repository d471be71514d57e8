#!/usr/bin/env python3
"""The training step of the paper's model on the CPU (batch 16, 150 px, the composed stem, channels-last)
with three optimizers, alternating over rounds: `adam.KerasAdam` as training builds it (PyTorch's fused
kernel with Keras' epsilon), its reference multi-tensor form (`fused=False`, the form CUDA graphs
capture), and `torch.optim.Adam(fused=True)`. Each round times 20 steps after 3 warm-up steps.

    .venv/bin/python experiments/bench_adam.py [--rounds 3]

Prints ms per step for each round and the medians, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pneumoscan.networks.adam import KerasAdam
from pneumoscan.core.config import Config
from pneumoscan.networks.cpu_kernels import for_cpu_training
from pneumoscan.networks.models import seed_cnn
from pneumoscan.networks.runtime import keep_freed_memory
from pneumoscan.tasks.train import DeviceSplit, make_step

OPTIMIZERS = {
    "KerasAdam (fused)": lambda params: KerasAdam(params, lr=1e-3),
    "KerasAdam (reference form)": lambda params: KerasAdam(params, lr=1e-3, fused=False),
    "torch.optim.Adam (fused)": lambda params: torch.optim.Adam(params, lr=1e-3, eps=1e-7, fused=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    cfg = Config()
    data = DeviceSplit(torch.randint(0, 256, (64, 150, 150), dtype=torch.uint8), (torch.arange(64) % 2).float())
    ms: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for _ in range(args.rounds):
        for name, build in OPTIMIZERS.items():
            model = for_cpu_training(seed_cnn("prelu", 3, 150)).to(memory_format=torch.channels_last).train()
            optimizer = build(model.parameters())
            step = make_step(model, data, cfg, optimizer)
            for i in range(23):
                if i == 3:
                    t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                step(torch.arange(16 * (i % 4), 16 * (i % 4 + 1)), {})
            ms[name].append(round(1000 * (time.perf_counter() - t0) / 20, 1))
    medians = {name: statistics.median(v) for name, v in ms.items()}
    for name, v in ms.items():
        print(f"{name:28} {medians[name]:7.1f} ms a step  rounds {v}")
    print(json.dumps({"benchmark": "adam", "ms_per_step": ms, "median_ms": medians, "threads": torch.get_num_threads(),
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
