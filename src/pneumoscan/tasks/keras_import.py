"""Importing the paper's own Keras models: a `.keras` archive or an HDF5 `.h5` file to a pneumoscan checkpoint.

The file is read with h5py and its own config, without TensorFlow: a Keras 3 `.keras` archive (a zip
of config.json and model.weights.h5), a legacy HDF5 model (what `model.save("x.h5")` and
`ModelCheckpoint("x.h5")` write, Keras 2 or 3), or weights alone (`.weights.h5`, or a Keras 2
`save_weights` file), which need the activation named. The architecture in the file is checked layer
by layer against the paper's network (`models.SeedCNN`); a difference is a `KerasImportError` naming
the file, the layer and what differs.

Every weight is mapped to PyTorch's layout: convolution kernels HWIO to OIHW, depthwise (H, W, C, 1) to
(C, 1, H, W), PReLU slopes per position (H, W, C) to (C, H, W), Dense kernels transposed, and the rows of
the first Dense kernel permuted from Keras' channels-last flattening (H, W, C) to PyTorch's (C, H, W).
BatchNormalization keeps gamma, beta and the moving statistics; Keras' momentum m is PyTorch's 1 - m.
The checkpoint carries the notebook's preprocessing (nearest resize, /255, the file's input size), a
fixed 0.5 threshold, and where it came from (`imported_from`: file, format, Keras version, SHA-256).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import ACTIVATIONS, Config, DataConfig, ModelConfig, Preprocessing, TrainConfig
from ..io.fileio import optional_import

KERAS_EPSILON = 1e-3  # BatchNormalization epsilon of SeedCNN (models.keras_batchnorm)
BLOCKS = ((32, 0.0), (64, 0.0), (128, 0.2), (256, 0.2))  # the separable blocks: filters, dropout
DENSE = ((512, "relu", 0.6), (128, "relu", 0.4), (64, "relu", 0.25), (1, "sigmoid", None))


class KerasImportError(ValueError):
    """A Keras file that cannot be read, or whose network is not the paper's; str() names the file."""


@dataclass
class KerasLayer:
    kind: str  # Keras class name
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    weights: list[np.ndarray] = field(default_factory=list)


@dataclass
class KerasFile:
    path: str
    format: str  # keras | h5 | weights-h5
    keras_version: str
    input_shape: tuple[int, ...] | None  # (H, W, C), None for weights alone
    layers: list[KerasLayer]


def _h5py():
    return optional_import("h5py", "keras", "importing Keras models")


# --- reading -------------------------------------------------------------------------------------------------


def read_keras_file(path: str | os.PathLike) -> KerasFile:
    """The layers (kind, name, config, weights in Keras' own order) and input shape of a Keras file."""
    path = str(path)
    if not Path(path).is_file():
        raise KerasImportError(f"{path}: no such file")
    h5py = _h5py()
    try:
        if zipfile.is_zipfile(path):
            return _read_keras_archive(path, h5py)
        with h5py.File(path, "r") as h5:
            return _read_h5(path, h5)
    except KerasImportError:
        raise
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise KerasImportError(f"{path}: not a readable Keras model ({type(e).__name__}: {e})") from None


def _read_keras_archive(path: str, h5py) -> KerasFile:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if not {"config.json", "model.weights.h5"} <= names:
            raise KerasImportError(f"{path}: a zip without config.json and model.weights.h5 is not a .keras model")
        config = json.loads(zf.read("config.json"))
        meta = json.loads(zf.read("metadata.json")) if "metadata.json" in names else {}
        weights = zf.read("model.weights.h5")
    layers, input_shape = _layers_of(path, config)
    with h5py.File(io.BytesIO(weights), "r") as h5:
        _fill_keras3_weights(path, h5, layers)
    return KerasFile(path, "keras", str(meta.get("keras_version", "unknown")), input_shape, layers)


def _read_h5(path: str, h5) -> KerasFile:
    version = _text(h5.attrs.get("keras_version", "unknown"))
    if "model_config" in h5.attrs:  # a whole legacy model: config plus model_weights/
        layers, input_shape = _layers_of(path, json.loads(_text(h5.attrs["model_config"])))
        _fill_legacy_weights(path, h5["model_weights"], layers)
        return KerasFile(path, "h5", version, input_shape, layers)
    if "layer_names" in h5.attrs:  # Keras 2 save_weights: model_weights' layout at the root
        layers = [KerasLayer(_kind_of_name(n), n) for n in map(_text, h5.attrs["layer_names"])]
        _fill_legacy_weights(path, h5, layers)
        return KerasFile(path, "weights-h5", version, None, layers)
    if "layers" in h5:  # Keras 3 save_weights (.weights.h5)
        names = [n for n in h5["layers"] if n != "sequential"] or list(h5["layers/sequential/layers"])
        layers = [KerasLayer(_kind_of_name(n), n) for n in names]
        _fill_keras3_weights(path, h5, layers)
        return KerasFile(path, "weights-h5", version, None, _in_auto_name_order(layers))
    raise KerasImportError(f"{path}: an HDF5 file with neither a Keras model config nor Keras weights")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _layers_of(path: str, config: dict[str, Any]) -> tuple[list[KerasLayer], tuple[int, ...] | None]:
    """The layer list of a Sequential (or a chain-shaped Functional) model config, and its input shape."""
    if config.get("class_name") not in ("Sequential", "Functional", "Model"):
        raise KerasImportError(f"{path}: a Keras {config.get('class_name')!r}, not a Sequential or Functional model")
    entries = config["config"]["layers"]
    input_shape = None
    layers = []
    for entry in entries:
        cfg = entry.get("config", {})
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if shape and input_shape is None:
            input_shape = tuple(shape[1:])
        if entry["class_name"] == "InputLayer":
            continue
        layers.append(KerasLayer(entry["class_name"], cfg.get("name", ""), cfg))
    if input_shape is None and layers:
        built = (entries[0].get("build_config") or {}).get("input_shape")
        input_shape = tuple(built[1:]) if built else None
    return layers, input_shape


def _fill_keras3_weights(path: str, h5, layers: list[KerasLayer]) -> None:
    """Keras 3 layout: layers/<name>/vars/<i> (Sequential models sometimes nested under layers/sequential/)."""
    root = h5["layers"]
    if "sequential" in root and "layers" in root["sequential"] and not any(layer.name in root for layer in layers):
        root = root["sequential/layers"]
    for layer in layers:
        if layer.name not in root:
            if _KIND_WEIGHTS.get(layer.kind):
                raise KerasImportError(f"{path}: no weights stored for layer {layer.name!r} ({layer.kind})")
            continue
        group = root[layer.name].get("vars", {})
        layer.weights = [np.asarray(group[k], dtype=np.float32) for k in sorted(group, key=int)]


def _fill_legacy_weights(path: str, group, layers: list[KerasLayer]) -> None:
    """Legacy HDF5 layout: <layer>/ lists its datasets in order in the attribute weight_names."""
    for layer in layers:
        if layer.name not in group:
            if _KIND_WEIGHTS.get(layer.kind):
                raise KerasImportError(f"{path}: no weights stored for layer {layer.name!r} ({layer.kind})")
            continue
        g = group[layer.name]
        layer.weights = [np.asarray(g[_text(n)], dtype=np.float32) for n in g.attrs.get("weight_names", [])]


# Keras' automatic layer names (snake case of the class, then _1, _2, ...) and what each kind stores
_AUTO_NAMES = {"conv2d": "Conv2D", "separable_conv2d": "SeparableConv2D", "batch_normalization": "BatchNormalization",
               "p_re_lu": "PReLU", "dense": "Dense"}
_KIND_WEIGHTS = {"Conv2D": 2, "SeparableConv2D": 3, "BatchNormalization": 4, "PReLU": 1, "Dense": 2}


def _kind_of_name(name: str) -> str:
    base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
    return _AUTO_NAMES.get(base, _AUTO_NAMES.get(name, name))


def _in_auto_name_order(layers: list[KerasLayer]) -> list[KerasLayer]:
    """Weights alone carry no layer order: Keras' automatic names (conv2d, conv2d_1, ...) give it."""
    def number(layer: KerasLayer) -> int:
        tail = layer.name.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else 0
    return sorted((layer for layer in layers if layer.weights), key=lambda layer: (layer.kind, number(layer)))


# --- the paper's network, as Keras describes it ---------------------------------------------------------------


def _pair(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value, value]


def activation_of(layer: KerasLayer) -> str | None:
    """Which of Table IV's rectifiers a Keras activation layer is, or None."""
    c = layer.config
    if layer.kind == "PReLU":
        return "prelu" if not c.get("shared_axes") else None
    if layer.kind == "ReLU":
        plain = c.get("max_value") is None and not c.get("negative_slope") and not c.get("threshold")
        return "relu" if plain else None
    if layer.kind == "Activation":
        return "relu" if c.get("activation") == "relu" else None
    if layer.kind == "LeakyReLU":
        slope = float(c.get("negative_slope", c.get("alpha", 0.3)))
        return {0.3: "leaky_relu", 30.0: "leaky_relu_30"}.get(round(slope, 6))
    return None


def expected_layers(activation: str) -> list[tuple[str, dict[str, Any]]]:
    """The notebook's layer sequence: (Keras class, config values it must have)."""
    conv = {"kernel_size": [3, 3], "strides": [1, 1], "padding": "same", "activation": "linear", "use_bias": True}
    pool = {"pool_size": [2, 2], "padding": "valid"}
    seq: list[tuple[str, dict[str, Any]]] = [("Conv2D", {"filters": 16, **conv}), ("Conv2D", {"filters": 16, **conv}),
                                              ("MaxPooling2D", pool)]
    for filters, dropout in BLOCKS:
        sep = ("SeparableConv2D", {"filters": filters, "depth_multiplier": 1, **conv})
        seq += [sep, ("ACT", {"activation": activation}), sep, ("ACT", {"activation": activation}),
                ("BatchNormalization", {"epsilon": KERAS_EPSILON, "center": True, "scale": True}), ("MaxPooling2D", pool)]
        if dropout:
            seq.append(("Dropout", {"rate": dropout}))
    seq.append(("Flatten", {}))
    for units, act, dropout in DENSE:
        seq.append(("Dense", {"units": units, "activation": act, "use_bias": True}))
        if dropout is not None:
            seq.append(("Dropout", {"rate": dropout}))
    return seq


def _config_differences(layer: KerasLayer, wanted: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in wanted.items():
        if key == "activation" and layer.kind not in ("Conv2D", "SeparableConv2D", "Dense"):
            have = activation_of(layer)
        else:
            have = layer.config.get(key, value)  # a key a Keras version does not write keeps its default
            if key in ("kernel_size", "strides", "pool_size"):
                have = _pair(have)
        if isinstance(value, float) and isinstance(have, (int, float)):
            same = abs(float(have) - value) <= 1e-9 * max(1.0, abs(value))
        else:
            same = have == value
        if not same:
            problems.append(f"{key} {have!r} (expected {value!r})")
    return problems


def check_architecture(kf: KerasFile, activation: str) -> None:
    """KerasImportError naming the file and every difference from the paper's network with `activation`."""
    layers = [layer for layer in kf.layers if layer.kind != "InputLayer"]
    expected = expected_layers(activation)
    problems = []
    for i, (layer, (kind, wanted)) in enumerate(zip(layers, expected), 1):
        if kind == "ACT" and activation_of(layer) is None and layer.kind not in ("PReLU", "ReLU", "LeakyReLU", "Activation"):
            problems.append(f"layer {i} {layer.name!r} is {layer.kind}, expected the {activation} activation")
            break
        if kind != "ACT" and layer.kind != kind:
            problems.append(f"layer {i} {layer.name!r} is {layer.kind}, expected {kind}")
            break
        problems += [f"layer {i} {layer.name!r} ({layer.kind}): {p}" for p in _config_differences(layer, wanted)]
    else:
        if len(layers) != len(expected):
            extra = (f"an extra layer {layers[len(expected)].name!r} ({layers[len(expected)].kind}) at the end"
                     if len(layers) > len(expected) else f"it ends after layer {len(layers)}")
            problems.append(f"{len(layers)} layers, the paper's network has {len(expected)}: {extra}")
    if problems:
        raise KerasImportError(f"{kf.path}: not the paper's network: " + "; ".join(problems[:8])
                               + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def file_activation(kf: KerasFile) -> str | None:
    """The activation a file's config names (that of its first activation layer), or None without one."""
    for layer in kf.layers:
        if layer.kind in ("PReLU", "ReLU", "LeakyReLU", "Activation"):
            return activation_of(layer) or f"an unsupported {layer.kind} {layer.config}"
    return None


# --- weights -------------------------------------------------------------------------------------------------


def _weighted(kf: KerasFile, kind: str, n: int) -> list[KerasLayer]:
    layers = [layer for layer in kf.layers if layer.kind == kind and layer.weights]
    if len(layers) != n:
        raise KerasImportError(f"{kf.path}: {len(layers)} {kind} layers with weights, the paper's network has {n}")
    for layer in layers:
        if len(layer.weights) != _KIND_WEIGHTS[kind]:
            raise KerasImportError(f"{kf.path}: layer {layer.name!r} ({kind}) stores {len(layer.weights)} weights, "
                                   f"expected {_KIND_WEIGHTS[kind]}")
    return layers


def keras_to_state(kf: KerasFile, activation: str, pooled: int) -> dict[str, tuple[str, np.ndarray]]:
    """SeedCNN state_dict key -> (where it comes from, array in PyTorch's layout); `pooled` is the side of
    the last feature map, which the first Dense kernel's rows are permuted over."""
    out: dict[str, tuple[str, np.ndarray]] = {}

    def put(key: str, layer: KerasLayer, i: int, array: np.ndarray) -> None:
        out[key] = (f"layer {layer.name!r} ({layer.kind}) weight {i} {tuple(layer.weights[i].shape)}", array)

    for layer, key in zip(_weighted(kf, "Conv2D", 2), ("conv1", "conv2")):
        put(f"{key}.weight", layer, 0, layer.weights[0].transpose(3, 2, 0, 1))
        put(f"{key}.bias", layer, 1, layer.weights[1])
    seps = _weighted(kf, "SeparableConv2D", 8)
    norms = _weighted(kf, "BatchNormalization", 4)
    prelus = _weighted(kf, "PReLU", 8) if activation == "prelu" else []
    for b in range(4):
        for j in range(2):
            layer = seps[2 * b + j]
            depthwise, pointwise, bias = layer.weights
            put(f"features.{b}.{2 * j}.0.weight", layer, 0, depthwise.transpose(2, 3, 0, 1))
            put(f"features.{b}.{2 * j}.1.weight", layer, 1, pointwise.transpose(3, 2, 0, 1))
            put(f"features.{b}.{2 * j}.1.bias", layer, 2, bias)
            if prelus:
                alpha = prelus[2 * b + j].weights[0]
                put(f"features.{b}.{2 * j + 1}.alpha", prelus[2 * b + j], 0, alpha.transpose(2, 0, 1) if alpha.ndim == 3 else alpha)
        for name, i in (("weight", 0), ("bias", 1), ("running_mean", 2), ("running_var", 3)):
            put(f"features.{b}.4.{name}", norms[b], i, norms[b].weights[i])
    for i, layer in enumerate(_weighted(kf, "Dense", 4)):
        kernel = layer.weights[0]
        if i == 0 and kernel.ndim == 2 and kernel.shape[0] == pooled * pooled * 256:
            # Keras flattens (H, W, C), PyTorch (C, H, W): reorder the rows to match
            kernel = kernel.reshape(pooled, pooled, 256, -1).transpose(2, 0, 1, 3).reshape(kernel.shape)
        put(f"dense.{i}.weight", layer, 0, kernel.T)
        put(f"dense.{i}.bias", layer, 1, layer.weights[1])
    return out


# --- the checkpoint ------------------------------------------------------------------------------------------


def _pooled(size: int) -> int:
    for _ in range(5):  # the stem's pool and one per separable block
        size //= 2
    return size


def _choose_activation(kf: KerasFile, asked: str | None) -> str:
    if asked is not None and asked not in ACTIVATIONS:
        raise KerasImportError(f"unknown activation {asked!r}; choose one of {', '.join(ACTIVATIONS)}")
    in_file = file_activation(kf)
    if in_file is None:  # weights alone: PReLU slopes are there or not; the others look alike
        has_slopes = any(layer.kind == "PReLU" and layer.weights for layer in kf.layers)
        if has_slopes:
            in_file = "prelu"
        elif asked is None or asked == "prelu":
            raise KerasImportError(f"{kf.path}: weights alone, without PReLU slopes: name the activation "
                                   f"(--activation {' | '.join(a for a in ACTIVATIONS if a != 'prelu')})")
        else:
            return asked
    if in_file not in ACTIVATIONS:
        raise KerasImportError(f"{kf.path}: not the paper's network: its activation is {in_file}")
    if asked is not None and asked != in_file:
        raise KerasImportError(f"{kf.path}: the file's activation is {in_file}, not {asked}")
    return in_file


def _input_of(kf: KerasFile, image_size: int | None) -> tuple[int, int]:
    """(image size, channels) of the model in the file."""
    if kf.input_shape is not None:
        shape = kf.input_shape
        if len(shape) != 3 or shape[0] != shape[1] or shape[2] not in (1, 3) or shape[0] is None:
            raise KerasImportError(f"{kf.path}: input shape {tuple(shape)}; the paper's network takes square "
                                   f"grey or RGB images (S, S, 1 or 3)")
        if image_size is not None and image_size != shape[0]:
            raise KerasImportError(f"{kf.path}: the model takes {shape[0]} px images, not {image_size}")
        size, channels = int(shape[0]), int(shape[2])
    else:
        convs = _weighted(kf, "Conv2D", 2)
        channels = int(convs[0].weights[0].shape[2])
        prelus = [layer for layer in kf.layers if layer.kind == "PReLU" and layer.weights]
        size = image_size or (2 * int(prelus[0].weights[0].shape[0]) if prelus else 150)
    if _pooled(size) < 1:
        raise KerasImportError(f"{kf.path}: {size} px input is too small for the paper's network (32 px at least)")
    return size, channels


def _batchnorm_momentum(kf: KerasFile) -> float:
    """PyTorch's momentum (1 - Keras'), from the file's first BatchNormalization (0.01 without a config)."""
    norms = [layer for layer in kf.layers if layer.kind == "BatchNormalization" and "momentum" in layer.config]
    return round(1.0 - float(norms[0].config["momentum"]), 9) if norms else 0.01


def imported_config(kf: KerasFile, activation: str, size: int, channels: int, data_root: str | None) -> Config:
    """The run configuration of an imported model: the notebook's preprocessing and a fixed 0.5 threshold."""
    return Config(data=DataConfig(root=data_root) if data_root else DataConfig(),
                  preprocessing=Preprocessing(image_size=size, channels=channels, resize_filter="nearest", scale=1.0 / 255.0),
                  model=ModelConfig(name="seed", activation=activation, batchnorm_momentum=_batchnorm_momentum(kf)),
                  train=TrainConfig(threshold=0.5, threshold_rule="fixed", calibration="none"),
                  recipe="keras-import").check()


def load_keras_model(path: str | os.PathLike, activation: str | None = None, image_size: int | None = None,
                     data_root: str | None = None):
    """(SeedCNN with the file's weights, its Config, the KerasFile); KerasImportError for a file that differs."""
    import torch

    from ..networks.models import build_model

    kf = read_keras_file(path)
    act = _choose_activation(kf, activation)
    size, channels = _input_of(kf, image_size)
    if kf.format != "weights-h5":
        check_architecture(kf, act)
    cfg = imported_config(kf, act, size, channels, data_root)
    model = build_model(cfg)
    state = model.state_dict()
    mapped = keras_to_state(kf, act, _pooled(size))
    for key, (source, array) in mapped.items():
        if tuple(array.shape) != tuple(state[key].shape):
            raise KerasImportError(f"{kf.path}: {source} does not fit the paper's network with a {size} px, "
                                   f"{channels}-channel input (PyTorch {key} is {tuple(state[key].shape)})")
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    missing = [k for k in state if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise KerasImportError(f"{kf.path}: no weights in the file for {', '.join(missing)}")
    model.load_state_dict(state)
    return model.eval(), cfg, kf


def import_keras(path: str | os.PathLike, out: str | os.PathLike, activation: str | None = None,
                 image_size: int | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Write a pneumoscan checkpoint of the Keras model in `path` to `out`; returns what was imported."""
    from ..networks.checkpoint import make_checkpoint, save

    model, cfg, kf = load_keras_model(path, activation, image_size, data_root)
    ckpt = make_checkpoint(model, cfg, threshold=0.5)
    ckpt["threshold_rule"] = {"rule": "fixed"}
    source = {"framework": "keras", "file": str(Path(path).resolve()), "format": kf.format,
              "keras_version": kf.keras_version, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    ckpt["imported_from"] = source
    save(ckpt, out)
    return {"checkpoint": str(out), "activation": cfg.model.activation, "image_size": cfg.preprocessing.image_size,
            "channels": cfg.preprocessing.channels, "batchnorm_momentum": cfg.model.batchnorm_momentum, **source}
