"""Training: a plain loop (`train_one_epoch`, `validate`) around cached pixels, with resumable checkpoints.

The whole split lives in memory as uint8 (or on the GPU), batches are sliced from it and augmented
as tensors, so no image is decoded after the first run. Each epoch appends one JSON line to
`metrics.jsonl`; `last.pt` holds everything needed to resume (optimizer, scheduler, random states);
`best.pt` holds the weights with the lowest validation loss, as Keras' ModelCheckpoint did.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import random
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from . import checkpoint as ckpt_io
from .augment import augment_batch, draw_augmentation
from .config import Config
from .data import CachedImages, DataError, cache_images, class_names, split_samples, split_summary, task_labels
from .metrics import binary_metrics, choose_threshold, decide
from .models import load_pretrained, memory_format, pneumonia_logit, probabilities
from .tracking import TensorBoardLogger

log = logging.getLogger(__name__)


class RunDirError(OSError):
    """The run folder cannot be used as asked (exists without --resume / --overwrite, or has nothing to resume)."""


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the OS.

    By default glibc maps large blocks fresh and unmaps them when freed, so every CPU training step
    page-faults its activations and gradients back in: for the paper's model at batch 16, 37,000 faults
    and a fifth of the step's CPU time; inference at batch 32 took twice as long (measured on this
    project's 2-core machine). Costs about 60 MB of peak memory. Called by train, evaluate and Predictor.
    The same as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824. Does nothing without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: up to 1 GiB of free heap is kept


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; returns the generator that drives shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class DeviceSplit:
    """A split's pixels and labels as tensors on the training device."""

    pixels: torch.Tensor  # (N, S, S) uint8
    labels: torch.Tensor  # (N,) float32 class index: 0/1, or 0/1/2 for the three-class task

    @classmethod
    def from_cache(cls, cached: CachedImages, device: torch.device, task: str = "binary") -> "DeviceSplit":
        labels = torch.from_numpy(task_labels(cached.samples, task))
        return cls(torch.from_numpy(cached.pixels).to(device), labels.float().to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, idx: torch.Tensor | slice, cfg: Config) -> torch.Tensor:
        """Model input for the given rows: (B, 1, S, S) float in the device's layout (the model replicates grey)."""
        x = cfg.preprocessing.normalize(self.pixels[idx].unsqueeze(1).float())
        return x.contiguous(memory_format=memory_format(x.device))


def model_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
               class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, cross-entropy) — total adds the model's own penalties (Keras' L2 on Dense kernels).

    One logit per image: binary cross-entropy; several (three-class): softmax cross-entropy.
    `class_weights` (one per class) weights each image's loss by its class.
    """
    if logits.dim() == 2:
        bce = F.cross_entropy(logits, targets.long(), weight=class_weights)
    else:
        weight = class_weights[targets.long()] if class_weights is not None else None
        bce = F.binary_cross_entropy_with_logits(logits, targets, weight=weight)
    penalty = getattr(ckpt_io.unwrap(model), "regularization_loss", None)
    return (bce + penalty() if penalty else bce), bce


def balanced_class_weights(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """N / (K * N_c) for each class c of K: every class then carries the same total weight."""
    counts = torch.bincount(labels.long().cpu(), minlength=n_classes).double().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).float().to(labels.device)


def epoch_order(labels: torch.Tensor, cfg: Config, epoch: int, ddp: "Distributed") -> torch.Tensor:
    """This process's row indices for one epoch, deterministic for (seed, epoch).

    shuffle: a DistributedSampler permutation (each process gets its own share);
    balanced: as many draws as images, each class equally likely, with replacement, split between processes.
    """
    n = len(labels)
    if cfg.train.sampling == "balanced":
        g = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)
        weights = (1.0 / torch.bincount(labels.long().cpu(), minlength=2).double().clamp(min=1))[labels.long().cpu()]
        draws = torch.multinomial(weights, n, replacement=True, generator=g)
        return draws[ddp.rank::ddp.world_size][: n // ddp.world_size]
    if cfg.train.sampling != "shuffle":
        raise ValueError(f"unknown sampling {cfg.train.sampling!r}; choose shuffle or balanced")
    sampler = DistributedSampler(range(n), num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def make_step(model: nn.Module, data: DeviceSplit, cfg: Config, optimizer: torch.optim.Optimizer,
              class_weights: torch.Tensor | None = None):
    """The optimisation step on rows `idx` with augmentation `draws` (gradients already cleared).

    Returns (summed loss, correct predictions) as device tensors: nothing here waits for the device.
    """

    def step(idx: torch.Tensor, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment_batch(data.inputs(idx, cfg), cfg.augmentation, draws=draws)
        y = data.labels[idx]
        logits = model(x)
        loss, _ = model_loss(model, logits, y, class_weights)
        loss.backward()
        optimizer.step()
        # accuracy of pneumonia vs normal, for either task
        return loss.detach() * len(idx), ((pneumonia_logit(logits.detach()) >= 0) == (y > 0)).sum()

    return step


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device,
                   cuda_graphs: bool) -> tuple[torch.optim.Optimizer, float | torch.Tensor, dict[str, Any]]:
    """Adam as the training loop uses it: (optimizer, its learning rate, the modes it was built with).

    A captured Adam reads its step count and learning rate from device tensors (the LR schedule still
    applies), so the learning rate is then a tensor. One fused kernel updates every parameter: on the CPU
    4.9 instead of 15.6 ms per step for the paper's model; on an H200 a replayed step took 2.40 ms
    against 2.62 ms with PyTorch's default multi-tensor update (and about 4.0 ms with the
    one-parameter-at-a-time loop that fused=False selects there).
    """
    lr = torch.tensor(cfg.train.lr, device=device) if cuda_graphs else cfg.train.lr
    modes = {"capturable": cuda_graphs, "fused": True}
    return torch.optim.Adam(model.parameters(), lr=lr, eps=cfg.train.adam_eps, **modes), lr, modes


class CudaGraphStep:
    """A training step captured once as a CUDA graph and replayed for every full batch.

    At batch 16 the paper's model is bound by kernel launches, not arithmetic: a replay issues the
    whole forward, backward and Adam update in one call. The graph reads its inputs from fixed
    buffers (row indices, augmentation draws), so a step is three small copies and a replay.
    Capturing needs a few warm-up steps; the weights, buffers and optimizer state they change are put
    back afterwards, so the run is the same as without the graph. The optimizer must be capturable.
    """

    def __init__(self, step, model: nn.Module, optimizer: torch.optim.Optimizer, idx: torch.Tensor,
                 draws: dict[str, torch.Tensor], warmup: int = 3):
        self.idx, self.draws = idx.clone(), {k: v.clone() for k, v in draws.items()}
        saved = _snapshot(model, optimizer)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                for _ in range(warmup):
                    optimizer.zero_grad(set_to_none=True)
                    step(self.idx, self.draws)
            torch.cuda.current_stream().wait_stream(side)
            optimizer.zero_grad(set_to_none=True)  # backward in the graph then writes fresh gradients
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = step(self.idx, self.draws)
        finally:
            _restore(model, optimizer, saved)

    def __call__(self, idx: torch.Tensor, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.idx.copy_(idx)
        for k, v in draws.items():
            self.draws[k].copy_(v)
        self.graph.replay()
        return self.outputs  # overwritten by the next replay: read before calling again


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": [t.detach().clone() for t in (*model.parameters(), *model.buffers())],
            "optimizer": {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in optimizer.state.items()}}


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Copy saved values back in place (the graph holds these very tensors); state created since starts at 0."""
    with torch.no_grad():
        for t, v in zip((*model.parameters(), *model.buffers()), saved["model"]):
            t.copy_(v)
        for p, st in optimizer.state.items():
            before = saved["optimizer"].get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v):
                    v.copy_(before[k]) if k in before else v.zero_()


def train_one_epoch(model: nn.Module, data: DeviceSplit, order: torch.Tensor, cfg: Config, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, progress: bool = False, desc: str = "",
                    class_weights: torch.Tensor | None = None, graphs: "dict[str, CudaGraphStep] | None" = None) -> dict[str, float]:
    """One pass over `order` (this process's shuffled row indices) in batches of cfg.train.batch_size.

    With `graphs` (a dict kept across epochs), full batches run as a replayed CUDA graph, captured on first use.
    """
    model.train()
    bs = cfg.train.batch_size
    steps = len(order) // bs if cfg.train.drop_last else -(-len(order) // bs)
    dev = data.pixels.device
    order = order[:steps * bs].to(dev)
    draws = {k: v.to(dev) for k, v in draw_augmentation(len(order), cfg.augmentation, generator).items()}
    step = make_step(model, data, cfg, optimizer, class_weights)
    total_loss = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    start = time.perf_counter()
    batches = range(steps)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr)
    for i in batches:
        rows = slice(i * bs, (i + 1) * bs)
        idx, batch_draws = order[rows], {k: v[rows] for k, v in draws.items()}
        if graphs is not None and len(idx) == bs:
            if "step" not in graphs:
                graphs["step"] = CudaGraphStep(step, model, optimizer, idx, batch_draws)
            loss, right = graphs["step"](idx, batch_draws)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss, right = step(idx, batch_draws)
        # accumulate on the device: no host sync per step (matters on a GPU)
        total_loss += loss
        correct += right
    seen = len(order)
    total_loss, correct = float(total_loss), float(correct)
    elapsed = time.perf_counter() - start
    return {"loss": total_loss / seen, "accuracy": correct / seen, "seconds": elapsed, "images_per_s": seen / elapsed,
            "images": seen}


class CudaGraphForward:
    """The model's eval-mode outputs for a fixed-size batch of `data`'s rows, captured once as a CUDA graph.

    Validation runs after every epoch, and at batch 16 an eager forward pass is bound by kernel
    launches. The graph reads the weights and BatchNorm statistics in place, so it stays valid while
    training updates them (and after loading other weights with load_state_dict). Build and call it
    under torch.no_grad() with the model in eval mode.
    """

    def __init__(self, model: nn.Module, data: DeviceSplit, cfg: Config, batch: int):
        self.rows = torch.zeros(batch, dtype=torch.long, device=data.pixels.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one warm-up pass on a side stream, as capture requires
            model(data.inputs(self.rows, cfg))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = model(data.inputs(self.rows, cfg))

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.rows.copy_(rows)
        self.graph.replay()
        return self.outputs.clone()


@torch.no_grad()
def predict_logits(model: nn.Module, data: DeviceSplit, cfg: Config,
                   graphs: "dict[str, Any] | None" = None) -> torch.Tensor:
    """The model's outputs for every row, in eval mode, in batches of cfg.train.eval_batch_size.

    On a GPU, in batches of the training batch size instead, the last one padded: every batch then has
    the shape the training step already ran, whose cuDNN plans and kernels are loaded; with a new shape
    the first validation took 2.3-4.3 s on an H200, and 0.05 s without.
    With `graphs` (a dict kept across calls on the same `data`), on a GPU each batch is a replayed CUDA graph.
    """
    model.eval()
    n = len(data)
    if data.pixels.device.type != "cuda":
        bs = cfg.train.eval_batch_size
        return torch.cat([model(data.inputs(slice(i, i + bs), cfg)) for i in range(0, n, bs)])
    bs = cfg.train.batch_size
    rows = torch.arange(-(-n // bs) * bs, device=data.pixels.device).clamp_(max=n - 1)  # pad with the last row
    if graphs is None:
        def forward(r: torch.Tensor) -> torch.Tensor:
            return model(data.inputs(r, cfg))
    else:
        if "validation" not in graphs:
            graphs["validation"] = CudaGraphForward(model, data, cfg, bs)
        forward = graphs["validation"]
    return torch.cat([forward(rows[i:i + bs]) for i in range(0, n, bs)])[:n]


def validate(model: nn.Module, data: DeviceSplit, cfg: Config, graphs: "dict[str, Any] | None" = None) -> dict[str, Any]:
    """Validation loss as Keras reports it (cross-entropy + L2 penalty), and the threshold metrics of
    pneumonia vs normal (for the three-class task too, plus its own accuracy). `graphs`: see predict_logits."""
    logits = predict_logits(model, data, cfg, graphs)
    with torch.no_grad():
        loss, bce = model_loss(model, logits, data.labels)
    probs, class_probs = probabilities(logits)
    labels = data.labels.cpu().numpy()
    m = binary_metrics(labels > 0, probs, cfg.train.threshold)
    out = {"loss": float(loss), "bce": float(bce), **{k: m[k] for k in ("accuracy", "roc_auc", "recall", "specificity")}}
    if class_probs is not None:
        out["accuracy_3class"] = float((decide(probs, cfg.train.threshold, class_probs) == labels).mean())
    return out


class EarlyStopping:
    """Keras EarlyStopping(monitor='val_accuracy', mode='max', min_delta, patience) semantics."""

    def __init__(self, patience: int, min_delta: float, state: dict[str, Any] | None = None):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.wait = (state or {}).get("best", -float("inf")), (state or {}).get("wait", 0)

    def step(self, value: float) -> bool:
        """Record an epoch's value; True when training should stop."""
        if value - self.min_delta > self.best:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        return self.wait >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}


def _set_lr(optimizer: torch.optim.Optimizer, lr: float | torch.Tensor, value: float | torch.Tensor) -> None:
    """Set the learning rate to `value`, keeping it in the tensor `lr` when the optimizer was built with one."""
    for group in optimizer.param_groups:
        if torch.is_tensor(lr):
            lr.fill_(float(value))
            group["lr"] = lr
        else:
            group["lr"] = float(value)


def _portable(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict with plain-number learning rates, loadable by a CPU or a CUDA-graph run."""
    return {**state, "param_groups": [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]}


def _state_in_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Put each of Adam's state tensors in its parameter's memory layout: a CPU run keeps its weights
    channels-last and a GPU run does not, and the fused update needs one layout for both."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


def _import_quietly(module: str) -> None:
    """Import `module` ahead of use; a failure is left for the real import to report."""
    try:
        importlib.import_module(module)
    except ImportError:
        pass


def start_warm_up(cfg: Config, dev: torch.device) -> threading.Thread:
    """Start paying a GPU run's one-off first-use costs in a background thread; join it before training.

    A fresh process's first training step starts CUDA and sets up cuDNN, cuBLAS and its kernels.
    PyTorch's operators do most of that without holding the interpreter lock, so one forward and
    backward pass of a throwaway copy of the model, at the run's batch shape, runs here while the main
    thread reads the images and imports `torch._dynamo` for the first optimizer. On an H100 the paper's
    recipe took 0.3-0.8 s less with it (README, "On a GPU"). The copy is built on the meta device and
    filled with zeros, and its dropout is off: it draws from no random stream, so the run is the same
    with or without it. Best effort: a failure here is logged, and the real step reports any real problem.
    """
    def warm_up() -> None:
        try:
            with torch.device("meta"):
                spare = ckpt_io.build_model(cfg)
            spare = spare.to_empty(device=dev).to(memory_format=memory_format(dev)).train()
            with torch.no_grad():
                for t in [*spare.parameters(), *spare.buffers()]:
                    t.zero_()
            for m in spare.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
            batch, size = cfg.train.batch_size, cfg.preprocessing.image_size
            x = torch.zeros(batch, 1, size, size, device=dev).contiguous(memory_format=memory_format(dev))
            draws = draw_augmentation(batch, cfg.augmentation, torch.Generator().manual_seed(0))
            x = augment_batch(x, cfg.augmentation, draws={k: v.to(dev) for k, v in draws.items()})
            model_loss(spare, spare(x), torch.zeros(batch, device=dev))[0].backward()
            with torch.no_grad():  # validation's kernels: BatchNorm with its running statistics
                spare.eval()(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        except Exception as e:  # noqa: BLE001 - only a lost head start
            log.debug("warming up %s failed: %s", dev, e)

    thread = threading.Thread(target=warm_up, name="pneumoscan-warm-up", daemon=True)
    thread.start()
    return thread


def _phase_seconds(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of `_train`, from the time each one ended (the dict's order); `after_epochs` runs
    until now: reloading best.pt, choosing the threshold, saving."""
    names, times = list(marks), list(marks.values()) + [time.perf_counter()]
    return {f"{name}_seconds": round(times[i + 1] - times[i], 2)
            for i, name in enumerate(names[1:] + ["after_epochs"])}


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / "last.pt").is_file():
            raise RunDirError(f"{out}: nothing to resume (no last.pt)")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(f"{out}: run folder exists and is not empty; pass --resume to continue it or --overwrite to replace it")
        for name in ("best.pt", "last.pt", "metrics.jsonl", "config.json", "split.json", "summary.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (gloo on CPU, NCCL on CUDA), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), select_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:  # share the cores between the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world, local), dev


def train(cfg: Config, out: str | Path, device: str = "auto", resume: bool = False, overwrite: bool = False,
          progress: bool = True, tensorboard: bool = False, strict: bool = False,
          cuda_graphs: bool | None = None, cudnn_benchmark: bool = False) -> dict[str, Any]:
    """Train `cfg` into run folder `out`; returns the run summary (also written to summary.json).

    `cuda_graphs` (default: on for single-process CUDA training) replays each full-batch step as a CUDA graph.
    `cudnn_benchmark`: on CUDA, let cuDNN time its algorithms for each new input shape and keep the fastest.
    Off by default: for the paper's model on an H200 the later epochs were no faster, and the first
    epoch and validation took 3.6-11 s longer.

    Under torchrun each process trains on its share of every epoch (DistributedSampler) with
    DistributedDataParallel; only rank 0 writes checkpoints and logs. `batch_size` is per process.
    Unreadable images are listed and skipped, or stop the run before training when `strict`.
    """
    out = Path(out)
    keep_freed_memory()
    ddp, dev = init_distributed(device)
    try:
        if cuda_graphs is None:
            cuda_graphs = dev.type == "cuda" and not ddp.enabled
        if cuda_graphs and (dev.type != "cuda" or ddp.enabled):
            raise ValueError("CUDA graphs need a single-process CUDA run")
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark
        return _train(cfg, out, dev, ddp, resume, overwrite, progress and ddp.is_main, tensorboard and ddp.is_main, strict,
                      cuda_graphs)
    finally:
        if ddp.enabled:
            torch.distributed.destroy_process_group()


def _train(cfg: Config, out: Path, dev: torch.device, ddp: Distributed, resume: bool, overwrite: bool,
           progress: bool, tensorboard: bool, strict: bool, cuda_graphs: bool) -> dict[str, Any]:
    if ddp.is_main:
        prepare_run_dir(out, resume, overwrite)
    ddp.barrier()
    wall_start, started = time.perf_counter(), time.time()
    if resume:
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        cfg = Config.from_dict(state["config"])
    generator = seed_everything(cfg.train.seed)
    if ddp.rank:  # different augmentation draws on each process; same initial weights
        generator.manual_seed(cfg.train.seed + 1000 * ddp.rank)

    warm_up = start_warm_up(cfg, dev) if dev.type == "cuda" else None
    marks = {"start": time.perf_counter()}  # phase ends, for the timings in summary.json
    splits = split_samples(cfg.data)
    marks["split"] = time.perf_counter()
    for name in ("train", "val"):
        task_labels(splits[name], cfg.data.task)  # fail now, not after decoding, if the task cannot be labelled
    if not ddp.is_main:
        ddp.barrier()  # let rank 0 fill the pixel cache first, then read it
    cached = {name: cache_images(splits[name], cfg.preprocessing, progress=progress) for name in ("train", "val")}
    if ddp.is_main:
        ddp.barrier()
    marks["decode"] = time.perf_counter()
    bad = {path: reason for c in cached.values() for path, reason in c.errors.items()}
    if strict and bad:  # every process sees the same files, so all of them stop here
        raise DataError(f"{len(bad)} unreadable image(s) and --strict was given:\n" +
                        "\n".join(f"  {p}: {r}" for p, r in sorted(bad.items())))
    if ddp.is_main:
        ckpt_io.write_json(out / "config.json", cfg.to_dict())
        ckpt_io.write_json(out / "split.json", {
            name: {"summary": split_summary(c.samples), "files": [s.path for s in c.samples], "unreadable": c.errors}
            for name, c in cached.items()})
    per_process = len(cached["train"].samples) // ddp.world_size
    if cfg.train.drop_last and per_process < cfg.train.batch_size:
        raise DataError(f"batch size {cfg.train.batch_size} is larger than the {per_process} training images "
                        f"each process gets: no full batch to train on; use a smaller --batch-size")
    data = {name: DeviceSplit.from_cache(c, dev, cfg.data.task) for name, c in cached.items()}
    marks["to_device"] = time.perf_counter()  # on a GPU this includes starting CUDA
    setup_seconds = time.perf_counter() - wall_start

    model = ckpt_io.build_model(cfg)
    if cfg.model.pretrained and not resume:
        loaded = load_pretrained(model, cfg.model.pretrained)
        log.info("loaded %d pretrained tensors from %s (%d left at their initialisation: %s)", len(loaded["loaded"]),
                 cfg.model.pretrained, len(loaded["missing"]), ", ".join(loaded["missing"][:4]))
    model = model.to(dev).to(memory_format=memory_format(dev))
    optimizer, lr, modes = make_optimizer(model, cfg, dev, cuda_graphs)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.train.lr_factor, patience=cfg.train.lr_patience, threshold=1e-4, threshold_mode="abs")
    history: list[dict[str, Any]] = []
    best_loss, start_epoch, stopper_state = float("inf"), 1, None
    if resume:
        model.load_state_dict(state["state_dict"])
        saved = state["optimizer"]  # a CPU run's state resumes on a GPU with graphs, and back
        optimizer.load_state_dict({**saved, "param_groups": [{**g, **modes} for g in saved["param_groups"]]})
        _state_in_parameter_layouts(optimizer)
        _set_lr(optimizer, lr, saved["param_groups"][0]["lr"])
        scheduler.load_state_dict(state["scheduler"])
        if ddp.is_main:
            generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_loss, stopper_state = state["history"], state["best_loss"], state["early_stopping"]
        start_epoch = state["epoch"] + 1
        log.info("resuming %s at epoch %d", out, start_epoch)
    stopper = EarlyStopping(cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta, stopper_state)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if ddp.enabled else model
    if cfg.train.class_weight not in ("none", "balanced"):
        raise ValueError(f"unknown class weight {cfg.train.class_weight!r}; choose none or balanced")
    n_classes = len(class_names(cfg.data.task))
    class_weights = balanced_class_weights(data["train"].labels, n_classes) if cfg.train.class_weight == "balanced" else None
    tracker = TensorBoardLogger(out) if tensorboard else None
    if ddp.is_main:
        ckpt_io.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    graphs: dict[str, CudaGraphStep] | None = {} if cuda_graphs else None
    val_graphs: dict[str, CudaGraphForward] | None = {} if cuda_graphs else None
    marks["model"] = time.perf_counter()
    if warm_up:
        warm_up.join()
        marks["warm_up_wait"] = time.perf_counter()  # how long the warm-up outlasted everything before
    # scikit-learn takes 1-2 s to import and is first needed by the first validation: import it while the
    # first epoch trains (PyTorch releases the GIL inside its kernels, and waits for a GPU without it)
    threading.Thread(target=_import_quietly, args=("sklearn.metrics",), daemon=True).start()

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        epoch_lr = float(optimizer.param_groups[0]["lr"])
        epoch_start = time.perf_counter()
        order = epoch_order(data["train"].labels, cfg, epoch, ddp)
        tr = train_one_epoch(net, data["train"], order, cfg, optimizer, generator, progress,
                             desc=f"epoch {epoch}/{cfg.train.epochs}", class_weights=class_weights, graphs=graphs)
        if ddp.enabled:
            totals = torch.tensor([tr["loss"] * tr["images"], tr["accuracy"] * tr["images"], tr["images"]], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            tr.update(loss=float(totals[0] / totals[2]), accuracy=float(totals[1] / totals[2]),
                      images=int(totals[2]), images_per_s=float(totals[2]) / tr["seconds"])
        val_start = time.perf_counter()
        va = validate(model, data["val"], cfg, val_graphs)  # every process scores the whole split: same numbers, same LR steps
        val_seconds = time.perf_counter() - val_start
        scheduler.step(va["loss"])
        _set_lr(optimizer, lr, optimizer.param_groups[0]["lr"])
        stop = cfg.train.early_stopping and stopper.step(va["accuracy"])
        row = {"epoch": epoch, "lr": epoch_lr, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               "val_loss": va["loss"], "val_bce": va["bce"], "val_accuracy": va["accuracy"], "val_roc_auc": va["roc_auc"],
               "val_recall": va["recall"], "val_specificity": va["specificity"],
               **({"val_accuracy_3class": va["accuracy_3class"]} if "accuracy_3class" in va else {}),
               "train_images": tr["images"], "train_seconds": round(tr["seconds"], 2),
               "train_images_per_s": round(tr["images_per_s"], 1), "val_seconds": round(val_seconds, 2),
               "epoch_seconds": round(time.perf_counter() - epoch_start, 2)}
        history.append(row)
        improved = va["loss"] < best_loss
        best_loss = min(best_loss, va["loss"])
        if ddp.is_main:
            print(json.dumps(row), flush=True)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if tracker:
                tracker.log_epoch(row)
            if improved:
                ckpt_io.save(ckpt_io.make_checkpoint(model, cfg, threshold=cfg.train.threshold,
                                                     metrics={"val": va, "epoch": epoch}, history=history, epoch=epoch),
                             out / "best.pt")
            last = ckpt_io.make_checkpoint(model, cfg, threshold=cfg.train.threshold, history=history, epoch=epoch)
            last.update(optimizer=_portable(optimizer.state_dict()), scheduler=scheduler.state_dict(), generator=generator.get_state(),
                        torch_rng=torch.get_rng_state(), best_loss=best_loss, early_stopping=stopper.state())
            ckpt_io.save(last, out / "last.pt")
        if stop:
            log.info("early stopping after epoch %d (validation accuracy did not improve by %g for %d epochs)",
                     epoch, cfg.train.early_stopping_min_delta, cfg.train.early_stopping_patience)
            break
    ddp.barrier()
    marks["epochs"] = time.perf_counter()
    if tracker:
        tracker.close()
    if not ddp.is_main:
        return {}

    # best.pt keeps the best weights; it gets the complete history (for the curves) and the decision
    # threshold chosen on validation by the configured rule.
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["state_dict"])
    val_probs = probabilities(predict_logits(model, data["val"], cfg, val_graphs))[0]
    t = cfg.train
    best["threshold"] = choose_threshold(data["val"].labels.cpu().numpy() > 0, val_probs, t.threshold_rule,
                                         t.target_sensitivity, t.threshold)
    best["threshold_rule"] = {"rule": t.threshold_rule, "target_sensitivity": t.target_sensitivity, "chosen_on": "val"}
    best["history"] = history
    ckpt_io.save(best, out / "best.pt")
    epochs_run = [h for h in history if h["epoch"] >= start_epoch]
    steady = [h["train_images_per_s"] for h in epochs_run[1:]] or [h["train_images_per_s"] for h in epochs_run]
    summary = {
        "best_epoch": best["epoch"], "best_val": best["metrics"]["val"], "epochs": len(history),
        "threshold": best["threshold"], "threshold_rule": best["threshold_rule"],
        "train_images": len(data["train"]), "val_images": len(data["val"]),
        "unreadable_files": {**cached["train"].errors, **cached["val"].errors},
        "started": round(started, 3), "device": str(dev), "processes": ddp.world_size, "threads": torch.get_num_threads(),
        "wall_seconds": round(time.perf_counter() - wall_start, 1), "setup_seconds": round(setup_seconds, 1),
        "timings": _phase_seconds(marks),
        "train_images_per_s_median": float(np.median(steady)) if steady else None,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "resumed": resume,
    }
    ckpt_io.write_json(out / "summary.json", summary)
    return summary
