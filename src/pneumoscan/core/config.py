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

_INT, _FLOAT, _BOOL = "int", "float", "bool"
# Named here rather than in models.py, so the command line can offer them without importing PyTorch.
MODEL_NAMES = ("densenet121", "resnet18", "seed")  # the builders registered in models.py
ACTIVATIONS = ("relu", "leaky_relu", "leaky_relu_30", "prelu")  # Table IV's rectifiers, for the paper's model
RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "area", "lanczos")


def setting(default: Any, rule: tuple[Any, ...] | None = None, help: str | None = None, flag: str | None = None) -> Any:
    """A config field: its default; `rule`, its type and range (`(kind, min, max)` with both ends included, or a
    tuple of the allowed values), which `Config.check` enforces; and `help`, which gives it a command-line
    flag (`flag`, or --field-name; a boolean that defaults to true gets --no-field-name)."""
    return field(default=default, metadata={"rule": rule, "help": help, "flag": flag})


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded grey image becomes model input (the paper: 150x150, /255, grey to 3 channels)."""

    image_size: int = setting(150, (_INT, 8, 1024), "side of the square model input in pixels")
    channels: int = setting(3, (1, 3))  # the model's input channels; a grey image is replicated
    resize_filter: str = setting("nearest", RESIZE_FILTERS,
                                 "how images are resized to the input (nearest: Keras load_img's, as the paper; "
                                 "area averages and does not alias full-size originals)")
    scale: float = setting(1.0 / 255.0, (_FLOAT, 1e-12, 1.0))

    def normalize(self, pixels: "np.ndarray | Any") -> Any:
        """uint8 grey pixels -> floats the model expects (numpy or torch, any leading shape)."""
        return pixels * self.scale


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation: the paper's is Keras ImageDataGenerator(zoom_range=0.5, vertical_flip=True);
    intensity changes (off in the paper) mimic another site's exposure and processing."""

    zoom: float = setting(0.5, (_FLOAT, 0.0, 0.99), "zoom range: a factor drawn in [1-z, 1+z] per axis (0: off)")
    vertical_flip: bool = setting(True, (_BOOL,), "flip images upside down at random")
    horizontal_flip: bool = setting(False, (_BOOL,), "flip images left to right at random")
    gamma: float = setting(0.0, (_FLOAT, 0.0, 0.9), "intensity augmentation: pixel values (0..1) raised to a "
                                                    "power drawn in [1-g, 1+g] (0: off)")
    contrast: float = setting(0.0, (_FLOAT, 0.0, 0.9), "intensity augmentation: deviations from the image's mean "
                                                       "scaled by a factor in [1-c, 1+c] (0: off)")
    brightness: float = setting(0.0, (_FLOAT, 0.0, 0.5), "intensity augmentation: an offset drawn in [-b, b], then "
                                                         "values clipped to 0..1 (0: off)")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how the patient-level validation split is carved out of train."""

    root: str = ""  # the command line fills it from --data or $PNEUMOSCAN_DATA
    val_fraction: float = setting(0.15, (_FLOAT, 1e-6, 0.5 - 1e-6), "share of the training patients carved out "
                                                                    "for validation")
    split_seed: int = setting(0, (_INT, 0, 2**32 - 1), "seed of the patient-level validation split")
    # binary: NORMAL / PNEUMONIA; three-class: NORMAL / BACTERIAL / VIRAL (from Kermany's file names).
    # The validation split is the same for both.
    task: str = setting("binary", ("binary", "three-class"),
                        "binary: normal / pneumonia; three-class: normal / bacterial / viral")


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting("seed", MODEL_NAMES, "registered model: seed (the paper's CNN), resnet18, densenet121",
                        flag="--model")
    activation: str = setting("prelu", ACTIVATIONS, "the paper's model: one of Table IV's rectifiers")
    pretrained: str = setting("", None, "resnet18 / densenet121: a local file of ImageNet weights (torchvision layout)")
    # PyTorch's convention: Keras' momentum=0.99 is 0.01 here. Larger batches mean fewer steps per epoch:
    # 1 - 0.99 ** (B / 16) keeps the paper's horizon measured in images.
    batchnorm_momentum: float = setting(0.01, (_FLOAT, 0.0, 1.0), "the paper's model: weight of each batch in "
                                                                 "BatchNorm's running statistics")


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe: Adam 1e-3 (Keras defaults), BCE, batch 16, 11 epochs, LR x0.3 after 2 flat epochs."""

    epochs: int = setting(11, (_INT, 1, 100_000), "passes over the training split")
    batch_size: int = setting(16, (_INT, 1, 65_536), "images per training step (per process)")
    lr: float = setting(1e-3, (_FLOAT, 1e-12, 10.0), "Adam's learning rate")
    adam_eps: float = setting(1e-7, (_FLOAT, 1e-30, 1.0))  # Keras' Adam epsilon
    lr_factor: float = setting(0.3, (_FLOAT, 1e-6, 1.0))
    lr_patience: int = setting(2, (_INT, 0, 100_000))
    early_stopping: bool = setting(False, (_BOOL,), "stop when validation accuracy stops improving (Keras "
                                                    "semantics of the notebook)")
    early_stopping_patience: int = setting(3, (_INT, 1, 100_000))
    early_stopping_min_delta: float = setting(0.1, (_FLOAT, 0.0, 1.0))  # on validation accuracy, as the notebook
    drop_last: bool = setting(True, (_BOOL,))  # Keras: steps_per_epoch = samples // batch_size
    class_weight: str = setting("none", ("none", "balanced"), "balanced: weight each class's loss by N / (2 N_class)")
    sampling: str = setting("shuffle", ("shuffle", "balanced"), "balanced: draw both classes equally often")
    eval_batch_size: int = setting(64, (_INT, 1, 65_536))
    seed: int = setting(0, (_INT, 0, 2**31 - 1))  # train's own --seed (compare runs several)
    threshold: float = setting(0.5, (_FLOAT, 0.0, 1.0))  # used as is by the 'fixed' rule
    threshold_rule: str = setting("fixed", ("fixed", "youden", "sensitivity"),
                                  "how the decision threshold is chosen on validation after training")
    target_sensitivity: float = setting(0.95, (_FLOAT, 1e-6, 1.0), "for --threshold-rule sensitivity")
    threshold_resamples: int = setting(200, (_INT, 0, 100_000),
                                       "youden / sensitivity: the threshold is the median of the rule's optimum over "
                                       "this many bootstrap resamples of validation (0: the optimum on validation "
                                       "itself, which may sit at a plateau's edge)")
    calibration: str = setting("none", ("none", "temperature", "platt"),
                               "calibrate probabilities on validation: one temperature (keeps decisions at 0.5) or "
                               "Platt scaling (temperature and offset: 0.5 is even odds at validation's prevalence)")
    precision: str = setting("fp32", ("fp32", "bf16"),
                             "training arithmetic: bf16 runs forward passes under BF16 autocast (weights, optimizer "
                             "state, loss and validation stay FP32; on a CPU without native BF16 refused, or "
                             "emulated with PNEUMOSCAN_ALLOW_EMULATED_BF16=1)")


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
        sub = SECTIONS.get(name) if cls is Config else None
        kwargs[name] = _from_dict(sub, value) if sub else value
    return cls(**kwargs)


SECTIONS = {
    "data": DataConfig,
    "preprocessing": Preprocessing,
    "augmentation": Augmentation,
    "model": ModelConfig,
    "train": TrainConfig,
}

# (section, field) -> its rule (see `setting`), for every field that has one
LIMITS: dict[tuple[str, str], tuple[Any, ...]] = {
    (section, f.name): f.metadata["rule"] for section, cls in SECTIONS.items() for f in fields(cls)
    if f.metadata.get("rule")}

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
    # `tuned` with intensity augmentation: no better on validation, better at a new site (the shift
    # benchmark's held-out normals, docs/experiments.md#training-that-travels); the recommended recipe
    "tuned-appearance": Config(preprocessing=Preprocessing(resize_filter="area"),
                               augmentation=Augmentation(zoom=0.2, vertical_flip=False, gamma=0.3, contrast=0.3,
                                                         brightness=0.1),
                               train=TrainConfig(epochs=20, class_weight="balanced", threshold_rule="fixed",
                                                 calibration="temperature"), recipe="tuned-appearance"),
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
