"""Dataset audit: what is in a Kaggle-layout folder, and where it can leak.

Counts per split and class (the paper's Figure 1), patients per split and patients found in more than
one split, byte-identical and near-identical duplicate images within and across splits, image size and
mode statistics, and unreadable files. Splits here are the folders as given (train, val, test); the
validation split pneumoscan carves out of train is patient-disjoint by construction.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io.data import CLASS_NAMES, DataError, Sample, scan_folder
from ..io.fileio import write_json
from ..io.images import ImageLoadError, load_grey

FOLDER_SPLITS = ("train", "val", "test")


def _inspect(path: str) -> dict[str, Any]:
    """Digest, header size/mode and a 64-bit difference hash of one file (or its error)."""
    try:
        data = Path(path).read_bytes()
        with Image.open(path) as img:
            size, mode = img.size, img.mode
        grey = load_grey(data, name=path)
    except (OSError, ImageLoadError, SyntaxError, ValueError) as e:
        return {"error": str(e)}
    small = np.asarray(Image.fromarray(grey).resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    dhash = int(np.packbits(bits).view(">u8")[0])
    thumb = np.asarray(Image.fromarray(grey).resize((32, 32), Image.Resampling.BOX), dtype=np.uint8)
    return {"sha": hashlib.blake2b(data, digest_size=16).hexdigest(), "size": size, "mode": mode, "dhash": dhash,
            "thumb": thumb}


def _near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, hamming distance) for every pair of 64-bit hashes at most `max_distance` bits apart."""
    pairs = []
    for i in range(len(hashes) - 1):
        d = np.bitwise_count(hashes[i] ^ hashes[i + 1:])
        for j in np.flatnonzero(d <= max_distance):
            pairs.append((i, i + 1 + int(j), int(d[j])))
    return pairs


def _near_identical(reps: list[tuple[str, Sample]], info_of: dict[int, dict[str, Any]], near_distance: int,
                    max_mad: float) -> list[dict[str, Any]]:
    """Near-identical pairs among `reps` (one representative per byte-identical group): small dHash distances,
    confirmed by the thumbnails' mean absolute difference. `info_of`: `_inspect`'s result by id of the sample."""
    hashes = np.array([info_of[id(s)]["dhash"] for _, s in reps], dtype=np.uint64)
    thumbs = np.stack([info_of[id(s)]["thumb"] for _, s in reps]).astype(np.float32) if reps else np.zeros((0, 32, 32))
    near = []
    for i, j, d in _near_duplicate_pairs(hashes, near_distance):
        mad = float(np.abs(thumbs[i] - thumbs[j]).mean())
        if mad <= max_mad:
            a, b = reps[i], reps[j]
            near.append({"hash_distance": d, "mean_abs_diff": round(mad, 2), "a": {"split": a[0], "path": a[1].path},
                         "b": {"split": b[0], "path": b[1].path}, "same_patient": a[1].patient == b[1].patient,
                         "same_label": a[1].label == b[1].label})
    return near


def audit(root: str | os.PathLike, near_distance: int = 2, max_mad: float = 4.0) -> dict[str, Any]:
    """Audit every split folder under `root`; returns a JSON-ready dict.

    Near-identical: a 64-bit difference hash at most `near_distance` bits apart (a cheap first pass: on
    chest X-rays it alone matches thousands of merely similar pairs), confirmed by a mean absolute
    difference of at most `max_mad` grey levels between 32x32 thumbnails.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found (pass --data or set PNEUMOSCAN_DATA)")
    samples: dict[str, list[Sample]] = {}
    for split in FOLDER_SPLITS:
        if (root / split).is_dir():
            samples[split] = scan_folder(root / split)
    if not samples:
        raise DataError(f"{root}: no train/, val/ or test/ folder found")
    flat = [(split, s) for split, ss in samples.items() for s in ss]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        info = list(pool.map(lambda item: _inspect(item[1].path), flat))

    counts = {split: {name: sum(s.label == i for s in ss) for i, name in enumerate(CLASS_NAMES)} for split, ss in samples.items()}
    patients = {split: {s.patient for s in ss} for split, ss in samples.items()}
    shared = {f"{a}&{b}": sorted(patients[a] & patients[b]) for i, a in enumerate(patients) for b in list(patients)[i + 1:]}

    ok = [(split, s, r) for (split, s), r in zip(flat, info) if "error" not in r]
    by_sha: dict[str, list[tuple[str, Sample]]] = defaultdict(list)
    for split, s, r in ok:
        by_sha[r["sha"]].append((split, s))
    exact = [[{"split": sp, "path": s.path, "label": CLASS_NAMES[s.label]} for sp, s in g] for g in by_sha.values() if len(g) > 1]

    near = _near_identical([g[0] for g in by_sha.values()], {id(s): r for _, s, r in ok}, near_distance, max_mad)
    sizes = np.array([r["size"] for _, _, r in ok]) if ok else np.zeros((0, 2))
    return {
        "root": str(root),
        "counts": counts,
        "images": {split: len(ss) for split, ss in samples.items()},
        "patients": {split: len(p) for split, p in patients.items()},
        "patients_in_several_splits": {k: {"count": len(v), "examples": v[:10]} for k, v in shared.items()},
        "byte_identical_groups": {"count": len(exact), "across_splits": sum(len({m["split"] for m in g}) > 1 for g in exact),
                                  "with_conflicting_labels": sum(len({m["label"] for m in g}) > 1 for g in exact),
                                  "groups": exact},
        "near_identical_pairs": {"count": len(near), "max_hash_distance": near_distance, "max_mean_abs_diff": max_mad,
                                 "across_splits": sum(p["a"]["split"] != p["b"]["split"] for p in near),
                                 "different_patients": sum(not p["same_patient"] for p in near), "pairs": near},
        "image_sizes": {
            "width": _stats(sizes[:, 0]) if len(sizes) else None,
            "height": _stats(sizes[:, 1]) if len(sizes) else None,
            "most_common": [[f"{w}x{h}", n] for (w, h), n in Counter(map(tuple, sizes.tolist())).most_common(5)],
        },
        "modes": dict(Counter(r["mode"] for _, _, r in ok)),
        "unreadable": {s.path: r["error"] for (_, s), r in zip(flat, info) if "error" in r},
    }


def _stats(v: np.ndarray) -> dict[str, float]:
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}


def counts_plot(result: dict[str, Any], out: Path) -> Path:
    """Images per split and class: the paper's Figure 1."""
    from ..io.plots import _save, plt

    splits = list(result["counts"])
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    width = 0.38
    x = np.arange(len(splits))
    for k, name in enumerate(CLASS_NAMES):
        vals = [result["counts"][s][name] for s in splits]
        bars = ax.bar(x + (k - 0.5) * width, vals, width, label=name)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, splits)
    ax.set_ylabel("images")
    ax.set_title("Images per split and class")
    ax.legend()
    return _save(fig, out)


def write_audit(root: str | os.PathLike, out_dir: str | os.PathLike, near_distance: int = 2,
                max_mad: float = 4.0) -> dict[str, Any]:
    out = Path(out_dir)
    result = audit(root, near_distance, max_mad)
    write_json(out / "audit.json", result)
    counts_plot(result, out / "counts.png")
    return result


def summary_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"{split}: {n} images ({', '.join(f'{c} {k}' for k, c in r['counts'][split].items())}), {r['patients'][split]} patients"
             for split, n in r["images"].items()]
    for pair, v in r["patients_in_several_splits"].items():
        lines.append(f"patients in both {pair.replace('&', ' and ')}: {v['count']}")
    b = r["byte_identical_groups"]
    lines.append(f"byte-identical groups: {b['count']} ({b['across_splits']} across splits, {b['with_conflicting_labels']} with conflicting labels)")
    n = r["near_identical_pairs"]
    lines.append(f"near-identical pairs (dHash distance <= {n['max_hash_distance']}, 32x32 mean abs diff <= "
                 f"{n['max_mean_abs_diff']:g}): {n['count']} "
                 f"({n['across_splits']} across splits, {n['different_patients']} between different patients)")
    lines.append(f"sizes: {r['image_sizes']['most_common']}; modes: {r['modes']}")
    lines.append(f"unreadable files: {len(r['unreadable'])}")
    return lines
