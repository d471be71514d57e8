"""The run folder: what a training run writes there, and replacing an earlier run without losing it.

`prepare_run_dir` refuses to reuse a folder unless asked (--resume, --overwrite). With --overwrite the
earlier run's files are set aside in `.replaced/` and deleted only once the new run has written its
first checkpoint; if the new run fails or is killed before that, `settle_replaced` puts them back.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class RunDirError(OSError):
    """The run folder cannot be used as asked (exists without --resume / --overwrite, or has nothing to resume)."""


REPLACED = ".replaced"  # a run folder's earlier files while a run started with --overwrite has no checkpoint yet
RUN_FILES = ("best.pt", "last.pt", "metrics.jsonl", "config.json", "split.json", "summary.json", "report.html",
             "tensorboard")


def _run_files(out: Path) -> list[Path]:
    """What a run and its evaluations write into the run folder (other files are left alone)."""
    return [p for p in sorted(out.iterdir()) if p.name in RUN_FILES or (p.is_dir() and p.name.startswith("eval-"))]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def settle_replaced(out: Path) -> None:
    """Finish a replacement: once the new run has a checkpoint (last.pt), the earlier run's files set aside
    in `.replaced/` are deleted; if it has none (it failed or was killed first), its files are removed
    and the earlier run's are put back."""
    kept = out / REPLACED
    if not kept.is_dir():
        return
    if (out / "last.pt").is_file():
        shutil.rmtree(kept)
        return
    for path in _run_files(out):
        _remove(path)
    for path in sorted(kept.iterdir()):
        os.replace(path, out / path.name)
    kept.rmdir()
    log.info("%s: the new run wrote no checkpoint; the earlier run's files are back in place", out)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Check the run folder can be used as asked. With `overwrite`, the earlier run's files (checkpoints,
    metrics, summary, evaluations, report) are moved into `.replaced/`, deleted only when the new run
    has written its first checkpoint and put back if it fails before (see `settle_replaced`)."""
    if out.is_dir():
        settle_replaced(out)  # a run killed while replacing another
    if resume:
        if not (out / "last.pt").is_file():
            raise RunDirError(f"{out}: nothing to resume (no last.pt)")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(f"{out}: run folder exists and is not empty; pass --resume to continue it or --overwrite to replace it")
        earlier = _run_files(out)
        if earlier:
            (out / REPLACED).mkdir()
            for path in earlier:
                os.replace(path, out / REPLACED / path.name)
    out.mkdir(parents=True, exist_ok=True)
