"""Run configuration: one frozen dataclass per concern, named recipes, and JSON round-tripping.

A run's `Config` is written as `config.json` beside its checkpoints and embedded in every checkpoint;
`Preprocessing` travels with the weights so evaluate, predict, explain and serve rebuild the exact
input pipeline the model was trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded grey image becomes model input (the paper: 150x150, /255, grey to 3 channels)."""

    image_size: int = 150
    channels: int = 3  # the model's input channels; a grey image is replicated
    resize_filter: str = "nearest"  # Keras load_img's default interpolation
    scale: float = 1.0 / 255.0

    def normalize(self, pixels: "np.ndarray | Any") -> Any:
        """uint8 grey pixels -> floats the model expects (numpy or torch, any leading shape)."""
        return pixels * self.scale


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation: the paper's is Keras ImageDataGenerator(zoom_range=0.5, vertical_flip=True);
    intensity changes (off in the paper) mimic another site's exposure and processing."""

    zoom: float = 0.5  # zoom factor drawn uniformly in [1 - zoom, 1 + zoom], per axis independently
    vertical_flip: bool = True
    horizontal_flip: bool = False
    gamma: float = 0.0  # pixel values (0..1) raised to a power drawn in [1 - gamma, 1 + gamma]
    contrast: float = 0.0  # deviation from the image's mean scaled by a factor drawn in [1 - contrast, 1 + contrast]
    brightness: float = 0.0  # an offset drawn in [-brightness, brightness], then values clipped to 0..1


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how the patient-level validation split is carved out of train."""

    root: str = ""  # the command line fills it from --data or $PNEUMOSCAN_DATA
    val_fraction: float = 0.15
    split_seed: int = 0
    # binary: NORMAL / PNEUMONIA; three-class: NORMAL / BACTERIAL / VIRAL (from Kermany's file names).
    # The validation split is the same for both.
    task: str = "binary"


# Named here rather than in models.py, so the command line can offer them without importing PyTorch.
MODEL_NAMES = ("densenet121", "resnet18", "seed")  # the builders registered in models.py
ACTIVATIONS = ("relu", "leaky_relu", "leaky_relu_30", "prelu")  # Table IV's rectifiers, for the paper's model


@dataclass(frozen=True)
class ModelConfig:
    name: str = "seed"
    activation: str = "prelu"  # the paper's model only
    pretrained: str = ""  # reference models: local file of ImageNet weights in torchvision's layout
    # the paper's model: weight of each batch in BatchNorm's running statistics (PyTorch's convention;
    # Keras' momentum=0.99 is 0.01 here). Larger batches mean fewer steps per epoch: 1 - 0.99 ** (B / 16)
    # keeps the paper's horizon measured in images.
    batchnorm_momentum: float = 0.01


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe: Adam 1e-3 (Keras defaults), BCE, batch 16, 11 epochs, LR x0.3 after 2 flat epochs."""

    epochs: int = 11
    batch_size: int = 16
    lr: float = 1e-3
    adam_eps: float = 1e-7  # Keras' Adam epsilon
    lr_factor: float = 0.3
    lr_patience: int = 2
    early_stopping: bool = False
    early_stopping_patience: int = 3
    early_stopping_min_delta: float = 0.1  # on validation accuracy, as the notebook defined it
    drop_last: bool = True  # Keras: steps_per_epoch = samples // batch_size
    class_weight: str = "none"  # none | balanced: weight each class's loss by N / (2 * N_class)
    sampling: str = "shuffle"  # shuffle | balanced: draw each class equally often (with replacement)
    eval_batch_size: int = 64
    seed: int = 0
    threshold: float = 0.5  # used as is by the 'fixed' rule
    threshold_rule: str = "fixed"  # fixed | youden | sensitivity: chosen on validation after training
    target_sensitivity: float = 0.95  # for the 'sensitivity' rule
    # youden / sensitivity: the threshold is the median of the rule's optimum over this many bootstrap
    # resamples of validation (0: the rule's optimum on validation itself, which may sit at a plateau's edge)
    threshold_resamples: int = 200
    # none | temperature | platt: probabilities calibrated on validation by one temperature (decisions at 0.5
    # unchanged) or by Platt scaling (a temperature and an offset: 0.5 is even odds at validation's prevalence)
    calibration: str = "none"
    # fp32 | bf16: bf16 runs the training forward pass under BF16 autocast (weights, optimizer state,
    # loss and BatchNorm statistics stay FP32; validation and inference run in FP32)
    precision: str = "fp32"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    augmentation: Augmentation = field(default_factory=Augmentation)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "paper"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """Rebuild from `to_dict()` output; unknown keys are an error, missing ones take defaults, and
        every value is checked (`check`) before anything is built from it."""
        return _from_dict(cls, d).check()

    def check(self) -> "Config":
        """This config, or ValueError naming every setting of the wrong type or outside its range
        (`LIMITS`): a file that asks for an absurd model or loop fails here, not when memory runs out."""
        problems = []
        for (section, name), rule in LIMITS.items():
            value = getattr(getattr(self, section), name)
            problem = _check_value(value, rule)
            if problem:
                problems.append(f"{section}.{name} = {value!r} ({problem})")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))
        return self

    def override(self, section: str, **values: Any) -> "Config":
        """A copy with fields of one section replaced; values that are None are left as they were."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        return replace(self, **{section: replace(getattr(self, section), **values)})


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} settings must be a mapping, not {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in d.items():
        sub = _SECTIONS.get(name) if cls is Config else None
        kwargs[name] = _from_dict(sub, value) if sub else value
    return cls(**kwargs)


_SECTIONS = {
    "data": DataConfig,
    "preprocessing": Preprocessing,
    "augmentation": Augmentation,
    "model": ModelConfig,
    "train": TrainConfig,
}

_INT, _FLOAT, _BOOL = "int", "float", "bool"
# (section, field) -> (type, minimum, maximum) with both ends included, or a tuple of the allowed values
LIMITS: dict[tuple[str, str], tuple[Any, ...]] = {
    ("data", "val_fraction"): (_FLOAT, 1e-6, 0.5 - 1e-6),
    ("data", "split_seed"): (_INT, 0, 2**32 - 1),
    ("data", "task"): ("binary", "three-class"),
    ("preprocessing", "image_size"): (_INT, 8, 1024),
    ("preprocessing", "channels"): (1, 3),
    ("preprocessing", "scale"): (_FLOAT, 1e-12, 1.0),
    ("augmentation", "zoom"): (_FLOAT, 0.0, 0.99),
    ("augmentation", "vertical_flip"): (_BOOL,),
    ("augmentation", "horizontal_flip"): (_BOOL,),
    ("augmentation", "gamma"): (_FLOAT, 0.0, 0.9),
    ("augmentation", "contrast"): (_FLOAT, 0.0, 0.9),
    ("augmentation", "brightness"): (_FLOAT, 0.0, 0.5),
    ("model", "name"): MODEL_NAMES,
    ("model", "activation"): ACTIVATIONS,
    ("model", "batchnorm_momentum"): (_FLOAT, 0.0, 1.0),
    ("train", "epochs"): (_INT, 1, 100_000),
    ("train", "batch_size"): (_INT, 1, 65_536),
    ("train", "eval_batch_size"): (_INT, 1, 65_536),
    ("train", "lr"): (_FLOAT, 1e-12, 10.0),
    ("train", "adam_eps"): (_FLOAT, 1e-30, 1.0),
    ("train", "lr_factor"): (_FLOAT, 1e-6, 1.0),
    ("train", "lr_patience"): (_INT, 0, 100_000),
    ("train", "early_stopping"): (_BOOL,),
    ("train", "early_stopping_patience"): (_INT, 1, 100_000),
    ("train", "early_stopping_min_delta"): (_FLOAT, 0.0, 1.0),
    ("train", "drop_last"): (_BOOL,),
    ("train", "class_weight"): ("none", "balanced"),
    ("train", "sampling"): ("shuffle", "balanced"),
    ("train", "seed"): (_INT, 0, 2**31 - 1),
    ("train", "threshold"): (_FLOAT, 0.0, 1.0),
    ("train", "threshold_rule"): ("fixed", "youden", "sensitivity"),
    ("train", "target_sensitivity"): (_FLOAT, 1e-6, 1.0),
    ("train", "threshold_resamples"): (_INT, 0, 100_000),
    ("train", "calibration"): ("none", "temperature", "platt"),
    ("train", "precision"): ("fp32", "bf16"),
}


def _check_value(value: Any, rule: tuple[Any, ...]) -> str:
    """'' when `value` obeys `rule` (see LIMITS), else what is wrong with it."""
    kind = rule[0]
    if kind not in (_INT, _FLOAT, _BOOL):
        ok = not isinstance(value, bool) and value in rule
        return "" if ok else "choose one of " + ", ".join(map(str, rule))
    if kind == _BOOL:
        return "" if isinstance(value, bool) else "must be true or false"
    numeric = (int,) if kind == _INT else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        return f"must be {'an integer' if kind == _INT else 'a number'}"
    if not rule[1] <= value <= rule[2]:  # NaN fails this too
        return f"must be between {rule[1]:g} and {rule[2]:g}"
    return ""


RECIPES: dict[str, Config] = {
    "paper": Config(),
    # for a GPU: 16x fewer, larger steps; LR scaled by sqrt(16); BatchNorm's horizon kept in images
    "large-batch": Config(model=ModelConfig(batchnorm_momentum=round(1 - 0.99 ** 16, 4)),
                          train=TrainConfig(batch_size=256, lr=4e-3, epochs=30, eval_batch_size=256),
                          recipe="large-batch"),
    # Chosen on validation (docs/experiments.md). Both keep the chest upright (no vertical flip), zoom
    # less and resize with area averaging. `tuned` decides at even odds of its temperature-calibrated,
    # class-balanced probabilities (a Youden threshold chosen on one half of validation did worse on the
    # other half); `resnet18-224` picks the threshold by Youden's J on validation.
    "tuned": Config(preprocessing=Preprocessing(resize_filter="area"),
                    augmentation=Augmentation(zoom=0.2, vertical_flip=False),
                    train=TrainConfig(epochs=20, class_weight="balanced", threshold_rule="fixed",
                                      calibration="temperature"), recipe="tuned"),
    "resnet18-224": Config(preprocessing=Preprocessing(image_size=224, resize_filter="area"),
                           augmentation=Augmentation(zoom=0.2, vertical_flip=False), model=ModelConfig(name="resnet18"),
                           train=TrainConfig(epochs=15, batch_size=32, threshold_rule="youden",
                                             calibration="temperature"), recipe="resnet18-224"),
}


def recipe(name: str) -> Config:
    """A named recipe; `paper` is the faithful reproduction."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
