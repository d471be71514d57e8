"""An archive of images scored in numbered parts: its listing, its parts on disk, and its one output file.

What a cluster job needs beside the engine that runs it (`cluster_predict`), none of it tied to Ray:
- `list_inputs`: folders (searched recursively, as local predict searches them), files, globs (`"scans/**/*.png"`,
  quoted so that the shell leaves them alone), text files of paths (`.txt` or `.lst`: one file per line, `#`
  comments), and URIs that pyarrow's filesystems understand (`s3://`, `gs://`, `file://`) in each of those forms.
- `read_source`: the bytes of a listed URI, read where it is decoded (a worker), never through the driver.
- `PartStore`: the archive cut into parts of `part_size` images, each written once as a Parquet file under
  OUT.parts/ with the raw scores of its images (the model's output at the scoring prior, before any decision),
  so that an interrupted run skips the parts already written; a manifest refuses parts of another run.
- `assemble`: the parts, streamed in input order into `--out` (Parquet or CSV, the columns of local predict),
  every record made by the same functions local predict uses, at the prior the whole run ends up with.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..io.fileio import atomic_write_bytes, optional_import, printable, write_json
from ..io.images import ImageLoadError, expand_paths, is_image_candidate, is_image_file, read_file
from ..io.records import ImageResult, result_cells, result_columns, spreadsheet_safe

LIST_SUFFIXES = (".txt", ".lst")  # a text file of paths, one a line
PARTS_VERSION = 1


def is_uri(item: str) -> bool:
    """A `scheme://...` input, read through pyarrow's filesystems (`file://` included)."""
    head, sep, _ = item.partition("://")
    return bool(sep) and head.isidentifier()


def _pyarrow_fs():
    return optional_import("pyarrow.fs", "cluster", "reading s3://, gs:// and file:// inputs")


@lru_cache(maxsize=64)
def _filesystem(root: str):
    """The pyarrow filesystem for `scheme://bucket` (made once per process: opening S3 resolves the region)."""
    return _pyarrow_fs().FileSystem.from_uri(root)[0]


def _split_uri(uri: str) -> tuple[str, object, str]:
    """(scheme, filesystem, path within it). `file://` paths are local paths."""
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        return scheme, None, rest
    bucket = rest.split("/", 1)[0]
    return scheme, _filesystem(f"{scheme}://{bucket}"), rest


def local_path(uri: str) -> str | None:
    """The local path a `file://` URI or a plain path names; None for a remote URI."""
    if not is_uri(uri):
        return uri
    scheme, _, path = _split_uri(uri)
    return path if scheme == "file" else None


def read_source(item: str) -> str | bytes:
    """What the loader reads for a listed input: a local path (read there, with its checks), or a remote
    URI's bytes. Raises ImageLoadError naming `item`."""
    path = local_path(item)
    if path is not None:
        return path
    _, fs, path = _split_uri(item)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, ValueError) as e:  # pyarrow raises FileNotFoundError, PermissionError, OSError
        raise ImageLoadError(item, f"cannot read file ({e})") from None


def _list_uri(item: str) -> list[str]:
    """A remote URI: its images when it is a folder, else itself (a missing one gets its error row)."""
    scheme, fs, path = _split_uri(item)
    if fs is None:  # file://
        return [f"file://{p}" for p in expand_paths([path])]
    fsmod = _pyarrow_fs()
    info = fs.get_file_info(path)
    if info.type != fsmod.FileType.Directory:
        return [item]
    listed = fs.get_file_info(fsmod.FileSelector(path, recursive=True))
    return sorted(f"{scheme}://{f.path}" for f in listed
                  if f.type == fsmod.FileType.File and is_image_file(Path(f.base_name)))


def _list_glob(item: str) -> list[str]:
    """A quoted glob: the images it matches, sorted; itself when it matches nothing (an error row says so)."""
    if is_uri(item):
        scheme, _, path = _split_uri(item)
        if scheme != "file":
            raise ValueError(f"{item}: globs are expanded for local paths and file:// only; list the folder instead")
        return [f"file://{p}" for p in _list_glob(path)] or [item]
    found = sorted(p for p in glob.glob(item, recursive=True) if is_image_candidate(Path(p)))
    return found or [item]


def _read_list(item: str) -> list[str]:
    """A text file of paths or URIs, one a line (blank lines and `#` comments skipped), each kept as written."""
    try:
        source = read_source(item)
        data = read_file(source, item) if isinstance(source, str) else source
    except ImageLoadError as e:
        raise ValueError(str(e)) from None
    text = data.decode("utf-8", "surrogateescape")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def list_inputs(inputs: Iterable[str]) -> list[str]:
    """Every image the inputs name, in order: a folder as local predict lists it (sorted, recursive), a glob's
    matches sorted, a `.txt`/`.lst` file's lines as written; remote URIs the same through pyarrow."""
    found: list[str] = []
    for item in inputs:
        if item.lower().endswith(LIST_SUFFIXES):
            found.extend(_read_list(item))
        elif any(c in item for c in "*?[") and not os.path.lexists(item):
            found.extend(_list_glob(item))
        elif is_uri(item):
            found.extend(_list_uri(item))
        else:
            found.extend(expand_paths([item]))
    return found


def part_schema():
    """The columns of a part: each image's place in the listing, its path (the file name's bytes, which need not
    be UTF-8) and its raw scores (see `PartStore`)."""
    pa = optional_import("pyarrow", "cluster", "writing the parts of an archive")
    return pa.schema([("index", pa.int64()), ("path", pa.binary()), ("p", pa.float64()),
                      ("class_probs", pa.list_(pa.float64())), ("ood", pa.float64()),
                      ("warnings", pa.list_(pa.string())), ("error", pa.string())])


class PartStore:
    """OUT.parts/: a manifest naming the run, and part-NNNNNN.parquet for each finished part."""

    def __init__(self, out: str | os.PathLike, listing: list[str], part_size: int, settings: dict):
        self.folder = Path(f"{out}.parts")
        self.n, self.part_size = len(listing), part_size
        digest = hashlib.sha256("\n".join(printable(p) for p in listing).encode()).hexdigest()
        self.manifest = {"version": PARTS_VERSION, "images": self.n, "part_size": part_size, "listing_sha256": digest,
                         **settings}
        self.parts = (self.n + part_size - 1) // part_size

    def open(self, resume: bool) -> None:
        """Start (or, with `resume`, continue) the run; parts of another run are refused, naming the folder."""
        path = self.folder / "manifest.json"
        if path.exists():
            if not resume:
                shutil.rmtree(self.folder)
            else:
                old = json.loads(path.read_text())
                if old != self.manifest:
                    changed = sorted(k for k in {*old, *self.manifest} if old.get(k) != self.manifest.get(k))
                    raise ValueError(f"{self.folder}: holds parts of another run (differs in {', '.join(changed)}); "
                                     "delete it or run without --resume")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(path, self.manifest)

    def part_path(self, part: int) -> Path:
        return self.folder / f"part-{part:06d}.parquet"

    def done(self) -> set[int]:
        return {p for p in range(self.parts) if self.part_path(p).exists()}

    def bounds(self, part: int) -> range:
        return range(part * self.part_size, min(self.n, (part + 1) * self.part_size))

    def write(self, part: int, rows: dict[int, dict]) -> None:
        """Write one finished part (its rows keyed by index: each image exactly once), atomically."""
        pa = optional_import("pyarrow", "cluster", "writing the parts of an archive")
        pq = optional_import("pyarrow.parquet", "cluster", "writing the parts of an archive")
        ordered = [rows[i] for i in self.bounds(part)]
        table = pa.Table.from_pylist(ordered, schema=part_schema())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.part_path(part), sink.getvalue().to_pybytes())

    def read(self, part: int, columns: list[str] | None = None):
        pq = optional_import("pyarrow.parquet", "cluster", "reading the parts of an archive")
        return pq.read_table(self.part_path(part), columns=columns)

    def probabilities(self) -> np.ndarray:
        """Every scored image's P(pneumonia) at the scoring prior, in input order (8 bytes an image)."""
        parts = [self.read(p, ["p"]).column("p").drop_null().to_numpy() for p in range(self.parts)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def records(self, make: Callable[[dict], ImageResult]) -> Iterator[list[ImageResult]]:
        """Each part's records in input order, one part in memory at a time."""
        for part in range(self.parts):
            yield [make(row) for row in self.read(part).to_pylist()]


def result_table(records: list[ImageResult], class_names: list[str]):
    """Records as an Arrow table with local predict's columns: numbers as numbers, an unreadable image's cells null,
    an infinite out-of-distribution score as inf, outside_training as a boolean."""
    pa = optional_import("pyarrow", "cluster", "writing Parquet")
    per_class = [f"p_{n}" for n in class_names] if len(class_names) > 2 else []
    f64, text = pa.float64(), pa.string()
    types = {"path": text, "p_pneumonia": f64, "label": text, "threshold": f64, **{c: f64 for c in per_class},
             "error": text, "warnings": text, "assumed_prevalence": f64, "prevalence_source": text,
             "ood_score": f64, "ood_threshold": f64, "outside_training": pa.bool_()}
    cols: dict[str, list] = {k: [] for k in types}
    for r in records:
        scored = r.p_pneumonia is not None
        flagged_inf = r.outside_training is not None and r.ood_score is None
        row = {"path": printable(r.path), "p_pneumonia": r.p_pneumonia, "label": r.label,
               "threshold": r.threshold if scored else None, "error": r.error, "warnings": "; ".join(r.warnings),
               "assumed_prevalence": r.assumed_prevalence if scored else None,
               "prevalence_source": r.prevalence_source if scored else None,
               "ood_score": float("inf") if flagged_inf else r.ood_score, "ood_threshold": r.ood_threshold,
               "outside_training": r.outside_training,
               **{f"p_{n}": (r.probabilities or {}).get(n) for n in class_names if f"p_{n}" in types}}
        for k in cols:
            cols[k].append(row[k])
    assert list(cols) == ["path", *result_columns(class_names)]
    return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def assemble(out: str | os.PathLike, batches: Iterable[list[ImageResult]], class_names: list[str]) -> None:
    """Write `out` from record batches, one batch in memory at a time: Parquet for `.parquet`, else CSV with the
    cells of local predict's CSV. Written beside `out` and renamed into place, so it is whole or absent."""
    import csv

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        if out.suffix.lower() == ".parquet":
            pq = optional_import("pyarrow.parquet", "cluster", "writing Parquet")
            writer = None
            for batch in batches:
                table = result_table(batch, class_names)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            writer = writer or pq.ParquetWriter(tmp, result_table([], class_names).schema)
            writer.close()
        else:
            columns = ["path", *result_columns(class_names)]
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                for batch in batches:
                    w.writerows({k: spreadsheet_safe(printable(v)) for k, v in
                                 {"path": r.path, **result_cells(r, class_names)}.items()} for r in batch)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
