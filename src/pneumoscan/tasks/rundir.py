"""The run folder: what a training run writes there, and replacing an earlier run without losing it.

`prepare_run_dir` refuses to reuse a folder unless asked (--resume, --overwrite). With --overwrite the
earlier run's files are set aside in `.replaced/` and deleted only once the new run has written its
first checkpoint; if the new run fails or is killed before that, `settle_replaced` puts them back.
While a run trains, its best weights are `best.partial.pt`; `best.pt` appears only once the run has
finalised them, so a `best.pt` is always finished. `incomplete` and `settle_after_failure` say and put
right what a run that failed left.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


class RunDirError(OSError):
    """The run folder cannot be used as asked (exists without --resume / --overwrite, or has nothing to resume)."""


REPLACED = ".replaced"  # a run folder's earlier files while a run started with --overwrite has no checkpoint yet
PARTIAL_BEST = "best.partial.pt"  # the best weights while the run trains: not yet what best.pt must be
RUN_FILES = ("best.pt", PARTIAL_BEST, "last.pt", "metrics.jsonl", "config.json", "split.json", "summary.json", "report.html",
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


def settle_after_failure(out: Path) -> bool:
    """Put an earlier run replaced by --overwrite back when the failed run wrote no checkpoint; True if it did."""
    restoring = (out / REPLACED).is_dir() and not (out / "last.pt").is_file()
    try:
        settle_replaced(out)
    except OSError as e:
        log.error("%s: could not put the earlier run's files back from %s/ (%s)", out, REPLACED, e)
        return False
    return restoring


class RunIncomplete(OSError):
    """A run stopped by a file it could not write or read; the message names the file and what is left."""


def incomplete(out: Path, error: OSError, restored: bool) -> RunIncomplete:
    """The error to report when `error` stopped the run in `out`: which file, why, that the run is unfinished and
    whether `--resume` can continue it (`restored`: the earlier run replaced by --overwrite is back instead)."""
    where = f"{error.filename}: " if error.filename else ""
    what = f"{where}{error.strerror or error}; the run in {out} is incomplete"
    if restored:
        return RunIncomplete(f"{what} (it wrote no checkpoint; the earlier run's files are back in place)")
    room = " once there is room" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    epoch = _last_epoch(out / "last.pt")
    if epoch is None:
        return RunIncomplete(f"{what}: it wrote no checkpoint to resume from; start it again{room} (--overwrite)")
    return RunIncomplete(f"{what}: `pneumoscan train --out {out} --resume` continues it{room} from last.pt "
                         f"(epoch {epoch})")


def _last_epoch(path: Path) -> int | None:
    """The epoch a last.pt holds, None when there is none that can be read."""
    from ..networks.checkpoint import read

    try:
        return int(read(path)["epoch"])
    except Exception:  # missing, cut short or not a checkpoint: nothing to resume from
        return None
