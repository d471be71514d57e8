"""File and package helpers shared by every stage: atomic writes and optional imports.

Every file pneumoscan writes goes through `atomic_write_bytes` (a temporary file in the same folder,
flushed to disk, then renamed into place), so a crash never leaves a half-written file. Optional
dependencies are imported through `optional_import`, which fails with the extra to install.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any


def optional_import(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {module.split('.')[0]!r} ({e}); "
                          f"install it with: pip install 'pneumoscan[{extra}]'") from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save, written atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
