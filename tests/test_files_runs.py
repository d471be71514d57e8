"""Files and work are never lost: --overwrite, concurrent comparisons, checked configs, permissions."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.networks import models
from pneumoscan.tasks.compare import compare
from pneumoscan.io.data import DataError
from pneumoscan.io.fileio import atomic_write_bytes, atomic_write_text
from pneumoscan.tasks.train import train

from .test_train_checkpoint import tiny_config


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_replaces_the_earlier_run_only_once_the_new_one_has_a_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, epochs=1)
    train(cfg, out, device="cpu", progress=False)
    atomic_write_text(out / "eval-val" / "metrics.json", "{}")  # an evaluation and a report of that run
    atomic_write_text(out / "report.html", "<html></html>")
    atomic_write_text(out / "notes.txt", "mine")
    before = _snapshot(out)

    with pytest.raises(DataError, match="typo"):  # fails before reading any image
        train(cfg.override("data", root=str(tmp_path / "typo")), out, device="cpu", overwrite=True, progress=False)
    assert _snapshot(out) == before
    with pytest.raises(DataError, match="batch size"):  # fails after writing config.json and split.json
        train(cfg.override("train", batch_size=4096), out, device="cpu", overwrite=True, progress=False)
    assert _snapshot(out) == before

    train(cfg.override("train", seed=1), out, device="cpu", overwrite=True, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"best.pt", "last.pt", "summary.json", "notes.txt"} <= names
    assert not {"eval-val", "report.html", ".replaced"} & names  # the earlier run's evaluation is gone
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 1
    assert (out / "best.pt").read_bytes() != before["best.pt"]


def test_a_run_killed_while_replacing_another_gives_the_earlier_run_back(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, epochs=1), out, device="cpu", progress=False)
    before = _snapshot(out)
    # what a new run killed before its first checkpoint leaves: the earlier run set aside, its own first files
    (out / ".replaced").mkdir()
    for name in before:
        os.replace(out / name, out / ".replaced" / name)
    atomic_write_text(out / "config.json", "{}")
    train(tiny_config(tiny_data, epochs=1), out, device="cpu", resume=True, progress=False)  # nothing left to train
    assert (out / "config.json").read_bytes() == before["config.json"] and not (out / ".replaced").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_compare_skips_a_run_another_process_holds_and_comes_back_to_it(tiny_data, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    held = open(out / ".relu-s0.lock", "a")  # another process training relu-s0
    fcntl.flock(held, fcntl.LOCK_EX)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = compare(tiny_config(tiny_data, epochs=1), out, activations=["relu"], seeds=[0, 1],
                                        device="cpu", progress=False)
        except BaseException as e:  # reported by the assertions below
            outcome["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    try:
        deadline = time.monotonic() + 300
        while not (out / "relu-s1" / "eval-val" / "metrics.json").is_file():
            assert worker.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.2)
        time.sleep(0.5)
        assert not (out / "relu-s0" / "best.pt").exists()  # not touched while the other process holds it
        assert worker.is_alive()  # waiting for it
    finally:
        fcntl.flock(held, fcntl.LOCK_UN)
        held.close()
        worker.join(300)
    assert "error" not in outcome, outcome
    runs = outcome["result"]["runs"]["relu"]
    assert len(runs) == 2
    started = {s: json.loads((out / f"relu-s{s}" / "summary.json").read_text())["started"] for s in (0, 1)}
    assert started[1] < started[0]


@pytest.mark.parametrize("section, name, value", [
    ("preprocessing", "image_size", 4), ("preprocessing", "channels", 2), ("train", "eval_batch_size", 0),
    ("train", "epochs", -1), ("train", "threshold", float("nan")), ("model", "activation", "tanh")])
def test_a_checkpoint_config_out_of_range_is_refused_before_the_model_is_built(tmp_path, section, name, value):
    from pneumoscan.core.config import Config, Preprocessing

    cfg = Config(preprocessing=Preprocessing(image_size=32))
    ckpt = ckpt_io.make_checkpoint(models.build_model(cfg), cfg, threshold=0.5)
    ckpt["config"][section][name] = value
    path = tmp_path / "odd.pt"
    ckpt_io.save(ckpt, path)
    with pytest.raises(ValueError, match=rf"odd\.pt.*{section}\.{name}"):
        ckpt_io.load(path)


def test_a_config_out_of_range_stops_training_before_the_run_folder_is_touched(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        train(tiny_config(tiny_data).override("preprocessing", image_size=100_000), tmp_path / "run", device="cpu",
              progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o002, 0o664), (0o022, 0o644)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("rule", ["youden", "sensitivity", "fixed"])
def test_one_class_data_fails_before_training(tiny_data, tmp_path, rule):
    shutil.rmtree(tiny_data / "train" / "PNEUMONIA")
    (tiny_data / "train" / "PNEUMONIA").mkdir()  # the folder is there, empty
    with pytest.raises(DataError, match="no PNEUMONIA images"):
        train(tiny_config(tiny_data, threshold_rule=rule), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
