"""`pneumoscan dicomweb`: find chest radiographs in a DICOMweb archive, score them, report back into their study.

Each pass: QIDO-RS finds the instances (`DicomwebSettings` says which: Modality CR or DX by default, one query
per modality; BodyPartExamined CHEST where the archive gives one; `--study`, `--since`), those already done are
left out, WADO-RS fetches each of the others in the transfer syntax the archive holds (the one loader decodes
it), the one scoring service (`tasks.scoring.ScoringService`: same loader, detector, acquisition warnings and
prior as `predict`) scores it, and with `--store-results` STOW-RS stores its Comprehensive SR (the node's
builder, `io.dicom_sr`; with `--secondary-capture` also the Grad-CAM overlay) into the same study. A few
worker threads fetch, score and store at once; the scoring service scores what they bring as one batch.

OUT/results.csv is both the record and the state (the node's `ResultLog`: one row a write, fsync'd, a torn last
row ended at the next start): a row per event (`scored`, `unreadable`, `retrieve-failed`, `sr-stored`,
`sr-failed`) with the instance's UIDs and the shared per-image columns (`io.records`). An instance is done once
it is scored or found unreadable (and, with `--store-results`, its report stored), or after `MAX_TRIES`
failures; a later run or pass skips it. A report's UIDs are derived from its source instance and the checkpoint,
so a report stored twice (a retried STOW-RS, a run stopped between storing and recording) is the same instance,
which an archive keeps once. `--watch` repeats the pass every N seconds; the first Ctrl-C (or SIGTERM) lets the
instances under way finish and be recorded, then stops.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from .. import __version__
from ..io.dicomweb_client import (BODY_PART, SERIES_UID, SOP_CLASS_UID, SOP_UID, STUDY_UID, Archive, Credentials,
                                  DicomwebError, credentials, uid_of)
from ..io.fileio import optional_import
from ..io.records import original_cell, result_cells, result_columns
from .dicom_node import ResultLog

log = logging.getLogger(__name__)

LEAD_COLUMNS = ["time", "event", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid"]
TAIL_COLUMNS = ["seconds", "stored_sop_instance_uids"]
DONE_EVENTS = {"scored", "unreadable"}
FAILED_EVENTS = {"retrieve-failed", "sr-failed"}
MAX_TRIES = 3  # failures of one instance (its fetch or its report) before later runs leave it alone
FATAL = {"auth", "unreachable", "unavailable"}  # kinds of DicomwebError that end a pass: later requests would fail too


def columns(class_names: list[str]) -> list[str]:
    """results.csv's columns: the instance's UIDs, the record every command writes, then this command's own."""
    return [*LEAD_COLUMNS, *result_columns(class_names), *TAIL_COLUMNS]


@dataclass(frozen=True)
class DicomwebSettings:
    url: str
    out: Path
    studies: tuple[str, ...] = ()
    since: str | None = None  # YYYYMMDD: studies of that date or later
    modalities: tuple[str, ...] = ("CR", "DX")
    limit: int | None = None  # instances scored per pass at most
    store_results: bool = False
    secondary_capture: bool = False
    watch_s: float | None = None
    workers: int = 4
    timeout_s: float = 60
    attempts: int = 4
    ca_bundle: str | None = None
    prevalence: float | None = None  # the site's prior, as predict's --prevalence P (None: the checkpoint's)
    credentials: Credentials | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.since is not None and not (len(self.since) == 8 and self.since.isdigit()):
            raise ValueError(f"--since must be a date as YYYYMMDD or YYYY-MM-DD, not {self.since!r}")
        if self.limit is not None and self.limit < 1 or self.workers < 1 or self.attempts < 1:
            raise ValueError("--limit, --workers and --attempts must be at least 1")
        if self.watch_s is not None and not self.watch_s > 0:
            raise ValueError("--watch must be a number of seconds above 0")
        if self.secondary_capture and not self.store_results:
            raise ValueError("--secondary-capture needs --store-results")
        if not re.match(r"https?://[^/\s]+", self.url):
            raise ValueError(f"--url must be the http:// or https:// address of a DICOMweb service, not {self.url!r}")
        if "@" in urlsplit(self.url).netloc:  # user:password@host: on the command line, where ps shows it
            raise ValueError("--url must not hold credentials: give them by $PNEUMOSCAN_DICOMWEB_TOKEN, --token-file, "
                             "or $PNEUMOSCAN_DICOMWEB_USER and $PNEUMOSCAN_DICOMWEB_PASSWORD, or --basic-auth-file")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise ValueError(f"--ca-bundle {self.ca_bundle}: no such file")


@dataclass
class History:
    """What results.csv says about each instance: done, or how often it failed."""

    done: set = field(default_factory=set)
    reported: set = field(default_factory=set)
    failures: Counter = field(default_factory=Counter)

    @classmethod
    def read(cls, path: Path) -> "History":
        """From results.csv (absent: nothing done); a row cut short by a crash counts for nothing."""
        h = cls()
        if not path.exists():
            return h
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.DictReader(f):
                if None in row or None in row.values() or not row.get("sop_instance_uid"):
                    continue
                sop, event = original_cell(row["sop_instance_uid"]), row["event"]  # as the archive gave it
                if event in DONE_EVENTS:
                    h.done.add(sop)
                    if event == "unreadable":
                        h.reported.add(sop)  # nothing to report on
                elif event == "sr-stored":
                    h.reported.add(sop)
                elif event in FAILED_EVENTS:
                    h.failures[sop] += 1
        return h

    def needs_work(self, sop: str, store: bool) -> bool:
        if self.failures[sop] >= MAX_TRIES:
            return False
        return sop not in self.done or (store and sop not in self.reported)


def chest_radiograph(item: dict) -> bool:
    """Whether a QIDO-RS match is one to score: BodyPartExamined CHEST, or none given."""
    part = (uid_of(item, BODY_PART) or "").strip().upper()
    return part in ("", "CHEST")


def find_work(archive: Archive, s: DicomwebSettings, history: History) -> tuple[list[dict], int]:
    """The instances not done yet, in the order the archive lists them, and how many matched in all."""
    found: dict[str, dict] = {}
    for study in s.studies or (None,):
        for modality in s.modalities:
            filters = {"Modality": modality}
            if study:
                filters["StudyInstanceUID"] = study
            if s.since:
                filters["StudyDate"] = f"{s.since}-"
            for item in archive.find_instances(filters, fields=["BodyPartExamined", "StudyDate"]):
                if chest_radiograph(item):
                    found.setdefault(uid_of(item, SOP_UID), item)
    return [i for sop, i in found.items() if history.needs_work(sop, s.store_results)], len(found)


class Reporter:
    """Builds the report (and overlay) of one scored instance with UIDs fixed by its source and the checkpoint."""

    def __init__(self, predictor: Any, checkpoint: str, secondary_capture: bool):
        from ..io.dicom_sr import ModelInfo

        optional_import("highdicom", "dicomweb", "DICOM Structured Reports")
        cfg = predictor.config
        self.model = ModelInfo(cfg.model.name, __version__, cfg.recipe, os.path.basename(str(checkpoint)))
        self.key = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
        self.class_names, self.secondary_capture = predictor.class_names, secondary_capture

    def uid(self, kind: str, of: str) -> str:
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=["pneumoscan", kind, self.key, of])

    def objects(self, source: Any, scored: Any) -> list:
        from ..io.dicom_sr import Score, secondary_capture, structured_report
        from ..tasks.explain import overlay

        score = Score.of(scored.result, self.class_names)
        study, sop = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
        objects = [structured_report(source, score, self.model, self.uid("sr", sop), self.uid("sr-series", study))]
        if self.secondary_capture and scored.heat is not None:
            objects.append(secondary_capture(source, overlay(scored.shown, scored.heat), self.uid("sc", sop),
                                             self.uid("sc-series", study)))
        return objects


class DicomwebRun:
    """One `dicomweb` command: the archive, the scoring service, results.csv, and the passes over the archive."""

    def __init__(self, predictor: Any, checkpoint: str, s: DicomwebSettings, stop: threading.Event | None = None):
        from ..tasks.scoring import ScoringService

        self.s, self.predictor = s, predictor
        self.stop = stop or threading.Event()
        s.out.mkdir(parents=True, exist_ok=True)
        self.columns = columns(predictor.class_names)
        self.results = ResultLog(s.out / "results.csv", self.columns)
        self.archive = Archive(s.url, s.credentials, s.ca_bundle, s.timeout_s, s.attempts)
        self.scoring = ScoringService(predictor)
        self.reporter = Reporter(predictor, checkpoint, s.secondary_capture) if s.store_results else None
        self.counts: Counter = Counter()  # rows of each event this pass
        self.lock = threading.Lock()

    def one(self, item: dict) -> str:
        """Fetch, score, record and (when asked) report one instance: the outcome, one of the row events.
        Raises DicomwebError when the archive cannot be reached or refuses the credentials."""
        started = time.perf_counter()
        fields = {"study_instance_uid": uid_of(item, STUDY_UID), "series_instance_uid": uid_of(item, SERIES_UID),
                  "sop_instance_uid": uid_of(item, SOP_UID), "sop_class_uid": uid_of(item, SOP_CLASS_UID)}
        try:
            data, source = self.archive.retrieve(fields["study_instance_uid"], fields["series_instance_uid"],
                                                 fields["sop_instance_uid"])
        except DicomwebError as e:
            if e.kind in FATAL:
                raise
            return self._row("retrieve-failed", fields, started, error=str(e))
        scored = self.scoring.score(data, fields["sop_instance_uid"], heatmap=self.s.secondary_capture,
                                    timeout=self.s.timeout_s * 4)
        cells = result_cells(scored.result, self.predictor.class_names)
        if scored.result.error is not None:
            return self._row("unreadable", fields, started, **cells)
        self._row("scored", fields, started, **cells)
        if self.reporter is None:
            return "scored"
        try:
            objects = self.reporter.objects(source, scored)
        except Exception as e:  # a header highdicom refuses: this report only
            return self._row("sr-failed", fields, started, error=f"cannot build the report ({type(e).__name__}: {e})")
        try:
            stored = self.archive.store(fields["study_instance_uid"], objects)
        except DicomwebError as e:
            if e.kind in FATAL:
                raise
            return self._row("sr-failed", fields, started, error=str(e))
        return self._row("sr-stored", fields, started, stored_sop_instance_uids=" ".join(stored), **cells)

    def _row(self, event: str, fields: dict, started: float, **more: Any) -> str:
        with self.lock:
            self.counts[event] += 1
        self.results.write(event=event, seconds=f"{time.perf_counter() - started:.3f}", **fields, **more)
        level = logging.WARNING if event in FAILED_EVENTS else logging.INFO
        log.log(level, "%s %s%s", event, fields["sop_instance_uid"], f": {more['error']}" if more.get("error") else "")
        return event

    def run_pass(self) -> Counter:
        """Find and process the instances not done yet, several at once; stops taking new ones when `stop` is
        set or the archive fails for good (the error is raised once those under way are recorded)."""
        history = History.read(self.s.out / "results.csv")
        todo, matched = find_work(self.archive, self.s, history)
        work = todo[: self.s.limit] if self.s.limit else todo
        self.counts = Counter()
        finished = 0
        fatal: list[Exception] = []
        with cf.ThreadPoolExecutor(self.s.workers, thread_name_prefix="pneumoscan-dicomweb") as pool:
            pending: set[cf.Future] = set()
            items: Iterator[dict] = iter(work)
            while True:
                # one more instance queued per worker, so that none waits for the next; queued ones not yet
                # started are cancelled within 0.1 s of `stop` (they stay for the next run)
                while len(pending) < 2 * self.s.workers and not self.stop.is_set() and not fatal:
                    item = next(items, None)
                    if item is None:
                        break
                    pending.add(pool.submit(self.one, item))
                if self.stop.is_set() or fatal:  # those queued but not started stay for the next run
                    pending = {f for f in pending if not f.cancel()}
                if not pending:
                    break
                done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    try:
                        future.result()
                        finished += 1
                    except Exception as e:  # the archive gone, or the inference thread stopped: no more this pass
                        fatal.append(e)
        counts = self.counts + Counter(matched=matched, skipped=matched - len(todo))
        counts["left"], counts["cut"] = len(todo) - finished, len(work) - finished  # cut: by `stop` or an error
        if fatal:
            raise fatal[0]
        return counts

    def close(self) -> None:
        self.archive.close()


def summary(counts: Counter, out: Path, seconds: float) -> str:
    scored = counts["scored"]
    parts = [f"{counts['matched']} chest radiograph(s) found", f"{counts['skipped']} already done",
             f"{scored} scored", f"{counts['unreadable']} unreadable"]
    if counts["sr-stored"] or counts["sr-failed"]:
        parts += [f"{counts['sr-stored']} report(s) stored", f"{counts['sr-failed']} not stored"]
    if counts["retrieve-failed"]:
        parts.append(f"{counts['retrieve-failed']} not retrieved")
    if counts["left"]:
        parts.append(f"{counts['left']} left for the next run")
    return f"pneumoscan dicomweb: {', '.join(parts)} in {seconds:.1f} s; results in {out / 'results.csv'}"


def run_dicomweb(checkpoint: str, s: DicomwebSettings, device: str = "cpu", stop: threading.Event | None = None) -> int:
    """Load the checkpoint, then one pass (or, with `watch_s`, a pass every `watch_s` seconds until `stop` is set).
    0 when every pass ran to its end, 130 when `stop` cut one short; raises DicomwebError for an archive that
    refuses the credentials or cannot be reached (in --watch, one out of reach is tried again at the next poll)."""
    from ..tasks.predict import Predictor

    stop = stop or threading.Event()
    if not log.isEnabledFor(logging.DEBUG):
        for name in ("highdicom", "dicomweb_client", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    run = DicomwebRun(Predictor(checkpoint, device=device, prevalence=s.prevalence), checkpoint, s, stop)
    try:
        while True:
            try:
                started = time.perf_counter()
                counts = run.run_pass()
                print(summary(counts, s.out, time.perf_counter() - started), flush=True)
            except DicomwebError as e:
                if s.watch_s is None or e.kind == "auth":
                    raise DicomwebError(f"{e}; what was done is recorded in {s.out / 'results.csv'}", e.kind,
                                        e.status) from None
                print(f"pneumoscan dicomweb: {e}; trying again in {s.watch_s:g} s", file=sys.stderr, flush=True)
                counts = Counter()
            if stop.is_set():
                return 130 if counts["cut"] else 0
            if s.watch_s is None:
                return 0
            if stop.wait(s.watch_s):
                return 0
    finally:
        run.close()


def settings_from_args(a: argparse.Namespace) -> DicomwebSettings:
    return DicomwebSettings(
        url=a.url, out=Path(a.out), studies=tuple(a.study), since=a.since and a.since.replace("-", ""),
        modalities=tuple(m.upper() for m in a.modality),
        limit=a.limit, store_results=a.store_results, secondary_capture=a.secondary_capture, watch_s=a.watch,
        workers=a.workers, timeout_s=a.timeout, attempts=a.attempts, ca_bundle=a.ca_bundle, prevalence=a.prevalence,
        credentials=credentials(a.token_file, a.basic_auth_file))


def command(a: argparse.Namespace) -> int:
    """`pneumoscan dicomweb`: settings checked before the model loads; the first SIGINT or SIGTERM lets the
    instances under way finish and be recorded, a second SIGINT stops at once (nothing recorded is lost)."""
    s = settings_from_args(a)
    stop = threading.Event()

    def first_then_default(signum: int, _frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        print("pneumoscan dicomweb: stopping once the instances under way are recorded (Ctrl-C again: at once)",
              file=sys.stderr, flush=True)

    before = {sig: signal.signal(sig, first_then_default) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_dicomweb(a.checkpoint, s, device=a.device, stop=stop)
    except KeyboardInterrupt:
        print(f"pneumoscan dicomweb: interrupted; what was done is recorded in {s.out / 'results.csv'}, and the "
              "next run goes on from there", file=sys.stderr, flush=True)
        return 130
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
