"""BF16 training (`--precision bf16`): autocast around the forward pass only, everything else FP32.

- A BF16 step on the CPU changes the weights as an FP32 step does (same batch, same initialisation),
  and leaves the weights, Adam's state and BatchNorm's running statistics in FP32.
- The CPU's composed stem under autocast equals the plain stem under autocast (values and gradients).
- Validation of a model trained in BF16 runs in FP32: it equals a fresh FP32 copy's outputs, and a
  2-epoch BF16 run through the command line logs validation figures equal to `evaluate`'s.
- `--precision bf16` is refused on a CPU without native BF16 arithmetic, unless forced.
- On a GPU: BF16 steps replayed as a CUDA graph equal eager BF16 steps.
- Emulated BF16 (a CPU without it, forced): each convolution and matrix product, forward and backward,
  equals the exactly rounded BF16 result (products of the BF16 values summed in float64, rounded once)
  in all but a few elements, each of those one BF16 step away (or 1e-6 of the largest value where terms
  cancel); training steps engage it only there.
- `compare --precisions fp32 bf16` trains both and tests their difference against the seed noise.

These tests check numbers, not speed: on a CPU without native BF16 they run emulated (forced through
PNEUMOSCAN_ALLOW_EMULATED_BF16).
"""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch

from pneumoscan.networks import runtime
from pneumoscan.apps.cli import build_parser, main
from pneumoscan.tasks.compare import compare
from pneumoscan.networks.emulated_bf16 import EmulatedBF16
from pneumoscan.core.config import Config, DataConfig, Preprocessing, TrainConfig
from pneumoscan.networks.cpu_kernels import for_cpu_training
from pneumoscan.networks.models import SeedCNN
from pneumoscan.tasks.train import DeviceSplit, make_optimizer, make_step, validation_logits

from .conftest import make_dataset, synthetic_xray
from .test_fast_paths import varied
from .test_invariants import paper_run_args

BF16_EPS = 2.0 ** -8  # BF16 keeps 8 significant bits: one rounding moves a value by up to this fraction


@pytest.fixture
def allow_bf16(monkeypatch):
    """Let BF16 training run here: natively where the CPU has it, else emulated (numbers, not speed)."""
    if not runtime.native_bf16_cpu():
        monkeypatch.setenv(runtime.FORCE_BF16_ENV, "1")


def _batch_and_model(size: int = 48, n: int = 16) -> tuple[Config, DeviceSplit, SeedCNN]:
    torch.manual_seed(0)
    cfg = Config(preprocessing=Preprocessing(image_size=size), train=TrainConfig(batch_size=n))
    rng = np.random.default_rng(0)
    labels = torch.arange(n) % 2
    pixels = torch.from_numpy(np.stack([synthetic_xray(rng, int(label), size) for label in labels]))
    labels = labels.float()
    model = for_cpu_training(SeedCNN(image_size=size)).to(memory_format=torch.channels_last).train()
    for m in model.modules():  # dropout masks drawn for BF16 and FP32 activations differ: compare without
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return cfg, DeviceSplit(pixels, labels), model


def _steps(cfg: Config, data: DeviceSplit, model: SeedCNN, precision: str, steps: int,
           sgd: bool = False) -> tuple[SeedCNN, torch.optim.Optimizer]:
    """`steps` training steps on the whole batch, dropout drawn alike for both precisions."""
    cfg = cfg.override("train", precision=precision)
    model = copy.deepcopy(model)
    optimizer = (torch.optim.SGD(model.parameters(), lr=1.0) if sgd
                 else make_optimizer(model, cfg, torch.device("cpu"), cuda_graphs=False)[0])
    step = make_step(model, data, cfg, optimizer)
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step(torch.arange(len(data)), {})
    return model, optimizer


def _relative_change_error(before: SeedCNN, a: SeedCNN, b: SeedCNN) -> float:
    """|change_b - change_a| / |change_a| over all parameters together."""
    with torch.no_grad():
        diff = sum(((pb - pa) ** 2).sum() for pa, pb in zip(a.parameters(), b.parameters()))
        norm = sum(((pa - p0) ** 2).sum() for p0, pa in zip(before.parameters(), a.parameters()))
    return float((diff / norm).sqrt())


def test_a_bf16_gradient_step_changes_the_weights_as_an_fp32_step_does(allow_bf16):
    """SGD with learning rate 1 writes the data term's gradient itself into the weights (the L2 penalty,
    computed in FP32 either way, is left out). At initialisation the two classes' gradients nearly cancel,
    so BF16's roundings show: measured about 16% of the change (7% after 20 steps). The same FP32 step
    with the labels swapped differs by far more than the tolerance."""
    cfg, data, model = _batch_and_model()
    model.l2 = 0.0
    fp32, _ = _steps(cfg, data, model, "fp32", 1, sgd=True)
    bf16, _ = _steps(cfg, data, model, "bf16", 1, sgd=True)
    assert _relative_change_error(model, fp32, bf16) < 0.3
    swapped, _ = _steps(cfg, DeviceSplit(data.pixels, 1 - data.labels), model, "fp32", 1, sgd=True)
    assert _relative_change_error(model, fp32, swapped) > 1.0


def test_bf16_adam_steps_follow_fp32_and_keep_weights_state_and_batchnorm_statistics_in_fp32(allow_bf16):
    """Three steps of the Adam that training builds (adam.KerasAdam). Adam's first steps move each weight
    by about the learning rate whatever its gradient's size, so weights whose gradient is near zero may
    move either way: the tolerance is on the total change (measured: 0.21; with the labels swapped: 0.69,
    the L2 penalty's part of the change being the same)."""
    cfg, data, model = _batch_and_model()
    fp32, _ = _steps(cfg, data, model, "fp32", 3)
    bf16, optimizer = _steps(cfg, data, model, "bf16", 3)
    assert _relative_change_error(model, fp32, bf16) < 0.35
    swapped, _ = _steps(cfg, DeviceSplit(data.pixels, 1 - data.labels), model, "fp32", 3)
    assert _relative_change_error(model, fp32, swapped) > 0.55
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for k, v in state.items()
               if torch.is_tensor(v) and k != "step")
    assert len(optimizer.state) == len(list(bf16.parameters()))
    stats = {name: (t, dict(fp32.named_buffers())[name]) for name, t in bf16.named_buffers()
             if name.endswith(("running_mean", "running_var"))}
    assert len(stats) == 8
    for name, (ours, reference) in stats.items():
        assert ours.dtype == torch.float32, name
        before = dict(model.named_buffers())[name]
        assert not torch.equal(ours, before), name  # the statistics did move
        assert torch.allclose(ours, reference, rtol=0.05, atol=1e-3), name
    # validation of the model BF16 trains runs in FP32: as a freshly built FP32 copy of the weights scores.
    # BatchNorm statistics of these images first, so that eval-mode outputs tell them apart
    with torch.no_grad():
        for m in bf16.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        bf16.train()(data.inputs(slice(None), cfg))
    in_loop = validation_logits(bf16, data, cfg)
    reference = SeedCNN(image_size=48).eval()
    reference.load_state_dict(bf16.state_dict())
    with torch.no_grad():
        fresh = reference(data.inputs(slice(None), cfg))
    assert in_loop.dtype == torch.float32 and fresh.std() > 1e-3
    assert torch.allclose(in_loop, fresh, atol=1e-5)


def test_the_composed_cpu_stem_equals_the_plain_stem_under_autocast(allow_bf16):
    """Values and gradients, each within a few BF16 roundings of the largest value; both also close to the
    plain stem in float64, so neither agrees with the other by being wrong the same way."""
    torch.manual_seed(0)
    plain = varied(SeedCNN(image_size=48)).train()
    fast = for_cpu_training(copy.deepcopy(plain))
    x = torch.rand(4, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = SeedCNN.stem(copy.deepcopy(plain).double(), x.double())
    outputs, grads = [], []
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            y = model.stem(x)
        assert y.dtype == torch.bfloat16
        (y.float() * reference.float()).sum().backward()
        outputs.append(y.float())
        grads.append([model.conv1.weight.grad, model.conv2.weight.grad])
    scale = reference.abs().max().item()
    assert (outputs[1] - outputs[0]).abs().max() < 4 * BF16_EPS * scale
    for y in outputs:
        assert (y.double() - reference).abs().max() < 4 * BF16_EPS * scale
    for g_plain, g_fast in zip(*grads):
        assert g_fast.dtype == torch.float32
        assert (g_fast - g_plain).norm() < 0.03 * g_plain.norm()


def test_a_bf16_run_logs_validation_equal_to_evaluate_of_best_pt(allow_bf16, tmp_path):
    """The invariant of tests/test_invariants.py for a BF16 run: validation stays FP32."""
    data = make_dataset(tmp_path / "data", patients_per_class=30, images_per_patient=2)
    run = tmp_path / "run"
    # BatchNorm statistics and a learning rate with which 2 epochs tell the classes apart
    assert main([*paper_run_args(data, run, epochs=2, image_size=48), "--precision", "bf16",
                 "--batchnorm-momentum", "0.5", "--lr", "0.003"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "bf16"
    summary = json.loads((run / "summary.json").read_text())
    evaluated = json.loads((run / "eval-val" / "metrics.json").read_text())
    logged = summary["best_val"]
    assert logged["roc_auc"] > 0.8  # trained: its outputs tell images apart
    for key in ("accuracy", "roc_auc", "recall", "specificity"):
        assert logged[key] == pytest.approx(evaluated[key], abs=1e-5), key
    assert logged["bce"] == pytest.approx(evaluated["log_loss"], abs=1e-5)
    best = torch.load(run / "best.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in best["state_dict"].values() if t.is_floating_point())


def test_bf16_is_refused_on_a_cpu_without_native_bf16_unless_forced(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: False)
    monkeypatch.delenv(runtime.FORCE_BF16_ENV, raising=False)
    data = make_dataset(tmp_path / "data", patients_per_class=4, images_per_patient=1)
    run = tmp_path / "run"
    assert main([*paper_run_args(data, run, epochs=1, image_size=48), "--precision", "bf16"]) != 0
    err = capsys.readouterr().err
    assert "no native BF16" in err and runtime.FORCE_BF16_ENV in err and "Traceback" not in err
    assert not run.exists()  # refused before the run folder is made
    runtime.check_precision("fp32", torch.device("cpu"))
    monkeypatch.setenv(runtime.FORCE_BF16_ENV, "1")
    runtime.check_precision("bf16", torch.device("cpu"))  # forced: accepted


def _products(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A strided channels-last convolution with bias, its three gradients, a depthwise convolution, and
    the dense layer's matrix products, computed in `dtype` from the same BF16 values."""
    g = torch.Generator().manual_seed(0)

    def bf16(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).to(dtype)

    x = bf16(4, 32, 37, 37).contiguous(memory_format=torch.channels_last)
    w, b, dw = bf16(64, 32, 3, 3, scale=0.1), bf16(64), bf16(32, 1, 3, 3)
    grad_out = bf16(4, 64, 19, 19).contiguous(memory_format=torch.channels_last)
    a, m, bias = bf16(16, 2000), bf16(2000, 64, scale=0.05), bf16(64)
    conv = (1, 1), (2, 2), (1, 1), False, (0, 0)  # padding, stride, dilation, transposed, output padding
    aten = torch.ops.aten
    out = {"conv": aten.convolution(x, w, b, conv[1], conv[0], *conv[2:], 1),
           "depthwise": aten.convolution(x, dw, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 32),
           "mm": aten.mm(a, m), "addmm": aten.addmm(bias, a, m)}
    grads = aten.convolution_backward(grad_out, x, w, [64], conv[1], conv[0], *conv[2:], 1, [True, True, True])
    return out | dict(zip(("grad_input", "grad_weight", "grad_bias"), grads))


def test_emulated_bf16_products_are_the_exactly_rounded_bf16_results():
    """FP32 sums of BF16 products differ from exact ones by about 1e-7 of the terms' size, so the one
    rounding to BF16 lands elsewhere only near a tie (measured: at most 0.02% of elements), by one BF16
    step, or by 1e-7 of the largest value where terms cancel. PyTorch's own BF16 kernels on a CPU
    without BF16 round partial sums (measured: about half of the gradient elements differ), so they are
    not the reference."""
    exact = {k: v.to(torch.bfloat16).float() for k, v in _products(torch.float64).items()}
    with EmulatedBF16():
        emulated = _products(torch.bfloat16)
    for name, reference in exact.items():
        ours = emulated[name]
        assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape, name
        error = (ours.float() - reference).abs()
        assert (error > 0).float().mean() < 1e-3, name
        assert (error <= 2 * BF16_EPS * reference.abs() + 1e-6 * reference.abs().max()).all(), name
    assert not torch.equal(emulated["conv"].float(), _products(torch.float32)["conv"])  # rounded, not FP32


def test_bf16_training_steps_are_emulated_only_on_a_cpu_without_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    assert isinstance(runtime.training_arithmetic(cpu, "fp32"), type(contextlib.nullcontext()))
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: False)
    assert isinstance(runtime.training_arithmetic(cpu, "bf16"), EmulatedBF16)
    monkeypatch.setattr(runtime, "native_bf16_cpu", lambda: True)
    assert isinstance(runtime.training_arithmetic(cpu, "bf16"), type(contextlib.nullcontext()))


def test_compare_trains_fp32_and_bf16_and_tests_their_difference(allow_bf16, tmp_path):
    data = make_dataset(tmp_path / "data", patients_per_class=8, images_per_patient=1)
    cfg = Config(data=DataConfig(root=str(data), val_fraction=0.25), preprocessing=Preprocessing(image_size=48),
                 train=TrainConfig(epochs=1, batch_size=8, eval_batch_size=16))
    result = compare(cfg, tmp_path / "cmp", activations=["prelu"], seeds=[0, 1], device="cpu", progress=False,
                     precisions=["fp32", "bf16"])
    assert list(result["runs"]) == ["prelu fp32", "prelu bf16"]
    for folder, precision in (("prelu-s1", "fp32"), ("prelu-bf16-s1", "bf16")):
        assert json.loads((tmp_path / "cmp" / folder / "config.json").read_text())["train"]["precision"] == precision
    assert {(t["a"], t["b"]) for t in result["tests"]} == {("prelu fp32", "prelu bf16")}
    assert "| prelu bf16 |" in (tmp_path / "cmp" / "compare.md").read_text()
    for flag in ("--precisions", "--precision"):  # train's spelling is accepted too
        assert build_parser().parse_args(["compare", "--out", "x", flag, "fp32", "bf16"]).precisions == ["fp32", "bf16"]


def test_precision_is_a_checked_setting():
    assert Config().train.precision == "fp32"
    with pytest.raises(ValueError, match="train.precision"):
        Config().override("train", precision="fp16").check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_steps_replayed_as_a_cuda_graph_equal_eager_bf16_steps():
    from pneumoscan.networks.cuda_graphs import CudaGraphStep

    torch.backends.cudnn.deterministic = True
    cfg, data, model = _batch_and_model(n=8)
    cfg = cfg.override("train", precision="bf16")
    data = DeviceSplit(data.pixels.cuda(), data.labels.cuda())
    runs = {}
    for name in ("eager", "graphed"):
        net = SeedCNN(image_size=48).cuda()
        net.load_state_dict(model.state_dict())
        for m in net.modules():  # no dropout: eager and replayed steps comparable number for number
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        optimizer = make_optimizer(net, cfg, torch.device("cuda"), cuda_graphs=True)[0]
        step = make_step(net, data, cfg, optimizer)
        idx = torch.arange(8, device="cuda")
        graph = CudaGraphStep(step, net, optimizer, idx, {}) if name == "graphed" else None
        losses = []
        for _ in range(4):
            if graph:
                losses.append(float(graph(idx, {})[0]))
            else:
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(step(idx, {})[0]))
        runs[name] = (losses, net)
    assert runs["eager"][0] == pytest.approx(runs["graphed"][0], rel=1e-3)
    assert runs["eager"][0][0] != runs["eager"][0][-1]  # the weights moved
    for a, b in zip(runs["eager"][1].parameters(), runs["graphed"][1].parameters()):
        assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-4)
