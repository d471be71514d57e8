"""The DICOM node against a real PACS: Orthanc on loopback sends it a JPEG-LS radiograph made by DCMTK from a
real image of the data set, and the Structured Report comes back into Orthanc's study with the probability
`pneumoscan predict` gives; C-ECHO both ways; objects the node cannot score get a failure status."""

from __future__ import annotations

import csv
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import real_train_folder
from .pacs import ORTHANC, PACS_AET, Orthanc, free_port, make_radiograph  # noqa: F401  (the benchmark imports them here)

# DCMTK's tools by their full path: pynetdicom installs Python scripts of the same names into the virtualenv
STORESCU, ECHOSCU = "/usr/bin/storescu", "/usr/bin/echoscu"
NODE_AET = "PNEUMOSCAN"


class NodeProcess:
    """`pneumoscan dicom-node` as a subprocess; its output lines are collected as they come."""

    def __init__(self, args: list[str], cache: Path):
        env = {**os.environ, "PNEUMOSCAN_CACHE": str(cache)}
        self.proc = subprocess.Popen([sys.executable, "-m", "pneumoscan", "dicom-node", *args], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise RuntimeError(f"the node never printed {text!r}:\n{''.join(self.output)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def associate(port: int, *syntaxes: str):
    """An association from a test SCU to the node on `port`: a DX (for presentation) context for each of
    `syntaxes`, and Verification."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

    ae = AE(ae_title="TESTSCU")
    for syntax in syntaxes:  # one context each
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, syntax)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET)


def node_port(node) -> int:
    """The port the node subprocess of the `pacs_and_node` fixture listens on."""
    return int(node.proc.args[node.proc.args.index("--port") + 1])


def results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- fixtures ---------------------------------------------------------------------------------------------

needs_servers = pytest.mark.skipif(not ORTHANC.exists() or not shutil.which("img2dcm"),
                                   reason="needs Orthanc (/usr/sbin/Orthanc) and DCMTK (img2dcm), as .ci/run installs")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ResNet-18 after one epoch: unlike the paper's network at this size, its probability and its
    Grad-CAM map depend on the image, so a report carrying another image's probability would show."""
    pytest.importorskip("monai")
    from pneumoscan.tasks.predict import Predictor
    from pneumoscan.tasks.train import train

    from .conftest import make_dataset
    from .test_train_checkpoint import tiny_config

    root = tmp_path_factory.mktemp("dicom-node")
    cfg = tiny_config(make_dataset(root / "data"), epochs=1).override("model", name="resnet18")
    train(cfg, root / "run", device="cpu", progress=False)
    probs = Predictor(root / "run" / "best.pt", device="cpu").predict_arrays(
        np.stack([np.full((48, 48), 40, np.uint8), np.full((48, 48), 200, np.uint8)]))
    assert abs(probs[0] - probs[1]) > 1e-3, probs
    return root / "run" / "best.pt"


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory) -> Path:
    jpeg = sorted((real_train_folder() / "PNEUMONIA").iterdir())[0]
    return make_radiograph(jpeg, tmp_path_factory.mktemp("radiograph") / "chest.dcm")


@pytest.fixture(scope="module")
def pacs_and_node(checkpoint, tmp_path_factory):
    """Orthanc with the node registered as modality 'pneumoscan', and the node sending reports to Orthanc."""
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    pytest.importorskip("httpx")
    folder = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    pacs = Orthanc(folder / "orthanc", {"pneumoscan": (NODE_AET, "127.0.0.1", node_port)})
    node = None
    try:
        node = NodeProcess([str(checkpoint), "--out", str(folder / "node"), "--port", str(node_port),
                            "--ae-title", NODE_AET, "--send-to", f"{PACS_AET}@127.0.0.1:{pacs.dicom_port}",
                            "--max-instance-mb", "1"], folder / "cache")
        node.wait_for("listening on")
        yield pacs, node, folder / "node"
    finally:
        if node is not None:
            node.stop()
        pacs.stop()


# --- tests ------------------------------------------------------------------------------------------------

@needs_servers
def test_c_echo_both_ways(pacs_and_node):
    pacs, node, _ = pacs_and_node
    assert "C-ECHO to ORTHANC@127.0.0.1" in node.wait_for("C-ECHO to") and "status 0x0000" in "".join(node.output)
    assert pacs.http.post("/modalities/pneumoscan/echo", json={}).status_code == 200
    echo = subprocess.run([ECHOSCU, "-aet", NODE_AET, "-aec", PACS_AET, "127.0.0.1", str(pacs.dicom_port)],
                          capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr


@needs_servers
def test_a_radiograph_from_the_pacs_comes_back_as_a_structured_report(pacs_and_node, radiograph, checkpoint, tmp_path):
    import pydicom

    from pneumoscan.apps.cli import main
    from pneumoscan.io.dicom_sr import RESEARCH_USE, read_report

    pacs, node, out = pacs_and_node
    source = pydicom.dcmread(radiograph, stop_before_pixels=True)
    assert source.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    uploaded = pacs.upload(radiograph.read_bytes())
    r = pacs.store("pneumoscan", [uploaded["ID"]])
    assert r.status_code == 200, r.text
    [sr_instance] = pacs.wait_for_modality(uploaded["ParentStudy"], "SR", 1, timeout=60)
    sr = pydicom.dcmread(__import__("io").BytesIO(pacs.http.get(f"/instances/{sr_instance['ID']}/file").content))
    report = read_report(sr)

    assert main(["predict", str(checkpoint), str(radiograph), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        [predicted] = list(csv.DictReader(f))
    assert report["probability"] == pytest.approx(float(predicted["p_pneumonia"]), abs=5e-7)  # the CSV's 6 decimals
    assert report["finding"] == ("233604007" if predicted["label"] == "PNEUMONIA" else "17621005")
    assert report["threshold"] == pytest.approx(float(predicted["threshold"]), abs=5e-7)
    assert report["source"] == (source.SOPClassUID, source.SOPInstanceUID)
    assert (sr.StudyInstanceUID, sr.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert RESEARCH_USE in report["texts"] and any(t.startswith("pneumoscan ") for t in report["texts"])

    rows = {r["event"]: r for r in results(out) if r["sop_instance_uid"] == source.SOPInstanceUID}
    assert rows["scored"]["status"] == "0x0000" and rows["scored"]["calling_ae"] == PACS_AET
    assert float(rows["scored"]["p_pneumonia"]) == pytest.approx(float(predicted["p_pneumonia"]), abs=1e-6)
    assert rows["scored"]["study_instance_uid"] == source.StudyInstanceUID
    assert (out / rows["scored"]["file"]).read_bytes()[128:132] == b"DICM"
    assert rows["sr-sent"]["sent_sop_instance_uid"] == sr.SOPInstanceUID


@needs_servers
def test_what_the_node_cannot_score_gets_a_failure_status_and_the_node_stays_up(pacs_and_node, radiograph):
    """An SR through Orthanc (0xA900), undecodable pixels (0xC000) and an instance over the 1 MiB limit (0xA700)
    straight from a pynetdicom client; each is a row of results.csv with its reason, and the node answers on."""
    import pydicom
    from pydicom.encaps import encapsulate

    from pneumoscan.io.dicom_sr import ModelInfo, Score, structured_report

    pacs, node, out = pacs_and_node
    dx = pydicom.dcmread(radiograph)
    sr = structured_report(dx, Score(0.5, True, "PNEUMONIA", 0.5), ModelInfo("m", "0", "r", "c"))
    sr_uploaded = pacs.upload(_part10(sr))
    assert pacs.store("pneumoscan", [sr_uploaded["ID"]]).status_code != 200  # Orthanc's job fails

    garbled = pydicom.dcmread(radiograph)
    garbled.SOPInstanceUID = pydicom.uid.generate_uid()
    garbled.PixelData = encapsulate([b"\xff\xd8" + bytes(1000)])  # a stream that ends after its first marker
    big = pydicom.dcmread(radiograph)
    big.SOPInstanceUID = pydicom.uid.generate_uid()
    big.decompress()
    big.Rows, big.Columns = 1024, 1024
    big.PixelData = np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8).tobytes()
    assoc = associate(node_port(node), pydicom.uid.JPEGLSLossless, pydicom.uid.ExplicitVRLittleEndian)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(garbled).Status == 0xC000
        assert assoc.send_c_store(big).Status == 0xA700
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()

    rows = {r["sop_instance_uid"]: r for r in results(out) if r["event"] == "rejected"}
    assert rows[sr.SOPInstanceUID]["status"] == "0xA900" and "not a radiograph" in rows[sr.SOPInstanceUID]["error"]
    assert rows[garbled.SOPInstanceUID]["status"] == "0xC000" and "pixel data" in rows[garbled.SOPInstanceUID]["error"]
    assert rows[big.SOPInstanceUID]["status"] == "0xA700" and "limit" in rows[big.SOPInstanceUID]["error"]
    assert node.proc.poll() is None
    assert pacs.http.post("/modalities/pneumoscan/echo", json={}).status_code == 200


@needs_servers
def test_a_header_warning_is_recorded_once(pacs_and_node, radiograph):
    """A lateral view stored straight to the node is scored, with the header's warning in its row once."""
    import pydicom

    _, node, out = pacs_and_node
    lateral = pydicom.dcmread(radiograph)
    lateral.SOPInstanceUID = pydicom.uid.generate_uid()
    lateral.ViewPosition = "LL"
    assoc = associate(node_port(node), pydicom.uid.JPEGLSLossless)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(lateral).Status == 0x0000
    finally:
        assoc.release()
    row = next(r for r in results(out) if r["event"] == "scored" and r["sop_instance_uid"] == lateral.SOPInstanceUID)
    assert row["warnings"].count("lateral view") == 1


@needs_servers
def test_the_grad_cam_overlay_comes_back_as_a_secondary_capture(pacs_and_node, checkpoint, radiograph, tmp_path):
    """An in-process node with secondary capture on, sending to the same Orthanc: the report and the overlay
    arrive in the source's study, the overlay referring to its source image and carrying the same probability."""
    import io

    import pydicom

    from pneumoscan.apps.dicom_node import DicomNode, Destination, NodeSettings
    from pneumoscan.io.dicom_sr import read_report
    from pneumoscan.tasks.predict import Predictor

    pacs, _, _ = pacs_and_node
    source = pydicom.dcmread(radiograph)
    source.StudyInstanceUID, source.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    settings = NodeSettings(out=tmp_path / "node", port=free_port(), secondary_capture=True,
                            send_to=Destination(PACS_AET, "127.0.0.1", pacs.dicom_port))
    node = DicomNode(Predictor(checkpoint, device="cpu"), settings)
    node.start()
    try:
        assoc = associate(node.port, pydicom.uid.JPEGLSLossless)
        try:
            assert assoc.send_c_store(source).Status == 0x0000
        finally:
            assoc.release()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = pacs.http.post("/tools/lookup", content=source.StudyInstanceUID).json()
            if found and len(pacs.study_instances(found[0]["ID"])) >= 2:
                break
            time.sleep(0.2)
    finally:
        node.stop()
    objects = {ds.SOPClassUID: ds for ds in (
        pydicom.dcmread(io.BytesIO(pacs.http.get(f"/instances/{i['ID']}/file").content))
        for i in pacs.study_instances(found[0]["ID"]))}
    sr, sc = objects[pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.88.33")], objects[pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.7")]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.Rows, sc.Columns) == ("RGB", 3, source.Rows, source.Columns)
    assert sc.pixel_array.std(axis=2).max() > 0  # colour: the heatmap is drawn
    [scored] = [r for r in results(tmp_path / "node") if r["event"] == "scored"]
    assert read_report(sr)["probability"] == pytest.approx(float(scored["p_pneumonia"]), abs=5e-7)


@needs_servers
def test_the_lua_routing_script_of_the_docs_sends_radiographs_and_not_reports(checkpoint, radiograph, tmp_path):
    """Orthanc running docs/dicom.md's Lua script: an uploaded DX goes to the node by itself, and the report
    that comes back is not routed again."""
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    import re

    from pneumoscan.apps.dicom_node import DicomNode, Destination, NodeSettings
    from pneumoscan.tasks.predict import Predictor

    docs = (Path(__file__).resolve().parents[1] / "docs" / "dicom.md").read_text()
    [script] = [b for b in re.findall(r"```lua\n(.*?)```", docs, re.S) if "OnStoredInstance" in b]
    (tmp_path / "route.lua").write_text(script)
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", {"pneumoscan": (NODE_AET, "127.0.0.1", node_port)},
                   extra={"LuaScripts": [str(tmp_path / "route.lua")]})
    node = None
    try:
        node = DicomNode(Predictor(checkpoint, device="cpu"),
                         NodeSettings(out=tmp_path / "node", port=node_port,
                                      send_to=Destination(PACS_AET, "127.0.0.1", pacs.dicom_port)))
        node.start()
        uploaded = pacs.upload(radiograph.read_bytes())
        pacs.wait_for_modality(uploaded["ParentStudy"], "SR", 1, timeout=60)
        time.sleep(1)  # a routed report would reach the node within this
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
    assert [r["event"] for r in results(tmp_path / "node")] == ["scored", "sr-sent"]


def _part10(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- the node in-process: what needs no PACS ------------------------------------------------------------

def test_send_to_is_parsed_or_refused_with_the_form_it_needs():
    from pneumoscan.apps.dicom_node import Destination

    assert Destination.parse("ORTHANC@pacs.example:4242") == Destination("ORTHANC", "pacs.example", 4242)
    for bad in ("ORTHANC", "ORTHANC@host", "@host:104", "A_TITLE_LONGER_THAN_16@h:104", "PACS@h:0", "PACS@h:70000",
                "PÄCS@h:104", "PA\\CS@h:104", "   @h:104"):
        with pytest.raises(ValueError, match="AE@HOST:PORT"):
            Destination.parse(bad)


def test_limits_below_one_are_refused_before_the_model_is_loaded(tmp_path, capsys):
    from pneumoscan.apps.cli import main

    assert main(["dicom-node", str(tmp_path / "missing.pt"), "--out", str(tmp_path), "--max-associations", "0"]) == 2
    assert "--max-associations" in capsys.readouterr().err


def test_the_results_file_ends_a_torn_row_before_the_next(tmp_path):
    from pneumoscan.apps.dicom_node import COLUMNS, ResultLog

    ResultLog(tmp_path / "results.csv").write(event="scored", sop_instance_uid="1.2.3", error="line one\nline two")
    with open(tmp_path / "results.csv", "a") as f:
        f.write("2026-01-01T00:00:00,scored,0x0000,1.2.4")  # a crash in the middle of a row
    ResultLog(tmp_path / "results.csv").write(event="rejected", sop_instance_uid="1.2.5")
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 4
    rows = results(tmp_path)
    assert [r["sop_instance_uid"] for r in rows] == ["1.2.3", "1.2.4", "1.2.5"]
    assert rows[0]["error"] == "line one line two" and rows[2]["event"] == "rejected"


def test_reports_that_cannot_be_delivered_are_retried_then_recorded_and_the_node_answers_on(checkpoint, radiograph,
                                                                                             tmp_path):
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    import pydicom

    from pneumoscan.apps.dicom_node import DicomNode, Destination, NodeSettings
    from pneumoscan.tasks.predict import Predictor

    nobody = Destination("NOBODY", "127.0.0.1", free_port())  # nothing listens there
    settings = NodeSettings(out=tmp_path / "node", port=free_port(), send_to=nobody, send_attempts=2, retry_wait_s=0.05,
                            keep_instances=False)
    node = DicomNode(Predictor(checkpoint, device="cpu"), settings)
    node.start()
    try:
        assoc = associate(node.port, pydicom.uid.JPEGLSLossless)
        try:
            assert assoc.send_c_store(pydicom.dcmread(radiograph)).Status == 0x0000
            deadline = time.monotonic() + 30
            while not any(r["event"] == "sr-failed" for r in results(tmp_path / "node")) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
    finally:
        node.stop()
    [scored, failed] = results(tmp_path / "node")
    assert scored["event"] == "scored" and failed["event"] == "sr-failed"
    assert failed["error"] == f"no association with {nobody} (after 2 attempts)"
    assert scored["file"] == "" and not (tmp_path / "node" / "instances").exists()  # keep_instances=False


def test_associations_over_the_limit_are_refused_until_one_ends(checkpoint, tmp_path):
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from pneumoscan.apps.dicom_node import DicomNode, NodeSettings
    from pneumoscan.tasks.predict import Predictor

    node = DicomNode(Predictor(checkpoint, device="cpu"), NodeSettings(out=tmp_path, port=free_port(), max_associations=1))
    node.start()
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert first.is_established
        second = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert second.is_rejected and not second.is_established
        assert first.send_c_echo().Status == 0x0000
        first.release()
        deadline = time.monotonic() + 10
        while True:
            third = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
            if third.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert third.is_established
        third.release()
    finally:
        node.stop()


def test_a_c_echo_is_answered_while_a_large_instance_is_being_stored(checkpoint, radiograph, tmp_path):
    """A 25-megapixel 16-bit DX (50 MB) takes seconds to receive, decode and score; a C-ECHO on another
    association meanwhile is answered at once."""
    pytest.importorskip("pynetdicom")
    import pydicom

    from pneumoscan.apps.dicom_node import DicomNode, NodeSettings
    from pneumoscan.tasks.predict import Predictor

    big = pydicom.dcmread(radiograph)
    big.decompress()
    big.Rows = big.Columns = 5000
    big.BitsAllocated, big.BitsStored, big.HighBit = 16, 12, 11
    big.PixelData = np.random.default_rng(0).integers(0, 4096, (5000, 5000), dtype=np.uint16).tobytes()
    node = DicomNode(Predictor(checkpoint, device="cpu"),
                     NodeSettings(out=tmp_path, port=free_port(), max_instance_mb=100, keep_instances=False))
    node.start()
    try:
        store = associate(node.port, pydicom.uid.ExplicitVRLittleEndian)
        status = {}
        sending = threading.Thread(target=lambda: status.update(s=store.send_c_store(big).Status))
        sending.start()
        time.sleep(0.3)
        started = time.perf_counter()
        echo = associate(node.port)
        assert echo.send_c_echo().Status == 0x0000
        echo.release()
        echoed_s = time.perf_counter() - started
        assert sending.is_alive(), "the large instance was stored before the echo: nothing was measured"
        sending.join(120)
        store.release()
    finally:
        node.stop()
    assert status["s"] == 0x0000 and [r["event"] for r in results(tmp_path)] == ["scored"]
    assert echoed_s < 1.0, f"the C-ECHO took {echoed_s:.2f} s while an instance was being stored"


# --- reports of de-identified headers, and the node's console ---------------------------------------------

# a radiograph's patient and study attributes; de-identification removes or empties them
IDENTIFIED = dict(PatientName="Test^Chest", PatientID="P-1", PatientBirthDate="20200101", PatientSex="F",
                  PatientAge="004Y", StudyDate="20240102", StudyTime="101500", ReferringPhysicianName="Ref^Doc",
                  AccessionNumber="A1", StudyID="S1", SeriesNumber="3", InstanceNumber="1", PatientOrientation="L\\F",
                  Manufacturer="X-ray maker", InstitutionName="Hospital", SpecificCharacterSet="ISO_IR 100")
UNREADABLE = dict(PatientSex="U", PatientBirthDate="1970-01-01", StudyDate="yesterday", StudyTime="12:00")


def _source(how: str = "identified"):
    """A DX header (no pixel data) whose patient and study attributes are given, absent, empty or (some) unreadable
    to highdicom."""
    import warnings

    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "DX"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    for keyword, value in IDENTIFIED.items():
        setattr(ds, keyword, value)
    for keyword in IDENTIFIED:
        if how == "absent":
            delattr(ds, keyword)
        elif how == "empty" and keyword != "SpecificCharacterSet":
            setattr(ds, keyword, None)
    if how == "unreadable":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's complaint about each value is the point
            for keyword, value in UNREADABLE.items():
                setattr(ds, keyword, value)
    return ds


def _round_trip(ds):
    import io

    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("how", ["absent", "empty", "unreadable"])
def test_report_and_overlay_are_built_from_a_header_without_patient_and_study_attributes(how):
    pytest.importorskip("highdicom")
    from pneumoscan.io.dicom_sr import TYPE2_ATTRIBUTES, ModelInfo, Score, read_report, secondary_capture, structured_report

    source = _source(how)
    before = {k: source.get(k) for k in IDENTIFIED}
    rgb = np.random.default_rng(0).integers(0, 256, (24, 16, 3), dtype=np.uint8)
    sr = _round_trip(structured_report(source, Score(0.75, True, "PNEUMONIA", 0.5), ModelInfo("m", "0", "paper", "b.pt")))
    sc = _round_trip(secondary_capture(source, rgb))
    assert {k: source.get(k) for k in IDENTIFIED} == before  # the source is not changed
    empty = set(UNREADABLE) if how == "unreadable" else set(TYPE2_ATTRIBUTES)
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        for keyword in TYPE2_ATTRIBUTES:  # present, as Type 2 requires; empty where unknown: nothing is made up
            expected = "" if keyword in empty else IDENTIFIED[keyword]
            assert keyword in ds and str(ds[keyword].value or "") == expected, (ds.Modality, keyword, ds[keyword].value)
    report = read_report(sr)
    assert report["probability"] == 0.75 and report["source"] == (source.SOPClassUID, source.SOPInstanceUID)
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == source.StudyInstanceUID
    assert np.array_equal(sc.pixel_array, rgb)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_the_node_logs_each_report_stored_and_each_not_stored(tmp_path, caplog):
    """One INFO line for a report stored (source, destination, statuses), one WARNING for each that is not, with
    why: a header highdicom cannot build from, and a destination that does not answer."""
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    import logging
    from types import SimpleNamespace

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage

    from pneumoscan.apps.dicom_node import DicomNode, Destination, ResultLog, Sender
    from pneumoscan.io.dicom_sr import ModelInfo, Score

    stored: list[str] = []
    pacs = AE(ae_title="STORESCP")
    for sop in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        pacs.add_supported_context(sop)
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda e: stored.append(e.request.AffectedSOPInstanceUID) or 0)])
    node = SimpleNamespace(settings=SimpleNamespace(ae_title="PNEUMOSCAN", secondary_capture=True),
                           model=ModelInfo("m", "0", "paper", "b.pt"), results=ResultLog(tmp_path / "results.csv"))
    node.build_objects = lambda job: DicomNode.build_objects(node, job)

    def job(source):
        return {"source": source, "score": Score(0.75, True, "PNEUMONIA", 0.5), "heat": np.full((4, 4), 0.5),
                "shown": np.full((32, 32), 100, np.uint8), "fields": {"sop_instance_uid": source.SOPInstanceUID}}

    good, unbuildable, undelivered = _source("absent"), _source("absent"), _source("absent")
    del unbuildable.StudyInstanceUID  # Type 1: no study to put the report in
    pacs_at, nobody = Destination("STORESCP", "127.0.0.1", port), Destination("NOBODY", "127.0.0.1", free_port())
    caplog.set_level(logging.INFO, logger="pneumoscan.apps.dicom_node")
    try:
        for destination, sources in ((pacs_at, [good, unbuildable]), (nobody, [undelivered])):
            sender = Sender(node, destination, attempts=1, retry_wait_s=0)
            for source in sources:
                sender.submit(job(source))
            sender.stop()
    finally:
        server.shutdown()
    lines = {(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pneumoscan.apps.dicom_node"}
    [(level, sent)] = [line for line in lines if good.SOPInstanceUID in line[1]]
    assert level == "INFO" and f"stored at {pacs_at}" in sent and len(stored) == 2
    assert all(f"{uid} status 0x0000" in sent for uid in stored)
    [(level, failed)] = [line for line in lines if unbuildable.SOPInstanceUID in line[1]]
    assert level == "WARNING" and f"not stored at {pacs_at}: cannot build the report" in failed
    [(level, failed)] = [line for line in lines if undelivered.SOPInstanceUID in line[1]]
    assert level == "WARNING" and failed.endswith(f"not stored at {nobody}: no association with {nobody} (after 1 attempts)")
    events = {r["sop_instance_uid"]: r["event"] for r in results(tmp_path)}
    assert events == {good.SOPInstanceUID: "sr-sent", unbuildable.SOPInstanceUID: "sr-failed",
                      undelivered.SOPInstanceUID: "sr-failed"}


# --- who may associate: the called AE title, and --allow-calling -----------------------------------------

needs_dcmtk = pytest.mark.skipif(not (Path(STORESCU).exists() and Path(ECHOSCU).exists()),
                                 reason=f"needs DCMTK ({STORESCU}, {ECHOSCU}), as .ci/run installs")


def dcmtk(tool: str, calling: str, called: str, port: int, *files: Path) -> subprocess.CompletedProcess:
    """A DCMTK SCU (echoscu or storescu) run against the node on loopback; storescu proposes JPEG-LS lossless,
    the radiograph's transfer syntax."""
    options = ["-xt"] if tool == STORESCU else []
    return subprocess.run([tool, *options, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def start_node(checkpoint, tmp_path):
    """Starts an in-process node (no destination) with the given settings; stops it after the test."""
    pytest.importorskip("pynetdicom")
    from pneumoscan.apps.dicom_node import DicomNode, NodeSettings
    from pneumoscan.tasks.predict import Predictor

    nodes = []

    def start(**settings):
        settings = NodeSettings(out=tmp_path / "node", port=free_port(), **settings)
        node = DicomNode(Predictor(checkpoint, device="cpu"), settings)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@needs_dcmtk
def test_a_wrong_called_ae_title_is_refused_recorded_and_nothing_is_scored(start_node, radiograph, tmp_path):
    node = start_node()
    wrong = dcmtk(STORESCU, "MODALITY", "WRONGAE", node.port, radiograph)
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr + wrong.stdout, wrong
    [refused] = results(tmp_path / "node")
    assert refused["event"] == "refused" and refused["calling_ae"] == "MODALITY"
    assert refused["error"] == "association from 127.0.0.1 called 'WRONGAE', not this node's AE title 'PNEUMOSCAN'"
    assert not (tmp_path / "node" / "instances").exists()

    right = dcmtk(STORESCU, "MODALITY", NODE_AET, node.port, radiograph)  # the same sender, the node's title
    assert right.returncode == 0, right
    assert [r["event"] for r in results(tmp_path / "node")] == ["refused", "scored"]


@needs_dcmtk
def test_only_the_allowed_calling_ae_titles_from_their_hosts_are_accepted(start_node, tmp_path):
    """MODALITY is allowed from 127.0.0.2 only: from there it is accepted; from 127.0.0.1 (DCMTK), or another
    title from 127.0.0.2, is refused with 'calling AE title not recognised', each with its row."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from pneumoscan.apps.dicom_settings import CallingPeer

    node = start_node(allow_calling=(CallingPeer.parse("MODALITY@127.0.0.2"), CallingPeer.parse("WORKSTATION@localhost")))

    def associate_from(address: str, title: str):
        ae = AE(ae_title=title)
        ae.add_requested_context(Verification)
        return ae.associate("127.0.0.1", node.port, ae_title=NODE_AET, bind_address=(address, 0))

    allowed = associate_from("127.0.0.2", "MODALITY")
    assert allowed.is_established and allowed.send_c_echo().Status == 0x0000
    allowed.release()
    other_title = associate_from("127.0.0.2", "OTHER")
    assert other_title.is_rejected and other_title.acceptor.primitive.diagnostic == 0x03
    other_host = dcmtk(ECHOSCU, "MODALITY", NODE_AET, node.port)
    assert other_host.returncode != 0 and "Calling AE Title Not Recognized" in other_host.stderr + other_host.stdout
    by_name = dcmtk(ECHOSCU, "WORKSTATION", NODE_AET, node.port)  # localhost, looked up at start
    assert by_name.returncode == 0, by_name

    rows = results(tmp_path / "node")
    assert [(r["event"], r["calling_ae"]) for r in rows] == [("refused", "OTHER"), ("refused", "MODALITY")]
    assert rows[0]["error"].startswith("association from 127.0.0.2 with calling AE title 'OTHER', which --allow-calling")
    assert rows[1]["error"] == ("association from 127.0.0.1 with calling AE title 'MODALITY', which --allow-calling "
                                "does not allow (MODALITY@127.0.0.2, WORKSTATION@localhost)")


def test_allow_calling_is_parsed_or_refused_on_the_command_line_before_the_model_is_loaded(tmp_path, capsys):
    from pneumoscan.apps.cli import main
    from pneumoscan.apps.dicom_settings import CallingPeer

    peer = CallingPeer.parse(" PACS@[::1] ")
    assert (peer.ae_title, peer.host, str(peer)) == ("PACS", "::1", "PACS@::1")
    assert peer.allows("PACS  ", "::1") and not peer.allows("PACS", "127.0.0.1") and not peer.allows("pacs", "::1")
    assert CallingPeer.parse("PACS@127.0.0.1").allows("PACS", "::ffff:127.0.0.1")  # IPv4 over an IPv6 socket
    for bad, reason in (("PACS", "must be AE@HOST"), ("@127.0.0.1", "must be AE@HOST"), ("CT\u00c9@127.0.0.1", "must be AE@HOST"),
                        ("A_TITLE_LONGER_THAN_16@127.0.0.1", "must be AE@HOST"), ("BACK\\SLASH@127.0.0.1", "must be AE@HOST"),
                        ("PACS@no-such-host.invalid", "cannot look up the host 'no-such-host.invalid'")):
        code = main(["dicom-node", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out"),
                     "--allow-calling", "PACS@127.0.0.1", "--allow-calling", bad])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("pneumoscan dicom-node: error: --allow-calling") and reason in err, err
        assert repr(bad) in err or bad in err
        assert err.count("\n") == 1 and "Traceback" not in err and "missing.pt" not in err


@needs_dcmtk
def test_hostile_ae_titles_and_header_text_are_written_spreadsheet_safe(checkpoint, radiograph, tmp_path):
    """`pneumoscan dicom-node` with two --allow-calling peers, one of them '=HYPERLINK(A1)': its radiograph, whose
    series UID is a formula, is scored; '+SUM(1)' is refused. Each such cell has a leading quote in results.csv,
    so a spreadsheet shows it as text, and reads back exactly."""
    import warnings

    import pydicom

    from pneumoscan.io.records import original_cell

    hostile_series = '=HYPERLINK("http://example.invalid","x")'
    ds = pydicom.dcmread(radiograph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warning about the invalid UID is the point
        ds.SeriesInstanceUID = hostile_series
        ds.save_as(tmp_path / "hostile.dcm", enforce_file_format=True)
    port, out = free_port(), tmp_path / "node"
    node = NodeProcess([str(checkpoint), "--out", str(out), "--port", str(port), "--allow-calling", "=HYPERLINK(A1)@127.0.0.1",
                        "--allow-calling", "MODALITY@localhost"], tmp_path / "cache")
    try:
        started = node.wait_for("listening on")
        assert started.rstrip().endswith("calling AE titles allowed: =HYPERLINK(A1)@127.0.0.1, MODALITY@localhost")
        assert dcmtk(STORESCU, "=HYPERLINK(A1)", NODE_AET, port, tmp_path / "hostile.dcm").returncode == 0
        refused = dcmtk(ECHOSCU, "+SUM(1)", NODE_AET, port)  # (DCMTK reads '@...' as a file of arguments)
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    finally:
        node.stop()
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    scored, refused = dict(zip(rows[0], rows[1])), dict(zip(rows[0], rows[2]))
    assert (scored["event"], refused["event"]) == ("scored", "refused") and len(rows) == 3
    assert scored["calling_ae"] == "'=HYPERLINK(A1)" and scored["series_instance_uid"] == "'" + hostile_series
    assert refused["calling_ae"] == "'+SUM(1)" and "'+SUM(1)'" in refused["error"]
    assert [original_cell(scored[c]) for c in ("calling_ae", "series_instance_uid")] == ["=HYPERLINK(A1)", hostile_series]
    assert not [cell for row in rows[1:] for cell in row if cell[:1] in ("=", "+", "-", "@", "\t")]
