"""Provenance of a result: which code, libraries, device, checkpoint and data produced it.

`provenance` is what `evaluate` writes under "provenance" in metrics.json and the report shows: enough to
tell two evaluations apart and to find the code again (the git commit when pneumoscan runs from a git
checkout, and whether its source had local changes).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__

_PACKAGE = Path(__file__).resolve().parents[1]  # src/pneumoscan


def provenance(checkpoint: str | os.PathLike, data_root: str, split: str, device: torch.device | str) -> dict[str, Any]:
    """pneumoscan's version and source revision, Python, torch and numpy versions, the device, the checkpoint
    and its SHA-256, the data root and split, and the date (UTC)."""
    commit, modified = source_revision()
    device = torch.device(device)
    return {
        "pneumoscan": __version__,
        "git_commit": commit,
        "git_modified": modified,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "data_root": str(data_root),
        "split": split,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_name() -> str:
    """The CPU's model name as Linux gives it in /proc/cpuinfo, else the machine type ("x86_64")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_revision(package: Path = _PACKAGE) -> tuple[str | None, bool | None]:
    """(the commit checked out, whether the package's files differ from it: changed, added or untracked), or
    (None, None) when `package` is not tracked in a git checkout (an installed wheel; a package folder that
    happens to sit inside some other repository, such as a virtual environment in a checkout) or git is
    not there."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", ".")
    if commit is None or status is None:
        return None, None
    return commit.strip(), bool(status.strip())
