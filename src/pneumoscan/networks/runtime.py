"""The process's runtime: which device, which memory layout, the allocator, seeding, torchrun, and the
arithmetic precision of training (FP32, or BF16 autocast where the hardware computes BF16 natively,
emulated where it is forced elsewhere).

Chosen once per command and passed down; nothing here changes what a model computes, except BF16
autocast when a run asks for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .emulated_bf16 import EmulatedBF16


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of images and activations on `device`: channels-last on a CPU, where oneDNN's kernels
    for it are the fast ones; PyTorch's default on a GPU, where cuDNN sets up its first channels-last
    step much more slowly (docs/gpu.md)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


# CPU flags of hardware BF16 arithmetic: AVX-512 BF16 (dot products) or AMX (BF16 tiles)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FORCE_BF16_ENV = "PNEUMOSCAN_ALLOW_EMULATED_BF16"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where it is unreadable); read
    once per process, since every BF16 training step asks (the file grows with the core count)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu() -> bool:
    """Whether this CPU computes BF16 in hardware (AVX-512 BF16 or AMX); elsewhere oneDNN emulates it,
    slower than FP32."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError unless `device` computes `precision` natively: BF16 needs AVX-512 BF16 or AMX on a
    CPU (unless PNEUMOSCAN_ALLOW_EMULATED_BF16=1 forces it, emulated) and a GPU that supports it on CUDA."""
    if precision == "fp32":
        return
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    if device.type == "cpu" and not native_bf16_cpu() and os.environ.get(FORCE_BF16_ENV) != "1":
        raise ValueError(f"--precision bf16: this CPU has no native BF16 arithmetic (no {' or '.join(NATIVE_BF16_FLAGS)} "
                         f"flag in /proc/cpuinfo), so BF16 cannot train faster than FP32 here; use --precision fp32, "
                         f"or set {FORCE_BF16_ENV}=1 to emulate BF16's numbers (to measure its accuracy)")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support BF16; use --precision fp32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a training forward pass runs in: BF16 autocast for 'bf16', nothing for 'fp32'.

    Autocast's cache of cast weights is off: a captured CUDA graph must not hold cast copies made
    outside it, and the casts the cache would save are few and small."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def bf16_is_emulated(device: torch.device, precision: str) -> bool:
    """Whether training in `precision` on `device` emulates BF16: 'bf16' on a CPU without native BF16."""
    return precision == "bf16" and device.type == "cpu" and not native_bf16_cpu()


def training_arithmetic(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a whole training step (forward and backward) runs in: emulated BF16 products
    (emulated_bf16.EmulatedBF16) where `bf16_is_emulated`, nothing otherwise."""
    return EmulatedBF16() if bf16_is_emulated(device, precision) else contextlib.nullcontext()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to `count` inside the block, then restored (the count is the
    process's: another thread's PyTorch work in the block gets it too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the OS.

    By default glibc maps large blocks fresh and unmaps them when freed, so every CPU step page-faults
    its activations and gradients back in. The same as MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=1073741824; costs some peak memory. Does nothing without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: up to 1 GiB of free heap is kept


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; returns the generator that drives shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes (the values themselves in a single process)."""
        if not self.enabled:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        return totals.tolist()


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
