"""Model registry and the paper's CNN, written as the paper draws it and as Keras computes it.

Models are built by name (`create_model("seed", activation="prelu")`; `build_model(cfg)` from a run's
config); an unknown name lists the registered ones. Every model returns one logit per image (sigmoid gives P(pneumonia)), or three for
the three-class task, and names the layer Grad-CAM should hook (`cam_layer`). Penalties that Keras adds
to the loss (L2 on Dense kernels) are exposed through `regularization_loss()`.

This is the reference computation. Faster forms of the same functions live beside it: `cpu_kernels`
(CPU training and inference) and `inference.freeze` (the frozen inference form); tests hold them equal.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core.config import ACTIVATIONS, Config
from ..io.data import class_names
from ..io.fileio import optional_import

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


def build_model(cfg: Config) -> nn.Module:
    """The model a config describes, freshly initialised."""
    n = len(class_names(cfg.data.task))
    return create_model(cfg.model.name, activation=cfg.model.activation, in_channels=cfg.preprocessing.channels,
                        image_size=cfg.preprocessing.image_size, batchnorm_momentum=cfg.model.batchnorm_momentum,
                        num_outputs=1 if n == 2 else n)


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


def _one_logit_or_many(out: torch.Tensor) -> torch.Tensor:
    return out.squeeze(1) if out.shape[1] == 1 else out


def count_parameters(model: nn.Module, include_buffers: bool = True) -> int:
    """Parameters as Keras counts them: trainable weights plus BatchNorm moving statistics."""
    n = sum(p.numel() for p in model.parameters())
    if include_buffers:
        n += sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var")))
    return n


def elementwise_prelu(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """max(x, 0) + alpha * min(x, 0) with one slope per element of each (C, H, W) image.

    torch's fused PReLU kernel takes one slope per channel of a 2-D input: each image is flattened in
    its memory order (channels-last or not) so that every element is a "channel" with its own slope.
    """
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = F.prelu(x.permute(0, 2, 3, 1).reshape(b, -1), alpha.permute(1, 2, 0).reshape(-1))
        return y.view(b, h, w, c).permute(0, 3, 1, 2)
    return F.prelu(x.reshape(b, -1), alpha.reshape(-1)).view(b, c, h, w)


class ElementwisePReLU(nn.Module):
    """Keras PReLU: one learned slope per element (C x H x W), initialised at 0 (alpha_initializer='zero')."""

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elementwise_prelu(x, self.alpha)


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


class SeparableConv2d(nn.Sequential):
    """Keras SeparableConv2D(depth_multiplier=1, padding='same'): depthwise 3x3 without bias, then 1x1 with bias."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=True),
        )


class KerasBatchNorm2d(nn.BatchNorm2d):
    """BatchNormalization as Keras updates it: the moving variance follows each batch's biased variance.

    PyTorch's BatchNorm2d moves it towards the unbiased one, n / (n - 1) larger (n = batch x height x
    width). In training this layer lets PyTorch update a copy of the running variance, then writes back
    that update less m * variance / n (PyTorch added m * unbiased variance to (1 - m) x the old value):
    a per-channel vector, not another pass over the activations. Normalisation itself, in training and
    in evaluation, is PyTorch's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        # momentum None: PyTorch's cumulative average (used to set statistics from a few batches)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        updated = self.running_var.clone()  # kept by autograd: the buffer itself is rewritten below
        y = F.batch_norm(x, self.running_mean, updated, self.weight, self.bias, True, m, self.eps)
        with torch.no_grad():
            n = x.numel() // x.size(1)
            self.running_var.copy_(updated - (updated - (1 - m) * self.running_var) / n)
        return y


def keras_batchnorm(channels: int, momentum: float = 0.01) -> nn.BatchNorm2d:
    # Keras momentum 0.99 keeps 99% of the old running value: PyTorch's momentum is the complement.
    return KerasBatchNorm2d(channels, eps=1e-3, momentum=momentum)


class SeedCNN(nn.Module):
    """The paper's network (Figure 9): two plain convolutions, four separable blocks, four Dense layers.

    Input (B, C, S, S) in [0, 1]. A grey (B, 1, S, S) batch is replicated to the model's input
    channels, as Keras' loader does with a grey image.
    """

    def __init__(self, activation: str = "prelu", in_channels: int = 3, image_size: int = 150, l2: float = 0.01,
                 batchnorm_momentum: float = 0.01, num_outputs: int = 1):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.l2 = l2
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
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
        self.cam_layer = "features.3.3"  # last activation before the final BatchNorm/pool
        # out-of-distribution features: each convolutional block's output, averaged over positions (480 wide)
        self.ood_layers = ("features.0", "features.1", "features.2", "features.3")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Keras initialisers: glorot_uniform kernels, zero biases (PReLU alphas stay at 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Conv2D(16, 3x3) -> Conv2D(16, 3x3) -> MaxPool(2): the paper puts no activation between them."""
        if x.shape[1] == 1 and self.conv1.in_channels > 1:
            x = x.expand(-1, self.conv1.in_channels, -1, -1)  # grey replicated to RGB
        return self.pool(self.conv2(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
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
    return optional_import("monai.networks.nets", "models", "the reference models (MONAI's networks)")


class GreyClassifier(nn.Module):
    """Wraps a 1-channel-in network: accepts grey (B, 1, S, S) or replicated (B, 3, S, S) input; one logit -> (B,)."""

    def __init__(self, net: nn.Module, cam_layer: str, ood_layers: tuple[str, ...] = ()):
        super().__init__()
        self.net = net
        self.cam_layer = cam_layer
        self.ood_layers = ood_layers  # out-of-distribution features: these outputs, averaged over positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 1:  # a replicated grey image: the channels are equal
            x = x.mean(1, keepdim=True)
        return _one_logit_or_many(self.net(x))


@register("resnet18")
def resnet18(num_outputs: int = 1, **_: object) -> nn.Module:
    """ResNet-18 as in torchvision (7x7 stride-2 stem, 1x1 projection shortcuts), grey input."""
    net = _monai_nets().resnet18(spatial_dims=2, n_input_channels=1, num_classes=num_outputs, conv1_t_size=7, conv1_t_stride=2,
                                 shortcut_type="B", bias_downsample=False)
    return GreyClassifier(net, cam_layer="net.layer4", ood_layers=("net.layer1", "net.layer2", "net.layer3", "net.layer4"))


@register("densenet121")
def densenet121(num_outputs: int = 1, **_: object) -> nn.Module:
    """DenseNet-121, the CheXNet architecture, grey input."""
    net = _monai_nets().DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_outputs)
    return GreyClassifier(net, cam_layer="net.features.norm5", ood_layers=("net.features.transition1", "net.features.transition2",
                                                                            "net.features.transition3", "net.features.norm5"))


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
