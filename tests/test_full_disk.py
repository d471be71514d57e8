"""Training on a full disk: a small tmpfs holds the run folder, filled up to leave a chosen room.

Full from the start, `pneumoscan train` stops with one line that names the file, says "No space left on
device" and that the run is incomplete. With room for the best weights but not for last.pt, no best.pt is
left (only best.partial.pt, which `predict` refuses), the line says how to resume, and once there is room
`--resume` finishes the run. The tmpfs needs root (or CAP_SYS_ADMIN): elsewhere the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_dataset

PAGE = 4096  # tmpfs gives out whole pages
TRAIN = ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--val-fraction", "0.25", "--no-progress",
         "--device", "cpu", "--no-eval"]


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs at tmp_path/disk, unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not (shutil.which("mount") and shutil.which("umount")):
        pytest.skip("needs mount and umount to make a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {disk} (needs root, or CAP_SYS_ADMIN in a container): "
                    f"{mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)  # busy: detached now, freed when let go


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "data", size=32)  # on the ordinary disk: only the run folder is short of room


def pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


def free_bytes(disk: Path) -> int:
    s = os.statvfs(disk)
    return s.f_bavail * s.f_frsize


def leave_room(disk: Path, room: int) -> None:
    """Fill `disk` with a file `filler` so that `room` bytes (whole pages) are left free."""
    with open(disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free_bytes(disk) - pages(room))
    assert free_bytes(disk) == pages(room)


def pneumoscan(*args: str | Path) -> subprocess.CompletedProcess:
    """The command as a user runs it (its own process: what it prints is all a user sees)."""
    return subprocess.run([sys.executable, "-m", "pneumoscan", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def the_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a command that failed: exit status 2, no traceback, no ERROR log line."""
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and not [line for line in lines if line.startswith("ERROR")], result.stderr
    [error] = [line for line in lines if line.startswith(f"pneumoscan {command}: error: ")]
    return error.removeprefix(f"pneumoscan {command}: error: ")


def checkpoint_sizes(data: Path, out: Path, monkeypatch) -> dict[str, list[int]]:
    """The size of each checkpoint a run of TRAIN into `out` writes, in order, by file name; `out` is removed."""
    from pneumoscan.networks import checkpoint
    from pneumoscan.apps.cli import main

    sizes: dict[str, list[int]] = {}
    save = checkpoint.save

    def measured(ckpt, path):
        save(ckpt, path)
        sizes.setdefault(Path(path).name, []).append(Path(path).stat().st_size)

    monkeypatch.setattr(checkpoint, "save", measured)
    assert main(["train", "--data", str(data), "--out", str(out), *TRAIN]) == 0
    sizes["other files"] = [sum(pages(p.stat().st_size) for p in out.iterdir() if p.suffix != ".pt")]
    shutil.rmtree(out)
    return sizes


def test_a_disk_full_from_the_start_stops_training_with_one_line_naming_the_file(small_disk, data):
    run = small_disk / "run"
    leave_room(small_disk, 0)
    error = the_error(pneumoscan("train", "--data", data, "--out", run, *TRAIN), "train")
    assert error == (f"{run / 'config.json'}: No space left on device; the run in {run} is incomplete: it wrote no "
                     f"checkpoint to resume from; start it again once there is room (--overwrite)")
    assert not [p for p in run.iterdir() if p.suffix in (".pt", ".tmp")]

    (small_disk / "filler").unlink()  # room again: the advice works
    assert pneumoscan("train", "--data", data, "--out", run, *TRAIN, "--overwrite").returncode == 0
    assert (run / "best.pt").is_file() and not (run / "best.partial.pt").exists()


def test_room_for_the_best_weights_but_not_last_pt_leaves_no_best_pt_and_the_run_resumes(small_disk, data, tmp_path,
                                                                                          monkeypatch):
    """Sized from the checkpoints a reference run writes: epoch 1 fits; at epoch 2 best.partial.pt fits (its new
    copy is written beside the old) and last.pt does not (its new copy beside the old one and the best weights)."""
    run = small_disk / "run"
    sizes = checkpoint_sizes(data, run, monkeypatch)
    best, last, other = sizes["best.partial.pt"], sizes["last.pt"], sizes["other files"][0]
    assert len(last) == 2 and len(best) in (1, 2), sizes
    best_2 = pages(best[1]) if len(best) == 2 else 0
    room = other + pages(best[0]) + pages(last[0]) + best_2 + (pages(last[1]) - best_2) // 2
    assert room < other + pages(best[-1]) + pages(last[0]) + pages(last[1]) - 16 * PAGE  # last.pt cannot fit
    leave_room(small_disk, room)

    error = the_error(pneumoscan("train", "--data", data, "--out", run, *TRAIN), "train")
    assert error == (f"{run / 'last.pt'}: No space left on device; the run in {run} is incomplete: `pneumoscan train "
                     f"--out {run} --resume` continues it once there is room from last.pt (epoch 1)")
    assert sorted(p.name for p in run.iterdir()) == ["best.partial.pt", "config.json", "last.pt", "metrics.jsonl",
                                                     "split.json"]
    image = next((data / "train" / "PNEUMONIA").iterdir())
    refused = the_error(pneumoscan("predict", run / "best.partial.pt", image, "--out", tmp_path / "p.csv"), "predict")
    assert refused.startswith(f"{run / 'best.partial.pt'}: the best weights of a training run that has not finished")
    assert refused.endswith(f"continue the run with `pneumoscan train --out {run} --resume` and use its best.pt")
    missing = the_error(pneumoscan("predict", run / "best.pt", image, "--out", tmp_path / "p.csv"), "predict")
    assert missing == (f"{run / 'best.pt'}: checkpoint not found; the run in {run} has not finished (it left "
                       f"best.partial.pt): `pneumoscan train --out {run} --resume` finishes it")
    assert not (tmp_path / "p.csv").exists()

    (small_disk / "filler").unlink()
    resumed = pneumoscan("train", "--data", data, "--out", run, *TRAIN, "--resume")
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed
    assert (run / "best.pt").is_file() and not (run / "best.partial.pt").exists()
    assert '"resumed": true' in (run / "summary.json").read_text()
    assert pneumoscan("predict", run / "best.pt", image, "--out", tmp_path / "p.csv").returncode == 0
