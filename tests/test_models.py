import pytest
import torch

from pneumoscan.models import ACTIVATIONS, ElementwisePReLU, SeedCNN, count_parameters, create_model, model_names


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


@pytest.mark.parametrize("shape", [(2, 3, 150, 150), (2, 1, 150, 150), (2, 1, 24, 16), (1, 3, 7, 9), (1, 1, 31, 30)])
def test_fused_stem_equals_the_two_literal_convolutions(shape):
    torch.manual_seed(0)
    model = SeedCNN().double()
    x = torch.rand(*shape, dtype=torch.double)
    literal = model.pool(model.conv2(model.conv1(x.expand(-1, 3, -1, -1))))
    fused = model.stem(x)
    assert torch.allclose(fused, literal, atol=1e-12)
    with torch.no_grad():  # inference computes it differently (phases, concatenated border; see SeedCNN.stem)
        assert torch.allclose(model.stem(x), literal, atol=1e-12)
    params = [model.conv1.weight, model.conv1.bias, model.conv2.weight, model.conv2.bias]
    g_fused = torch.autograd.grad(fused.square().sum(), params)
    g_literal = torch.autograd.grad(literal.square().sum(), params)
    for a, b in zip(g_fused, g_literal):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    for p in params:  # Grad-CAM's case: gradients recorded, none through the stem (its weights frozen)
        p.requires_grad_(False)
    assert torch.allclose(model.stem(x), literal, atol=1e-12)


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


def test_weights_kept_for_inference_follow_every_change_to_the_parameters():
    """Inference keeps the stem's phase weights and the PReLU slopes in channels-last order between calls:
    an optimizer step, load_state_dict and a change of dtype must each be seen."""
    torch.manual_seed(0)
    model, other = SeedCNN(image_size=32).eval(), SeedCNN(image_size=32).eval()
    with torch.no_grad():
        for p in (*model.parameters(), *other.parameters()):
            p.add_(torch.randn_like(p) * 0.1)  # PReLU slopes away from 0
    x = torch.rand(2, 1, 32, 32).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def fresh(weights: SeedCNN) -> torch.Tensor:  # the same weights in a model that has kept nothing yet
        reference = SeedCNN(image_size=32).to(next(weights.parameters()).dtype).eval()
        reference.load_state_dict(weights.state_dict())
        return reference(x.to(reference.conv1.weight.dtype))

    with torch.no_grad():
        first = model(x)  # keeps the derived weights
    model.train()
    model(x).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # writes the parameters in place
    model.eval()
    with torch.no_grad():
        after_step = model(x)
    assert not torch.allclose(after_step, first) and torch.allclose(after_step, fresh(model), atol=1e-6)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), fresh(other), atol=1e-6)
        model.double()
        assert torch.allclose(model(x.double()), fresh(model), atol=1e-12)
