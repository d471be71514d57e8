import pytest
import torch

from pneumoscan.models import ACTIVATIONS, ElementwisePReLU, count_parameters, create_model, model_names


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
    from pneumoscan.config import MODEL_NAMES

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
