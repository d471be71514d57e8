"""Model registry and the paper's CNN, written to match the Keras original layer for layer.

Models are built by name (`create_model("seed", activation="prelu")`); an unknown name lists the
registered ones. Every model returns one logit per image (sigmoid gives P(pneumonia)) and names the
layer Grad-CAM should hook (`cam_layer`). Penalties that Keras adds to the loss (L2 on Dense kernels)
are exposed through `regularization_loss()` so the training loop adds them exactly as Keras does.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .config import ACTIVATIONS

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = builder
        return builder

    return add


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model by name; keyword arguments go to its builder."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(model_names())}")
    return _REGISTRY[name](**kwargs)


def pneumonia_logit(out: torch.Tensor) -> torch.Tensor:
    """The logit of pneumonia vs normal from a model's output, for either task.

    Binary models output it directly, shape (N,). Three-class models output (N, 3) logits (normal,
    bacterial, viral): log(P(bacterial) + P(viral)) - log P(normal), whose sigmoid is P(pneumonia).
    """
    return out if out.dim() == 1 else torch.logsumexp(out[:, 1:], 1) - out[:, 0]


def probabilities(out: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """A model's outputs -> (P(pneumonia) (N,), per-class probabilities (N, K) for three-class models,
    else None), as numpy arrays."""
    out = out.detach().float()
    class_probs = torch.softmax(out, 1).cpu().numpy() if out.dim() == 2 else None
    return torch.sigmoid(pneumonia_logit(out)).cpu().numpy(), class_probs


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of images and activations on `device`: channels-last on a CPU, where oneDNN's kernels
    for it are the fast ones; PyTorch's default on a GPU, where a fresh process's first training step
    set up cuDNN much faster that way (README, "On a GPU")."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def _one_logit_or_many(out: torch.Tensor) -> torch.Tensor:
    return out.squeeze(1) if out.shape[1] == 1 else out


def count_parameters(model: nn.Module, include_buffers: bool = True) -> int:
    """Parameters as Keras counts them: trainable weights plus BatchNorm moving statistics."""
    n = sum(p.numel() for p in model.parameters())
    if include_buffers:
        n += sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return n


class DerivedWeights:
    """A value computed from some parameters for inference, rebuilt only when one of them has changed
    (other storage, or written in place: every in-place write bumps a tensor's version)."""

    def __init__(self) -> None:
        self.key: tuple | None = None

    def get(self, params: Sequence[torch.Tensor], build: Callable[[], Any], *key: object) -> Any:
        full_key = (*key, *((t.data_ptr(), t._version) for t in params))
        if full_key != self.key:
            # holding the parameters keeps their storage alive, so no new tensor can take their address
            self.key, self.params, self.value = full_key, [t.detach() for t in params], build()
        return self.value


def _keeps_weights(*params: torch.Tensor) -> bool:
    """True when a forward pass may use DerivedWeights: parameters on the CPU (a CUDA graph captured with a
    kept value would go on reading it after the parameters change), no gradient to them, no ONNX export."""
    return (all(t.device.type == "cpu" for t in params) and not torch.onnx.is_in_onnx_export()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in params)))


class ElementwisePReLU(nn.Module):
    """Keras PReLU: one learned slope per element (C x H x W), initialised at 0 (alpha_initializer='zero')."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(shape))
        self._kept_slopes = DerivedWeights()  # for inference on channels-last input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused PReLU kernel takes one slope per channel of a 2-D input: flatten each image
        # (in its memory order) so that every element is a "channel" with its own slope.
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            def slopes_channels_last() -> torch.Tensor:
                return self.alpha.permute(1, 2, 0).reshape(-1)  # a copy of all slopes

            slopes = (self._kept_slopes.get([self.alpha], slopes_channels_last) if _keeps_weights(self.alpha)
                      else slopes_channels_last())
            y = F.prelu(x.permute(0, 2, 3, 1).reshape(b, -1), slopes)
            return y.view(b, h, w, c).permute(0, 3, 1, 2)
        return F.prelu(x.reshape(b, -1), self.alpha.reshape(-1)).view(b, c, h, w)


def make_activation(kind: str, shape: tuple[int, int, int]) -> nn.Module:
    """The four rectifiers of the paper's Table IV; `shape` is the (C, H, W) of the tensor it acts on."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky_relu":  # Keras 2 LeakyReLU default alpha
        return nn.LeakyReLU(0.3)
    if kind == "leaky_relu_30":
        return nn.LeakyReLU(30.0)
    if kind == "prelu":
        return ElementwisePReLU(shape)
    raise ValueError(f"unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")


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


def _phase_weights(kernel: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 convolution on the 2x2-phase grid that computes a 5x5 one (`kernel`, `bias`) at the four
    positions of every 2x2 window: weight (4 x Cout, 4 x Cin, 3, 3) and bias (4 x Cout,)."""
    cout, cin = kernel.shape[:2]
    taps = torch.cat([kernel.reshape(cout, cin, 25), kernel.new_zeros(cout, cin, 1)], 2)[:, :, _phase_taps(kernel.device)]
    # (Cout, Cin, out phase, in phase, 3, 3) -> (out phase x Cout, Cin x in phase, 3, 3): pixel_unshuffle's channel order
    weight = taps.permute(2, 0, 1, 3, 4, 5).reshape(4 * cout, 4 * cin, 3, 3).contiguous(memory_format=torch.channels_last)
    return weight, bias.repeat(4)


def _conv5x5_pool2_by_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """max_pool2d(conv2d(x, kernel, bias, padding=2), 2) for even H and W, computed on the 2x2-phase grid
    with `_phase_weights(kernel, bias)`.

    Used when no gradient flows through it (the gradient of ties would differ from max pooling's). The input is split into its
    four pixel phases (pixel_unshuffle) and one 3x3 convolution with 4 x Cout outputs computes the
    5x5 convolution at all four positions of every pooling window; the pool is then the largest of the
    four output groups. A 5x5 convolution of a grey image has one input channel, which PyTorch's CPU
    kernels run slowly; this form has four inputs and four times the outputs, and is about 4x faster.
    """
    cout = weight.shape[0] // 4
    phases = F.pixel_unshuffle(x, 2).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(phases, weight, bias, padding=1)
    return torch.maximum(torch.maximum(y[:, :cout], y[:, cout:2 * cout]), torch.maximum(y[:, 2 * cout:3 * cout], y[:, 3 * cout:]))


class SeparableConv2d(nn.Sequential):
    """Keras SeparableConv2D(depth_multiplier=1, padding='same'): depthwise 3x3 without bias, then 1x1 with bias."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=True),
        )


def keras_batchnorm(channels: int, momentum: float = 0.01) -> nn.BatchNorm2d:
    # Keras momentum 0.99 keeps 99% of the old running value: PyTorch's momentum is the complement.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=momentum)


class SeedCNN(nn.Module):
    """The paper's network (Figure 9): two plain convolutions, four separable blocks, four Dense layers.

    Input (B, C, S, S) in [0, 1]. With `in_channels=3` a single-channel batch is accepted too: the first
    convolution then uses its kernel summed over the colour axis, which is exactly what the Keras model
    computes on a grey image replicated to three channels (and three times cheaper).
    """

    def __init__(self, activation: str = "prelu", in_channels: int = 3, image_size: int = 150, l2: float = 0.01,
                 batchnorm_momentum: float = 0.01, num_outputs: int = 1):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.l2 = l2
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        size = image_size // 2
        blocks: list[nn.Module] = []
        cin = 16
        for cout, dropout in ((32, 0.0), (64, 0.0), (128, 0.2), (256, 0.2)):
            layers: list[nn.Module] = [
                SeparableConv2d(cin, cout),
                make_activation(activation, (cout, size, size)),
                SeparableConv2d(cout, cout),
                make_activation(activation, (cout, size, size)),
                keras_batchnorm(cout, batchnorm_momentum),
                nn.MaxPool2d(2),
            ]
            if dropout:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
            cin, size = cout, size // 2
        self.features = nn.Sequential(*blocks)
        self.dense = nn.ModuleList(
            [nn.Linear(cin * size * size, 512), nn.Linear(512, 128), nn.Linear(128, 64), nn.Linear(64, num_outputs)]
        )
        self.dense_dropout = nn.ModuleList([nn.Dropout(0.6), nn.Dropout(0.4), nn.Dropout(0.25)])
        self.pool = nn.MaxPool2d(2)
        self.cam_layer = "features.3.3"  # last activation before the final BatchNorm/pool
        self._kept_phase_weights = DerivedWeights()  # see stem()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras initialisers: glorot_uniform kernels, zero biases (PReLU alphas stay at 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """MaxPool(conv2(conv1(x))), with the two convolutions computed as one 5x5 convolution.

        The paper puts no activation between conv1 and conv2, so their composition is one linear map.
        The composed kernel is built from both layers' parameters on every call, so autograd trains
        conv1 and conv2 exactly as the two-layer version would, at 16 instead of 16 + 256
        multiply-adds per pixel and output channel. Only the outermost ring of pixels differs (conv2
        zero-pads conv1's output there), so the pooled border is recomputed the literal way on thin strips.
        A GPU runs the two convolutions as they are: there the strips' extra kernels cost more than the
        multiply-adds they save (on an H100 an epoch of the paper's recipe took 0.74 s composed, 0.68 s literal).
        """
        w1, b1 = self.conv1.weight, self.conv1.bias
        if x.shape[1] == 1 and w1.shape[1] > 1:
            # a grey image replicated to C channels: same result with the kernel summed over channels
            w1 = w1.sum(1, keepdim=True)
        w2, b2 = self.conv2.weight, self.conv2.bias

        def literal(part: torch.Tensor) -> torch.Tensor:
            return self.pool(F.conv2d(F.conv2d(part, w1, b1, padding=1), w2, b2, padding=1))

        if x.device.type != "cpu" or min(x.shape[2:]) < 8 or x.shape[2] % 2 or x.shape[3] % 2:
            return literal(x)  # a GPU, or tiny or odd sizes: not worth the bookkeeping

        def composed() -> tuple[torch.Tensor, torch.Tensor]:
            return F.conv2d(F.pad(w2, (2, 2, 2, 2)), w1.flip(2, 3).transpose(0, 1)), b2 + (w2.sum((2, 3)) * b1).sum(1)

        exporting = torch.onnx.is_in_onnx_export()
        # gradients through the stem: training, or saliency on the input (Grad-CAM freezes these weights)
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2, b2))
        params = (self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias)
        # the phase form pays off on a CPU; ONNX Runtime runs the plain form faster
        if recording or not _keeps_weights(*params):
            pooled = self.pool(F.conv2d(x, *composed(), padding=2))
        else:  # kept while conv1 and conv2 are unchanged: building them took a sixth of a single image's forward pass
            phase_weights = self._kept_phase_weights.get(params, lambda: _phase_weights(*composed()), tuple(w1.shape))
            pooled = _conv5x5_pool2_by_phases(x, *phase_weights)
        # border pooling windows cover input rows/columns 0-1 (or the last two), which need input 0-3
        top, bottom = literal(x[:, :, :4])[:, :, :1], literal(x[:, :, -4:])[:, :, -1:]
        left, right = literal(x[..., :4])[..., 1:-1, :1], literal(x[..., -4:])[..., 1:-1, -1:]
        if exporting:  # slice assignment exports as ScatterND, which ONNX Runtime runs 2x slower
            middle = torch.cat([left, pooled[:, :, 1:-1, 1:-1], right], dim=3)
            return torch.cat([top, middle, bottom], dim=2).contiguous(memory_format=torch.channels_last)
        # training writes the border into a copy, so the gradient keeps the channels-last layout and max
        # pooling's backward pass is more than twice as fast on the CPU; inference writes it in place
        out = pooled.clone(memory_format=torch.channels_last) if recording else pooled
        out[:, :, :1], out[:, :, -1:] = top, bottom
        out[:, :, 1:-1, :1], out[:, :, 1:-1, -1:] = left, right
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.features(x)
        # Keras flattens channels-last; the order is a fixed permutation and irrelevant when trained here.
        x = torch.flatten(x, 1)
        for linear, dropout in zip(self.dense[:-1], self.dense_dropout):
            x = dropout(torch.relu(linear(x)))
        return _one_logit_or_many(self.dense[-1](x))

    def regularization_loss(self) -> torch.Tensor:
        """Keras kernel_regularizer=l2(0.01) on every Dense kernel: l2 * sum(w**2), added to the loss."""
        return self.l2 * sum(layer.weight.pow(2).sum() for layer in self.dense)


@register("seed")
def seed_cnn(activation: str = "prelu", in_channels: int = 3, image_size: int = 150, batchnorm_momentum: float = 0.01,
             num_outputs: int = 1, **_: object) -> nn.Module:
    return SeedCNN(activation=activation, in_channels=in_channels, image_size=image_size,
                   batchnorm_momentum=batchnorm_momentum, num_outputs=num_outputs)


# --- reference models (the paper compares with an ImageNet ResNet; CheXNet is a DenseNet-121) ---------------

def _monai_nets():
    try:
        from monai.networks import nets
    except ImportError as e:
        raise ImportError(f"the reference models use MONAI's networks ({e}); install them with: "
                          "pip install 'pneumoscan[models]'") from e
    return nets


class GreyClassifier(nn.Module):
    """Wraps a 1-channel-in network: accepts grey (B, 1, S, S) or replicated (B, 3, S, S) input; one logit -> (B,)."""

    def __init__(self, net: nn.Module, cam_layer: str):
        super().__init__()
        self.net = net
        self.cam_layer = cam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 1:  # a replicated grey image: the channels are equal
            x = x.mean(1, keepdim=True)
        return _one_logit_or_many(self.net(x))


@register("resnet18")
def resnet18(num_outputs: int = 1, **_: object) -> nn.Module:
    """ResNet-18 as in torchvision (7x7 stride-2 stem, 1x1 projection shortcuts), grey input."""
    net = _monai_nets().resnet18(spatial_dims=2, n_input_channels=1, num_classes=num_outputs, conv1_t_size=7, conv1_t_stride=2,
                                 shortcut_type="B", bias_downsample=False)
    return GreyClassifier(net, cam_layer="net.layer4")


@register("densenet121")
def densenet121(num_outputs: int = 1, **_: object) -> nn.Module:
    """DenseNet-121, the CheXNet architecture, grey input."""
    net = _monai_nets().DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_outputs)
    return GreyClassifier(net, cam_layer="net.features.norm5")


_TORCHVISION_DENSE = re.compile(r"^(.*denselayer\d+)\.((?:norm|relu|conv)\.?[12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def load_pretrained(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Load ImageNet weights in torchvision's layout from a local file into a reference model.

    The RGB stem kernel is summed over its colour channels (the input is grey), torchvision's DenseNet
    names are mapped to MONAI's, and the 1000-class head is skipped. Returns the keys left untouched.
    """
    if not isinstance(model, GreyClassifier):
        raise ValueError("pretrained weights can be loaded into the reference models (resnet18, densenet121) only")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises OSError, pickle errors, RuntimeError...: all mean the same here
        raise ValueError(f"{path}: cannot read pretrained weights ({type(e).__name__}: {e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    target = model.net.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _TORCHVISION_DENSE.match(key)
        key = f"{m.group(1)}.layers.{m.group(2).replace('.1.', '1.').replace('.2.', '2.')}" if m else key
        if key in target and value.dim() == 4 and target[key].shape[1] == 1 and value.shape[1] == 3:
            value = value.sum(1, keepdim=True)  # RGB stem -> grey stem
        if key in target and target[key].shape == value.shape:
            mapped[key] = value
    if not mapped:
        raise ValueError(f"{path}: no tensor matches {type(model.net).__name__}; expected torchvision's layout")
    model.net.load_state_dict(mapped, strict=False)
    return {"loaded": sorted(mapped), "missing": sorted(set(target) - set(mapped))}
