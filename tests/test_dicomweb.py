"""`pneumoscan dicomweb` against a real Orthanc with its DICOMweb plugin: radiographs made by DCMTK from real
images are found (QIDO-RS), fetched (WADO-RS) and scored with the probability `predict` gives, and their
Structured Reports come back into their study (STOW-RS), once however often it runs; a wrong token or
password, a server that stops mid-run, an instance that cannot be decoded and an answer that is not DICOMweb
each end as the docs say, with what was done recorded; Ctrl-C during --watch loses nothing."""

from __future__ import annotations

import csv
import http.server
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import real_train_folder
from .pacs import DICOMWEB_CONFIG, DICOMWEB_PLUGIN, ORTHANC, Orthanc, make_radiograph
from .test_dicom_node import checkpoint  # noqa: F401  (the tiny trained ResNet-18 fixture)

needs_orthanc = pytest.mark.skipif(not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists() or not Path("/usr/bin/img2dcm").exists(),
                                   reason="needs Orthanc, its DICOMweb plugin and DCMTK (as .ci/run installs)")
DOCS = (Path(__file__).resolve().parents[1] / "docs" / "dicom.md").read_text()
# Orthanc has no bearer tokens of its own: docs/dicom.md's filter lets DICOMweb requests through with one token
# only (403 else)
[BEARER_FILTER] = [b for b in re.findall(r"```lua\n(.*?)```", DOCS, re.S) if "IncomingHttpRequestFilter" in b]
GOOD_TOKEN = re.search(r'"Bearer ([^"]+)"', BEARER_FILTER).group(1)
# Orthanc answers each WADO-RS request of an instance 1 s late
SLOW_FETCH = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == "GET" and string.find(uri, "/dicom-web/studies/", 1, true) == 1 and string.find(uri, "/instances/", 1, true) then
    os.execute("sleep 1")
  end
  return true
end
"""
# Orthanc ends (as a server that crashes or is stopped would) on the WADO-RS request after the first `limit`
STOP_AFTER = """
fetched = 0
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == "GET" and string.find(uri, "/dicom-web/studies/", 1, true) == 1 and string.find(uri, "/instances/", 1, true) then
    fetched = fetched + 1
    if fetched > %d then os.exit(1) end
  end
  return true
end
"""


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> list[Path]:
    """Six JPEG-LS DX radiographs of real images (three of each class), each its own patient and study."""
    train, folder = real_train_folder(), tmp_path_factory.mktemp("radiographs")
    jpegs = [f for cls in ("NORMAL", "PNEUMONIA") for f in sorted((train / cls).iterdir())[:3]]
    return [make_radiograph(j, folder / f"{i}.dcm", patient_id=f"WEB-{i}") for i, j in enumerate(jpegs)]


def dicomweb(*args: str, capsys=None) -> tuple[int, str, str]:
    from pneumoscan.apps.cli import main

    code = main(["dicomweb", *args, "--device", "cpu"])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def reports_in(url: str, study: str, modality: str = "SR") -> list[dict]:
    """QIDO-RS: the instances of `modality` in the study."""
    from dicomweb_client import DICOMwebClient

    return DICOMwebClient(url).search_for_instances(study_instance_uid=study, search_filters={"Modality": modality})


def sop(ds_path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(ds_path, stop_before_pixels=True).SOPInstanceUID)


def garbled_copy(radiograph: Path) -> bytes:
    """The radiograph under a new SOP Instance UID with pixel data no decoder can read."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(radiograph)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(1000)])  # a stream that ends after its first marker
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@needs_orthanc
def test_reports_come_back_into_the_study_with_predicts_probability_and_only_once(checkpoint, radiographs,  # noqa: F811
                                                                                   tmp_path, capsys):
    import pydicom
    from dicomweb_client import DICOMwebClient

    from pneumoscan.apps.cli import main
    from pneumoscan.io.dicom_sr import RESEARCH_USE, read_report

    pacs = Orthanc(tmp_path / "orthanc", extra=DICOMWEB_CONFIG)
    try:
        for f in radiographs[:2]:
            pacs.upload(f.read_bytes())
        garbled = pacs.upload(garbled_copy(radiographs[2]))
        hand = make_radiograph(real_train_folder() / "NORMAL" / sorted(os.listdir(real_train_folder() / "NORMAL"))[5],
                               tmp_path / "hand.dcm", patient_id="HAND", keys=("Modality=DX", "BodyPartExamined=HAND"))
        pacs.upload(hand.read_bytes())
        out = tmp_path / "out"
        # one worker, so that the service scores one image at a time, as predict does with one file: the same
        # arithmetic, so the same float32 probability (with several at once, a batch's other shape may move it by
        # float32 rounding)
        code, said, _ = dicomweb(str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(out), "--store-results",
                                 "--secondary-capture", "--workers", "1", capsys=capsys)
        assert code == 0, said
        assert "3 chest radiograph(s) found" in said and "2 scored, 1 unreadable, 2 report(s) stored" in said

        predicted = {}
        for i, f in enumerate(radiographs[:2]):
            assert main(["predict", str(checkpoint), str(f), "--out", str(tmp_path / f"p{i}.csv"), "--device", "cpu"]) == 0
            with open(tmp_path / f"p{i}.csv", newline="") as csv_file:
                [predicted[sop(f)]] = list(csv.DictReader(csv_file))
        web = DICOMwebClient(pacs.dicomweb_url)
        for f in radiographs[:2]:
            source = pydicom.dcmread(f, stop_before_pixels=True)
            [sr_match] = reports_in(pacs.dicomweb_url, source.StudyInstanceUID)
            sr = web.retrieve_instance(source.StudyInstanceUID, sr_match["0020000E"]["Value"][0],
                                       sr_match["00080018"]["Value"][0])
            report, p = read_report(sr), predicted[source.SOPInstanceUID]
            assert report["probability"] == pytest.approx(float(p["p_pneumonia"]), abs=5e-7)  # the CSV's 6 decimals
            assert report["threshold"] == pytest.approx(float(p["threshold"]), abs=5e-7)
            assert report["source"] == (source.SOPClassUID, source.SOPInstanceUID) and RESEARCH_USE in report["texts"]
            assert (sr.PatientID, sr.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
            assert len(reports_in(pacs.dicomweb_url, source.StudyInstanceUID, "OT")) == 1  # the Grad-CAM overlay

        recorded = rows(out)
        scored = {r["sop_instance_uid"]: r for r in recorded if r["event"] == "scored"}
        assert set(scored) == set(predicted)
        for uid, r in scored.items():
            assert r["p_pneumonia"] == predicted[uid]["p_pneumonia"] and r["label"] == predicted[uid]["label"]
            assert r["assumed_prevalence"] == predicted[uid]["assumed_prevalence"]
        [bad] = [r for r in recorded if r["event"] == "unreadable"]
        assert bad["study_instance_uid"] and bad["error"] and not bad["p_pneumonia"]
        assert pacs.http.get(f"/instances/{garbled['ID']}").status_code == 200
        assert sop(hand) not in {r["sop_instance_uid"] for r in recorded}  # not a chest: not scored

        code, said, _ = dicomweb(str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(out), "--store-results",
                                 "--secondary-capture", capsys=capsys)
        assert code == 0 and "3 already done, 0 scored" in said, said
        assert rows(out) == recorded
        assert len(pacs.http.post("/tools/find", json={"Level": "Instance", "Query": {"Modality": "SR"}}).json()) == 2

        # results.csv lost (a run killed between storing and recording, or a new --out): the reports stored again
        # carry the same UIDs, derived from the source and the checkpoint, so the archive still holds one of each
        (out / "results.csv").rename(tmp_path / "before.csv")
        code, said, _ = dicomweb(str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(out), "--store-results",
                                 "--secondary-capture", capsys=capsys)
        assert code == 0 and "2 report(s) stored" in said, said
        stored = {r["sop_instance_uid"]: r["stored_sop_instance_uids"] for r in rows(out) if r["event"] == "sr-stored"}
        assert stored == {r["sop_instance_uid"]: r["stored_sop_instance_uids"] for r in recorded if r["event"] == "sr-stored"}
        for modality in ("SR", "OT"):
            assert len(pacs.http.post("/tools/find", json={"Level": "Instance", "Query": {"Modality": modality}}).json()) == 2
    finally:
        pacs.stop()


@needs_orthanc
def test_a_wrong_token_or_password_is_one_line_and_what_was_done_stays(checkpoint, radiographs, tmp_path,  # noqa: F811
                                                                        capsys, monkeypatch):
    lua = tmp_path / "bearer.lua"
    lua.write_text(BEARER_FILTER)
    pacs = Orthanc(tmp_path / "bearer", extra={**DICOMWEB_CONFIG, "LuaScripts": [str(lua)]})
    out = tmp_path / "out"
    try:
        pacs.upload(radiographs[0].read_bytes())
        token_file = tmp_path / "token"
        token_file.write_text(GOOD_TOKEN + "\n")
        args = [str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(out)]
        assert dicomweb(*args, "--token-file", str(token_file), capsys=capsys)[0] == 0
        assert [r["event"] for r in rows(out)] == ["scored"]

        pacs.upload(radiographs[1].read_bytes())
        monkeypatch.setenv("PNEUMOSCAN_DICOMWEB_TOKEN", "a-wrong-token")
        code, said, err = dicomweb(*args, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and "HTTP 403" in err and "refused the credentials" in err, err
        assert "a-wrong-token" not in err + said and "Traceback" not in err
        assert [r["event"] for r in rows(out)] == ["scored"]  # the first run's row stays; nothing half-done added
    finally:
        pacs.stop()

    monkeypatch.delenv("PNEUMOSCAN_DICOMWEB_TOKEN")
    pacs = Orthanc(tmp_path / "basic", extra=DICOMWEB_CONFIG, users={"radiology": "right-password"})
    try:
        pacs.upload(radiographs[0].read_bytes())
        monkeypatch.setenv("PNEUMOSCAN_DICOMWEB_USER", "radiology")
        monkeypatch.setenv("PNEUMOSCAN_DICOMWEB_PASSWORD", "wrong-password")
        code, _, err = dicomweb(str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(tmp_path / "basic-out"),
                                capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and "HTTP 401" in err, err
        monkeypatch.setenv("PNEUMOSCAN_DICOMWEB_PASSWORD", "right-password")
        code, said, _ = dicomweb(str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(tmp_path / "basic-out"),
                                 capsys=capsys)
        assert code == 0 and "1 scored" in said
    finally:
        pacs.stop()


@needs_orthanc
def test_a_server_that_stops_mid_run_is_one_line_and_the_next_run_goes_on(checkpoint, radiographs, tmp_path,  # noqa: F811
                                                                          capsys):
    """Orthanc exits on the third WADO-RS request (one worker, so the first two are scored and recorded); the
    run ends with one line; Orthanc restarted on the same storage, the next run scores the other four only."""
    lua = tmp_path / "stop.lua"
    lua.write_text(STOP_AFTER % 2)
    folder, out = tmp_path / "orthanc", tmp_path / "out"
    pacs = Orthanc(folder, extra={**DICOMWEB_CONFIG, "LuaScripts": [str(lua)]})
    try:
        for f in radiographs:
            pacs.upload(f.read_bytes())
        args = [str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(out), "--workers", "1", "--attempts", "2"]
        code, _, err = dicomweb(*args, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and "cannot reach" in err and "results.csv" in err, err
        assert pacs.proc.wait(30) is not None
    finally:
        pacs.stop()
    first = rows(out)
    assert [r["event"] for r in first] == ["scored", "scored"]

    pacs = Orthanc(folder, extra=DICOMWEB_CONFIG)  # the same storage, without the script
    try:
        code, said, _ = dicomweb(str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(out), capsys=capsys)
        assert code == 0 and "6 chest radiograph(s) found, 2 already done, 4 scored" in said, said
    finally:
        pacs.stop()
    scored = [r["sop_instance_uid"] for r in rows(out) if r["event"] == "scored"]
    assert sorted(scored) == sorted(sop(f) for f in radiographs)  # each once


@needs_orthanc
def test_since_study_modality_and_limit_choose_what_is_scored(checkpoint, tmp_path, capsys):  # noqa: F811
    """A DX of 2020, a CR of 2026 without BodyPartExamined (scored: a chest where none is given) and a DX of 2026:
    --since, --study, --modality and --limit each narrow the search as the docs say, and --prevalence moves the
    probability to a site's prior as predict's does."""
    import pydicom

    from pneumoscan.apps.cli import main

    jpegs = sorted((real_train_folder() / "NORMAL").iterdir())
    made = [make_radiograph(jpegs[0], tmp_path / "old.dcm", "OLD", keys=("Modality=DX", "BodyPartExamined=CHEST", "StudyDate=20200101")),
            make_radiograph(jpegs[1], tmp_path / "cr.dcm", "CR", keys=("Modality=CR", "StudyDate=20261201",
                                                                       "SOPClassUID=1.2.840.10008.5.1.4.1.1.1")),
            make_radiograph(jpegs[2], tmp_path / "new.dcm", "NEW", keys=("Modality=DX", "BodyPartExamined=CHEST", "StudyDate=20261202"))]
    old, cr, new = (pydicom.dcmread(f, stop_before_pixels=True) for f in made)
    assert (cr.Modality, cr.SOPClassUID, "BodyPartExamined" in cr) == ("CR", "1.2.840.10008.5.1.4.1.1.1", False)
    pacs = Orthanc(tmp_path / "orthanc", extra=DICOMWEB_CONFIG)
    try:
        for f in made:
            pacs.upload(f.read_bytes())

        def scored(out: str, *args: str) -> set[str]:
            code, said, _ = dicomweb(str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(tmp_path / out), *args,
                                     capsys=capsys)
            assert code == 0, said
            return {r["sop_instance_uid"] for r in rows(tmp_path / out) if r["event"] == "scored"}

        assert scored("since", "--since", "2026-01-01") == {cr.SOPInstanceUID, new.SOPInstanceUID}
        assert scored("prior", "--study", new.StudyInstanceUID, "--prevalence", "0.2") == {new.SOPInstanceUID}
        assert main(["predict", str(checkpoint), str(made[2]), "--out", str(tmp_path / "p.csv"), "--prevalence", "0.2",
                     "--device", "cpu"]) == 0
        with open(tmp_path / "p.csv", newline="") as f:
            [predicted] = list(csv.DictReader(f))
        [at_prior] = rows(tmp_path / "prior")
        assert (at_prior["p_pneumonia"], at_prior["assumed_prevalence"], at_prior["prevalence_source"]) == (
            predicted["p_pneumonia"], predicted["assumed_prevalence"], "given")
        assert scored("study", "--study", old.StudyInstanceUID, cr.StudyInstanceUID) == {old.SOPInstanceUID, cr.SOPInstanceUID}
        assert scored("cr", "--modality", "CR") == {cr.SOPInstanceUID}
        assert len(scored("limit", "--limit", "2")) == 2
        assert len(scored("limit", "--limit", "2")) == 3  # the third, and nothing twice
    finally:
        pacs.stop()


OPENSSL = Path("/usr/bin/openssl")


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """A CA and a certificate it signed for 127.0.0.1, made by OpenSSL: (the server's PEM, certificate then key;
    the CA's certificate)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run([str(OPENSSL), *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=pneumoscan test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    server = folder / "server.pem"
    server.write_text((folder / "server.crt").read_text() + (folder / "server.key").read_text())
    return server, folder / "ca.pem"


class EmptyArchive(http.server.BaseHTTPRequestHandler):
    """A DICOMweb search that finds nothing: an empty JSON list."""

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.skipif(not OPENSSL.exists(), reason="needs OpenSSL to make the certificates")
def test_tls_is_verified_and_a_hospital_ca_is_taken_from_ca_bundle(checkpoint, tmp_path, capsys):  # noqa: F811
    """An HTTPS server with a certificate of a CA of its own (Debian's Orthanc 1.10 resets TLS connections under
    OpenSSL 3, so a small server stands in): refused in one line without --ca-bundle, whatever
    $REQUESTS_CA_BUNDLE says, and searched with it."""
    import ssl

    server_pem, ca = make_certificates(tmp_path / "tls")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EmptyArchive)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
        args = [str(checkpoint), "--url", url, "--out", str(tmp_path / "out"), "--attempts", "1"]
        code, _, err = dicomweb(*args, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and "certificate" in err and "--ca-bundle" in err, err
        code, said, err = dicomweb(*args, "--ca-bundle", str(ca), capsys=capsys)
        assert code == 0 and "0 chest radiograph(s) found" in said, said + err
    finally:
        server.shutdown()


class NotDicomweb(http.server.BaseHTTPRequestHandler):
    """A server that answers 503 `busy` times (asking for a retry at once), then 200 with a body that is not JSON."""

    answered, busy = 0, 2

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        type(self).answered += 1
        busy = type(self).answered <= type(self).busy
        body = b"busy" if busy else b"<html>this is not DICOM JSON</html>"
        self.send_response(503 if busy else 200)
        self.send_header("Content-Type", "text/plain" if busy else "application/dicom+json")
        if busy:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("busy, attempts, said", [(2, 4, "malformed answer from"),
                                                  (9, 3, "HTTP 503 Service Unavailable after 3 attempts")])
def test_503_is_retried_then_a_malformed_or_busy_answer_is_one_line(checkpoint, tmp_path, capsys, busy, attempts,  # noqa: F811
                                                                    said):
    """503 twice then a body that is not JSON: retried twice, then malformed. 503 every time: retried as --attempts
    says, then one line."""
    NotDicomweb.answered, NotDicomweb.busy = 0, busy
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotDicomweb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        code, _, err = dicomweb(str(checkpoint), "--url", url, "--out", str(tmp_path / "out"), "--modality", "DX",
                                "--attempts", str(attempts), capsys=capsys)
    finally:
        server.shutdown()
    assert NotDicomweb.answered == min(busy + 1, attempts)
    assert code == 2 and err.count("\n") == 1 and said in err and "QIDO-RS" in err, err
    assert not rows(tmp_path / "out")  # a header, and no row: nothing was found


class Silent(http.server.BaseHTTPRequestHandler):
    """A server that takes the request and does not answer for 5 s."""

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        time.sleep(5)

    def log_message(self, *args) -> None:
        pass


def test_a_server_that_does_not_answer_is_one_line_after_the_timeout(checkpoint, tmp_path, capsys):  # noqa: F811
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        started = time.monotonic()
        code, _, err = dicomweb(str(checkpoint), "--url", url, "--out", str(tmp_path / "out"), "--modality", "DX",
                                "--timeout", "1", "--attempts", "1", capsys=capsys)
        waited = time.monotonic() - started
    finally:
        server.shutdown()
    assert code == 2 and err.count("\n") == 1 and "no answer from" in err and "within 1 s" in err, err
    assert waited < 5  # the timeout ended it, not the server


@needs_orthanc
def test_ctrl_c_during_watch_loses_nothing(checkpoint, radiographs, tmp_path):  # noqa: F811
    """`--watch 1` as a subprocess: three studies are reported, three more arrive and are found by a later poll;
    Ctrl-C once the fourth report is stored, while the fifth is being fetched (Orthanc answers each WADO-RS
    request after 1 s, so that the signal lands inside a pass): the command records the fifth, which was under
    way, and stops, every instance it scored reported; the next run does what is left. Each instance is scored
    once and has one report in the archive."""
    lua = tmp_path / "slow.lua"
    lua.write_text(SLOW_FETCH)
    pacs = Orthanc(tmp_path / "orthanc", extra={**DICOMWEB_CONFIG, "LuaScripts": [str(lua)]})
    out = tmp_path / "out"
    try:
        for f in radiographs[:3]:
            pacs.upload(f.read_bytes())
        args = [str(checkpoint), "--url", pacs.dicomweb_url, "--out", str(out), "--store-results", "--workers", "1"]
        proc = subprocess.Popen([sys.executable, "-m", "pneumoscan", "dicomweb", *args, "--watch", "1", "--device", "cpu"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_rows(out, "sr-stored", 3, proc)
            for f in radiographs[3:]:
                pacs.upload(f.read_bytes())
            wait_for_rows(out, "sr-stored", 4, proc)
            proc.send_signal(signal.SIGINT)
            said, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        # cut short: the fifth recorded whole, the sixth left (it takes 1 s to fetch; the signal comes within 0.1 s)
        assert proc.returncode == 130 and "left for the next run" in said and "Traceback" not in said, said
        interrupted = rows(out)
        assert sorted(r["sop_instance_uid"] for r in interrupted if r["event"] == "scored") == sorted(
            r["sop_instance_uid"] for r in interrupted if r["event"] == "sr-stored"), interrupted  # none half done
        from pneumoscan.apps.cli import main

        assert main(["dicomweb", *args, "--device", "cpu"]) == 0
        events = [(r["sop_instance_uid"], r["event"]) for r in rows(out)]
        expected = sorted(sop(f) for f in radiographs)
        assert sorted(u for u, e in events if e == "scored") == expected, events
        assert sorted(u for u, e in events if e == "sr-stored") == expected, events
        found = pacs.http.post("/tools/find", json={"Level": "Instance", "Query": {"Modality": "SR"}}).json()
        assert len(found) == 6
    finally:
        pacs.stop()


def wait_for_rows(out: Path, event: str, count: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "results.csv").exists() and sum(r["event"] == event for r in rows(out)) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the command ended early: {proc.stdout.read()}")
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} {event} rows after {timeout:g} s")


# --- what needs no server ---------------------------------------------------------------------------------

def test_the_orthanc_configuration_in_the_docs_is_the_one_the_tests_use():
    import json

    [config] = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOCS, re.S) if '"DicomWeb"' in b]
    assert {k: config[k] for k in DICOMWEB_CONFIG} == DICOMWEB_CONFIG
    assert (config["RemoteAccessAllowed"], config["AuthenticationEnabled"]) == (False, False)


def test_credentials_come_from_the_environment_or_a_file_and_never_show(tmp_path):
    from pneumoscan.io.dicomweb_client import credentials

    assert credentials(environ={}) is None
    c = credentials(environ={"PNEUMOSCAN_DICOMWEB_TOKEN": "s3cret"})
    assert c.token == "s3cret" and "s3cret" not in repr(c) and "s3cret" not in str(c)
    (tmp_path / "basic").write_text("alice:pa:ss\n")
    c = credentials(basic_auth_file=str(tmp_path / "basic"), environ={})
    assert (c.user, c.password) == ("alice", "pa:ss")
    with pytest.raises(ValueError, match="given twice"):
        credentials(token_file=str(tmp_path / "basic"), environ={"PNEUMOSCAN_DICOMWEB_TOKEN": "x"})
    with pytest.raises(ValueError, match="PNEUMOSCAN_DICOMWEB_PASSWORD"):
        credentials(environ={"PNEUMOSCAN_DICOMWEB_USER": "alice"})
    with pytest.raises(ValueError, match="no-such-file"):
        credentials(token_file=str(tmp_path / "no-such-file"), environ={})


def test_bad_settings_and_a_token_on_the_command_line_are_refused_before_the_model_loads(tmp_path, capsys):
    from pneumoscan.apps.cli import main

    base = ["dicomweb", str(tmp_path / "no.pt"), "--url", "http://127.0.0.1:1/dicom-web", "--out", str(tmp_path)]
    assert main([*base, "--since", "05/12/2026"]) == 2 and "YYYYMMDD" in capsys.readouterr().err
    assert main([*base, "--secondary-capture"]) == 2 and "--store-results" in capsys.readouterr().err
    assert main([*base, "--ca-bundle", str(tmp_path / "none.pem")]) == 2 and "no such file" in capsys.readouterr().err
    url_with_password = ["dicomweb", "no.pt", "--url", "https://alice:s3cret@pacs.example/dicom-web", "--out", str(tmp_path)]
    assert main(url_with_password) == 2
    err = capsys.readouterr().err
    assert "must not hold credentials" in err and "s3cret" not in err
    with pytest.raises(SystemExit):
        main([*base, "--token", "s3cret"])
    assert "unrecognized arguments: --token" in capsys.readouterr().err
