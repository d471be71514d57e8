"""ONNX export of a checkpoint, and CPU inference on the exported model through ONNX Runtime.

This module owns the ONNX contract. An exported model takes one input and gives one output:

* ``pixels``: float32 (N, 1, S, S), the grey uint8 image times the checkpoint's preprocessing scale
  (1/255: values in [0, 1]); N is dynamic, S is the checkpoint's image size. The grey channel goes in
  as is: the model folds the Keras grey-to-RGB replication into its first convolution.
* ``probability``: float32 (N,), sigmoid of the model's logit, P(class_names[1]).
* ``ood_features``: float32 (N, D), only for a checkpoint with an out-of-distribution detector: the
  outputs of the detector's layers pooled over positions, from the same forward pass (the detector's
  means and precision stay in the checkpoint; `Predictor` scores these features with them).

Decoding and resizing stay outside the graph (`pneumoscan.images` does them identically for both
backends). The model's metadata_props make the file self-describing like a checkpoint: ``format``,
``pneumoscan_version``, ``model``, ``activation``, ``class_names`` (JSON), ``threshold``,
``temperature`` and ``calibration_offset`` (the checkpoint's calibration: the threshold applies to
sigmoid(logit(probability) / temperature + calibration_offset); 1 and 0 when it has none), ``preprocessing`` (JSON, as in the checkpoint), ``input`` and ``output`` (descriptions); for an
ensemble also ``ensemble`` (JSON: the members' seeds and the test-time views, all inside the one graph).
The graph's output stays the model's own probability.

`export_onnx` writes a .onnx file atomically; `export_onnx_bytes` gives the same bytes in memory, and
`remembered_onnx_bytes` keeps them in the cache folder for the next run;
`OnnxPredictor` scores uint8 arrays with ONNX Runtime and needs neither torch nor the checkpoint.
The exported graph is the frozen inference form (`inference.freeze(model, for_onnx=True)`), through
PyTorch's torch.export-based exporter (it needs ``onnxscript``).
ONNX packages are optional: ``pip install 'pneumoscan[onnx]'``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np

from .. import __version__
from ..core.calibration import calibration_of
from ..core.config import Preprocessing
from ..io.fileio import atomic_write_bytes, optional_import

FORMAT = "pneumoscan-onnx-1"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probability"
FEATURES_NAME = "ood_features"
MIN_OPSET = 18  # the torch.export-based exporter implements opset 18 and later only

log = logging.getLogger(__name__)


def _require(module: str, purpose: str) -> ModuleType:
    return optional_import(module, "onnx", purpose)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision ops it skips, pytree deprecations); errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
            warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)`"))
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _metadata(loaded: Any, ood_layers: tuple[str, ...]) -> dict[str, str]:
    prep = loaded.config.preprocessing
    s = prep.image_size
    return {
        "format": FORMAT,
        "pneumoscan_version": __version__,
        "checkpoint_version": str(loaded.checkpoint.get("version", "")),
        "model": loaded.config.model.name,
        "activation": loaded.config.model.activation,
        "class_names": json.dumps(list(loaded.class_names)),
        "threshold": repr(float(loaded.threshold)),
        "temperature": repr(calibration_of(loaded.checkpoint)[0]),
        "calibration_offset": repr(calibration_of(loaded.checkpoint)[1]),
        "preprocessing": json.dumps(loaded.checkpoint["preprocessing"]),
        **({"ensemble": _ensemble_text(loaded.checkpoint)} if "ensemble" in loaded.checkpoint else {}),
        "input": f"{INPUT_NAME}: float32 (N, 1, {s}, {s}) = grey uint8 pixels * {prep.scale!r}",
        "output": f"{OUTPUT_NAME}: float32 (N,) = P({loaded.class_names[1]})",
        **({"ood_features": f"{FEATURES_NAME}: float32 (N, D) = outputs of {', '.join(ood_layers)} pooled over "
                            "positions, for the checkpoint's out-of-distribution detector"} if ood_layers else {}),
    }


def _ood_layers(loaded: Any) -> tuple[str, ...]:
    """The layers of the checkpoint's out-of-distribution detector, () without one."""
    from .ood import Detector

    detector = Detector.from_checkpoint(loaded.checkpoint)
    return tuple(detector.layers) if detector is not None else ()


def _output_names(ood_layers: tuple[str, ...]) -> list[str]:
    return [OUTPUT_NAME, FEATURES_NAME] if ood_layers else [OUTPUT_NAME]


def _ensemble_text(ckpt: dict[str, Any]) -> str:
    """An ensemble's members (seeds) and test-time views, as JSON for the metadata."""
    record = ckpt["ensemble"]
    return json.dumps({"seeds": [m.get("seed") for m in record.get("members", [])],
                       "views": [v.get("name") for v in record.get("views", [])],
                       "combined": "mean of the members' logits over members and views"})


def export_onnx_bytes(checkpoint_path: str | os.PathLike, opset: int = MIN_OPSET, check: bool = True) -> bytes:
    """The checkpoint's model as a serialized ONNX model (see the module docstring for its contract).

    With `check`, ONNX Runtime runs the exported graph on random images and the result must match
    PyTorch within 1e-4 (only when onnxruntime is installed).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: PyTorch's ONNX exporter produces opset {MIN_OPSET} or later")
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")  # torch's exporter needs it; fail here with the install hint
    import torch

    from . import checkpoint as ckpt_io
    from .inference import freeze

    loaded = ckpt_io.load(checkpoint_path, "cpu")
    if len(loaded.class_names) > 2:
        raise ValueError(f"{checkpoint_path}: ONNX export covers binary models; this one has classes {loaded.class_names}")
    size = loaded.config.preprocessing.image_size
    ood_layers = _ood_layers(loaded)
    wrapper = _exported_form(freeze(loaded.model, for_onnx=True), ood_layers)
    example = torch.rand(2, 1, size, size)  # batch 2: a batch of 1 would be specialised as a constant
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=_output_names(ood_layers), dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            optimize=True, verbose=False,
        )
    model = program.model_proto
    model.doc_string = f"pneumoscan {__version__}: {loaded.config.model.name} ({loaded.config.model.activation})"
    onnx.helper.set_model_props(model, _metadata(loaded, ood_layers))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    if check and importlib.util.find_spec("onnxruntime") is not None:
        _check_parity(wrapper, data, size)
    return data


def remembered_onnx_bytes(checkpoint_path: str | os.PathLike, forget: bool = False) -> bytes:
    """`export_onnx_bytes`, remembered in the cache folder (`PNEUMOSCAN_CACHE`): an export takes about 10 s,
    reading it back milliseconds. Keyed by the checkpoint's bytes and by what shapes the graph (pneumoscan's
    model and export code, PyTorch's version, the opset). An entry is used only when it parses as an ONNX
    model whose metadata matches the checkpoint (`_matches`); anything else is exported again. `forget`
    exports afresh. A cache folder that cannot be written only costs the time."""
    path = _cache_path(checkpoint_path)
    if path.is_file() and not forget:
        try:
            data = path.read_bytes()
            problem = _matches(data, checkpoint_path)
        except Exception as e:  # onnx, protobuf and the file system raise many types; all mean "export again"
            problem = f"{type(e).__name__}: {e}"
        if not problem:
            return data
        log.warning("ignoring the remembered ONNX export %s (%s); exporting again", path, problem)
    data = export_onnx_bytes(checkpoint_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as e:
        log.warning("could not remember the ONNX export in %s (%s); the next run exports again", path, e)
    return data


def _cache_path(checkpoint_path: str | os.PathLike) -> Path:
    """Where `remembered_onnx_bytes` keeps the export of this checkpoint."""
    import torch

    from ..io.data import default_cache_dir

    key = hashlib.sha256(Path(checkpoint_path).read_bytes())
    for module in ("models", "cpu_kernels", "inference", "export", "ensemble_model", "augment"):  # networks/
        key.update((Path(__file__).parent / f"{module}.py").read_bytes())
    key.update(f"{__version__}|torch {torch.__version__}|opset {MIN_OPSET}".encode())
    return default_cache_dir() / "onnx" / f"{key.hexdigest()[:32]}.onnx"


CHECKED_METADATA = ("format", "pneumoscan_version", "model", "activation", "class_names", "threshold", "preprocessing")


def _matches(data: bytes, checkpoint_path: str | os.PathLike) -> str:
    """'' when `data` is an ONNX model with this checkpoint's metadata (format, version, model, class
    names, threshold, preprocessing) and its input and output, else what differs."""
    onnx = _require("onnx", "ONNX export")
    from . import checkpoint as ckpt_io

    model = onnx.load_model_from_string(data)
    onnx.checker.check_model(model)
    found = {p.key: p.value for p in model.metadata_props}
    loaded = ckpt_io.load(checkpoint_path, "cpu")
    ood_layers = _ood_layers(loaded)
    expected = _metadata(loaded, ood_layers)
    differ = [k for k in CHECKED_METADATA if found.get(k) != expected[k]]
    if differ:
        return "metadata differs from the checkpoint: " + ", ".join(differ)
    outputs = _output_names(ood_layers)
    if [i.name for i in model.graph.input] != [INPUT_NAME] or [o.name for o in model.graph.output] != outputs:
        return f"inputs and outputs are not {INPUT_NAME} -> {', '.join(outputs)}"
    return ""


def export_onnx(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, opset: int = MIN_OPSET,
                check: bool = True) -> Path:
    """Export a checkpoint to `out_path` (written atomically) and return that path."""
    data = export_onnx_bytes(checkpoint_path, opset=opset, check=check)
    atomic_write_bytes(out_path, data)
    return Path(out_path)


def _exported_form(model: Any, ood_layers: tuple[str, ...]) -> Any:
    """model -> sigmoid(logit), and with `ood_layers` also the detector's pooled features, in eval mode."""
    import torch

    from .ood import captured_features

    class Exported(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.model = inner

        def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            if not ood_layers:
                return torch.sigmoid(self.model(pixels))
            with captured_features(self.model, ood_layers) as features:
                return torch.sigmoid(self.model(pixels)), features(pixels.shape[0])

    return Exported(model).eval()


def _check_parity(wrapper: Any, data: bytes, size: int, atol: float = 1e-4) -> None:
    """ONNX Runtime against PyTorch on random images: probabilities to `atol`, features to `atol` relative."""
    import torch

    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, (3, 1, size, size)).astype(np.float32) / 255.0).astype(np.float32)
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(x))
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    got = OnnxPredictor(data).run_all(x)
    diff = float(np.max(np.abs(got[0] - expected[0])))
    if not diff <= atol:
        raise RuntimeError(f"ONNX export does not match PyTorch: max |difference| {diff:.3g} > {atol:g}")
    if len(expected) > 1:
        scale = max(1.0, float(np.max(np.abs(expected[1]))))
        diff = float(np.max(np.abs(got[1] - expected[1]))) / scale
        if not diff <= atol:
            raise RuntimeError(f"ONNX export's {FEATURES_NAME} do not match PyTorch: max relative difference {diff:.3g} > {atol:g}")


def default_threads() -> int:
    """OMP_NUM_THREADS when set (as PyTorch honours it), else the cores this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def read_metadata(data: bytes, label: str) -> dict[str, str]:
    """The metadata_props of the serialized ONNX model `data`; ValueError naming `label` if it does not parse."""
    onnx = _require("onnx", "reading an exported model")
    try:
        return {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}
    except Exception as e:  # protobuf raises its own DecodeError, among others
        raise ValueError(f"{label}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def model_bytes(source: str | os.PathLike | bytes) -> tuple[str, bytes]:
    """(a name for messages, the bytes) of an exported model given as a .onnx file or as its bytes."""
    if isinstance(source, bytes):
        return "<in-memory ONNX model>", source
    if not Path(source).is_file():
        raise FileNotFoundError(f"{source}: ONNX model not found")
    return str(source), Path(source).read_bytes()


class OnnxPredictor:
    """An exported model in ONNX Runtime (CPU): `predict_arrays` as `Predictor.predict_arrays`.

    `source` is a .onnx file written by `export_onnx` or its bytes. `threads` sizes the intra-op
    thread pool (default `default_threads()`); operators run one at a time, since this network is a
    chain and inter-op parallelism would only oversubscribe a small machine.
    """

    def __init__(self, source: str | os.PathLike | bytes, threads: int | None = None):
        ort = _require("onnxruntime", "ONNX Runtime inference")
        label, data = model_bytes(source)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises several pybind types for a bad file; all mean the same here
            raise ValueError(f"{label}: not a readable ONNX model ({type(e).__name__}: {e})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self._set_fields(label)
        self.threads = opts.intra_op_num_threads

    def _set_fields(self, label: str) -> None:
        """Class names, threshold, preprocessing, version and calibration from `self.metadata`, once it says
        that pneumoscan exported the model."""
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{label}: not an ONNX model exported by pneumoscan (metadata format "
                             f"{self.metadata.get('format')!r}, expected {FORMAT!r})")
        try:
            self.class_names: list[str] = list(json.loads(self.metadata["class_names"]))
            self.threshold = float(self.metadata["threshold"])
            self.prep = Preprocessing(**json.loads(self.metadata["preprocessing"]))
            self.version = self.metadata["pneumoscan_version"]
            self.temperature = float(self.metadata.get("temperature", "1.0"))
            self.offset = float(self.metadata.get("calibration_offset", "0.0"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{label}: incomplete pneumoscan metadata ({type(e).__name__}: {e})") from None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Model input float32 (N, 1, S, S) -> (N,) probabilities."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Model input float32 (N, 1, S, S) -> every output: probabilities, and features where the graph has them."""
        return self.session.run(None, {INPUT_NAME: x})

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 -> the graph's float32 (N, 1, S, S) input."""
        pixels = np.asarray(pixels)
        s = self.prep.image_size
        if pixels.ndim != 3 or pixels.shape[1:] != (s, s):
            raise ValueError(f"expected pixels of shape (N, {s}, {s}), got {pixels.shape}")
        return np.ascontiguousarray(self.prep.normalize(pixels.astype(np.float32))[:, None], dtype=np.float32)

    def predict_arrays(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 -> (N,) float32 probability of the positive class."""
        return self.run(self.model_input(pixels))

    def predict_with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, S, S) uint8 -> ((N,) probabilities, (N, D) out-of-distribution features or None), in one run."""
        outputs = self.run_all(self.model_input(pixels))
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def calibrated(self, probability: float) -> float:
        """The model's probability after the checkpoint's calibration (the scale the threshold is on)."""
        if self.temperature == 1.0 and self.offset == 0.0:
            return float(probability)
        p = min(max(float(probability), 1e-12), 1 - 1e-12)
        return 1 / (1 + math.exp(-(math.log(p / (1 - p)) / self.temperature + self.offset)))

    def label_of(self, probability: float) -> str:
        """The label of a probability the graph gave (calibrated first, then compared with the threshold)."""
        return self.class_names[int(self.calibrated(probability) >= self.threshold)]
