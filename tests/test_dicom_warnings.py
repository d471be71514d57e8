"""What a DICOM header says the model was not trained for reaches every output: predict's CSV, the API's
JSON, the web page, explain's CSV; a pediatric frontal chest radiograph and a PNG get no warning."""

from __future__ import annotations

import csv
import io
import warnings

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pneumoscan.io.dicom import acquisition_warnings  # noqa: E402
from pneumoscan.io.images import load_grey_with_info  # noqa: E402

from .conftest import synthetic_xray  # noqa: E402
from .test_dicom import make_dicom  # noqa: E402

PIXELS = synthetic_xray(np.random.default_rng(3), 1, 64).astype(np.uint16) * 16  # 12-bit values
PEDIATRIC_PA = dict(Modality="CR", ViewPosition="PA", BodyPartExamined="CHEST", PatientAge="003Y",
                    PixelSpacing=[3.0, 3.0], BitsStored=12, HighBit=11)  # 64 px x 3 mm: a child's 19 cm chest

# file name -> (header values over the pediatric PA ones, what its one warning must quote)
CASES = {
    "lateral.dcm": (dict(ViewPosition="LL"), "ViewPosition LL: a lateral view"),
    "abdomen.dcm": (dict(BodyPartExamined="ABDOMEN"), "BodyPartExamined ABDOMEN: not a chest"),
    "ct.dcm": (dict(Modality="CT"), "Modality CT: not a radiograph"),
    "adult-age.dcm": (dict(PatientAge="034Y"), "PatientAge 034Y: an adult of 34 years"),
    "adult-born.dcm": (dict(PatientAge="", PatientBirthDate="19700101", StudyDate="20200315"),
                       "PatientBirthDate 19700101 and StudyDate 20200315: an adult of 50 years"),
}


def _dicom(**header) -> bytes:
    return make_dicom(PIXELS, **{**PEDIATRIC_PA, **header})


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_xray(np.random.default_rng(4), 0, 64)).save(buf, format="PNG")
    return buf.getvalue()


def _files() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, the expected warning or None for none)."""
    files = {name: (_dicom(**header), expected) for name, (header, expected) in CASES.items()}
    files["pediatric-pa.dcm"] = (_dicom(), None)
    files["plain.png"] = (_png(), None)
    return files


def _check(name: str, found: list[str], expected: str | None) -> None:
    if expected is None:
        assert found == [], (name, found)
    else:
        assert len(found) == 1 and found[0].startswith(expected), (name, found)


@pytest.mark.parametrize("name", [*CASES, "pediatric-pa.dcm", "plain.png"])
def test_the_loader_gives_the_headers_warnings_with_the_pixels(name):
    data, expected = _files()[name]
    image = load_grey_with_info(data, name=name)
    assert image.grey.shape == (64, 64)
    _check(name, image.warnings, expected)


@pytest.mark.parametrize("header, expected", [
    (dict(ViewPosition="RL"), "ViewPosition RL"),
    (dict(ViewPosition="LATERAL"), "ViewPosition LATERAL"),
    (dict(PatientAge="018Y"), "PatientAge 018Y: an adult of 18 years"),
    (dict(PatientAge="240M"), "PatientAge 240M: an adult of 20 years"),
    (dict(PatientAge="4 years"), "PatientAge '4 years' cannot be read as an age"),
    (dict(PatientAge="4;Y"), "PatientAge '4,Y' cannot be read"),  # no ";" inside a warning
    (dict(PatientAge="", PatientBirthDate="20000229", StudyDate="20180228"), None),  # a day short of 18
    (dict(PatientAge="", PatientBirthDate="20000229", AcquisitionDate="20180301"),
     "PatientBirthDate 20000229 and AcquisitionDate 20180301: an adult of 18 years"),
    (dict(PatientAge="", PatientBirthDate="1970-01-01", StudyDate="20200101"), "PatientBirthDate '1970-01-01'"),
    (dict(PhotometricInterpretation="RGB"), "PhotometricInterpretation RGB: a colour image"),
    (dict(BitsStored=4, HighBit=3), "BitsStored 4"),
    (dict(PixelSpacing=[0.1, 0.1]), "PixelSpacing 0.1\\0.1 mm over 64x64 pixels gives a field of view of 0.6 x 0.6 cm"),
    (dict(PixelSpacing=None, ImagerPixelSpacing=[10, 10]), "ImagerPixelSpacing 10\\10 mm"),
    (dict(Modality="DX", PatientAge="017Y", ViewPosition="AP", BodyPartExamined="THORAX"), None),
    (dict(Modality="", ViewPosition="", BodyPartExamined="", PatientAge="", PixelSpacing=None), None),
])
def test_each_header_check(header, expected):
    ds = pydicom.dcmread(io.BytesIO(_dicom()))
    for keyword, value in header.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    _check(str(header), acquisition_warnings(ds), expected)


def test_a_malformed_header_never_raises_and_says_what_it_could_not_check():
    ds = pydicom.dcmread(io.BytesIO(_dicom()))
    ds.BitsStored = 12
    ds["BitsStored"].value = b"\xff\xfe"  # not a number
    found = acquisition_warnings(ds)
    assert len(found) == 1 and "bits could not be checked" in found[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("warned")
    for name, (data, _) in _files().items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model trained for one epoch on generated images (Grad-CAM needs MONAI)."""
    pytest.importorskip("monai")
    from pneumoscan.tasks.train import train

    from .conftest import make_dataset
    from .test_train_checkpoint import tiny_config

    root = tmp_path_factory.mktemp("model")
    train(tiny_config(make_dataset(root / "data"), epochs=1), root / "run", device="cpu", progress=False)
    return root / "run" / "best.pt"


def test_predict_csv_has_each_files_warnings(checkpoint, folder, tmp_path):
    from pneumoscan.apps.cli import main

    out = tmp_path / "p.csv"
    assert main(["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == set(_files())
    for name, (_, expected) in _files().items():
        assert rows[name]["p_pneumonia"] != ""
        _check(name, rows[name]["warnings"].split("; ") if rows[name]["warnings"] else [], expected)


def test_explain_csv_has_each_files_warnings(checkpoint, folder, tmp_path):
    from pneumoscan.tasks.explain import explain_paths

    rows = {r["path"].rsplit("/", 1)[-1]: r for r in explain_paths(checkpoint, [str(folder)], tmp_path, device="cpu")}
    written = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader((tmp_path / "explanations.csv").open())}
    for name, (_, expected) in _files().items():
        assert written[name]["warnings"] == rows[name]["warnings"]
        _check(name, rows[name]["warnings"].split("; ") if rows[name]["warnings"] else [], expected)


def test_every_per_image_csv_carries_the_columns_predict_writes(checkpoint, folder, tmp_path):
    """One record, one column set: evaluate's predictions.csv adds `true_label`, explain's CSV the heatmap file,
    and neither lacks a column of predict's."""
    from pneumoscan.apps.cli import main

    def header(path):
        with open(path, newline="") as f:
            return next(csv.reader(f))

    assert main(["predict", str(checkpoint), str(folder), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    assert main(["explain", str(checkpoint), str(folder), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 0
    assert main(["evaluate", str(checkpoint), "--split", "val", "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    predicted = header(tmp_path / "p.csv")
    explained, evaluated = header(tmp_path / "x" / "explanations.csv"), header(tmp_path / "e" / "predictions.csv")
    assert "p_pneumonia" in predicted and "prevalence_source" in predicted and "threshold" in predicted
    assert set(predicted) <= set(explained) and set(explained) - set(predicted) == {"heatmap"}, explained
    assert set(predicted) <= set(evaluated) and "true_label" in evaluated, evaluated


def test_api_json_has_each_files_warnings(checkpoint):
    from fastapi.testclient import TestClient

    from pneumoscan.apps.serve import create_app

    files = _files()
    client = TestClient(create_app(checkpoint))
    results = client.post("/api/predict", files=[("files", (n, d, "application/octet-stream")) for n, (d, _) in
                                                  files.items()]).json()["results"]
    assert [r["filename"] for r in results] == list(files)
    for r, (name, (_, expected)) in zip(results, files.items()):
        assert r["error"] is None and r["p_pneumonia"] is not None
        _check(name, r["warnings"], expected)
    schema = client.get("/openapi.json").json()["components"]["schemas"]["FileResult"]["properties"]["warnings"]
    assert schema["type"] == "array" and schema["items"] == {"type": "string"}


def test_page_shows_each_files_warnings_beside_its_result(checkpoint, folder):
    import shutil

    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    from pneumoscan.apps.serve import create_app

    from .test_serve import live
    from .test_serve_browser import watched_page

    files = _files()
    with live(create_app(checkpoint)) as url, watched_page(url) as page:
        page.goto(url)
        page.set_input_files("#files", [str(folder / name) for name in files])
        page.wait_for_selector(f".card >> nth={len(files) - 1}", timeout=30_000)
        cards = {c.get_attribute("data-filename"): c for c in page.query_selector_all(".card")}
        shown = {name: [n.inner_text() for n in card.query_selector_all(".note")] for name, card in cards.items()}
        texts = {name: card.inner_text() for name, card in cards.items()}
        visible = all(n.is_visible() for card in cards.values() for n in card.query_selector_all(".note"))
    assert visible
    for name, (_, expected) in files.items():
        assert "probability of pneumonia" in texts[name]
        _check(name, [w.removeprefix("Warning: ") for w in shown[name]], expected)


def test_a_hostile_header_value_is_quoted_short_and_on_one_line():
    ds = pydicom.dcmread(io.BytesIO(_dicom()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's complaint about the value's length is the point
        ds.BodyPartExamined = "ABDOMEN\r\n" + "X" * 10_000
    found = acquisition_warnings(ds)
    assert len(found) == 1 and found[0].startswith("BodyPartExamined ABDOMEN XXX") and len(found[0]) < 200
    assert "\n" not in found[0] and "\r" not in found[0]
