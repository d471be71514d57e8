"""adam.KerasAdam takes Keras' Adam step (epsilon before the bias correction) in its reference form (the
one a CUDA graph captures, with a float or a tensor learning rate) and in the fused CPU form training
uses, and resumes torch.optim.Adam's state."""

from __future__ import annotations

import numpy as np
import torch

from pneumoscan.networks.adam import KerasAdam


TOLERANCE = {"rtol": 2e-5, "atol": 1e-8}  # float32; Keras itself computes 1 - 0.999 ** t in float32 (1.3e-5 off at t = 1)


def keras_adam(w: np.ndarray, grads: list[np.ndarray], lr: float, eps: float = 1e-7) -> np.ndarray:
    """keras.optimizers.Adam.update_step, in float64."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        alpha = lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        m += (g - m) * 0.1
        v += (g * g - v) * 0.001
        w = w - alpha * m / (np.sqrt(v) + eps)
    return w


def gradients(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[np.ndarray]:
    """Gradients from 1e-9 to 1e-1 in size: where epsilon's placement matters and where it does not."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-9, -1, shape)
    return [rng.standard_normal(shape) * scale for _ in range(steps)]


def run(lr: float | torch.Tensor, w0: np.ndarray, grads: list[np.ndarray], optimizer=None, fused=None) -> np.ndarray:
    w = torch.nn.Parameter(torch.from_numpy(w0).float())
    opt = optimizer(w) if optimizer else KerasAdam([w], lr=lr, fused=fused)
    for g in grads:
        w.grad = torch.from_numpy(g).float()
        opt.step()
    return w.detach().double().numpy()


def test_the_step_is_keras_where_torch_adam_is_not():
    w0, grads = np.zeros((64, 64)), gradients((64, 64), 20)
    expected = keras_adam(w0, grads, 1e-3)
    forms = {"fused": run(1e-3, w0, grads), "reference": run(1e-3, w0, grads, fused=False),
             "reference, lr tensor": run(torch.tensor(1e-3), w0, grads)}
    for got in forms.values():
        np.testing.assert_allclose(got, expected, **TOLERANCE)
    torch_adam = run(None, w0, grads, lambda w: torch.optim.Adam([w], lr=1e-3, eps=1e-7))
    assert np.abs(torch_adam - expected).max() > 1e-4  # what the placement of epsilon changes


def test_a_learning_rate_tensor_changed_in_place_is_followed():
    w0, grads = np.zeros(100), gradients((100,), 6)
    lr = torch.tensor(1e-3)
    w = torch.nn.Parameter(torch.from_numpy(w0).float())
    opt = KerasAdam([w], lr=lr)
    for i, g in enumerate(grads):
        if i == 3:
            lr.fill_(1e-4)
        w.grad = torch.from_numpy(g).float()
        opt.step()
    m, v, expected = np.zeros(100), np.zeros(100), w0.copy()
    for t, g in enumerate(grads, start=1):
        m += (g - m) * 0.1
        v += (g * g - v) * 0.001
        expected -= (1e-3 if t <= 3 else 1e-4) * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(w.detach().double().numpy(), expected, **TOLERANCE)


def test_resumes_torch_adam_state_and_its_own():
    """A last.pt written by torch.optim.Adam (fused, as older runs used) or by KerasAdam on the host resumes
    in the device form, continuing the step count and the moments."""
    w0, grads = np.zeros(50), gradients((50,), 10)
    for first in (lambda w: torch.optim.Adam([w], lr=1e-3, eps=1e-7, fused=True), lambda w: KerasAdam([w], lr=1e-3)):  # fused
        w = torch.nn.Parameter(torch.from_numpy(w0).float())
        opt = first(w)
        for g in grads[:4]:
            w.grad = torch.from_numpy(g).float()
            opt.step()
        resumed = KerasAdam([w], lr=torch.tensor(1e-3))
        resumed.load_state_dict(opt.state_dict())
        for g in grads[4:]:
            w.grad = torch.from_numpy(g).float()
            resumed.step()
        state = resumed.state[w]
        m, v = _moments(grads)
        assert int(state["step"]) == len(grads)
        np.testing.assert_allclose(state["exp_avg"].double().numpy(), m, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(state["exp_avg_sq"].double().numpy(), v, rtol=1e-5, atol=1e-24)
        if isinstance(opt, KerasAdam):
            np.testing.assert_allclose(w.detach().double().numpy(), keras_adam(w0, grads, 1e-3), **TOLERANCE)


def _moments(grads: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    m, v = np.zeros_like(grads[0]), np.zeros_like(grads[0])
    for g in grads:
        m += (g - m) * 0.1
        v += (g * g - v) * 0.001
    return m, v
