"""Adam as Keras computes it, the optimizer of every recipe.

Keras adds epsilon to sqrt(v) before the bias correction; torch.optim.Adam adds it after. In PyTorch's
terms Keras' epsilon at step t is eps / sqrt(1 - beta2 ** t): 32x larger at the first step, and still
1.3x after a thousand, so weights with gradients below about 1e-5 move differently. This optimizer takes
Keras' step (keras.optimizers.Adam.update_step):

    alpha = lr * sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
    m += (g - m) * (1 - beta1);  v += (g * g - v) * (1 - beta2)
    w -= alpha * m / (sqrt(v) + eps)

The reference form writes this with multi-tensor (foreach) kernels, the step count in a tensor on the
parameters' device, the learning rate a float or a 0-d tensor there: a CUDA graph can capture it and
the schedule still applies (it writes into that tensor). On the CPU the same step runs as PyTorch's
one fused Adam kernel, with PyTorch's epsilon set to eps / sqrt(1 - beta2 ** t) for each step, which is
the same arithmetic in one pass over memory instead of six (tests/test_adam.py holds the two equal).
The state has torch.optim.Adam's names (step, exp_avg, exp_avg_sq), so a checkpoint of either resumes
in the other.
"""

from __future__ import annotations

import math

import torch


class KerasAdam(torch.optim.Optimizer):
    """Adam with Keras' epsilon placement. `fused`: the fused CPU kernel (default: where the parameters
    and a float learning rate are on the CPU), else the reference form."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-7, fused: bool | None = None):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            grads = [p.grad for p in params]
            m, v, steps = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            fused = self.fused if self.fused is not None else (params[0].device.type == "cpu" and not torch.is_tensor(lr))
            if fused:
                t = float(steps[0])  # every parameter of a group has taken the same number of steps
                torch._fused_adam_(params, grads, m, v, [], steps, lr=float(lr), beta1=beta1, beta2=beta2, weight_decay=0.0,
                                   eps=eps / math.sqrt(1.0 - beta2 ** t), amsgrad=False, maximize=False)
                continue
            t = steps[0]
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m, denom)
            torch._foreach_mul_(update, lr * torch.sqrt(1 - beta2 ** t) / (1 - beta1 ** t))
            torch._foreach_sub_(params, update)

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device != p.device:  # a resumed state saved on another device
            state["step"] = state["step"].to(p.device)
        return state
