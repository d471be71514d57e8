import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.io import data as data_module
from pneumoscan.core.config import DataConfig, Preprocessing
from pneumoscan.io.data import (DataError, cache_images, carve_validation, patient_id, pneumonia_type, scan_folder,
                             split_samples)

from .conftest import make_dataset


@pytest.mark.parametrize("name, patient", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1_virus_6.jpeg", "person1"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0427-0001.jpeg", "NORMAL2-IM-0427"),
    ("IM-0640-0001-0001.jpeg", "IM-0640"),
    ("scan_from_elsewhere.png", "scan_from_elsewhere"),
])
def test_patient_ids_follow_the_kermany_file_names(name, patient):
    assert patient_id(name) == patient


def test_pneumonia_type_from_name():
    assert pneumonia_type("person1_bacteria_1.jpeg") == "bacteria"
    assert pneumonia_type("person1_virus_6.jpeg") == "virus"
    assert pneumonia_type("IM-0115-0001.jpeg") == ""


def test_scan_matches_class_folders_case_insensitively(tmp_path):
    root = make_dataset(tmp_path, patients_per_class=2)
    os.rename(root / "train" / "NORMAL", root / "train" / "normal")
    samples = scan_folder(root / "train")
    assert [s.label for s in samples].count(0) == 4 and len(samples) == 8


def test_missing_class_folder_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DataError, match="PNEUMONIA"):
        scan_folder(tmp_path / "train")
    with pytest.raises(DataError, match="not found"):
        split_samples(DataConfig(root=str(tmp_path / "nowhere")))


def test_validation_is_carved_by_patient_stratified_and_deterministic(tmp_path):
    root = make_dataset(tmp_path, patients_per_class=20, images_per_patient=3)
    samples = scan_folder(root / "train")
    train, val = carve_validation(samples, 0.2, seed=1)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == len(samples)
    assert {s.label for s in val} == {0, 1}
    assert 0.1 < len(val) / len(samples) < 0.3
    again = carve_validation(samples, 0.2, seed=1)[1]
    other = carve_validation(samples, 0.2, seed=2)[1]
    assert [s.path for s in again] == [s.path for s in val]
    assert [s.path for s in other] != [s.path for s in val]


def test_byte_identical_files_stay_on_one_side(tmp_path):
    root = make_dataset(tmp_path, patients_per_class=20, images_per_patient=1)
    d = root / "train" / "NORMAL"
    files = sorted(d.iterdir())
    for i in range(0, 20, 2):  # ten pairs of different 'patients' with the same bytes
        shutil.copy(files[i], files[i + 1])
    samples = scan_folder(root / "train")
    for seed in range(5):
        train, val = carve_validation(samples, 0.25, seed)
        val_paths = {s.path for s in val}
        for i in range(0, 20, 2):
            assert (str(files[i]) in val_paths) == (str(files[i + 1]) in val_paths)


def test_kaggle_val_folder_is_exposed_but_separate(tmp_path):
    root = make_dataset(tmp_path, patients_per_class=6, splits=("train", "val", "test"))
    splits = split_samples(DataConfig(root=str(root), val_fraction=0.2))
    assert set(splits) == {"train", "val", "test", "kaggle_val"}
    assert all("/val/" in s.path for s in splits["kaggle_val"])
    assert all("/train/" in s.path for s in splits["val"])


def test_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path):
    root = make_dataset(tmp_path / "d", patients_per_class=3)
    samples = scan_folder(root / "train")
    prep = Preprocessing(image_size=32)
    cache = tmp_path / "cache"
    first = cache_images(samples, prep, cache_dir=cache)
    assert first.pixels.shape == (12, 32, 32) and first.pixels.dtype == np.uint8
    assert len(list(cache.iterdir())) == 1
    again = cache_images(samples, prep, cache_dir=cache)
    assert np.array_equal(again.pixels, first.pixels)
    assert len(list(cache.iterdir())) == 1
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(samples[0].path, format="JPEG")
    changed = cache_images(samples, prep, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert changed.pixels[0].max() == 0 and first.pixels[0].max() > 0
    cache_images(samples, Preprocessing(image_size=24), cache_dir=cache)
    assert len(list(cache.iterdir())) == 3


def test_unreadable_training_file_is_listed_and_skipped(tmp_path):
    root = make_dataset(tmp_path / "d", patients_per_class=3)
    bad = root / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"not a jpeg at all")
    samples = scan_folder(root / "train")
    cached = cache_images(samples, Preprocessing(image_size=32), cache_dir=tmp_path / "cache")
    assert len(cached.samples) == len(samples) - 1
    assert str(bad) in cached.errors and "not a recognised image" in cached.errors[str(bad)]
    assert len(cached.labels) == len(cached.pixels) == len(samples) - 1


def test_medmnist_npz_is_a_data_source_for_train_and_evaluate(tmp_path):
    from pneumoscan.apps.cli import main

    from .conftest import synthetic_xray

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 12), ("test", 12)):
        labels = np.array([i % 2 for i in range(n)], dtype=np.uint8)[:, None]
        arrays[f"{split}_images"] = np.stack([synthetic_xray(rng, int(y), 28) for y in labels[:, 0]])
        arrays[f"{split}_labels"] = labels
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    splits = split_samples(DataConfig(root=str(tmp_path / "pneumoniamnist.npz")))
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "val": 12, "test": 12}
    cached = cache_images(splits["val"], Preprocessing(image_size=32), cache_dir=tmp_path / "c")
    assert cached.pixels.shape == (12, 32, 32) and list(cached.labels[:4]) == [0, 1, 0, 1]
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "pneumoniamnist.npz"), "--out", str(run), "--epochs", "1",
                 "--image-size", "32", "--batch-size", "8", "--no-progress", "--device", "cpu"]) == 0
    assert main(["evaluate", str(run / "best.pt"), "--split", "test", "--out", str(tmp_path / "ev")]) == 0


def test_npz_without_labels_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "x.npz", train_images=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="MedMNIST"):
        split_samples(DataConfig(root=str(tmp_path / "x.npz")))


def test_split_is_remembered_and_recomputed_when_files_or_settings_change(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", patients_per_class=10)
    cfg = DataConfig(root=str(root), val_fraction=0.2)
    first = split_samples(cfg)
    calls = []
    monkeypatch.setattr(data_module, "carve_validation", lambda *a: calls.append(a) or carve_validation(*a))
    again = split_samples(cfg)
    assert calls == [] and again == {"train": first["train"], "val": first["val"]}
    split_samples(DataConfig(root=str(root), val_fraction=0.2, split_seed=cfg.split_seed + 1))
    assert len(calls) == 1
    os.utime(first["val"][0].path, ns=(0, 0))  # a changed file: its patient group may have changed
    assert split_samples(cfg) == again and len(calls) == 2


def test_worker_processes_decode_the_same_pixels_and_report_bad_files(tmp_path):
    root = make_dataset(tmp_path / "d", patients_per_class=4)
    samples = scan_folder(root / "train")
    Path(samples[3].path).write_bytes(b"not an image")
    prep = Preprocessing(image_size=32)
    threads = cache_images(samples, prep, cache_dir=tmp_path / "a", processes=False)
    procs = cache_images(samples, prep, cache_dir=tmp_path / "b", processes=True)
    assert np.array_equal(threads.pixels, procs.pixels) and threads.samples == procs.samples
    assert list(procs.errors) == [samples[3].path] and "not a recognised image" in procs.errors[samples[3].path]


_PARENT = os.getpid()
_real_decode = data_module._decode


def _die_in_worker(path, prep):
    if os.getpid() != _PARENT:
        os._exit(1)  # as if the worker were killed
    return _real_decode(path, prep)


def test_a_dead_decoding_worker_falls_back_to_threads(tmp_path, monkeypatch, caplog):
    root = make_dataset(tmp_path / "d", patients_per_class=3)
    samples = scan_folder(root / "train")
    prep = Preprocessing(image_size=32)
    expected = cache_images(samples, prep, cache_dir=tmp_path / "a", processes=False)
    monkeypatch.setattr(data_module, "_decode", _die_in_worker)
    got = cache_images(samples, prep, cache_dir=tmp_path / "b", processes=True)
    assert np.array_equal(got.pixels, expected.pixels) and not got.errors
    assert "decoding them again in threads" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_a_fifo_and_broken_links_in_a_class_folder_are_listed_as_unreadable(tmp_path):
    """Not skipped silently (a count that does not add up) and not opened (a FIFO would hang the split)."""
    root = make_dataset(tmp_path / "d", patients_per_class=6)
    normal = root / "train" / "NORMAL"
    os.mkfifo(normal / "IM-9990-0001.jpeg")
    os.symlink("IM-9991-0001.jpeg", normal / "IM-9991-0001.jpeg")  # a link to itself
    os.symlink(tmp_path / "gone.jpeg", normal / "IM-9992-0001.jpeg")
    splits = split_samples(DataConfig(root=str(root), val_fraction=0.25))
    samples = splits["train"] + splits["val"]
    assert len(samples) == 12 * 2 + 3
    errors = {**cache_images(splits["train"], Preprocessing(image_size=24), cache_dir=tmp_path / "c").errors,
              **cache_images(splits["val"], Preprocessing(image_size=24), cache_dir=tmp_path / "c").errors}
    assert {Path(p).name: reason for p, reason in errors.items()} == {
        "IM-9990-0001.jpeg": "not a regular file (a FIFO)",
        "IM-9991-0001.jpeg": "a symbolic link that loops (too many levels of symbolic links)",
        "IM-9992-0001.jpeg": "a broken symbolic link (its target does not exist)"}


def test_a_class_folder_that_is_a_link_to_the_other_is_refused(tmp_path):
    root = make_dataset(tmp_path / "d", patients_per_class=6)
    pneumonia = root / "train" / "PNEUMONIA"
    shutil.rmtree(pneumonia)
    pneumonia.symlink_to(root / "train" / "NORMAL", target_is_directory=True)
    with pytest.raises(DataError) as e:
        split_samples(DataConfig(root=str(root), val_fraction=0.25))
    message = str(e.value)
    assert "\n" not in message and "NORMAL and PNEUMONIA are one folder" in message and str(root / "train") in message


@pytest.mark.parametrize("how", ["copy", "link"])
def test_one_image_under_both_classes_is_refused(tmp_path, how):
    """A copy (the same bytes) or a link to a file of the other class: the image would carry both labels."""
    root = make_dataset(tmp_path / "d", patients_per_class=6)
    source = sorted((root / "train" / "NORMAL").iterdir())[3]
    twin = root / "train" / "PNEUMONIA" / "person99_virus_1.jpeg"
    shutil.copy(source, twin) if how == "copy" else twin.symlink_to(source)
    with pytest.raises(DataError) as e:
        split_samples(DataConfig(root=str(root), val_fraction=0.25))
    message = str(e.value)
    assert "\n" not in message and str(source) in message and str(twin) in message
    assert "under two classes, NORMAL and PNEUMONIA" in message


def test_byte_identical_files_within_one_class_are_accepted(tmp_path):
    root = make_dataset(tmp_path / "d", patients_per_class=6)
    files = sorted((root / "train" / "PNEUMONIA").iterdir())
    shutil.copy(files[0], files[0].with_name("person99_virus_1.jpeg"))
    splits = split_samples(DataConfig(root=str(root), val_fraction=0.25))
    assert len(splits["train"]) + len(splits["val"]) == 25
