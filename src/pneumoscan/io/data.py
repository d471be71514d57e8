"""Data: find the images of a Kaggle-layout folder, carve a patient-level validation split, and cache pixels.

Layout: `ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*` (class folders matched case-insensitively). The
validation split is carved out of `train` by patient (and byte-identical copies are kept together), so
no patient is on both sides. The paper's tiny `ROOT/val` folder is exposed as the split `kaggle_val`
and never used to choose anything. Decoded, resized pixels are cached as one uint8 array per split
under the user's cache folder, keyed by the file list, sizes, modification times and preprocessing,
so later epochs and later runs never decode an image again; the carved validation split is
remembered there too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.config import DataConfig, Preprocessing
from .fileio import atomic_write_text, current_umask
from .images import ImageLoadError, is_image_candidate, load_for_model, read_file, resize

log = logging.getLogger(__name__)

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # the folders of the Kaggle layout
TASK_CLASSES = {"binary": CLASS_NAMES, "three-class": ("NORMAL", "BACTERIAL", "VIRAL")}
SPLITS = ("train", "val", "test", "kaggle_val")
CACHE_VERSION = 2  # 2: a colour JPEG's grey is its stored luma (images._decode_raster)
PROCESS_DECODE_MIN = 256  # fewer images are decoded in threads: starting worker processes would cost more

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE),
)


class DataError(Exception):
    """The data folder is missing or malformed; the message says what was expected."""


def patient_id(filename: str) -> str:
    """Patient from a Kermany file name: person123_bacteria_4.jpeg -> person123, IM-0115-0001.jpeg -> IM-0115.

    Names that match no known pattern count as their own patient (their stem).
    """
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(filename)
        if m:
            return m.group(1)
    return Path(filename).stem


def pneumonia_type(filename: str) -> str:
    """'bacteria', 'virus' or '' (unknown / normal), from the Kermany file name."""
    low = filename.lower()
    return "bacteria" if "_bacteria_" in low else "virus" if "_virus_" in low else ""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # 0 NORMAL, 1 PNEUMONIA (the folder)
    patient: str
    subtype: str = ""  # 'bacteria' / 'virus' for PNEUMONIA images whose file name says so


def class_names(task: str) -> tuple[str, ...]:
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[task]


def task_labels(samples: list[Sample], task: str) -> np.ndarray:
    """Class index of each sample for `task` (int64); three-class needs the pneumonia type in every file name."""
    class_names(task)
    if task == "binary":
        return np.array([s.label for s in samples], dtype=np.int64)
    unknown = [s.path for s in samples if s.label and s.subtype not in ("bacteria", "virus")]
    if unknown:
        raise DataError(f"the three-class task needs 'bacteria' or 'virus' in every PNEUMONIA file name; "
                        f"{len(unknown)} do not, e.g. " + ", ".join(unknown[:3]))
    return np.array([0 if not s.label else 1 if s.subtype == "bacteria" else 2 for s in samples], dtype=np.int64)


def _class_dirs(split_dir: Path) -> dict[int, Path]:
    found = {}
    for child in split_dir.iterdir() if split_dir.is_dir() else ():
        if child.is_dir() and child.name.upper() in CLASS_NAMES:
            found[CLASS_NAMES.index(child.name.upper())] = child
    return found


def scan_folder(split_dir: Path) -> list[Sample]:
    """All image files under split_dir/{NORMAL,PNEUMONIA}, sorted by path. A FIFO, device or broken symbolic
    link with an image name is listed too: decoding then reports it as unreadable instead of skipping it."""
    dirs = _class_dirs(split_dir)
    if len(dirs) != len(CLASS_NAMES):
        raise DataError(f"{split_dir}: expected sub-folders {' and '.join(CLASS_NAMES)} (any case), found "
                        f"{sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else 'no such folder'}")
    samples = [Sample(str(p), label, patient_id(p.name), pneumonia_type(p.name) if label else "")
               for label, d in sorted(dirs.items()) for p in sorted(d.rglob("*")) if is_image_candidate(p)]
    if not samples:
        raise DataError(f"{split_dir}: no JPEG or PNG images found")
    return samples


def check_one_label(samples: list[Sample], split_dir: Path) -> None:
    """DataError when one file is under two class folders: a class folder that leads to the other, or a link
    to a file of another class. Training would see it with both labels and learn nothing from it."""
    dirs = {CLASS_NAMES[label]: d.resolve() for label, d in _class_dirs(split_dir).items()}
    if len(set(dirs.values())) < len(dirs):
        raise DataError(f"{split_dir}: the class folders {' and '.join(dirs)} are one folder ({next(iter(dirs.values()))}); "
                        "each class needs its own images")
    first: dict[str, Sample] = {}
    for s in samples:
        other = first.setdefault(os.path.realpath(s.path), s)
        if other.label != s.label:
            raise DataError(f"{other.path} and {s.path} are one file ({os.path.realpath(s.path)}) under two classes, "
                            f"{CLASS_NAMES[other.label]} and {CLASS_NAMES[s.label]}; each image needs one label")


def _file_digest(path: str) -> str:
    try:
        return hashlib.blake2b(read_file(path), digest_size=16).hexdigest()
    except ImageLoadError:  # unreadable (decoding will say why): a group of its own
        return f"unreadable:{path}"


def check_one_content(samples: list[Sample], digests: list[str]) -> None:
    """DataError when byte-identical files are under two classes (a copy of one image in both folders)."""
    first: dict[str, Sample] = {}
    for s, digest in zip(samples, digests):
        other = first.setdefault(digest, s)
        if other.label != s.label:
            raise DataError(f"{other.path} and {s.path} are the same image, byte for byte, under two classes, "
                            f"{CLASS_NAMES[other.label]} and {CLASS_NAMES[s.label]}; each image needs one label")


def _groups(samples: list[Sample], digests: list[str]) -> np.ndarray:
    """Group index per sample: same patient or byte-identical file -> same group (union-find)."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key: dict[str, int] = {}
    for i, s in enumerate(samples):
        for key in ("p:" + s.patient, "h:" + digests[i]):
            j = first_by_key.setdefault(key, i)
            parent[find(i)] = find(j)
    roots = [find(i) for i in range(len(samples))]
    _, group = np.unique(roots, return_inverse=True)
    return group


def carve_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split train into (train, val) by patient group, stratified by class, deterministic for a seed.

    Uses scikit-learn's StratifiedGroupKFold with round(1/fraction) folds and keeps fold 0 as validation.
    DataError when one image (byte for byte) is under both classes.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < fraction < 0.5:
        raise ValueError(f"validation fraction must be in (0, 0.5), got {fraction}")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        digests = list(pool.map(_file_digest, (s.path for s in samples)))
    check_one_content(samples, digests)
    groups = _groups(samples, digests)
    labels = np.array([s.label for s in samples])
    n_splits = max(2, round(1 / fraction))
    if len(np.unique(groups)) < n_splits:
        raise DataError(f"only {len(np.unique(groups))} patients: too few to carve a {fraction:.0%} validation split")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in sorted(train_idx)], [samples[i] for i in sorted(val_idx)]


def _remembered_carve(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """carve_validation, remembered in the cache folder: grouping reads every file and the fold search
    takes seconds. Keyed like the pixel cache, plus the fraction, the seed and scikit-learn's version."""
    from importlib.metadata import version

    # "one label": splits remembered before check_one_content ran are carved (and checked) again
    settings = f"split|{fraction}|{seed}|scikit-learn {version('scikit-learn')}|one label"
    path = default_cache_dir() / "splits" / f"{_files_key(samples, settings)}.json"
    try:
        val_paths = set(json.loads(path.read_text())["val"])
    except (OSError, ValueError, KeyError, TypeError):
        val_paths = None
    if val_paths is not None and val_paths <= {s.path for s in samples}:
        return [s for s in samples if s.path not in val_paths], [s for s in samples if s.path in val_paths]
    train, val = carve_validation(samples, fraction, seed)
    try:
        atomic_write_text(path, json.dumps({"val": [s.path for s in val]}))
    except OSError as e:
        log.warning("could not remember the validation split in %s (%s)", path.parent, e)
    return train, val


NPZ_SEPARATOR = "#"  # a MedMNIST image is addressed as FILE.npz#split/index


@functools.lru_cache(maxsize=2)
def _npz_arrays(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None


def npz_splits(path: Path) -> dict[str, list[Sample]]:
    """A MedMNIST-format .npz (e.g. PneumoniaMNIST): {train,val,test}_images (N, H, W) uint8 and _labels (N, 1).

    Its own train/val/test split is kept (MedMNIST publishes no patient ids, so none can be carved here).
    """
    arrays = _npz_arrays(str(path), path.stat().st_mtime_ns)
    splits = {}
    for split in ("train", "val", "test"):
        if f"{split}_images" not in arrays:
            continue
        images, labels = arrays[f"{split}_images"], arrays.get(f"{split}_labels")
        if labels is None or images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(f"{path}: {split}_images / {split}_labels are not a MedMNIST pair of arrays")
        labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
        if not set(np.unique(labels)) <= {0, 1}:
            raise DataError(f"{path}: {split}_labels must be 0 (normal) / 1 (pneumonia); found {sorted(set(np.unique(labels)))}")
        splits[split] = [Sample(f"{path}{NPZ_SEPARATOR}{split}/{i}", int(y), f"{split}-{i}") for i, y in enumerate(labels)]
    if "train" not in splits or "val" not in splits:
        raise DataError(f"{path}: expected at least train_images/train_labels and val_images/val_labels")
    return splits


def _npz_image(address: str) -> np.ndarray:
    path, _, item = address.rpartition(NPZ_SEPARATOR)
    split, index = item.split("/")
    img = _npz_arrays(path, os.stat(path).st_mtime_ns)[f"{split}_images"][int(index)]
    if img.ndim == 3:  # RGB MedMNIST variants
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("L"))
    return img.astype(np.uint8)


def split_samples(cfg: DataConfig) -> dict[str, list[Sample]]:
    """The splits under cfg.root: train and val (carved from ROOT/train), test and kaggle_val if present.

    A MedMNIST-format .npz file is accepted as root too (its own train/val/test split).
    """
    if not cfg.root:
        raise DataError("no data folder given: pass --data ROOT or set PNEUMOSCAN_DATA=ROOT "
                        "(ROOT holds train/NORMAL and train/PNEUMONIA)")
    root = Path(cfg.root)
    if root.suffix == ".npz" and root.is_file():
        return npz_splits(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (pass --data or set PNEUMOSCAN_DATA)")
    if not (root / "train").is_dir():
        raise DataError(f"{root}: expected a train/ folder (Kaggle layout ROOT/train/{{NORMAL,PNEUMONIA}})")
    train, val = _remembered_carve(_scan_checked(root / "train"), cfg.val_fraction, cfg.split_seed)
    splits = {"train": train, "val": val}
    for name, folder in (("test", "test"), ("kaggle_val", "val")):
        if (root / folder).is_dir():
            splits[name] = _scan_checked(root / folder)
    return splits


def _scan_checked(split_dir: Path) -> list[Sample]:
    samples = scan_folder(split_dir)
    check_one_label(samples, split_dir)
    return samples


def load_split(cfg: DataConfig, split: str) -> list[Sample]:
    splits = split_samples(cfg)
    if split not in splits:
        raise DataError(f"split {split!r} is not available under {cfg.root}; available: {', '.join(splits)}")
    return splits[split]


@dataclass
class CachedImages:
    """Pixels of one split, decoded once: `pixels` is (N, S, S) uint8, aligned with `samples` (bad files dropped)."""

    samples: list[Sample]
    pixels: np.ndarray
    labels: np.ndarray
    errors: dict[str, str]  # path -> reason, for files that could not be read


def default_cache_dir() -> Path:
    base = os.environ.get("PNEUMOSCAN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "pneumoscan")
    return Path(base)


def _files_key(samples: list[Sample], settings: str) -> str:
    """Hash of the files' paths, sizes and modification times, and of the settings that shaped a result."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{settings}".encode())
    for s in samples:
        # a path's bytes as the file system holds them: names that are not UTF-8 hash too
        h.update(b"|" + os.fsencode(os.path.abspath(s.path)) + _file_state(s.path).encode())
    return h.hexdigest()[:32]


def _file_state(path: str) -> str:
    """'|size|mtime' of a sample's file; of the link itself for a broken symbolic link (no file behind it)."""
    path = path.partition(NPZ_SEPARATOR)[0] if NPZ_SEPARATOR in path else path
    try:
        st = os.stat(path)
    except OSError:
        st = os.lstat(path)
    return f"|{st.st_size}|{st.st_mtime_ns}"


def _decode(path: str, prep: Preprocessing) -> np.ndarray | str:
    try:
        if NPZ_SEPARATOR in path and path.partition(NPZ_SEPARATOR)[0].endswith(".npz"):
            return resize(_npz_image(path), prep.image_size, prep.resize_filter)
        return load_for_model(path, prep.image_size, prep.resize_filter)
    except ImageLoadError as e:
        return e.reason


def _decoder_pool(n_images: int, processes: bool | None) -> tuple[Executor, dict[str, int]]:
    """Worker processes for large sets, threads otherwise (`processes` None: choose by size and platform).

    Reading a JPEG is mostly Python (PIL parses the headers) and holds the GIL, so threads stop scaling
    beyond about two cores. Processes are forked: they need only PIL and numpy, already imported here,
    where spawning them would import PyTorch again in each. Linux only: forking a process that has
    loaded macOS system frameworks is unsafe.
    """
    workers = os.cpu_count() or 1
    if processes is None:
        processes = workers > 1 and n_images >= PROCESS_DECODE_MIN and sys.platform.startswith("linux")
    if processes:
        return (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")),
                {"chunksize": max(1, min(64, n_images // (4 * workers)))})
    return ThreadPoolExecutor(workers), {}


def _decode_all(samples: list[Sample], prep: Preprocessing, progress: bool,
                processes: bool | None) -> tuple[np.ndarray, dict[str, str]]:
    """Pixels of every sample (rows of unreadable ones left unset) and {path: reason} for those."""
    pixels = np.empty((len(samples), prep.image_size, prep.image_size), dtype=np.uint8)
    errors: dict[str, str] = {}
    pool, options = _decoder_pool(len(samples), processes)
    with pool:
        results = pool.map(functools.partial(_decode, prep=prep), [s.path for s in samples], **options)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(samples), desc="decoding images", unit="img", leave=False)
        for i, (s, r) in enumerate(zip(samples, results)):
            if isinstance(r, str):
                errors[s.path] = r
            else:
                pixels[i] = r
    return pixels, errors


def cache_images(samples: list[Sample], prep: Preprocessing, cache_dir: Path | None = None, progress: bool = False,
                 processes: bool | None = None) -> CachedImages:
    """Decode every sample once (in parallel, see `_decoder_pool`) into a uint8 array, reusing the
    on-disk cache when still valid. An entry that cannot be read back whole (truncated, corrupt, or not
    matching its index) counts as a miss: it is removed and rebuilt."""
    cache_dir = cache_dir or default_cache_dir()
    entry = cache_dir / _files_key(samples, f"{prep.image_size}|{prep.resize_filter}")
    if entry.exists():
        try:
            return _read_cache(entry, samples, prep)
        except MemoryError:
            raise  # a sound entry too large for this machine now: keep it
        except Exception as e:  # numpy and json raise many types for a damaged file; all mean "rebuild"
            log.warning("image cache entry %s is damaged (%s: %s); decoding the images again", entry, type(e).__name__, e)
            _remove_entry(entry)

    try:
        pixels, errors = _decode_all(samples, prep, progress, processes)
    except BrokenProcessPool as e:  # a worker was killed (out of memory?) or crashed
        log.warning("a process decoding images died (%s); decoding them again in threads", e)
        pixels, errors = _decode_all(samples, prep, progress, processes=False)
    keep = np.array([s.path not in errors for s in samples], dtype=bool)
    for path, reason in errors.items():
        log.warning("skipping unreadable image %s: %s", path, reason)
    good = [s for s, k in zip(samples, keep) if k]
    pixels = pixels[keep]
    _write_cache(entry, pixels, {"kept": [s.path for s in good], "errors": errors})
    return CachedImages(good, pixels, np.array([s.label for s in good], dtype=np.int64), errors)


def _read_cache(entry: Path, samples: list[Sample], prep: Preprocessing) -> CachedImages:
    """A cache entry, checked against the samples: ValueError unless the pixels are (kept, S, S) uint8
    and every kept or failed path is one of the samples."""
    index = json.loads((entry / "index.json").read_text())
    kept, errors = index["kept"], index["errors"]
    pixels = np.load(entry / "pixels.npy", allow_pickle=False)
    size = prep.image_size
    paths = {s.path for s in samples}
    if not isinstance(errors, dict) or not isinstance(kept, list) or len(set(kept)) != len(kept):
        raise ValueError("malformed index.json")
    if pixels.dtype != np.uint8 or pixels.shape != (len(kept), size, size):
        raise ValueError(f"pixels {pixels.dtype} {pixels.shape}, index lists {len(kept)} images of {size}x{size}")
    if not set(kept) <= paths or not set(errors) <= paths or len(kept) + len(errors) != len(samples):
        raise ValueError("index.json does not list these files")
    kept_set = set(kept)
    good = [s for s in samples if s.path in kept_set]
    if [s.path for s in good] != kept:
        raise ValueError("index.json lists the files in another order")
    return CachedImages(good, pixels, np.array([s.label for s in good], dtype=np.int64), errors)


def _remove_entry(entry: Path) -> None:
    """Move a damaged entry out of the way (one rename, so readers see it or nothing), then delete it."""
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}")
    try:
        os.rename(entry, trash)
    except OSError:
        return  # another process removed or replaced it
    shutil.rmtree(trash, ignore_errors=True)


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_cache(entry: Path, pixels: np.ndarray, index: dict) -> None:
    """Write the cache entry into a temporary folder, its files flushed to disk, and rename it into place
    (atomic for readers). On any failure (a full disk) the temporary folder is removed."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
        _write_synced(tmp / "pixels.npy", lambda f: np.save(f, pixels, allow_pickle=False))
        _write_synced(tmp / "index.json", lambda f: f.write(json.dumps(index).encode()))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
        try:
            os.rename(tmp, entry)
        except OSError:  # another process wrote the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _fsync_dir(entry.parent)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        log.warning("could not write the image cache in %s (%s); images will be decoded again next time", entry.parent, e)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; not possible on every platform, where it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def split_summary(samples: list[Sample]) -> dict[str, int]:
    labels = [s.label for s in samples]
    subtypes = [s.subtype for s in samples]
    return {"images": len(samples), "patients": len({s.patient for s in samples}),
            **{name.lower(): labels.count(i) for i, name in enumerate(CLASS_NAMES)},
            "bacterial": subtypes.count("bacteria"), "viral": subtypes.count("virus")}
