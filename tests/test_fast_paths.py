"""Every fast form of the paper's network equals the plain one, under the conditions it runs in.

The plain reference is `SeedCNN` (models.py). Its fast forms: `CpuTrainingSeedCNN` (the composed stem,
CPU training and in-loop validation) and the frozen inference form `inference.freeze` (CPU inference:
the stem on the 2x2-phase grid, PReLU slopes in channels-last order, each block's BatchNorm folded into
its pointwise convolution and a shift after pooling; `for_onnx`: the composed stem with a concatenated
border, PReLU as element-wise operators).
"""

import copy

import pytest
import torch
from torch.nn import functional as F

from pneumoscan.core.config import Config, Preprocessing, TrainConfig
from pneumoscan.networks.cpu_kernels import CpuTrainingSeedCNN, for_cpu_training
from pneumoscan.networks.inference import FrozenPReLU, FrozenSeedCNN, PoolThenShift, freeze, model_input
from pneumoscan.networks.models import SeedCNN
from pneumoscan.tasks.train import DeviceSplit, make_optimizer, make_step, validation_logits


def varied(model: SeedCNN, seed: int = 0) -> SeedCNN:
    """Every weight and statistic away from its initial value (PReLU slopes start at 0, BatchNorm at identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("shape", [(2, 3, 150, 150), (2, 1, 150, 150), (2, 1, 24, 16), (1, 3, 7, 9), (1, 1, 31, 30)])
def test_the_cpu_training_stem_equals_the_two_literal_convolutions(shape):
    torch.manual_seed(0)
    plain = SeedCNN().double()
    fast = for_cpu_training(copy.deepcopy(plain))
    assert type(fast) is CpuTrainingSeedCNN and fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(*shape, dtype=torch.double)
    literal, composed = plain.stem(x), fast.stem(x)
    assert torch.allclose(composed, literal, atol=1e-12)
    with torch.no_grad():  # in-loop validation writes the border in place
        assert torch.allclose(fast.stem(x), literal, atol=1e-12)
    params = lambda m: [m.conv1.weight, m.conv1.bias, m.conv2.weight, m.conv2.bias]  # noqa: E731
    for a, b in zip(torch.autograd.grad(composed.square().sum(), params(fast)),
                    torch.autograd.grad(literal.square().sum(), params(plain))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("activation,size,for_onnx", [("prelu", 150, False), ("prelu", 150, True), ("prelu", 48, False),
                                                       ("relu", 45, False), ("leaky_relu", 32, True)])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_frozen_inference_form_equals_the_plain_model(activation, size, for_onnx, channels):
    torch.manual_seed(0)
    plain = varied(SeedCNN(activation=activation, image_size=size)).double().eval()
    frozen = freeze(plain, for_onnx=for_onnx)
    assert type(frozen) is FrozenSeedCNN and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    if activation == "prelu":
        assert isinstance(frozen.get_submodule(plain.cam_layer), FrozenPReLU)
    assert all(isinstance(block[5], PoolThenShift) for block in frozen.features)  # every BatchNorm folded
    x = torch.rand(3, channels, size, size, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(frozen(x), plain(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("for_onnx", [False, True])
def test_blocks_that_cannot_be_folded_keep_their_batchnorm_and_still_equal_the_plain_model(for_onnx):
    """A BatchNorm scale <= 0 in some channel keeps that block's BatchNorm; a PReLU slope above 1 keeps the
    four-operator ONNX form (max(x, alpha * x) would be wrong there)."""
    torch.manual_seed(0)
    plain = varied(SeedCNN(image_size=48)).double().eval()
    with torch.no_grad():
        plain.features[1][4].weight[3] = -0.5  # a negative scale
        plain.features[2][4].weight[0] = 0.0  # a zero scale
        plain.features[0][3].alpha[0, 0, :5] = 1.5  # slopes above 1
    frozen = freeze(plain, for_onnx=for_onnx)
    kept = [type(block[4]).__name__ for block in frozen.features]
    assert kept == ["Identity", "KerasBatchNorm2d", "KerasBatchNorm2d", "Identity"]
    assert not frozen.features[0][3].slopes_at_most_one and frozen.features[0][1].slopes_at_most_one
    x = torch.rand(3, 1, 48, 48, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(frozen(x), plain(x), rtol=1e-10, atol=1e-10)


def test_the_onnx_prelu_forms_give_prelus_float32_numbers_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 6, 6, generator=g) * 10 ** torch.randint(-30, 30, (4, 8, 6, 6), generator=g).float()
    x.view(-1)[:5] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45])
    for alpha in (torch.rand(8, 6, 6, generator=g) * 2 - 1, torch.rand(8, 6, 6, generator=g) * 3):
        alpha.view(-1)[:3] = torch.tensor([0.0, 1.0, -1.0])
        expected = F.prelu(x.reshape(4, -1), alpha.reshape(-1)).view(x.shape)
        layer = FrozenPReLU(alpha, for_onnx=True)
        assert layer.slopes_at_most_one == bool((alpha <= 1).all())
        assert torch.equal(layer(x), expected)


def test_grad_cam_on_the_frozen_form_equals_grad_cam_on_the_plain_model():
    """The hooked activation is scaled per channel by the folded BatchNorm; the map is not."""
    torch.manual_seed(0)
    plain = varied(SeedCNN(image_size=48)).double().eval()
    frozen = freeze(plain)
    x = torch.rand(2, 1, 48, 48, dtype=torch.double).contiguous(memory_format=torch.channels_last)

    def cam(model):
        saved = {}
        handle = model.get_submodule(plain.cam_layer).register_forward_hook(lambda m, i, o: saved.update(a=o))
        with torch.enable_grad():
            model.requires_grad_(True)
            grad = torch.autograd.grad(model(x).sum(), saved["a"])[0]
        handle.remove()
        return F.relu((grad.mean((2, 3), keepdim=True) * saved["a"]).sum(1))

    assert cam(plain).abs().max() > 0
    assert torch.allclose(cam(frozen), cam(plain), rtol=1e-9, atol=1e-12)


def test_a_frozen_copy_is_a_snapshot_and_the_original_is_untouched():
    torch.manual_seed(0)
    model = varied(SeedCNN(image_size=32)).eval()
    x = model_input(torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8), Preprocessing(image_size=32))
    frozen = freeze(model)
    with torch.no_grad():
        before = frozen(x)
        assert type(model) is SeedCNN and model.conv1.weight.requires_grad
        varied(model, seed=1)  # the original changes in place
        assert torch.equal(frozen(x), before)
        assert torch.allclose(freeze(model)(x), model(x), atol=1e-5)


def test_validation_after_adam_steps_equals_a_fresh_copy_and_the_frozen_form():
    """The optimizer exactly as training builds it, writing the parameters in place (torch's fused Adam
    did so without bumping their version counters): each validation must see the weights as they are
    after every step."""
    torch.manual_seed(0)
    cfg = Config(preprocessing=Preprocessing(image_size=48), train=TrainConfig(batch_size=8, eval_batch_size=16))
    labels = (torch.arange(40) % 2).float()
    brightness = torch.arange(40).view(40, 1, 1) * 6  # images that differ: outputs that differ
    data = DeviceSplit((brightness + torch.randint(0, 16, (40, 48, 48))).to(torch.uint8), labels)
    model = for_cpu_training(varied(SeedCNN(image_size=48))).to(memory_format=torch.channels_last)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():  # BatchNorm statistics of these images, so that eval-mode outputs tell them apart
        for m in batchnorms:
            m.momentum = 1.0
        model.train()(data.inputs(slice(None), cfg))
        for m in batchnorms:
            m.momentum = 0.01
    optimizer, _ = make_optimizer(model, cfg, torch.device("cpu"), cuda_graphs=False)
    step = make_step(model, data, cfg, optimizer)
    draws: dict[str, torch.Tensor] = {}
    seen = []
    for epoch in range(3):
        model.train()
        for i in range(0, 40, 8):
            optimizer.zero_grad(set_to_none=True)
            step(torch.arange(i, i + 8), draws)
        in_loop = validation_logits(model, data, cfg)
        reference = SeedCNN(image_size=48).eval()
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            fresh = reference(data.inputs(slice(None), cfg))
            frozen = freeze(model)(data.inputs(slice(None), cfg))
        assert torch.allclose(in_loop.sigmoid(), fresh.sigmoid(), atol=1e-5), epoch  # probabilities
        assert torch.allclose(frozen.sigmoid(), fresh.sigmoid(), atol=1e-5), epoch
        seen.append(in_loop)
    assert seen[0].std() > 1e-3 and not torch.allclose(seen[0], seen[-1], atol=1e-3)  # images differ; weights moved
