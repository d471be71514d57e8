"""Hostile paths and names given to predict: a FIFO or a broken link gets its error row instead of a hang or
silence, and a file name that a spreadsheet would run as a formula is written so that it is not run."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.apps.cli import main
from pneumoscan.io.records import original_cell, spreadsheet_safe

needs_fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained paper network at 32 px: what is tested here is which rows are written, not the scores."""
    from pneumoscan.networks import checkpoint as ckpt_io
    from pneumoscan.networks import models
    from pneumoscan.core.config import Config, Preprocessing

    cfg = Config(preprocessing=Preprocessing(image_size=32))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    ckpt_io.save(ckpt_io.make_checkpoint(models.build_model(cfg), cfg, threshold=0.5), path)
    return path


def _image(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(path)
    return path


def finishes_within(seconds: float, fifos: list[Path], fn, *args):
    """fn(*args) in a thread; if it is still running after `seconds` (blocked opening a FIFO), each FIFO is
    opened for writing, which lets the blocked open return, and the test fails instead of hanging."""
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(result=fn(*args)), daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        for fifo in fifos:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a reader is waiting, so this does not block
            os.close(fd)
        worker.join(30)
        pytest.fail(f"still running after {seconds} s: blocked on a FIFO")
    return outcome["result"], time.monotonic() - started


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@needs_fifos
def test_a_fifo_gets_its_error_row_and_the_good_file_is_scored(checkpoint, tmp_path, capsys):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    good = _image(tmp_path / "good.png")
    out = tmp_path / "o.csv"
    code, seconds = finishes_within(30, [fifo], main, ["predict", str(checkpoint), str(fifo), str(good),
                                                       "--out", str(out), "--device", "cpu"])
    assert code == 0 and seconds < 30
    rows = _rows(out)
    assert [r["path"] for r in rows] == [str(fifo), str(good)]
    assert rows[0]["error"] == f"{fifo}: not a regular file (a FIFO)" and rows[0]["p_pneumonia"] == ""
    assert rows[1]["error"] == "" and 0 <= float(rows[1]["p_pneumonia"]) <= 1
    assert f"error: {fifo}: not a regular file (a FIFO)" in capsys.readouterr().err


@needs_fifos
def test_every_image_name_in_a_folder_gets_a_row_however_bad_the_entry(checkpoint, tmp_path, capsys):
    folder = tmp_path / "xrays"
    folder.mkdir()
    good = _image(folder / "a-good.png")
    os.mkfifo(folder / "b-fifo.png")
    os.symlink("c-loop.jpeg", folder / "c-loop.jpeg")  # a link to itself
    os.symlink(folder / "nowhere.dcm", folder / "d-dangling.dcm")
    (folder / "e-folder.png").mkdir()  # a folder with an image's name is searched, not scored
    inner = _image(folder / "e-folder.png" / "inner.png")
    _image(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image name")
    out = tmp_path / "o.csv"
    code, _ = finishes_within(30, [folder / "b-fifo.png"], main,
                              ["predict", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu"])
    assert code == 0
    errors = {Path(r["path"]).name: r["error"] for r in _rows(out)}
    assert errors == {
        good.name: "", "b-fifo.png": f"{folder / 'b-fifo.png'}: not a regular file (a FIFO)",
        "c-loop.jpeg": f"{folder / 'c-loop.jpeg'}: a symbolic link that loops (too many levels of symbolic links)",
        "d-dangling.dcm": f"{folder / 'd-dangling.dcm'}: a broken symbolic link (its target does not exist)",
        inner.name: ""}
    assert "2 images scored" in capsys.readouterr().out  # the hidden file and notes.txt are not images


@needs_fifos
def test_the_summary_counts_the_unreadable_entries_of_a_folder(checkpoint, tmp_path, capsys):
    folder = tmp_path / "xrays"
    folder.mkdir()
    _image(folder / "good.png")
    os.mkfifo(folder / "fifo.png")
    os.symlink("loop.png", folder / "loop.png")
    finishes_within(30, [folder / "fifo.png"], main,
                    ["predict", str(checkpoint), str(folder), "--out", str(tmp_path / "o.csv"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert "1 images scored" in captured.out and "2 unreadable" in captured.out
    assert captured.err.count("error: ") == 2 and "Traceback" not in captured.err


@pytest.mark.parametrize("name", ["=1+2.png", "-2+3.jpeg", "@A1.jpeg"])
def test_a_file_name_a_spreadsheet_would_run_is_written_as_text_and_reads_back(checkpoint, tmp_path, monkeypatch,
                                                                                name):
    good = _image(tmp_path / name) if name.endswith(".png") else tmp_path / name
    if not name.endswith(".png"):
        Image.fromarray(np.full((40, 40), 90, np.uint8)).save(good, format="JPEG")
    bad = tmp_path / f"{name[0]}broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "o.csv"
    monkeypatch.chdir(tmp_path)  # relative paths: the cell starts with the name itself
    assert main(["predict", str(checkpoint), "--out", str(out), "--device", "cpu", "--", name, bad.name]) == 0
    rows = _rows(out)
    assert [r["path"] for r in rows] == ["'" + name, "'" + bad.name]
    assert [original_cell(r["path"]) for r in rows] == [name, bad.name]
    assert rows[1]["error"].startswith("'" + bad.name + ": ") and original_cell(rows[1]["error"]).startswith(bad.name)
    for cell in ("p_pneumonia", "threshold"):  # numbers stay numbers
        assert float(rows[0][cell]) >= 0 and not rows[0][cell].startswith("'")
    assert rows[0]["label"] in ("NORMAL", "PNEUMONIA")


def test_neutralised_cells_read_back_exactly():
    quoted = ["=1+2.png", "-2+3.jpeg", "@A1.jpeg", "+1", "\tx", "\rx", "-", "-inf", "'=1", "''@x", "'-0.5"]
    as_is = ["'plain", "plain", "", "-0.5", "0.25", "1e-05", "inf"]
    for text in quoted + as_is:
        written = spreadsheet_safe(text)
        assert written == ("'" + text if text in quoted else text), text
        assert original_cell(written) == text, text
