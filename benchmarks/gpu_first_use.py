#!/usr/bin/env python3
"""What each first use costs in a fresh process on a CUDA GPU: imports, starting CUDA, the first
optimizer, the first training steps, capturing the CUDA graph, the first validation (520 rows in
`train`'s batches, run eagerly: `train` replays them as a graph), the first checkpoint. Later uses are timed beside the first, so the difference is the
one-off cost. For comparison: the same replays with PyTorch's default (multi-tensor) Adam update.

    python benchmarks/gpu_first_use.py [--cudnn-benchmark] [--device cpu] [--profile]

Run by bench_gpu.py in a fresh interpreter for each setting; prints one JSON line (seconds).
`--device cpu` (eager steps instead of the graph) checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true",
                    help="at the end, print PyTorch's profile of 10 eager training steps (where a step's time goes)")
    args = ap.parse_args()
    t: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str, sync: bool = True) -> None:
        nonlocal mark
        if sync and args.device == "cuda" and "torch" in sys.modules:
            sys.modules["torch"].cuda.synchronize()
        now = time.perf_counter()
        t[name] = round(now - mark, 3)
        mark = now

    import torch
    lap("import_torch")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.empty(1, device=args.device)
    lap("start_cuda")
    from pneumoscan.networks import checkpoint as ckpt_io
    from pneumoscan.networks.augment import draw_augmentation
    from pneumoscan.core.config import Config
    from pneumoscan.networks.cuda_graphs import CudaGraphStep
    from pneumoscan.networks.runtime import memory_format
    from pneumoscan.tasks.train import DeviceSplit, make_optimizer, make_step
    from pneumoscan.tasks.train import validation_logits as predict_logits
    lap("import_pneumoscan_train")
    cfg, dev, gen = Config(), torch.device(args.device), torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2048 + 520, 150, 150), dtype=torch.uint8, generator=gen)
    labels = (torch.rand(2048 + 520, generator=gen) < 0.74).float()
    train_split = DeviceSplit(pixels[:2048].to(dev), labels[:2048].to(dev))
    val_split = DeviceSplit(pixels[2048:].to(dev), labels[2048:].to(dev))  # 520 rows, in batches as predict_logits makes them (no graph)
    lap("data_to_gpu")
    model = ckpt_io.build_model(cfg).to(dev).to(memory_format=memory_format(dev)).train()
    lap("build_model")
    graphs = dev.type == "cuda"
    opt = make_optimizer(model, cfg, dev, graphs)[0]
    lap("first_optimizer")
    step = make_step(model, train_split, cfg, opt)
    bs = cfg.train.batch_size
    batches = [(torch.randint(0, 2048, (bs,), generator=gen).to(dev),
                {k: v.to(dev) for k, v in draw_augmentation(bs, cfg.augmentation, gen).items()}) for _ in range(60)]
    lap("draw_batches")
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        step(*batches[i])
        lap(f"eager_step_{i + 1}")

    def eager(idx, draws):
        opt.zero_grad(set_to_none=True)
        return step(idx, draws)

    graph = CudaGraphStep(step, model, opt, *batches[3]) if graphs else eager
    lap("capture_graph")
    graph(*batches[4])
    lap("replay_1")
    for b in batches[5:55]:
        graph(*b)
    lap("replay_next_50")
    predict_logits(model, val_split, cfg)
    lap("validation_1")
    predict_logits(model, val_split, cfg)
    lap("validation_2")
    model.train()
    for b in batches[55:60]:
        graph(*b)
    lap("replay_5_after_validation")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_io.save(ckpt_io.make_checkpoint(model, cfg, threshold=0.5, history=[], epoch=1), Path(tmp) / "a.pt")
        lap("checkpoint_1")
        ckpt_io.save(ckpt_io.make_checkpoint(model, cfg, threshold=0.5, history=[], epoch=2), Path(tmp) / "b.pt")
        lap("checkpoint_2")
    importlib.import_module("sklearn.metrics")
    lap("import_sklearn_metrics", sync=False)
    if graphs:  # for comparison: PyTorch's default Adam update (multi-tensor) instead of the fused one
        model = ckpt_io.build_model(cfg).to(dev).to(memory_format=memory_format(dev)).train()
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(cfg.train.lr, device=dev), eps=cfg.train.adam_eps,
                               capturable=True)
        graph = CudaGraphStep(make_step(model, train_split, cfg, opt), model, opt, *batches[3])
        for b in batches[4:9]:
            graph(*b)
        lap("default_adam_capture_and_5_replays")
        for b in batches[5:55]:
            graph(*b)
        lap("default_adam_replay_next_50")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = make_step(model, train_split, cfg, opt)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if graphs else [])) as prof:
            for b in batches[:10]:
                opt.zero_grad(set_to_none=True)
                step(*b)
            torch.cuda.synchronize() if graphs else None
        key = "self_device_time_total" if graphs else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
    print(json.dumps({"cudnn_benchmark": args.cudnn_benchmark, **t}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
