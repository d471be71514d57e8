"""GPU fast paths of the training loop: steps and validation replayed as CUDA graphs, and a warm-up.

At batch 16 the paper's model is bound by kernel launches on a GPU, not by arithmetic: a replayed
graph issues a whole forward, backward and Adam update in one call. Each graph computes exactly what
the eager code computes (tests/test_gpu.py holds them equal number for number).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import Config
from .augment import augment_batch, draw_augmentation
from .models import build_model
from .runtime import memory_format

log = logging.getLogger(__name__)

Step = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


class CudaGraphStep:
    """A training step (`step(idx, draws)`, gradients already cleared) captured once as a CUDA graph and
    replayed for every full batch.

    The graph reads its inputs from fixed buffers (row indices, augmentation draws), so a step is a few
    small copies and a replay. Capturing needs a few warm-up steps; the weights, buffers and optimizer
    state they change are put back afterwards, so the run is the same as without the graph. The
    optimizer must be capturable.
    """

    def __init__(self, step: Step, model: nn.Module, optimizer: torch.optim.Optimizer, idx: torch.Tensor,
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


class CudaGraphForward:
    """`forward(rows)` for a fixed number of rows, captured once as a CUDA graph.

    The graph reads the weights and BatchNorm statistics in place, so it stays valid while training
    updates them (and after load_state_dict). Build and call it under torch.no_grad() in eval mode.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: int, device: torch.device):
        self.rows = torch.zeros(batch, dtype=torch.long, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one warm-up pass on a side stream, as capture requires
            forward(self.rows)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = forward(self.rows)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.rows.copy_(rows)
        self.graph.replay()
        return self.outputs.clone()


def start_warm_up(cfg: Config, dev: torch.device,
                  loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> threading.Thread:
    """Start paying a GPU run's one-off first-use costs in a background thread; join it before training.

    A fresh process's first training step starts CUDA and sets up cuDNN, cuBLAS and their kernels,
    mostly without holding the interpreter lock. One forward and backward pass (`loss(model, outputs,
    targets)`) of a throwaway copy of the model (built on the meta device, zero-filled, dropout off), at
    the run's batch shape, runs here while the main thread reads the images. It draws from no random
    stream, so the run is the same with or without it. Best effort: a failure is logged, and the real
    step reports any real problem.
    """
    def warm_up() -> None:
        try:
            with torch.device("meta"):
                spare = build_model(cfg)
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
            loss(spare, spare(x), torch.zeros(batch, device=dev)).backward()
            with torch.no_grad():  # validation's kernels: BatchNorm with its running statistics
                spare.eval()(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        except Exception as e:  # noqa: BLE001 - only a lost head start
            log.debug("warming up %s failed: %s", dev, e)

    thread = threading.Thread(target=warm_up, name="pneumoscan-warm-up", daemon=True)
    thread.start()
    return thread
