"""File and package helpers shared by every stage: atomic writes and optional imports.

Every file pneumoscan writes goes through `atomic_write_bytes` (a temporary file in the same folder,
flushed to disk, then renamed into place), so a crash never leaves a half-written file; written files get
the permissions the umask allows, like any file a program creates. Optional
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
from typing import Any, NoReturn


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; honour the umask as open() would
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_naming(e, path)


def _raise_naming(error: BaseException, path: str | os.PathLike) -> NoReturn:
    """Raise `error`, naming `path` when it is an OSError that names no file: a failed write says only
    "[Errno 28] No space left on device", and the user needs to know which file, on which disk."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None  # the subclass the errno gives
    raise error


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` (UTF-8) to `path`; an error names the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        _raise_naming(e, path)


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc; elsewhere a quick set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def printable(text: str) -> str:
    """`text` as valid Unicode: bytes a file name carried that are not UTF-8 (held by Python as
    surrogate escapes, e.g. the byte 0xFF as U+DCFF) are written as backslash escapes (`\\xff`)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name produced
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` as UTF-8, atomically. File names that are not valid UTF-8 are written with
    backslash escapes (see `printable`), so the file stays valid UTF-8 for other tools instead of
    failing after all the work that produced it."""
    atomic_write_bytes(path, printable(text).encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_torch(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save, written atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
