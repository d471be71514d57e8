"""The OpenVINO backend: FP32 equal to PyTorch, BF16 opt-in, compiled once per process, `--backend auto`."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from pneumoscan.networks import openvino_backend  # noqa: E402
from pneumoscan.networks.export import OnnxPredictor, export_onnx  # noqa: E402
from pneumoscan.networks.openvino_backend import OpenVinoPredictor, compiled_model  # noqa: E402
from pneumoscan.tasks.predict import Predictor, choose_backend  # noqa: E402

from .test_export import CASES, THRESHOLD, build_checkpoint, structured_images  # noqa: E402


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{s}px" for a, s in CASES])
def exported(request, tmp_path_factory):
    activation, size = request.param
    d = tmp_path_factory.mktemp(f"ov-{activation}-{size}")
    ckpt = build_checkpoint(d / "model.pt", activation, size)
    return ckpt, export_onnx(ckpt, d / "model.onnx"), size


def test_fp32_equals_torch_and_onnx_runtime(exported):
    """FP32 is the default: on a CPU with native BF16, OpenVINO's own default would be BF16."""
    ckpt, onnx_path, size = exported
    torch_pred, ov = Predictor(ckpt, device="cpu"), OpenVinoPredictor(onnx_path)
    assert ov.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    rng = np.random.default_rng(1)
    for n in (1, 7):
        pixels = structured_images(rng, n, size)
        expected, got = torch_pred.predict_arrays(pixels), ov.predict_arrays(pixels)
        assert got.shape == (n,) and got.dtype == np.float32
        assert np.max(np.abs(got - expected)) < 1e-5
        assert np.max(np.abs(got - OnnxPredictor(onnx_path).predict_arrays(pixels))) < 1e-5
    assert ov.class_names == torch_pred.class_names and ov.threshold == THRESHOLD and ov.prep.image_size == size


def test_bf16_is_opt_in_and_close(exported):
    ckpt, onnx_path, size = exported
    if not openvino_backend.native_bf16():
        pytest.skip("this CPU has no native BF16: OpenVINO would run f32 and the check would say nothing")
    bf16 = OpenVinoPredictor(onnx_path, precision="bf16")
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    pixels = structured_images(np.random.default_rng(2), 16, size)
    diff = np.abs(bf16.predict_arrays(pixels) - Predictor(ckpt, device="cpu").predict_arrays(pixels))
    # 8 mantissa bits: a relative error of about 2^-8 per product, averaged down over each sum; the logits
    # spread over +-3, so probabilities move by well under 0.1 and, on these images, by more than f32's 1e-5
    assert diff.max() < 0.1 and diff.max() > 1e-5


def test_compiled_once_per_process_and_shared(exported):
    _, onnx_path, _ = exported
    data = onnx_path.read_bytes()
    assert compiled_model(data) is compiled_model(data) is OpenVinoPredictor(data).compiled
    assert compiled_model(data, "bf16") is not compiled_model(data, "f32")


def test_predictor_openvino_backend_on_files_with_errors(tiny_data, tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt" / "model.pt", "prelu", 40)
    paths = sorted(str(p) for p in (tiny_data / "train").rglob("*.jpeg"))[:9] + [str(tmp_path / "missing.jpeg")]
    torch_rows = list(Predictor(ckpt, device="cpu", batch_size=4).predict_files(paths))
    ov_rows = list(Predictor(ckpt, backend="openvino", batch_size=4).predict_files(paths))
    assert [r.path for r in ov_rows] == paths and ov_rows[-1].error and ov_rows[-1].probability is None
    a = np.array([r.probability for r in torch_rows[:-1]])
    b = np.array([r.probability for r in ov_rows[:-1]])
    assert np.max(np.abs(a - b)) < 1e-5 and [r.label for r in ov_rows] == [r.label for r in torch_rows]


def test_auto_picks_the_fastest_exact_backend_installed_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="pneumoscan.tasks.predict"):
        assert choose_backend("auto", "cpu") == "openvino"  # both openvino and onnxruntime are installed here
    assert "backend auto: openvino" in caplog.text
    assert choose_backend("onnx", "cpu") == "onnx"
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        choose_backend("tensorrt")


def test_bad_model_and_bad_precision_are_one_line_errors(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="broken.onnx: not a readable ONNX model"):
        OpenVinoPredictor(bad)
    with pytest.raises(FileNotFoundError, match="missing.onnx: ONNX model not found"):
        OpenVinoPredictor(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="unknown OpenVINO precision 'int4'"):
        compiled_model(b"", "int4")
