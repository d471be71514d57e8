"""The frozen inference form of a model, and scoring pixels with it.

`freeze(model)` is an explicit step, like RepVGG's `switch_to_deploy`: it copies a trained model into
eval mode, stops its gradients, and on a CPU rewrites the paper network into its fast inference
form (`FrozenSeedCNN`), whose derived weights are computed once, from the weights as they are at that
moment. Later changes to the original model never reach the frozen copy. evaluate, predict, explain,
serve and export work on a frozen model; the training loop never does (it validates the model it trains).

`model_input` is the one place that turns cached or decoded uint8 pixels into model input.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core.config import Preprocessing
from .cpu_kernels import (composed_kernel, conv5x5_pool2_by_phases, fits_composed_stem, grey_kernel, phase_weights,
                          pooled_border, with_border)
from .models import ElementwisePReLU, SeedCNN, SeparableConv2d
from .runtime import memory_format


def model_input(pixels: torch.Tensor | np.ndarray, prep: Preprocessing, device: torch.device | None = None) -> torch.Tensor:
    """(N, S, S) uint8 pixels -> (N, 1, S, S) float model input on `device`, in that device's layout
    (the model replicates the grey channel itself)."""
    x = torch.as_tensor(pixels)
    x = prep.normalize(x.to(device or x.device).unsqueeze(1).float())
    return x.contiguous(memory_format=memory_format(x.device))


class FrozenPReLU(nn.Module):
    """ElementwisePReLU with its slopes also stored in channels-last order, for channels-last input.

    The slopes are parameters that do not require gradients, so that Grad-CAM can still ask for the
    gradient of this layer's output by switching them on. `for_onnx`: written with element-wise operators
    that ONNX Runtime runs faster than its broadcasting PRelu, with the same numbers: max(x, alpha * x)
    where no slope exceeds 1 (two operators), else relu(x) + min(x, 0) * alpha (four;
    docs/performance.md#where-the-cpu-speed-comes-from)."""

    def __init__(self, alpha: torch.Tensor, for_onnx: bool = False):
        super().__init__()
        self.alpha = nn.Parameter(alpha.detach().clone(), requires_grad=False)
        self.alpha_channels_last = nn.Parameter(alpha.detach().permute(1, 2, 0).reshape(-1).clone(), requires_grad=False)
        self.for_onnx = for_onnx
        self.slopes_at_most_one = bool((alpha <= 1).all())  # then PReLU(x) = max(x, alpha * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.for_onnx:
            if self.slopes_at_most_one:
                return torch.maximum(x, x * self.alpha)
            return F.relu(x) + torch.clamp(x, max=0) * self.alpha
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = F.prelu(x.permute(0, 2, 3, 1).reshape(b, -1), self.alpha_channels_last)
            return y.view(b, h, w, c).permute(0, 3, 1, 2)
        return F.prelu(x.reshape(b, -1), self.alpha.reshape(-1)).view(b, c, h, w)


class FrozenSeedCNN(SeedCNN):
    """The paper network's CPU inference form: the stem as one 5x5 convolution, computed on the 2x2-phase
    grid (`for_onnx`: as a plain 5x5 convolution with a concatenated border, which ONNX Runtime runs
    faster), from kernels derived once by `freeze`; PReLU slopes kept in channels-last order too, and each
    block's BatchNorm folded into its last pointwise convolution and a shift after pooling (`fold_batchnorm`)."""

    def derive(self, for_onnx: bool) -> None:
        """Compute the stem's derived weights from conv1 and conv2 as they are now."""
        self.for_onnx = for_onnx
        with torch.no_grad():
            grey_w1 = self.conv1.weight.sum(1, keepdim=True)
            kernel, bias = composed_kernel(grey_w1, self.conv1.bias, self.conv2.weight, self.conv2.bias)
            w, b = (kernel, bias) if for_onnx else phase_weights(kernel, bias)
        self.register_buffer("stem_weight", w, persistent=False)
        self.register_buffer("stem_bias", b, persistent=False)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1 or not fits_composed_stem(x):
            return super().stem(x)
        w1 = grey_kernel(self.conv1.weight, x)
        border = pooled_border(x, w1, self.conv1.bias, self.conv2.weight, self.conv2.bias)
        if self.for_onnx:
            pooled = F.max_pool2d(F.conv2d(x, self.stem_weight, self.stem_bias, padding=2), 2)
            return with_border(pooled, border, in_place=False)
        return with_border(conv5x5_pool2_by_phases(x, self.stem_weight, self.stem_bias), border, in_place=True)


class PoolThenShift(nn.Module):
    """Max pooling, then a per-channel shift: what remains of a BatchNorm folded by `fold_batchnorm`."""

    def __init__(self, pool: nn.MaxPool2d, shift: torch.Tensor):
        super().__init__()
        self.pool = pool
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) + self.shift


HOMOGENEOUS = (FrozenPReLU, nn.ReLU, nn.LeakyReLU)  # f(a * x) = a * f(x) for every a > 0


def fold_batchnorm(block: nn.Sequential) -> None:
    """Rewrite `SeparableConv2d -> activation -> BatchNorm -> MaxPool` in `block` (in place) into
    `SeparableConv2d' -> activation -> MaxPool -> + shift`: the same function, one pass over the
    block's largest tensor fewer.

    Eval-mode BatchNorm is y = a * x + c per channel. The rectifiers are positively homogeneous, so
    a * f(z) = f(a * z) for a > 0, and a * z is the pointwise convolution with its weights and bias
    scaled by a; max pooling commutes with adding c. Where some a <= 0 the block stays as it is. The
    layer names stay (BatchNorm becomes Identity), so Grad-CAM's and the detector's layers still exist;
    Grad-CAM's map is unchanged by the per-channel scale of the activation it hooks.
    """
    for i in range(2, len(block) - 1):
        sep, act, norm, pool = block[i - 2], block[i - 1], block[i], block[i + 1]
        if not (isinstance(sep, SeparableConv2d) and isinstance(act, HOMOGENEOUS)
                and isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None and isinstance(pool, nn.MaxPool2d)
                and sep[-1].bias is not None):
            continue
        scale = (norm.weight if norm.affine else 1) / torch.sqrt(norm.running_var + norm.eps)
        if not bool((scale > 0).all()):
            continue
        pointwise = sep[-1]
        with torch.no_grad():
            shift = (norm.bias if norm.affine else 0) - norm.running_mean * scale
            pointwise.weight.mul_(scale.reshape(-1, 1, 1, 1))
            pointwise.bias.mul_(scale)
        block[i], block[i + 1] = nn.Identity(), PoolThenShift(pool, shift)


def freeze(model: nn.Module, for_onnx: bool = False) -> nn.Module:
    """A frozen copy of `model` for inference: eval mode, no gradients, and on a CPU the paper network's fast
    inference form (`FrozenSeedCNN`), for the model itself or each one inside it (an ensemble's members).
    `model` itself is left as it is."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    device = next(frozen.parameters()).device
    return _fast_forms(frozen, for_onnx) if device.type == "cpu" else frozen


def _fast_forms(module: nn.Module, for_onnx: bool) -> nn.Module:
    """`module` with every paper network in it (itself included) rewritten in place into its fast form."""
    if not isinstance(module, SeedCNN):
        for name, child in module.named_children():
            setattr(module, name, _fast_forms(child, for_onnx))
        return module
    module.__class__ = FrozenSeedCNN
    module.derive(for_onnx)
    for block in module.features:
        for i, layer in enumerate(block):
            if isinstance(layer, ElementwisePReLU):
                block[i] = FrozenPReLU(layer.alpha, for_onnx)
        fold_batchnorm(block)
    return module.to(memory_format=torch.channels_last)


@torch.no_grad()
def predict_logits(model: nn.Module, pixels: torch.Tensor, prep: Preprocessing, batch_size: int = 64) -> torch.Tensor:
    """The model's outputs for (N, S, S) uint8 pixels (on the model's device), in batches."""
    return torch.cat([model(model_input(pixels[i:i + batch_size], prep)) for i in range(0, len(pixels), batch_size)])
