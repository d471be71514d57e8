import json
import shutil

import numpy as np
from PIL import Image

from pneumoscan.tasks.audit import _near_duplicate_pairs, audit
from pneumoscan.apps.cli import main

from .conftest import make_dataset


def test_audit_finds_counts_leaks_and_duplicates(tmp_path):
    root = make_dataset(tmp_path / "d", patients_per_class=4, splits=("train", "test"))
    train_n, test_p = root / "train" / "NORMAL", root / "test" / "PNEUMONIA"
    first = sorted(train_n.iterdir())[0]
    shutil.copy(first, test_p / "person5_virus_99.jpeg")  # same bytes in another split, other label; person5 is a train patient
    img = np.asarray(Image.open(first).convert("L")).astype(np.int16)
    Image.fromarray(np.clip(img + 2, 0, 255).astype(np.uint8)).save(train_n / "IM-7777-0001.png")  # near copy
    (train_n / "IM-8888-0001.jpeg").write_bytes(b"broken")

    r = audit(root)
    assert r["counts"]["train"] == {"NORMAL": 10, "PNEUMONIA": 8} and r["counts"]["test"]["PNEUMONIA"] == 9
    assert r["byte_identical_groups"]["count"] == 1
    assert r["byte_identical_groups"]["across_splits"] == 1 and r["byte_identical_groups"]["with_conflicting_labels"] == 1
    assert r["near_identical_pairs"]["count"] >= 1
    assert any({p["a"]["path"], p["b"]["path"]} >= {str(train_n / "IM-7777-0001.png")} for p in r["near_identical_pairs"]["pairs"])
    assert list(r["unreadable"]) == [str(train_n / "IM-8888-0001.jpeg")]
    assert r["modes"] and r["image_sizes"]["most_common"][0][0] == "64x64"
    assert r["patients_in_several_splits"]["train&test"] == {"count": 1, "examples": ["person5"]}


def test_near_duplicate_pairs_by_hamming_distance():
    h = np.array([0b0000, 0b0001, 0b0111, 0xFFFF], dtype=np.uint64)
    assert _near_duplicate_pairs(h, 1) == [(0, 1, 1)]
    assert {(i, j) for i, j, _ in _near_duplicate_pairs(h, 2)} == {(0, 1), (1, 2)}


def test_audit_command_writes_json_and_figure(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", patients_per_class=3)
    assert main(["audit", "--data", str(root), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["images"]["train"] == 12
    assert (tmp_path / "a" / "counts.png").stat().st_size > 1000
    assert "byte-identical groups" in capsys.readouterr().out
