"""Fast CPU forms of the paper network's stem: the same function as `SeedCNN.stem`, computed with fewer
multiply-adds. Tests hold each form equal to the literal one (tests/test_fast_paths.py).

The paper puts no activation between conv1 and conv2, so their composition is one linear map: a 5x5
convolution with 16 instead of 16 + 256 multiply-adds per pixel and output channel. Only the
outermost ring of pixels differs (conv2 zero-pads conv1's output there), so the pooled border is
recomputed the literal way on thin strips.

- `CpuTrainingSeedCNN` (training on a CPU): the composed kernel is built from both layers' parameters
  on every call, so autograd trains conv1 and conv2 exactly as the two-layer version would.
- `phase_weights` + `conv5x5_pool2_by_phases` (the frozen inference form, `inference.freeze`): the
  5x5 convolution and the 2x2 max pooling computed on the 2x2-phase grid from weights derived once.

A GPU runs the two convolutions as they are: there the strips' extra kernels cost more than the
multiply-adds they save.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch.nn import functional as F

from .models import SeedCNN


def grey_kernel(conv1_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """conv1's kernel for input `x`: summed over the colour axis for a grey image that the model would
    replicate to RGB (the same result at a third of the cost)."""
    return conv1_weight.sum(1, keepdim=True) if x.shape[1] == 1 and conv1_weight.shape[1] > 1 else conv1_weight


def composed_kernel(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5x5 kernel and bias of conv2(conv1(x)) away from the border (both 3x3, padding 1)."""
    return F.conv2d(F.pad(w2, (2, 2, 2, 2)), w1.flip(2, 3).transpose(0, 1)), b2 + (w2.sum((2, 3)) * b1).sum(1)


def fits_composed_stem(x: torch.Tensor) -> bool:
    """The composed forms need even sides of at least 8 pixels (tiny or odd sizes run literally)."""
    return x.device.type == "cpu" and min(x.shape[2:]) >= 8 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0


def pooled_border(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
                  ) -> tuple[torch.Tensor, ...]:
    """The literal stem's outermost pooled rows and columns: (top, bottom, left, right), the columns
    without the corners. A border pooling window covers input rows 0-1 (or the last two), which need rows 0-3."""
    def literal(part: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.conv2d(F.conv2d(part, w1, b1, padding=1), w2, b2, padding=1), 2)

    return (literal(x[:, :, :4])[:, :, :1], literal(x[:, :, -4:])[:, :, -1:],
            literal(x[..., :4])[..., 1:-1, :1], literal(x[..., -4:])[..., 1:-1, -1:])


def with_border(pooled: torch.Tensor, border: tuple[torch.Tensor, ...], in_place: bool) -> torch.Tensor:
    """`pooled` with its outermost ring replaced by `border` (see `pooled_border`).

    In place (a slice assignment) where a copy is not needed; otherwise concatenated, which ONNX export
    needs (a slice assignment exports as ScatterND, which ONNX Runtime runs 2x slower)."""
    top, bottom, left, right = border
    if not in_place:
        middle = torch.cat([left, pooled[:, :, 1:-1, 1:-1], right], dim=3)
        return torch.cat([top, middle, bottom], dim=2).contiguous(memory_format=torch.channels_last)
    pooled[:, :, :1], pooled[:, :, -1:] = top, bottom
    pooled[:, :, 1:-1, :1], pooled[:, :, 1:-1, -1:] = left, right
    return pooled


class CpuTrainingSeedCNN(SeedCNN):
    """SeedCNN whose stem runs as one composed 5x5 convolution: same parameters, same state_dict, same
    function. `for_cpu_training` turns a SeedCNN into one."""

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        if not fits_composed_stem(x):
            return super().stem(x)
        w1, b1, w2, b2 = grey_kernel(self.conv1.weight, x), self.conv1.bias, self.conv2.weight, self.conv2.bias
        pooled = F.max_pool2d(F.conv2d(x, *composed_kernel(w1, b1, w2, b2), padding=2), 2)
        if torch.is_grad_enabled():
            # write the border into a channels-last copy: max pooling's backward pass then keeps that
            # layout, which is more than twice as fast on the CPU
            pooled = pooled.clone(memory_format=torch.channels_last)
        return with_border(pooled, pooled_border(x, w1, b1, w2, b2), in_place=True)


def for_cpu_training(model: torch.nn.Module) -> torch.nn.Module:
    """The model to train on a CPU: a SeedCNN computes its stem as one composed convolution (the same
    module, its class changed: parameters and state_dict keys stay as they are); other models as they are."""
    if type(model) is SeedCNN:
        model.__class__ = CpuTrainingSeedCNN
    return model


@functools.cache
def _phase_taps(device: torch.device) -> torch.Tensor:
    """Which tap of a 5x5 kernel (0-24; 25: none) links input phase (py, px) at cell offset (oy - 1, ox - 1)
    to output phase (dy, dx) when a stride-1 5x5 convolution (padding 2) is computed on the 2x2-phase grid."""
    taps = torch.full((4, 4, 3, 3), 25, dtype=torch.long)
    for dy, dx, py, px, oy, ox in itertools.product(range(2), range(2), range(2), range(2), range(3), range(3)):
        i, j = 2 * oy + py - dy, 2 * ox + px - dx
        if 0 <= i < 5 and 0 <= j < 5:
            taps[2 * dy + dx, 2 * py + px, oy, ox] = 5 * i + j
    return taps.to(device)


def phase_weights(kernel: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 convolution on the 2x2-phase grid that computes a 5x5 one (`kernel`, `bias`) at the four
    positions of every 2x2 window: weight (4 x Cout, 4 x Cin, 3, 3) and bias (4 x Cout,)."""
    cout, cin = kernel.shape[:2]
    taps = torch.cat([kernel.reshape(cout, cin, 25), kernel.new_zeros(cout, cin, 1)], 2)[:, :, _phase_taps(kernel.device)]
    # (Cout, Cin, out phase, in phase, 3, 3) -> (out phase x Cout, Cin x in phase, 3, 3): pixel_unshuffle's channel order
    weight = taps.permute(2, 0, 1, 3, 4, 5).reshape(4 * cout, 4 * cin, 3, 3).contiguous(memory_format=torch.channels_last)
    return weight, bias.repeat(4)


def conv5x5_pool2_by_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """max_pool2d(conv2d(x, kernel, bias, padding=2), 2) for even H and W, with `phase_weights(kernel, bias)`.

    The input is split into its four pixel phases (pixel_unshuffle) and one 3x3 convolution with
    4 x Cout outputs computes the 5x5 convolution at all four positions of every pooling window; the
    pool is then the largest of the four output groups. A 5x5 convolution of a grey image has one
    input channel, which PyTorch's CPU kernels run slowly; this form has four inputs and four times
    the outputs. No gradient is meant to flow through it (ties would route it differently).
    """
    cout = weight.shape[0] // 4
    phases = F.pixel_unshuffle(x, 2).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(phases, weight, bias, padding=1)
    return torch.maximum(torch.maximum(y[:, :cout], y[:, cout:2 * cout]), torch.maximum(y[:, 2 * cout:3 * cout], y[:, 3 * cout:]))
