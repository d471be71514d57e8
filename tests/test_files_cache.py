"""Files and work are never lost: non-UTF-8 file names, the pixel cache and the remembered ONNX export."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.core.config import Preprocessing
from pneumoscan.io.data import cache_images, scan_folder
from pneumoscan.tasks.evaluate import evaluate
from pneumoscan.tasks.predict import predict_paths
from pneumoscan.tasks.train import train

from .test_train_checkpoint import tiny_config

ODD_NAME = os.fsdecode(b"IM-0999-0001-\xff\xfe.jpeg")  # not UTF-8: Python holds it with surrogate escapes


def _utf8_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV that must decode as strict UTF-8."""
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8"))))


def test_non_utf8_file_names_train_evaluate_predict_and_explain(tiny_data, tmp_path):
    normal = tiny_data / "train" / "NORMAL"
    first = sorted(normal.iterdir())[0]
    os.rename(first, normal / ODD_NAME)
    out = tmp_path / "run"
    train(tiny_config(tiny_data, epochs=1), out, device="cpu", progress=False)
    split = json.loads((out / "split.json").read_text())
    assert str(normal / ODD_NAME) in split["train"]["files"] + split["val"]["files"]  # JSON keeps the name exactly

    which = "train" if str(normal / ODD_NAME) in split["train"]["files"] else "val"
    evaluate(out / "best.pt", which, out / f"eval-{which}", device="cpu", progress=False)
    rows = _utf8_csv(out / f"eval-{which}" / "predictions.csv")
    assert str(normal / "IM-0999-0001-\\xff\\xfe.jpeg") in [r["path"] for r in rows]  # the bytes, escaped

    results, _ = predict_paths(out / "best.pt", [str(normal)], tmp_path / "p.csv", device="cpu")
    rows = _utf8_csv(tmp_path / "p.csv")
    assert len(rows) == len(results) == 24 and not any(r["error"] for r in rows)
    assert str(normal / "IM-0999-0001-\\xff\\xfe.jpeg") in [r["path"] for r in rows]

    from pneumoscan.tasks.explain import explain_paths

    explain_paths(out / "best.pt", [str(normal / ODD_NAME), str(tmp_path / f"missing-{ODD_NAME}")], tmp_path / "x",
                  device="cpu")
    rows = _utf8_csv(tmp_path / "x" / "explanations.csv")
    assert rows[0]["heatmap"] and not rows[0]["error"] and "\\xff\\xfe" in rows[1]["error"]


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry


def _truncate(entry: Path) -> None:
    data = (entry / "pixels.npy").read_bytes()
    (entry / "pixels.npy").write_bytes(data[: len(data) // 2])


def _garble_index(entry: Path) -> None:
    (entry / "index.json").write_text('{"kept": [')


def _wrong_shape(entry: Path) -> None:
    np.save(entry / "pixels.npy", np.zeros((3, 32, 32), dtype=np.uint8))


def _lost_index(entry: Path) -> None:
    (entry / "index.json").unlink()


@pytest.mark.parametrize("damage", [_truncate, _garble_index, _wrong_shape, _lost_index])
def test_a_damaged_cache_entry_is_a_miss_and_is_rebuilt(tiny_data, tmp_path, damage):
    samples = scan_folder(tiny_data / "train")
    prep, cache = Preprocessing(image_size=32), tmp_path / "cache"
    fresh = cache_images(samples, prep, cache_dir=cache)
    damage(_entry(cache))
    again = cache_images(samples, prep, cache_dir=cache)
    assert np.array_equal(again.pixels, fresh.pixels) and [s.path for s in again.samples] == [s.path for s in fresh.samples]
    entry = _entry(cache)
    assert np.array_equal(np.load(entry / "pixels.npy"), fresh.pixels)  # the entry itself was repaired
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_cache_files_are_flushed_before_the_rename_and_a_failed_write_leaves_nothing(tiny_data, tmp_path, monkeypatch):
    samples = scan_folder(tiny_data / "train")
    prep, cache = Preprocessing(image_size=32), tmp_path / "cache"
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    cache_images(samples, prep, cache_dir=cache)
    assert {"pixels.npy", "index.json"} <= {Path(p).name for p in synced}
    assert all(Path(p).parent.name.startswith(".tmp-") for p in synced if Path(p).suffix)  # before the rename

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    cached = cache_images(samples, Preprocessing(image_size=24), cache_dir=cache)
    assert len(cached.samples) == len(samples)  # the run goes on without the cache
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder is left


onnx_available = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs pneumoscan[onnx]")


@onnx_available
def test_a_remembered_onnx_export_is_checked_against_its_checkpoint(tmp_path, monkeypatch):
    import onnx

    from pneumoscan.networks.export import remembered_onnx_bytes
    from pneumoscan.tasks.predict import Predictor

    from .test_export import build_checkpoint

    ckpt = build_checkpoint(tmp_path / "m.pt", "relu", 40)
    remembered_onnx_bytes(ckpt)
    (entry,) = (Path(os.environ["PNEUMOSCAN_CACHE"]) / "onnx").glob("*.onnx")

    def rewrite_metadata(change):
        model = onnx.load_model_from_string(entry.read_bytes())
        props = {p.key: p.value for p in model.metadata_props}
        change(props)
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
        entry.write_bytes(model.SerializeToString())

    rewrite_metadata(lambda props: props.update(threshold="0.99"))  # another checkpoint's export at this key
    model = onnx.load_model_from_string(remembered_onnx_bytes(ckpt))
    assert {p.key: p.value for p in model.metadata_props}["threshold"] == repr(0.37)

    rewrite_metadata(lambda props: props.pop("class_names"))
    predictor = Predictor(ckpt, device="cpu", backend="onnx")
    assert predictor.onnx.class_names == ["NORMAL", "PNEUMONIA"] and predictor.onnx.threshold == pytest.approx(0.37)
    entry.write_bytes(b"not an onnx model")
    assert Predictor(ckpt, device="cpu", backend="onnx").onnx.class_names == ["NORMAL", "PNEUMONIA"]
