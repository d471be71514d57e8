import pytest
import torch

from pneumoscan.networks.models import ACTIVATIONS, ElementwisePReLU, count_parameters, create_model, keras_batchnorm, model_names


def test_prelu_model_has_the_keras_parameter_count():
    # Keras model.count_params() of the notebook's PReLU model: 2,973,025 weights + 960 BatchNorm moving statistics.
    model = create_model("seed", activation="prelu")
    assert count_parameters(model) == 2_973_985
    assert count_parameters(model, include_buffers=False) == 2_973_025


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "prelu"])
def test_other_activations_have_no_extra_parameters(activation):
    prelu_alphas = 2 * (32 * 75 * 75 + 64 * 37 * 37 + 128 * 18 * 18 + 256 * 9 * 9)
    assert count_parameters(create_model("seed", activation=activation)) == 2_973_985 - prelu_alphas


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="seed"):
        create_model("nope")
    with pytest.raises(ValueError, match="prelu"):
        create_model("seed", activation="swish")
    assert "seed" in model_names()


def test_the_command_line_offers_exactly_the_registered_models():
    from pneumoscan.core.config import MODEL_NAMES

    assert model_names() == sorted(MODEL_NAMES)


def test_prelu_is_per_element_and_starts_as_relu():
    act = ElementwisePReLU((2, 3, 3))
    x = torch.randn(4, 2, 3, 3)
    assert torch.equal(act(x), torch.relu(x))
    act.alpha.data.fill_(0.5)
    assert torch.allclose(act(-torch.ones(1, 2, 3, 3)), -0.5 * torch.ones(1, 2, 3, 3))


def test_forward_shape_and_keras_batchnorm_settings():
    model = create_model("seed").eval()
    assert model(torch.rand(3, 3, 150, 150)).shape == (3,)
    bn = model.features[0][4]
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01)


def test_l2_penalty_is_keras_l2_on_dense_kernels_only():
    model = create_model("seed")
    with torch.no_grad():
        expected = 0.01 * sum(float(layer.weight.pow(2).sum()) for layer in model.dense)
        assert float(model.regularization_loss()) == pytest.approx(expected, rel=1e-5)


def test_input_gradients_are_finite():
    model = create_model("seed").eval()
    x = torch.rand(1, 3, 150, 150, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_elementwise_prelu_matches_its_definition_with_gradients(channels_last):
    torch.manual_seed(0)
    act = ElementwisePReLU((3, 4, 5))
    act.alpha.data.uniform_(-1, 2)
    x = torch.randn(2, 3, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = act(x)
    expected = torch.where(x >= 0, x, act.alpha * x)
    assert torch.allclose(y, expected)
    g = torch.randn_like(y)
    gx, ga = torch.autograd.grad(y, [x, act.alpha], g)
    ex, ea = torch.autograd.grad(expected, [x, act.alpha], g)
    assert torch.allclose(gx, ex) and torch.allclose(ga, ea)


def test_keras_batchnorm_moves_towards_the_biased_variance_and_normalises_as_pytorch():
    """Keras: moving_var = 0.99 * moving_var + 0.01 * biased batch variance (PyTorch uses the unbiased one);
    outputs, gradients, moving mean and the batch counter stay torch.nn.BatchNorm2d's."""
    torch.manual_seed(0)
    keras_bn, torch_bn = keras_batchnorm(5), torch.nn.BatchNorm2d(5, eps=1e-3, momentum=0.01)
    for bn in (keras_bn, torch_bn):
        bn.running_var.fill_(2.0)
        bn.weight.data = torch.linspace(0.5, 1.5, 5)
    x = torch.randn(3, 5, 4, 2) * 3 + 1
    outs = []
    for bn in (keras_bn, torch_bn):
        xi = x.clone().requires_grad_()
        y = bn(xi)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        outs.append((y, xi.grad, bn.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    expected = 0.99 * 2.0 + 0.01 * x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(keras_bn.running_var, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(torch_bn.running_var, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(keras_bn.running_mean, torch_bn.running_mean)
    assert int(keras_bn.num_batches_tracked) == 1
    cumulative = keras_batchnorm(5)
    cumulative.momentum = None  # PyTorch's cumulative average: after one batch, that batch's (biased) variance
    cumulative(x)
    torch.testing.assert_close(cumulative.running_var, x.var(dim=(0, 2, 3), unbiased=False))
    keras_bn.eval(), torch_bn.eval()
    torch_bn.running_var.copy_(keras_bn.running_var)
    torch.testing.assert_close(keras_bn(x), torch_bn(x))
