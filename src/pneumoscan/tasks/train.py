"""Training: a plain loop (`train_one_epoch`, `validate`) around cached pixels, with resumable checkpoints.

The whole split lives in memory as uint8 (on the training device), batches are sliced from it and
augmented as tensors, so no image is decoded after the first run. Each epoch appends one JSON line to
`metrics.jsonl`; `last.pt` holds everything needed to resume (optimizer, scheduler, random states);
`best.partial.pt` holds the weights with the lowest validation loss, as Keras' ModelCheckpoint did, until
`finish` gives them their operating point and detector and writes them as `best.pt`.

Validation runs the model being trained, in eval mode; `evaluate` of `best.pt` gives the same figures.
Device-specific speed lives elsewhere: `cpu_kernels` (the CPU stem), `cuda_graphs` (replayed steps).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ..core.config import Config
from ..core.overlap import training_record, validation_record
from ..io.data import CachedImages, DataError, cache_images, class_names, split_samples, split_summary, task_labels
from ..io.fileio import atomic_write_text, write_json
from ..io.tracking import TensorBoardLogger, epoch_row, log_epoch
from ..networks import checkpoint as ckpt_io
from ..networks.adam import KerasAdam
from ..networks.augment import augment_batch, draw_augmentation
from ..networks.cpu_kernels import for_cpu_training
from ..networks.cuda_graphs import CudaGraphForward, CudaGraphStep, start_warm_up
from ..networks.models import build_model, load_pretrained, pneumonia_logit
from ..networks.runtime import (Distributed, autocast, bf16_is_emulated, check_precision, init_distributed,
                                keep_freed_memory, memory_format, peak_memory_mb, seed_everything, training_arithmetic)
from .fitting import DeviceSplit, fit_operating_point, model_loss, validation_figures, validation_logits
from .rundir import PARTIAL_BEST, incomplete, prepare_run_dir, settle_after_failure, settle_replaced

log = logging.getLogger(__name__)


def total_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model_loss(model, logits, targets)[0]


def balanced_class_weights(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """N / (K * N_c) for each class c of K: every class then carries the same total weight."""
    counts = torch.bincount(labels.long().cpu(), minlength=n_classes).double().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).float().to(labels.device)


def epoch_order(labels: torch.Tensor, cfg: Config, epoch: int, ddp: Distributed) -> torch.Tensor:
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

    With cfg.train.precision 'bf16' the forward pass runs under BF16 autocast; the loss is computed from
    FP32 logits, and the weights and Adam's state stay FP32. On a CPU without native BF16 the step's
    BF16 products are emulated (runtime.training_arithmetic).
    Returns (summed loss, correct predictions) as device tensors: nothing here waits for the device.
    """
    dev, precision = data.pixels.device, cfg.train.precision

    def step(idx: torch.Tensor, draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = augment_batch(data.inputs(idx, cfg), cfg.augmentation, draws=draws)
        y = data.labels[idx]
        with training_arithmetic(dev, precision):
            with autocast(dev, precision):
                logits = model(x)
            logits = logits.float()
            loss, _ = model_loss(model, logits, y, class_weights)
            loss.backward()
        optimizer.step()
        # accuracy of pneumonia vs normal, for either task
        return loss.detach() * len(idx), ((pneumonia_logit(logits.detach()) >= 0) == (y > 0)).sum()

    return step


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device,
                   cuda_graphs: bool) -> tuple[torch.optim.Optimizer, float | torch.Tensor]:
    """Adam as Keras computes it (adam.KerasAdam), and its learning rate: a device tensor for a captured
    step (the LR schedule writes into it), a float otherwise."""
    lr = torch.tensor(cfg.train.lr, device=device) if cuda_graphs else cfg.train.lr
    return KerasAdam(model.parameters(), lr=lr, eps=cfg.train.adam_eps), lr


def train_one_epoch(model: nn.Module, data: DeviceSplit, order: torch.Tensor, cfg: Config, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, progress: bool = False, desc: str = "",
                    class_weights: torch.Tensor | None = None, graphs: dict[str, CudaGraphStep] | None = None) -> dict[str, float]:
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
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # summed on the device: no sync per step
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
        loss_sum += loss
        correct += right
    seen, elapsed = len(order), time.perf_counter() - start
    return {"loss": float(loss_sum) / seen, "accuracy": float(correct) / seen, "seconds": elapsed,
            "images_per_s": seen / elapsed, "images": seen}


def validate(model: nn.Module, data: DeviceSplit, cfg: Config, graphs: dict[str, CudaGraphForward] | None = None) -> dict[str, Any]:
    """Validation loss as Keras reports it (cross-entropy + L2 penalty), and the threshold metrics of
    pneumonia vs normal (for the three-class task too, plus its own accuracy)."""
    return validation_figures(model, validation_logits(model, data, cfg, graphs), data.labels, cfg)


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


def check_classes(splits: dict[str, list[Any]], task: str, root: str) -> None:
    """DataError unless the training and validation splits each hold NORMAL and PNEUMONIA images: the
    model needs both to learn, and validation needs both for its ROC AUC, sensitivity and specificity
    and for every threshold rule."""
    for name in ("train", "val"):
        labels = task_labels(splits[name], task) > 0
        n_pneumonia = int(labels.sum())
        if n_pneumonia in (0, len(labels)):
            missing = "PNEUMONIA" if n_pneumonia == 0 else "NORMAL"
            raise DataError(f"{root}: the {'training' if name == 'train' else 'validation'} split has no {missing} "
                            f"images (of {len(labels)}); training and validation need both NORMAL and PNEUMONIA images")


@dataclass
class Run:
    """What a training run carries from epoch to epoch; `last.pt` saves all of it."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: float | torch.Tensor  # a device tensor when the step is a CUDA graph
    scheduler: Any
    stopper: EarlyStopping
    generator: torch.Generator
    history: list[dict[str, Any]] = field(default_factory=list)
    best_loss: float = float("inf")
    start_epoch: int = 1

    def set_lr(self, value: float) -> None:
        """Set the learning rate, keeping it in the tensor `lr` when the optimizer was built with one."""
        for group in self.optimizer.param_groups:
            if torch.is_tensor(self.lr):
                self.lr.fill_(float(value))
                group["lr"] = self.lr
            else:
                group["lr"] = float(value)

    def resumable_state(self, epoch: int) -> dict[str, Any]:
        """last.pt: the checkpoint plus the optimizer, scheduler, random states and early-stopping state."""
        state = ckpt_io.make_checkpoint(self.model, self.cfg, threshold=self.cfg.train.threshold, history=self.history, epoch=epoch)
        optimizer = self.optimizer.state_dict()  # with plain-number learning rates, loadable on any device
        optimizer["param_groups"] = [{**g, "lr": float(g["lr"])} for g in optimizer["param_groups"]]
        state.update(optimizer=optimizer, scheduler=self.scheduler.state_dict(), generator=self.generator.get_state(),
                     torch_rng=torch.get_rng_state(), best_loss=self.best_loss, early_stopping=self.stopper.state())
        return state

    def resume_from(self, state: dict[str, Any], restore_generator: bool) -> None:
        self.model.load_state_dict(state["state_dict"])
        saved = state["optimizer"]  # a CPU run's state resumes on a GPU with graphs, and back
        self.optimizer.load_state_dict(saved)
        state_in_parameter_layouts(self.optimizer)
        self.set_lr(saved["param_groups"][0]["lr"])
        self.scheduler.load_state_dict(state["scheduler"])
        if restore_generator:
            self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history, self.best_loss = state["history"], state["best_loss"]
        self.stopper = EarlyStopping(self.cfg.train.early_stopping_patience, self.cfg.train.early_stopping_min_delta,
                                     state["early_stopping"])
        self.start_epoch = state["epoch"] + 1


def state_in_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Put each of Adam's state tensors in its parameter's memory layout: a CPU run keeps its weights
    channels-last and a GPU run does not, and the multi-tensor update is fastest with one layout for both."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)


def load_data(cfg: Config, out: Path, dev: torch.device, ddp: Distributed, progress: bool, strict: bool,
              marks: dict[str, float]) -> tuple[dict[str, DeviceSplit], dict[str, CachedImages]]:
    """Carve the split, decode (or read from the pixel cache), write config.json and split.json, and put
    both splits on the device. Unreadable images are listed, or stop the run when `strict`. Records when
    each phase ended in `marks`."""
    splits = split_samples(cfg.data)
    marks["split"] = time.perf_counter()
    check_classes(splits, cfg.data.task, cfg.data.root)  # fail now, not after decoding or after the epochs
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
        write_json(out / "config.json", cfg.to_dict())
        write_json(out / "split.json", {
            name: {"summary": split_summary(c.samples), "files": [s.path for s in c.samples], "unreadable": c.errors}
            for name, c in cached.items()})
    per_process = len(cached["train"].samples) // ddp.world_size
    if cfg.train.drop_last and per_process < cfg.train.batch_size:
        raise DataError(f"batch size {cfg.train.batch_size} is larger than the {per_process} training images "
                        f"each process gets: no full batch to train on; use a smaller --batch-size")
    data = {name: DeviceSplit.from_cache(c, dev, cfg.data.task) for name, c in cached.items()}
    marks["to_device"] = time.perf_counter()  # on a GPU this includes starting CUDA
    return data, cached


def start_run(cfg: Config, dev: torch.device, cuda_graphs: bool, generator: torch.Generator,
              resume_state: dict[str, Any] | None, restore_generator: bool) -> Run:
    """The model (on the device, in its layout; on a CPU with the composed stem), Adam, the LR schedule
    and early stopping, fresh or as `resume_state` left them."""
    model = build_model(cfg)
    if cfg.model.pretrained and resume_state is None:
        loaded = load_pretrained(model, cfg.model.pretrained)
        log.info("loaded %d pretrained tensors from %s (%d left at their initialisation: %s)", len(loaded["loaded"]),
                 cfg.model.pretrained, len(loaded["missing"]), ", ".join(loaded["missing"][:4]))
    if dev.type == "cpu":
        model = for_cpu_training(model)
    model = model.to(dev).to(memory_format=memory_format(dev))
    optimizer, lr = make_optimizer(model, cfg, dev, cuda_graphs)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.train.lr_factor, patience=cfg.train.lr_patience, threshold=1e-4, threshold_mode="abs")
    t = cfg.train
    run = Run(cfg, model, optimizer, lr, scheduler, EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta), generator)
    if resume_state is not None:
        run.resume_from(resume_state, restore_generator)
    return run


def train(cfg: Config, out: str | Path, device: str = "auto", resume: bool = False, overwrite: bool = False,
          progress: bool = True, tensorboard: bool = False, strict: bool = False,
          cuda_graphs: bool | None = None, cudnn_benchmark: bool = False) -> dict[str, Any]:
    """Train `cfg` into run folder `out`; returns the run summary (also written to summary.json).

    `cuda_graphs` (default: on for single-process CUDA training in FP32) replays each full-batch step as a CUDA graph.
    `cudnn_benchmark`: on CUDA, let cuDNN time its algorithms for each new input shape (off by default).
    Under torchrun each process trains on its share of every epoch (DistributedSampler) with
    DistributedDataParallel; only rank 0 writes checkpoints and logs. `batch_size` is per process.
    """
    out = Path(out)
    cfg.check()
    keep_freed_memory()
    ddp, dev = init_distributed(device)
    try:
        graphs_by_default = cuda_graphs is None
        if cuda_graphs is None:
            cuda_graphs = dev.type == "cuda" and not ddp.enabled
        if cuda_graphs and (dev.type != "cuda" or ddp.enabled):
            raise ValueError("CUDA graphs need a single-process CUDA run")
        check_precision(cfg.train.precision, dev)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark
        if ddp.is_main:
            prepare_run_dir(out, resume, overwrite)
        ddp.barrier()
        try:
            return _train(cfg, out, dev, ddp, resume, progress and ddp.is_main, tensorboard and ddp.is_main, strict,
                          cuda_graphs, graphs_by_default)
        except BaseException as e:
            if not ddp.is_main:
                raise
            restored = settle_after_failure(out)
            if isinstance(e, OSError):  # a full disk, a folder gone read-only: which file, and what is left
                raise incomplete(out, e, restored) from e
            raise
    finally:
        if ddp.enabled:
            torch.distributed.destroy_process_group()


def _precision_checked(cfg: Config, dev: torch.device, cuda_graphs: bool, graphs_by_default: bool) -> bool:
    """Refuse a precision `dev` cannot train in (a resumed run keeps the one it started with) and say what it
    means; returns whether CUDA graphs stay on (under BF16 they are off unless asked for)."""
    check_precision(cfg.train.precision, dev)
    if cfg.train.precision == "fp32":
        return cuda_graphs
    log.info("training forward passes under %s autocast; weights, Adam's state, the loss and validation in FP32",
             cfg.train.precision.upper())
    if bf16_is_emulated(dev, cfg.train.precision):
        log.info("this CPU has no BF16 arithmetic: BF16 products are emulated (FP32 sums of BF16 values, rounded "
                 "once), for BF16's numbers at no gain in speed")
    if cuda_graphs and graphs_by_default:
        log.info("CUDA graphs are off under --precision %s: each step runs eagerly", cfg.train.precision)
        return False
    return cuda_graphs


def _train(cfg: Config, out: Path, dev: torch.device, ddp: Distributed, resume: bool, progress: bool,
           tensorboard: bool, strict: bool, cuda_graphs: bool, graphs_by_default: bool = False) -> dict[str, Any]:
    marks = {"start": time.perf_counter()}  # when each phase ended, for the timings in summary.json
    started = time.time()
    state = ckpt_io.read(out / "last.pt") if resume else None
    cfg = ckpt_io.config_of(state, out / "last.pt") if state else cfg
    cuda_graphs = _precision_checked(cfg, dev, cuda_graphs, graphs_by_default)
    generator = seed_everything(cfg.train.seed)
    if ddp.rank:  # different augmentation draws on each process; same initial weights
        generator.manual_seed(cfg.train.seed + 1000 * ddp.rank)
    warm_up = start_warm_up(cfg, dev, total_loss) if dev.type == "cuda" else None
    data, cached = load_data(cfg, out, dev, ddp, progress, strict, marks)
    run = start_run(cfg, dev, cuda_graphs, generator, state, restore_generator=ddp.is_main)
    net = nn.parallel.DistributedDataParallel(run.model) if ddp.enabled else run.model
    if cfg.train.class_weight not in ("none", "balanced"):
        raise ValueError(f"unknown class weight {cfg.train.class_weight!r}; choose none or balanced")
    class_weights = (balanced_class_weights(data["train"].labels, len(class_names(cfg.data.task)))
                     if cfg.train.class_weight == "balanced" else None)
    tracker = TensorBoardLogger(out) if tensorboard else None
    if ddp.is_main:
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in run.history))
    graphs, val_graphs = ({}, {}) if cuda_graphs else (None, None)
    marks["model"] = time.perf_counter()
    if warm_up:
        warm_up.join()
        marks["warm_up_wait"] = time.perf_counter()  # how long the warm-up outlasted everything before
    # scikit-learn is slow to import and first needed by the first validation: import it while the first
    # epoch trains (PyTorch releases the GIL inside its kernels)
    threading.Thread(target=_import_quietly, args=("sklearn.metrics",), daemon=True).start()

    if ddp.is_main and getattr(run.model, "regularization_loss", None):
        log.info("train_loss and val_loss are Keras' loss, by which best.pt is chosen: the cross-entropy plus the "
                 "L2 penalty of the dense kernels (0.01 x their squared weights, as the paper); val_bce is the "
                 "cross-entropy alone")
    for epoch in range(run.start_epoch, cfg.train.epochs + 1):
        row, va, stop = run_epoch(run, net, data, epoch, ddp, progress, class_weights, graphs, val_graphs)
        improved, run.best_loss = va["loss"] < run.best_loss, min(run.best_loss, va["loss"])
        if ddp.is_main:
            _save_epoch(out, run, row, va, epoch, improved, tracker)
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
    summary = finish(out, run, data, val_graphs, [s.patient for s in cached["train"].samples])
    summary.update(unreadable_files={**cached["train"].errors, **cached["val"].errors}, started=round(started, 3),
                   device=str(dev), processes=ddp.world_size, threads=torch.get_num_threads(),
                   wall_seconds=round(time.perf_counter() - marks["start"], 1),
                   setup_seconds=round(marks["to_device"] - marks["start"], 1), timings=_phase_seconds(marks),
                   peak_memory_mb=round(peak_memory_mb(), 1), resumed=resume)
    write_json(out / "summary.json", summary)
    return summary


def _save_epoch(out: Path, run: Run, row: dict[str, Any], va: dict[str, Any], epoch: int, improved: bool,
                tracker: TensorBoardLogger | None) -> None:
    """After an epoch, on the main process: log its row, keep improved weights, save last.pt to resume from."""
    log_epoch(out, row, tracker)
    if improved:  # not best.pt: that name is kept for weights the run has finalised (`finish`)
        ckpt_io.save({**ckpt_io.make_checkpoint(run.model, run.cfg, threshold=run.cfg.train.threshold,
                                                metrics={"val": va, "epoch": epoch}, history=run.history,
                                                epoch=epoch), ckpt_io.UNFINISHED: True}, out / PARTIAL_BEST)
    ckpt_io.save(run.resumable_state(epoch), out / "last.pt")
    settle_replaced(out)  # the new run has a checkpoint: an earlier run's files go now


def run_epoch(run: Run, net: nn.Module, data: dict[str, DeviceSplit], epoch: int, ddp: Distributed, progress: bool,
              class_weights: torch.Tensor | None, graphs: dict[str, CudaGraphStep] | None,
              val_graphs: dict[str, CudaGraphForward] | None) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Train one epoch, validate, step the LR schedule and early stopping: (metrics.jsonl row, validation
    figures, whether to stop). The row is appended to the run's history."""
    cfg = run.cfg
    epoch_start, epoch_lr = time.perf_counter(), float(run.optimizer.param_groups[0]["lr"])
    order = epoch_order(data["train"].labels, cfg, epoch, ddp)
    tr = train_one_epoch(net, data["train"], order, cfg, run.optimizer, run.generator, progress,
                         desc=f"epoch {epoch}/{cfg.train.epochs}", class_weights=class_weights, graphs=graphs)
    loss_sum, right, images = ddp.sum(tr["loss"] * tr["images"], tr["accuracy"] * tr["images"], tr["images"])
    tr.update(loss=loss_sum / images, accuracy=right / images, images=int(images), images_per_s=images / tr["seconds"])
    val_start = time.perf_counter()
    va = validate(run.model, data["val"], cfg, val_graphs)  # every process scores the whole split: same LR steps
    val_seconds = time.perf_counter() - val_start
    run.scheduler.step(va["loss"])
    run.set_lr(run.optimizer.param_groups[0]["lr"])
    stop = cfg.train.early_stopping and run.stopper.step(va["accuracy"])
    row = epoch_row(epoch, epoch_lr, tr, va, val_seconds, time.perf_counter() - epoch_start)
    run.history.append(row)
    return row, va, stop


def finish(out: Path, run: Run, data: dict[str, DeviceSplit], val_graphs: dict[str, CudaGraphForward] | None,
           train_patients: list[str]) -> dict[str, Any]:
    """Write best.pt: the best weights (best.partial.pt; best.pt itself when a finished run is resumed with
    no better epoch) with the complete history (for the curves), their operating point chosen on validation
    (`fitting.fit_operating_point`): calibration, the threshold and its interval, the training prevalence, their
    out-of-distribution detector (fitted on the training split, threshold on validation) and the record of
    their training images (`overlap.training_record`); return the summary's training figures."""
    partial = out / PARTIAL_BEST
    best = ckpt_io.read(partial if partial.is_file() else out / "best.pt", allow_unfinished=True)
    best.pop(ckpt_io.UNFINISHED, None)
    run.model.load_state_dict(best["state_dict"])
    fitted = fit_operating_point(run.model, data, run.cfg, val_graphs)
    best.update(fitted.fields)
    if "ood" not in fitted.fields:
        log.warning("%s names no ood_layers: this checkpoint gets no out-of-distribution score", type(run.model).__name__)
    val_logits = pneumonia_logit(fitted.logits).cpu().numpy()
    best["history"] = run.history
    best["training_images"] = training_record(data["train"].pixels.cpu().numpy(), train_patients)
    best["validation_outputs"] = validation_record(val_logits, data["val"].labels.cpu().numpy())
    ckpt_io.save(best, out / "best.pt")
    partial.unlink(missing_ok=True)
    epochs_run = [h for h in run.history if h["epoch"] >= run.start_epoch]
    steady = [h["train_images_per_s"] for h in epochs_run[1:]] or [h["train_images_per_s"] for h in epochs_run]
    return {"best_epoch": best["epoch"], "best_val": best["metrics"]["val"], "epochs": len(run.history),
            "threshold": best["threshold"], "threshold_rule": best["threshold_rule"],
            "threshold_interval": best["threshold_interval"], "calibration": best["calibration"],
            "train_prevalence": best["train_prevalence"], "ood": {k: best["ood"][k] for k in ("layers", "threshold", "quantile", "val_flagged")} if "ood" in best else None,
            "train_images": len(data["train"]), "val_images": len(data["val"]),
            "train_images_per_s_median": float(np.median(steady)) if steady else None}


def _phase_seconds(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase, from the time each one ended (the dict's order); `after_epochs` runs until now:
    reloading best.pt, choosing the threshold, saving."""
    names, times = list(marks), list(marks.values()) + [time.perf_counter()]
    return {f"{name}_seconds": round(times[i + 1] - times[i], 2)
            for i, name in enumerate(names[1:] + ["after_epochs"])}


def _import_quietly(module: str) -> None:
    """Import `module` ahead of use; a failure is left for the real import to report."""
    try:
        importlib.import_module(module)
    except ImportError:
        pass
