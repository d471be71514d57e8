"""The fast prediction pipeline against the reference loop, and the fast JPEG loader against the reference loader.

The pipeline (`tasks.pipeline`, behind `pneumoscan predict`) runs with a background decoding thread and
simplejpeg; the reference (`Predictor.predict_files`) with neither. On weights trained for a few epochs,
with the out-of-distribution detector every trained checkpoint has, with good and bad files mixed, with
each backend, the two must give the same records, number for number.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.apps.cli import main
from pneumoscan.io.fast_decode import load_for_model_fast
from pneumoscan.io.images import ImageLoadError, load_for_model_with_info
from pneumoscan.tasks.pipeline import predict_file_fast, predict_files_pipelined
from pneumoscan.tasks.predict import Predictor

from .conftest import make_dataset, real_train_folder
from .test_invariants import paper_run_args

pytest.importorskip("simplejpeg")
BACKENDS = ["torch", "onnx", "openvino"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 epochs of the paper recipe on 80 synthetic X-rays at 48 px, and a folder of good and bad files."""
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOSCAN_CACHE", str(root / "cache"))
        data = make_dataset(root / "data", patients_per_class=20, images_per_patient=2)
        # BatchNorm statistics that follow the weights within these few steps
        assert main([*paper_run_args(data, root / "run", epochs=6, image_size=48), "--batchnorm-momentum", "0.1"]) == 0
    files = sorted(str(p) for p in (data / "train").rglob("*.jpeg"))
    odd = root / "odd"
    odd.mkdir()
    (odd / "truncated.jpeg").write_bytes(Path(files[0]).read_bytes()[:300])
    (odd / "empty.jpeg").write_bytes(b"")
    Image.open(files[1]).convert("L").save(odd / "grey.png")
    rotated = Image.open(files[2]).convert("RGB")
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rotated.save(odd / "rotated.jpeg", exif=exif, quality=90)
    bad = [str(odd / n) for n in ("truncated.jpeg", "empty.jpeg", "grey.png", "rotated.jpeg")] + [str(odd / "missing.jpeg")]
    mixed = files[:7] + bad[:2] + files[7:15] + bad[2:] + files[15:]
    return root / "run" / "best.pt", mixed


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_pipeline_gives_the_reference_loops_records(trained, backend):
    checkpoint, paths = trained
    pytest.importorskip({"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[backend])
    predictor = Predictor(checkpoint, device="cpu", batch_size=5, backend=backend)
    assert predictor.ood is not None  # the detector is scored in the same pass
    reference = list(predictor.predict_files(paths))
    fast = list(predict_files_pipelined(predictor, paths, ahead=1))
    assert fast == reference  # the records' every field: probability, label, OOD score, error text
    assert sum(r.error is not None for r in fast) == 3 and len({r.probability for r in fast}) > 10
    for path in paths[:3] + paths[7:9]:  # one image at a time: good files, a truncated and an empty one
        data = Path(path).read_bytes()
        assert predict_file_fast(predictor, data, name=path) == predictor.predict_file(data, name=path)


def test_predict_cli_writes_the_reference_loops_numbers(trained, tmp_path):
    checkpoint, paths = trained
    assert main(["predict", str(checkpoint), *paths, "--out", str(tmp_path / "p.csv"), "--backend", "openvino",
                 "--batch-size", "4"]) == 0  # the unreadable files are error rows; the job carries on
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    reference = Predictor(checkpoint, device="cpu", batch_size=4, backend="torch").predict_files(paths)
    for r in reference:
        got = rows[r.path]
        if r.error:
            assert got["error"] == r.error
        else:
            assert float(got["p_pneumonia"]) == pytest.approx(r.probability, abs=1e-5)
            assert float(got["ood_score"]) == pytest.approx(r.ood_score, rel=1e-3, abs=2e-4)


def test_stopping_early_stops_the_decoder(trained):
    checkpoint, paths = trained
    predictor = Predictor(checkpoint, device="cpu", batch_size=2)
    records = predict_files_pipelined(predictor, paths * 20, ahead=1)
    assert next(records).path == paths[0]
    records.close()  # the generator's finally stops and drains the decoding thread


def _reference_or_error(source, size, name=None):
    try:
        return load_for_model_with_info(source, size, "nearest", name).grey
    except ImageLoadError as e:
        return str(e)


def _fast_or_error(source, size, name=None):
    try:
        return load_for_model_fast(source, size, "nearest", name).grey
    except ImageLoadError as e:
        return str(e)


def test_fast_loader_gives_the_reference_pixels_on_real_radiographs():
    train = real_train_folder()
    files = sorted((train / "NORMAL").glob("*.jpeg"))[:60] + sorted((train / "PNEUMONIA").glob("*.jpeg"))[:60]
    import simplejpeg

    from pneumoscan.io import fast_decode

    for f in files:
        data = f.read_bytes()  # the fast path is the one taken for these files: no EXIF, YCbCr or grey
        assert fast_decode._plain_jpeg(data) and simplejpeg.decode_jpeg_header(data)[2] in ("Gray", "YCbCr")
        for size in (150, 224):
            assert np.array_equal(_fast_or_error(str(f), size), _reference_or_error(str(f), size)), f


def test_fast_loader_gives_the_reference_pixels_and_errors_on_odd_files(trained, tmp_path):
    _, paths = trained
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    samples = {"colour.jpeg": None, "colour-progressive.jpeg": None, "subsampled.jpeg": None}
    for name in samples:
        buf = io.BytesIO()
        Image.fromarray(colour).save(buf, "JPEG", quality=85, progressive="progressive" in name,
                                     subsampling=2 if name.startswith("subsampled") else 0)
        samples[name] = buf.getvalue()
    cmyk = io.BytesIO()
    Image.fromarray(colour).convert("CMYK").save(cmyk, "JPEG")
    samples["cmyk.jpeg"] = cmyk.getvalue()
    samples["scan.dcm"] = samples["colour.jpeg"]  # a DICOM name goes to the DICOM reader, as in the reference
    for name, data in samples.items():
        assert np.array_equal(_fast_or_error(data, 48, name), _reference_or_error(data, 48, name)), name
    for path in paths:  # EXIF rotation, PNG, truncated, empty, missing
        fast, ref = _fast_or_error(path, 48), _reference_or_error(path, 48)
        assert (fast == ref) if isinstance(ref, str) else np.array_equal(fast, ref), path


def test_serve_on_openvino_scores_as_torch_with_and_without_heatmap(trained):
    """serve's default is auto (OpenVINO where installed): heatmaps come from the PyTorch model every
    Predictor holds, probabilities without them from OpenVINO; both equal the torch backend's."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openvino")
    from fastapi.testclient import TestClient

    from pneumoscan.apps.cli_parser import build_parser
    from pneumoscan.apps.serve import create_app

    assert build_parser().parse_args(["serve", "x.pt"]).backend == "auto"
    assert build_parser().parse_args(["predict", "x.pt", "a.jpeg", "--out", "o.csv"]).backend == "auto"
    checkpoint, paths = trained
    client = TestClient(create_app(checkpoint, backend="openvino"))
    assert client.app.app.state.predictor.backend == "openvino"
    reference = Predictor(checkpoint, device="cpu", backend="torch")
    for path in paths[:3]:
        expected = reference.predict_file(path)
        upload = [("files", (Path(path).name, Path(path).read_bytes(), "image/jpeg"))]
        for query in ("", "?heatmap=false"):
            got = client.post(f"/api/predict{query}", files=upload).json()["results"][0]
            assert got["p_pneumonia"] == pytest.approx(expected.probability, abs=1e-5), (path, query)
            assert got["ood_score"] == pytest.approx(expected.ood_score, rel=1e-3, abs=2e-4), (path, query)
            assert (got["heatmap_png"] is None) == (query != "")


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_evaluate_and_explain_score_with_an_exported_backend_as_predict_does(trained, backend, tmp_path):
    """`evaluate --backend` gives the torch reference's figures (the engines equal it to 1e-5) and says which
    backend scored; `explain --backend` reports that backend's probability and OOD score beside torch's heatmaps."""
    from pneumoscan.tasks.evaluate import evaluate
    from pneumoscan.tasks.explain import explain_paths

    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[backend])
    checkpoint, paths = trained
    reference = evaluate(checkpoint, "val", tmp_path / "torch", progress=False)
    got = evaluate(checkpoint, "val", tmp_path / backend, progress=False, backend=backend)
    assert (reference["backend"], got["backend"]) == ("torch", backend)
    assert got["n"] == reference["n"] and got["roc_auc"] == pytest.approx(reference["roc_auc"], abs=1e-4)
    ref_rows, rows = _csv_rows(tmp_path / "torch" / "predictions.csv"), _csv_rows(tmp_path / backend / "predictions.csv")
    assert rows.keys() == ref_rows.keys()
    for path, row in rows.items():
        assert float(row["p_pneumonia"]) == pytest.approx(float(ref_rows[path]["p_pneumonia"]), abs=2e-6)
        assert float(row["ood_score"]) == pytest.approx(float(ref_rows[path]["ood_score"]), rel=1e-3, abs=2e-4)
    explained = {r["path"]: r for r in explain_paths(checkpoint, paths[:9], tmp_path / "maps", device="cpu", backend=backend)}
    predictor = Predictor(checkpoint, device="cpu", backend=backend)
    for path in paths[:9]:
        record = predictor.predict_file(path)
        if record.error:
            assert explained[path]["error"] == record.error and explained[path]["heatmap"] == ""
        else:
            assert float(explained[path]["p_pneumonia"]) == pytest.approx(record.probability, abs=1e-6)
            assert float(explained[path]["ood_score"]) == pytest.approx(record.ood_score, abs=1e-4)  # 4 decimals
            assert (tmp_path / "maps" / explained[path]["heatmap"]).is_file()
