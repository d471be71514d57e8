#!/usr/bin/env python3
"""torch.compile (Inductor, CPU) against eager PyTorch for the paper's network, compile time counted.

Training: the model as CPU training runs it (composed stem, channels-last, Keras' Adam, batches of 16 at
150 px held in memory), eager and wrapped in `torch.compile`: the first compiled step's wall time (the
compile), then steady-state steps. The 11-epoch paper recipe (4,471 training images: 279 steps a
epoch, 3,069 in all) then costs, in training steps alone,

    eager:    3,069 x eager step
    compiled: compile time + 3,069 x compiled step (+ one recompile for validation's eval mode, measured)

Inference: the frozen form (`inference.freeze`, what predict and serve run) on batches of 32 and on
single images, eager and compiled (`dynamic=False`: one graph per batch shape, each compile counted).

    .venv/bin/python experiments/compile_trial.py [--steps 30] [--mode default|max-autotune-no-cudagraphs]

Prints a table and one JSON line. Eager and compiled alternate in rounds, so a noisy minute does not
land on one side only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from pneumoscan.networks.checkpoint import build_model
from pneumoscan.core.config import Config
from pneumoscan.networks.cpu_kernels import for_cpu_training
from pneumoscan.networks.inference import freeze
from pneumoscan.networks.runtime import keep_freed_memory
from pneumoscan.tasks.train import make_optimizer, model_loss

STEPS_PER_RUN = 11 * (4471 // 16)  # the paper recipe on pneumoscan's training split


def training_step(model: torch.nn.Module, forward, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss, _ = model_loss(model, forward(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_steps(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def train_trial(steps: int, rounds: int, mode: str) -> dict:
    cfg = Config()
    torch.manual_seed(0)
    x = torch.rand(16, 1, 150, 150).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(16) < 0.74).float()
    sides = {}
    for name in ("eager", "compiled"):
        model = for_cpu_training(build_model(cfg)).to(memory_format=torch.channels_last).train()
        opt = make_optimizer(model, cfg, torch.device("cpu"), cuda_graphs=False)[0]
        forward = torch.compile(model, mode=mode) if name == "compiled" else model
        t0 = time.perf_counter()
        training_step(model, forward, opt, x, y)  # the compile, for the compiled side
        first = time.perf_counter() - t0
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            forward(x)  # validation: eval mode and no gradients recompile
        first_eval = time.perf_counter() - t0
        model.train()
        for _ in range(3):
            training_step(model, forward, opt, x, y)
        sides[name] = {"model": model, "forward": forward, "opt": opt, "first_step_s": first,
                       "first_eval_s": first_eval, "step_s": []}
    for _ in range(rounds):
        for side in sides.values():
            side["step_s"].append(time_steps(lambda s=side: training_step(s["model"], s["forward"], s["opt"], x, y), steps))
    out = {}
    for name, side in sides.items():
        step = sorted(side["step_s"])[len(side["step_s"]) // 2]
        out[name] = {"first_step_s": round(side["first_step_s"], 2), "first_eval_s": round(side["first_eval_s"], 2),
                     "step_ms": round(1000 * step, 1), "rounds_step_ms": [round(1000 * s, 1) for s in side["step_s"]],
                     "images_per_s": round(16 / step, 1)}
    e, c = out["eager"], out["compiled"]
    compile_s = c["first_step_s"] - e["first_step_s"] + c["first_eval_s"] - e["first_eval_s"]
    out["projected_11_epochs_s"] = {"eager": round(STEPS_PER_RUN * e["step_ms"] / 1000, 1),
                                    "compiled": round(compile_s + STEPS_PER_RUN * c["step_ms"] / 1000, 1),
                                    "compile_s": round(compile_s, 1)}
    return out


def inference_trial(batch: int, steps: int, rounds: int, mode: str) -> dict:
    cfg = Config()
    torch.manual_seed(0)
    frozen = freeze(build_model(cfg))
    x = torch.rand(batch, 1, 150, 150).contiguous(memory_format=torch.channels_last)
    sides = {}
    with torch.no_grad():
        for name in ("eager", "compiled"):
            forward = torch.compile(frozen, mode=mode, dynamic=False) if name == "compiled" else frozen
            t0 = time.perf_counter()
            forward(x)
            sides[name] = {"forward": forward, "first_s": time.perf_counter() - t0, "s": []}
            for _ in range(3):
                forward(x)
        for _ in range(rounds):
            for side in sides.values():
                side["s"].append(time_steps(lambda f=side["forward"]: f(x), steps))
    out = {}
    for name, side in sides.items():
        per_call = sorted(side["s"])[len(side["s"]) // 2]
        out[name] = {"first_call_s": round(side["first_s"], 2), "ms_per_call": round(1000 * per_call, 2),
                     "images_per_s": round(batch / per_call, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per round (default 30)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds; medians (default 3)")
    ap.add_argument("--mode", default="default", help="torch.compile mode (default: default)")
    args = ap.parse_args()
    keep_freed_memory()
    result = {"torch": torch.__version__, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": torch.get_num_threads(), "mode": args.mode, "date": time.strftime("%Y-%m-%d"),
              "train": train_trial(args.steps, args.rounds, args.mode),
              "predict_batch_32": inference_trial(32, 20, args.rounds, args.mode),
              "predict_single": inference_trial(1, 200, args.rounds, args.mode)}
    t = result["train"]
    print(f"torch.compile trial, torch {result['torch']}, {result['machine']}, {result['threads']} threads, mode {args.mode}")
    print(f"{'':34}{'eager':>12}{'compiled':>12}")
    print(f"{'training step, batch 16 (ms)':34}{t['eager']['step_ms']:>12.1f}{t['compiled']['step_ms']:>12.1f}")
    print(f"{'first step incl. compile (s)':34}{t['eager']['first_step_s']:>12.2f}{t['compiled']['first_step_s']:>12.2f}")
    print(f"{'first eval-mode call (s)':34}{t['eager']['first_eval_s']:>12.2f}{t['compiled']['first_eval_s']:>12.2f}")
    p = t["projected_11_epochs_s"]
    print(f"{'11 epochs of training steps (s)':34}{p['eager']:>12.1f}{p['compiled']:>12.1f}  (compile {p['compile_s']} s)")
    for key, label in (("predict_batch_32", "predict, batch 32 (images/s)"), ("predict_single", "predict, 1 image (ms)")):
        r = result[key]
        unit = "images_per_s" if key == "predict_batch_32" else "ms_per_call"
        print(f"{label:34}{r['eager'][unit]:>12.2f}{r['compiled'][unit]:>12.2f}  (compile {r['compiled']['first_call_s']} s)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
