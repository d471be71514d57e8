"""A DICOM node beside a PACS: radiographs come in by C-STORE, results go out as Structured Reports.

`DicomNode` is a pynetdicom application entity (`pip install 'pneumoscan[dicom-node]'`) that answers
C-ECHO and C-STORE. Every storage SOP class is negotiated, so that an object the node does not score still
gets a DIMSE status that says why; CR and DX (for presentation and for processing) radiographs are scored.
The transfer syntaxes offered are those the one loader (`images`, `dicom`) can decode here: uncompressed,
deflated and RLE always, the JPEG, JPEG-LS and JPEG 2000 families when pydicom has a decoder for them; a
PACS transcodes anything else before sending.

For each instance, on the association's own thread: size and SOP class checks, the received bytes kept
under OUT/instances (atomically), then decoding and scoring by the one scoring service
(`scoring.ScoringService`, whose single inference thread scores instances arriving on several associations
as one batch), and the C-STORE is answered once the result is in OUT/results.csv: success means scored and
recorded. C-ECHO runs on its own association's thread and never waits for scoring. With a destination,
a sender thread builds the Structured Report (and optionally a Grad-CAM Secondary Capture) of each
scored instance and stores it there, retrying a bounded number of times; a failure is a row of
results.csv, never the node's end. What the node is told before it starts (settings, the calling peers it
accepts, the destination, the transfer syntaxes it can decode) is `dicom_settings`'s.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..io.fileio import atomic_write_bytes, optional_import
from .dicom_settings import Destination, NodeSettings, decodable_syntaxes

log = logging.getLogger(__name__)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
RADIOGRAPH_CLASSES = {CR: "CR", DX_PRESENTATION: "DX for presentation", DX_PROCESSING: "DX for processing"}

# DIMSE statuses (PS3.4 B.2.3 and PS3.7 C.4)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

NODE_COLUMNS = ["time", "event", "status", "sop_instance_uid", "sop_class_uid", "study_instance_uid",
                "series_instance_uid", "calling_ae"]
TAIL_COLUMNS = ["file", "seconds", "sent_sop_instance_uid"]


def result_log_columns(class_names: list[str]) -> list[str]:
    """results.csv's columns: the node's own, the result record every command writes, then the node's again."""
    from ..io.records import result_columns

    return [*NODE_COLUMNS, *result_columns(class_names), *TAIL_COLUMNS]


COLUMNS = result_log_columns(["NORMAL", "PNEUMONIA"])  # a binary model's


class ResultLog:
    """OUT/results.csv, one row a line: each row is one write() to a file opened for appending, then fsync.

    A crash can at worst cut the last row short; the next start ends that line, so every later row is whole.
    A file with other columns (another model, or an older pneumoscan) is kept under a dated name.
    """

    def __init__(self, path: Path, columns: list[str] = COLUMNS):
        self.path, self.columns = path, list(columns)
        self.lock = threading.Lock()
        buf = io.StringIO()
        csv.writer(buf).writerow(self.columns)
        header = buf.getvalue().encode()
        if path.exists() and path.stat().st_size > 0 and not _starts_with(path, header):
            kept = path.with_name(f"{path.stem}-until-{dt.datetime.now():%Y%m%d-%H%M%S}{path.suffix}")
            os.replace(path, kept)
            log.warning("%s had other columns: kept as %s, a new one is started", path, kept.name)
        if not path.exists() or path.stat().st_size == 0:
            atomic_write_bytes(path, header)
        else:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:
                self._append(b"\n")

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, **fields: Any) -> None:
        """Append one row; text a sender chose (an AE title, a header's words) cannot become a spreadsheet formula."""
        from ..io.records import spreadsheet_safe

        fields.setdefault("time", dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"))
        buf = io.StringIO()
        # one line a row: a decoder's message over several lines is joined into one
        cells = ["" if fields.get(c) is None else re.sub(r"\s*[\r\n]+\s*", " ", str(fields[c])) for c in self.columns]
        csv.writer(buf).writerow([spreadsheet_safe(cell) for cell in cells])
        with self.lock:
            self._append(buf.getvalue().encode("utf-8", "backslashreplace"))


def _starts_with(path: Path, header: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(header)) == header


class Rejected(Exception):
    """An instance answered with a failure `status`; the message is the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def _uid_name(uid: str) -> str:
    """A UID as a file name: the UID itself when it is one, else a name that cannot leave the folder."""
    return uid if re.fullmatch(r"[0-9.]{1,64}", uid or "") and ".." not in uid else re.sub(r"[^0-9A-Za-z]", "_", uid)[:64] or "_"


def _status(code: int, reason: str = "") -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    if reason:
        ds.ErrorComment = reason[:64]  # LO: at most 64 characters
    return ds


def _header_fields(ds: Any) -> dict[str, str]:
    """The UIDs a dataset gives (those it lacks are left out)."""
    keywords = {"sop_instance_uid": "SOPInstanceUID", "study_instance_uid": "StudyInstanceUID",
                "series_instance_uid": "SeriesInstanceUID"}
    return {k: str(ds.get(v)) for k, v in keywords.items() if ds.get(v)}


class Sender:
    """One thread that stores each scored instance's report at the destination: what is waiting is sent over
    one association; what fails is tried again, `attempts` times in all, then recorded as failed."""

    def __init__(self, node: "DicomNode", destination: Destination, attempts: int, retry_wait_s: float,
                 max_waiting: int = 1024):
        pynetdicom = optional_import("pynetdicom", "dicom-node", "the DICOM node")
        from pynetdicom.sop_class import ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification

        self.node, self.destination = node, destination
        self.attempts, self.retry_wait_s = max(attempts, 1), retry_wait_s
        self.ae = pynetdicom.AE(ae_title=node.settings.ae_title)
        for sop in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification):
            self.ae.add_requested_context(sop)
        self.jobs: "queue.Queue[dict | None]" = queue.Queue(max_waiting)
        self.thread = threading.Thread(target=self._run, name="pneumoscan-dicom-sender", daemon=True)
        self.thread.start()

    def submit(self, job: dict) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self._failed(job, "the send queue is full: report not sent")

    def _sent(self, job: dict, objects: list, codes: list[int]) -> None:
        """A report stored: its row, and an INFO line naming the source, the destination and each status."""
        self.node.results.write(event="sr-sent", status=f"0x{SUCCESS:04X}",
                                sent_sop_instance_uid=" ".join(o.SOPInstanceUID for o in objects), **job["fields"])
        stored = ", ".join(f"{o.Modality} {o.SOPInstanceUID} status 0x{code:04X}" for o, code in zip(objects, codes))
        log.info("report on %s stored at %s: %s", job["fields"].get("sop_instance_uid", ""), self.destination, stored)

    def _failed(self, job: dict, error: str) -> None:
        """A report not stored: its row, and a WARNING line with the reason (the console is often all that is watched)."""
        self.node.results.write(event="sr-failed", error=error, **job["fields"])
        log.warning("report on %s not stored at %s: %s", job["fields"].get("sop_instance_uid", ""), self.destination,
                    error)

    def echo(self) -> int | None:
        """C-ECHO to the destination: its status, or None when no association could be made."""
        assoc = self.ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_echo()
            return int(status.Status) if "Status" in status else None
        finally:
            assoc.release()

    def stop(self, timeout: float = 30) -> None:
        """Send what is waiting (within `timeout`), then end the thread."""
        self.jobs.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            batch = [job] if job is not None else []
            while job is not None and len(batch) < 64:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    batch.append(job)
            if batch:
                try:
                    self._send_batch(batch)
                except Exception as e:  # never the end of the thread: each report gets a row
                    log.exception("sending reports failed")
                    for j in batch:
                        self._failed(j, f"{type(e).__name__}: {e}")
            if job is None:
                return

    def _send_batch(self, batch: list[dict]) -> None:
        pending = []
        for job in batch:
            try:
                pending.append((job, self.node.build_objects(job)))
            except Exception as e:  # a header highdicom refuses: this report only
                self._failed(job, f"cannot build the report ({type(e).__name__}: {e})")
        for attempt in range(1, self.attempts + 1):
            failed = []
            for job, objects, error, codes in self._store(pending):
                if error is None:
                    self._sent(job, objects, codes)
                else:
                    failed.append((job, objects, error))
            if not failed:
                return
            if attempt == self.attempts:
                for job, _, error in failed:
                    self._failed(job, f"{error} (after {attempt} attempts)")
                return
            log.warning("%d report(s) not stored at %s (%s); trying again", len(failed), self.destination, failed[0][2])
            time.sleep(self.retry_wait_s * attempt)
            pending = [(job, objects) for job, objects, _ in failed]

    def _store(self, pending: list[tuple[dict, list]]) -> list[tuple[dict, list, str | None, list[int]]]:
        """C-STORE every object of `pending` over one association: (job, objects, error or None, the statuses of
        the objects stored) each."""
        d = self.destination
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            return [(job, objects, f"no association with {d}", []) for job, objects in pending]
        results = []
        try:
            for job, objects in pending:
                error, codes = None, []
                for ds in objects:
                    status = assoc.send_c_store(ds) if assoc.is_established else None
                    code = int(status.Status) if status is not None and "Status" in status else None
                    if code is None or not (code == SUCCESS or 0xB000 <= code <= 0xBFFF):
                        error = (f"{d} answered C-STORE with status 0x{code:04X}" if code is not None
                                 else f"no C-STORE response from {d}")
                        break
                    codes.append(code)
                results.append((job, objects, error, codes))
        finally:
            if assoc.is_established:
                assoc.release()
        return results


class DicomNode:
    """The node: `start()` listens (returns at once); `stop()` stops listening, lets the associations under way
    end (aborting those still open after `grace_s`), then sends the reports still waiting."""

    def __init__(self, predictor: Any, settings: NodeSettings, checkpoint_name: str = "checkpoint"):
        from ..tasks.scoring import ScoringService

        pynetdicom = optional_import("pynetdicom", "dicom-node", "the DICOM node")
        if settings.send_to:
            optional_import("highdicom", "dicom-node", "DICOM Structured Reports")
        from pynetdicom.presentation import StoragePresentationContexts
        from pynetdicom.sop_class import Verification

        self.predictor, self.settings = predictor, settings
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = ResultLog(self.out / "results.csv", result_log_columns(predictor.class_names))
        self.scoring = ScoringService(predictor, max_batch=settings.max_batch)
        self.model = self._model_info(checkpoint_name)
        self.syntaxes = decodable_syntaxes()
        ae = pynetdicom.AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        # `check_association` refuses first, with a row; should it ever fail to, pynetdicom's own checks still
        # refuse a wrong called AE title and (by title only) a calling AE title off the allow-list
        ae.require_called_aet = True
        ae.require_calling_aet = sorted({p.ae_title for p in settings.allow_calling})
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:  # every storage class: the others get a status saying why
            ae.add_supported_context(context.abstract_syntax, self.syntaxes)
        self.ae = ae
        self.server: Any = None
        self.sender = (Sender(self, settings.send_to, settings.send_attempts, settings.retry_wait_s)
                       if settings.send_to else None)

    def _model_info(self, checkpoint_name: str) -> Any:
        from ..io.dicom_sr import ModelInfo

        cfg = self.predictor.config
        return ModelInfo(cfg.model.name, __version__, cfg.recipe, os.path.basename(str(checkpoint_name)))

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.settings.port

    def start(self) -> None:
        from pynetdicom import evt

        handlers = [(evt.EVT_REQUESTED, self.check_association), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_C_STORE, self.handle_store)]
        self.server = self.ae.start_server((self.settings.bind, self.settings.port), block=False, evt_handlers=handlers)

    def stop(self, grace_s: float = 30) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        if self.sender is not None:
            self.sender.stop()

    def refusal(self, calling: str, called: str, address: str) -> tuple[int, str] | None:
        """(A-ASSOCIATE-RJ diagnostic, reason) for an association this node refuses, None for one it accepts."""
        own = self.settings.ae_title.strip()
        if called.strip() != own:
            return 0x07, f"association from {address} called {called.strip()!r}, not this node's AE title {own!r}"
        allowed = self.settings.allow_calling
        if allowed and not any(p.allows(calling, address) for p in allowed):
            return 0x03, (f"association from {address} with calling AE title {calling.strip()!r}, which "
                          f"--allow-calling does not allow ({', '.join(map(str, allowed))})")
        return None

    def check_association(self, event: Any) -> None:
        """EVT_REQUESTED: an association `refusal` refuses gets a WARNING and a row, then A-ASSOCIATE-RJ (permanent,
        by the service user), and ends there. pynetdicom logs and ignores a handler's exception, which would let
        the association through: a request that cannot be checked is refused too."""
        assoc = event.assoc
        calling = address = ""
        try:
            request = assoc.requestor.primitive
            calling, address = str(request.calling_ae_title).strip(), str(assoc.requestor.address)
            refused = self.refusal(calling, str(request.called_ae_title), address)
        except Exception as e:
            refused = 0x01, f"association from {address or 'an unknown address'} not checked ({type(e).__name__}: {e})"
        if refused is None:
            return
        diagnostic, reason = refused
        try:  # recorded before the peer is answered, as a C-STORE is
            log.warning("refused an %s", reason)
            self.results.write(event="refused", calling_ae=calling, error=reason)
        finally:
            assoc.acse.send_reject(0x01, 0x01, diagnostic)
            assoc.kill()  # as pynetdicom's own refusals: without it the connection closes before the reject is sent

    def handle_store(self, event: Any) -> Any:
        """C-STORE: the instance checked, kept, decoded, scored and recorded; the DIMSE status says how it went."""
        started = time.perf_counter()
        fields = {"sop_class_uid": str(event.context.abstract_syntax), "calling_ae": event.assoc.requestor.ae_title,
                  "sop_instance_uid": str(event.request.AffectedSOPInstanceUID or "")}
        try:
            row, job = self._process(event, fields)
        except Rejected as e:
            self.results.write(event="rejected", status=f"0x{e.status:04X}", error=str(e),
                               seconds=f"{time.perf_counter() - started:.3f}", **fields)
            log.warning("rejected %s from %s: %s", fields["sop_instance_uid"], fields["calling_ae"], e)
            return _status(e.status, str(e))
        except Exception as e:  # whatever happens to one instance, the node answers and lives on
            log.exception("processing %s failed", fields["sop_instance_uid"])
            self.results.write(event="rejected", status=f"0x{PROCESSING_FAILURE:04X}",
                               error=f"{type(e).__name__}: {e}", **fields)
            return _status(PROCESSING_FAILURE, f"{type(e).__name__}: {e}")
        self.results.write(event="scored", status=f"0x{SUCCESS:04X}", seconds=f"{time.perf_counter() - started:.3f}",
                           **row, **fields)
        log.info("scored %s from %s: %s %s", fields["sop_instance_uid"], fields["calling_ae"], row["label"],
                 row["p_pneumonia"])
        if self.sender is not None:
            self.sender.submit(job)
        return SUCCESS

    def _process(self, event: Any, fields: dict[str, str]) -> tuple[dict, dict]:
        """One instance from check to score: (the row's result fields, the sender's job). Raises Rejected."""
        from ..tasks.scoring import WorkerStopped

        limit = self.settings.max_instance_mb * 2**20
        size = len(event.request.DataSet.getvalue()) if event.request.DataSet is not None else 0
        if size > limit:
            raise Rejected(OUT_OF_RESOURCES, f"instance of {size / 2**20:.2f} MiB is over the "
                                             f"{self.settings.max_instance_mb:g} MiB limit")
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            fields.update(_header_fields(ds))
        except Exception as e:  # a dataset pydicom cannot parse
            raise Rejected(CANNOT_UNDERSTAND, f"cannot read the dataset ({type(e).__name__}: {e})") from None
        sop_class = fields["sop_class_uid"]
        if sop_class not in RADIOGRAPH_CLASSES:
            raise Rejected(DOES_NOT_MATCH_SOP_CLASS, f"SOP class {sop_class} is not a radiograph: this node "
                                                     "scores CR and DX images only")
        if "PixelData" not in ds:
            raise Rejected(DOES_NOT_MATCH_SOP_CLASS, "a radiograph without pixel data (PixelData missing)")
        data = event.encoded_dataset(include_meta=True)
        if self.settings.keep_instances:
            kept = Path("instances") / _uid_name(fields["study_instance_uid"]) / f"{_uid_name(fields['sop_instance_uid'])}.dcm"
            atomic_write_bytes(self.out / kept, data)
            fields["file"] = str(kept)
        try:
            scored = self.scoring.score(data, fields["sop_instance_uid"], self.settings.secondary_capture,
                                        timeout=self.settings.score_timeout_s)
        except TimeoutError:
            raise Rejected(OUT_OF_RESOURCES, f"not scored within {self.settings.score_timeout_s:g} s: the node is busy") from None
        except WorkerStopped as e:
            raise Rejected(OUT_OF_RESOURCES, str(e)) from None
        if scored.result.error is not None:
            raise Rejected(CANNOT_UNDERSTAND, scored.result.error)
        return self._result(ds, scored, fields)

    def _result(self, ds: Any, scored: Any, fields: dict) -> tuple[dict, dict]:
        """(the row's result fields, the sender's job) of a scored instance."""
        from ..io.dicom_sr import Score
        from ..io.records import result_cells

        result, class_names = scored.result, self.predictor.class_names
        score = Score.of(result, class_names)
        row = result_cells(result, class_names)
        del ds.PixelData  # the report needs the header only; the pixels are scored
        return row, {"source": ds, "score": score, "heat": scored.heat, "shown": scored.shown, "fields": dict(fields)}

    def build_objects(self, job: dict) -> list:
        """The report (and the Grad-CAM Secondary Capture when asked for) of one scored instance."""
        from ..io.dicom_sr import secondary_capture, structured_report
        from ..tasks.explain import overlay

        objects = [structured_report(job["source"], job["score"], self.model)]
        if self.settings.secondary_capture and job["heat"] is not None:
            objects.append(secondary_capture(job["source"], overlay(job["shown"], job["heat"])))
        return objects


def run_node(checkpoint: str, settings: NodeSettings, device: str = "cpu", stop: threading.Event | None = None,
             backend: str = "torch") -> None:
    """Load the checkpoint, start the node, echo the destination, and serve until `stop` is set."""
    from ..tasks.predict import Predictor

    if not log.isEnabledFor(logging.DEBUG):  # a line per association and per copied module: only with -v
        for name in ("pynetdicom", "highdicom"):
            logging.getLogger(name).setLevel(logging.WARNING)
    predictor = Predictor(checkpoint, device=device, backend=backend)
    node = DicomNode(predictor, settings, checkpoint_name=checkpoint)
    node.start()
    try:
        peers = ", ".join(map(str, settings.allow_calling))
        allowed = f"; calling AE titles allowed: {peers}" if peers else ""
        print(f"pneumoscan dicom-node: {settings.ae_title} listening on {settings.bind}:{node.port}; "
              f"results in {Path(settings.out) / 'results.csv'}{allowed}", flush=True)
        if node.sender is not None:
            status = node.sender.echo()
            print(f"pneumoscan dicom-node: C-ECHO to {settings.send_to}: "
                  + ("no association" if status is None else f"status 0x{status:04X}"), flush=True)
        (stop or threading.Event()).wait()
    finally:
        node.stop()
