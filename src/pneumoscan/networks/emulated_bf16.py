"""BF16 arithmetic on a CPU that has none: the numbers of BF16 training at about FP32's speed.

Without AVX-512 BF16 or AMX, PyTorch runs BF16 convolutions through its reference path
(`_slow_conv2d`), 10-15 times slower than FP32, and that path's backward pass rounds its partial sums
to BF16, so most of its gradient elements differ from what BF16 hardware computes
(`experiments/bf16_emulation.py`). Under `EmulatedBF16`, every convolution and matrix product whose
inputs are BF16, forward and backward, runs in FP32 on those BF16 values and rounds its result to BF16
once: BF16 inputs, FP32 sums, one rounding, as BF16 dot-product hardware computes. Every other
operation runs as autocast has it, in the dtypes autocast gives it.

It exists to measure what BF16 training does to accuracy on a CPU without BF16
(`PNEUMOSCAN_ALLOW_EMULATED_BF16=1`), never for speed.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# the products BF16 hardware computes; the same operators autocast sends to BF16 for this project's models
PRODUCTS = frozenset({aten.convolution.default, aten.convolution_backward.default,
                      aten.mm.default, aten.addmm.default, aten.bmm.default})


def _is_bf16(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


def _to_fp32(value: object) -> object:
    return value.float() if _is_bf16(value) else value


def _to_bf16(value: object) -> object:
    return value.to(torch.bfloat16) if isinstance(value, torch.Tensor) else value


class EmulatedBF16(TorchDispatchMode):
    """While active (forward and backward passes both), BF16 products are computed in FP32 on the BF16
    values and rounded to BF16 once."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS or not any(map(_is_bf16, args)):
            return func(*args, **kwargs)
        out = func(*map(_to_fp32, args), **{k: _to_fp32(v) for k, v in kwargs.items()})
        return tuple(map(_to_bf16, out)) if isinstance(out, tuple) else _to_bf16(out)
