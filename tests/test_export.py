"""ONNX export: parity with PyTorch, self-describing files, the Predictor's onnx backend, clear errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from pneumoscan import __version__  # noqa: E402
from pneumoscan.networks import checkpoint as ckpt_io  # noqa: E402
from pneumoscan.networks import models  # noqa: E402
from pneumoscan.core.config import Config, ModelConfig, Preprocessing  # noqa: E402
from pneumoscan.networks.export import FORMAT, OnnxPredictor, export_onnx  # noqa: E402
from pneumoscan.tasks.predict import Predictor, expand_paths  # noqa: E402

# (activation, image size): the paper's 150 px; small sizes keep the suite fast, and an odd size takes
# the model's other stem path (two literal convolutions instead of the composed 5x5 kernel)
CASES = [("prelu", 150), ("leaky_relu", 40), ("relu", 45)]
THRESHOLD = 0.37


def structured_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Random uint8 images with large-scale structure (random waves and contrast) plus noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        wave = 128 + 100 * np.sin(3 * (a * xx + b * yy) + c)
        out.append(np.clip(wave * rng.uniform(0.2, 1.0) + rng.normal(0, 5, (size, size)), 0, 255))
    return np.stack(out).astype(np.uint8)


def build_checkpoint(path, activation: str, size: int, seed: int = 0):
    """A fresh model made non-trivial: every parameter and statistic of the graph matters to the output.

    Convolutions get He-normal weights (Keras' glorot on depthwise kernels makes activations so small
    that BatchNorm's eps swamps them), biases, PReLU alphas and BatchNorm affine parameters are random, the
    BatchNorm running statistics are those of a batch of images, and the last layer is rescaled so
    logits spread over about +-3 (probabilities well away from 0.5 and from saturation).
    """
    cfg = Config(preprocessing=Preprocessing(image_size=size), model=ModelConfig(activation=activation))
    torch.manual_seed(seed)  # the builder's own initialisation draws from the global generator
    model = models.build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.1, generator=g)  # zero biases could be dropped by the exporter unnoticed
            alpha = getattr(m, "alpha", None)
            if isinstance(alpha, torch.nn.Parameter):
                alpha.copy_(torch.rand(alpha.shape, generator=g) * 0.6 - 0.3)
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
            bn.momentum = None  # cumulative average: one batch sets the running statistics
        model.train()
        rng = np.random.default_rng(seed)
        model(torch.from_numpy(structured_images(rng, 16, size)).float()[:, None] / 255)
        model.eval()
        for bn in bns:
            bn.momentum = 0.01
        z = model(torch.from_numpy(structured_images(rng, 32, size)).float()[:, None] / 255)
        last = model.dense[-1]
        k = 1.5 / z.std()
        last.weight.mul_(k)
        last.bias.copy_((last.bias - z.mean()) * k)
    ckpt_io.save(ckpt_io.make_checkpoint(model, cfg, threshold=THRESHOLD), path)
    return path


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{s}px" for a, s in CASES])
def exported(request, tmp_path_factory):
    activation, size = request.param
    d = tmp_path_factory.mktemp(f"onnx-{activation}-{size}")
    ckpt = build_checkpoint(d / "model.pt", activation, size)
    onnx_path = export_onnx(ckpt, d / "model.onnx")
    return ckpt, onnx_path, size


def test_onnx_matches_pytorch(exported):
    ckpt, onnx_path, size = exported
    torch_pred = Predictor(ckpt, device="cpu")
    onnx_pred = OnnxPredictor(onnx_path)
    rng = np.random.default_rng(1)
    for n in (1, 5):
        pixels = structured_images(rng, n, size)
        expected, got = torch_pred.predict_arrays(pixels), onnx_pred.predict_arrays(pixels)
        assert got.shape == expected.shape == (n,) and got.dtype == np.float32
        diff = float(np.max(np.abs(got - expected)))
        print(f"{onnx_path.parent.name} batch {n}: max |p_torch - p_onnx| = {diff:.3g}")
        assert diff < 1e-4
    # the comparison means something only if the outputs vary with the input
    probs = torch_pred.predict_arrays(structured_images(rng, 16, size))
    assert probs.std() > 0.1 and 0.001 < probs.min() and probs.max() < 0.999


def test_onnx_file_is_self_describing(exported):
    onnx = pytest.importorskip("onnx")
    ckpt, onnx_path, size = exported
    assert not [p for p in onnx_path.parent.iterdir() if p.name.endswith(".tmp")]
    model = onnx.load(onnx_path)
    meta = {p.key: p.value for p in model.metadata_props}
    saved = torch.load(ckpt, weights_only=True)
    assert meta["format"] == FORMAT and meta["pneumoscan_version"] == __version__
    assert json.loads(meta["class_names"]) == saved["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert float(meta["threshold"]) == THRESHOLD
    assert json.loads(meta["preprocessing"]) == saved["preprocessing"]
    assert meta["model"] == "seed" and meta["activation"] == saved["config"]["model"]["activation"]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "pixels" and out.name == "probability"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, size, size]  # dynamic batch, grey, fixed size
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [dims[0]]
    pred = OnnxPredictor(onnx_path)
    assert pred.class_names == saved["class_names"] and pred.threshold == THRESHOLD
    assert pred.prep.image_size == size and pred.version == __version__
    assert pred.label_of(THRESHOLD) == "PNEUMONIA" and pred.label_of(THRESHOLD - 1e-6) == "NORMAL"


def test_predictor_onnx_backend_matches_torch_on_files(tiny_data, tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt" / "model.pt", "prelu", 40)
    before = sorted(p.name for p in ckpt.parent.iterdir())
    paths = expand_paths([str(tiny_data / "train")])[:12] + [str(tmp_path / "missing.jpeg")]
    torch_rows = list(Predictor(ckpt, device="cpu", batch_size=5).predict_files(paths))
    onnx_pred = Predictor(ckpt, batch_size=5, backend="onnx")
    onnx_rows = list(onnx_pred.predict_files(paths))
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before  # nothing written beside the checkpoint
    assert [r.path for r in onnx_rows] == [r.path for r in torch_rows] == paths
    assert onnx_rows[-1].error and onnx_rows[-1].probability is None
    a = np.array([r.probability for r in torch_rows[:-1]])
    b = np.array([r.probability for r in onnx_rows[:-1]])
    assert np.max(np.abs(a - b)) < 1e-4
    assert [r.label for r in onnx_rows[:-1]] == [r.label for r in torch_rows[:-1]]
    one = onnx_pred.predict_file((tiny_data / "train" / "NORMAL" / "IM-0001-0001.jpeg").read_bytes(), name="x.jpeg")
    assert one.error is None and abs(one.probability - a[0]) < 1e-4


def test_onnx_backend_remembers_its_export(tmp_path, monkeypatch):
    """The second Predictor reads the export back from the cache folder; a damaged entry is exported again."""
    import pneumoscan.networks.export as export_module

    ckpt = build_checkpoint(tmp_path / "model.pt", "prelu", 40)
    x = structured_images(np.random.default_rng(0), 4, 40)
    first = Predictor(ckpt, backend="onnx").predict_arrays(x)
    entries = list((Path(os.environ["PNEUMOSCAN_CACHE"]) / "onnx").glob("*.onnx"))
    assert len(entries) == 1
    real_export = export_module.export_onnx_bytes
    monkeypatch.setattr(export_module, "export_onnx_bytes", lambda *a, **k: pytest.fail("exported again"))
    assert np.array_equal(Predictor(ckpt, backend="onnx").predict_arrays(x), first)
    entries[0].write_bytes(b"not an onnx model")
    monkeypatch.setattr(export_module, "export_onnx_bytes", real_export)
    assert np.array_equal(Predictor(ckpt, backend="onnx").predict_arrays(x), first)
    assert entries[0].read_bytes() != b"not an onnx model"


def test_clear_errors(tmp_path):
    onnx = pytest.importorskip("onnx")
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        OnnxPredictor(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        OnnxPredictor(tmp_path / "garbage.onnx")
    # a valid ONNX model that pneumoscan did not export
    h = onnx.helper
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "foreign",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    foreign = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    (tmp_path / "foreign.onnx").write_bytes(foreign.SerializeToString())
    with pytest.raises(ValueError, match="not an ONNX model exported by pneumoscan"):
        OnnxPredictor(tmp_path / "foreign.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tmp_path / "missing.pt", tmp_path / "out.onnx", opset=11)
    with pytest.raises(ValueError, match="backend"):
        Predictor(tmp_path / "missing.pt", backend="tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        Predictor(tmp_path / "missing.pt", device="cuda", backend="onnx")


def test_wrong_image_size_is_refused(exported):
    _, onnx_path, size = exported
    with pytest.raises(ValueError, match=rf"\(N, {size}, {size}\)"):
        OnnxPredictor(onnx_path).predict_arrays(np.zeros((2, size + 1, size + 1), np.uint8))


def test_missing_optional_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"pip install 'pneumoscan\[onnx\]'"):
        OnnxPredictor(tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"onnxscript.*pneumoscan\[onnx\]"):
        export_onnx(tmp_path / "model.pt", tmp_path / "model.onnx")


def test_the_exporter_logs_nothing_at_info_and_predict_refuses_the_onnx_file_in_one_line(tmp_path, capsys, caplog):
    """`pneumoscan export` at the CLI's INFO level: no line of the exporter's own passes (onnx_ir, onnxscript);
    predict given the exported .onnx instead of the checkpoint: one line that says which file to give."""
    import logging

    from pneumoscan.apps.cli import main

    pytest.importorskip("onnxscript")
    ckpt = build_checkpoint(tmp_path / "model.pt", "prelu", 64)
    with caplog.at_level(logging.INFO):
        assert main(["export", str(ckpt), "--out", str(tmp_path / "model.onnx")]) == 0
    chatter = [r for r in caplog.records if r.name.split(".")[0] in ("onnx_ir", "onnxscript", "torch")]
    assert not chatter, [r.getMessage() for r in chatter[:3]]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "model.onnx"), str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.onnx: an ONNX model, not a checkpoint" in err[0]
