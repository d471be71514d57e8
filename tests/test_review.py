"""The evaluation's review and report: threshold trade-offs, the gallery of mistakes with Grad-CAM, provenance,
and figures written for people."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import __version__
from pneumoscan.core.metrics import binary_metrics, threshold_table
from pneumoscan.io.plots import row_shares
from pneumoscan.io.provenance import file_sha256, provenance, source_revision
from pneumoscan.tasks.report import _confusion_table, _gallery_section, _gradcam_section
from pneumoscan.tasks.review import pick_examples

from .test_train_checkpoint import tiny_config


def test_threshold_table_counts_and_rates_by_hand():
    labels = [0, 0, 0, 1, 1, 1, 1]
    probs = [0.1, 0.4, 0.8, 0.3, 0.6, 0.9, 0.95]
    rows = threshold_table(labels, probs, (0.6, 0.25, 0.6, 0.99))
    assert [r["threshold"] for r in rows] == [0.25, 0.6, 0.99]  # sorted, once each
    low, mid, high = rows
    assert (low["tp"], low["fp"], low["tn"], low["fn"]) == (4, 2, 1, 0)
    assert (mid["tp"], mid["fp"], mid["tn"], mid["fn"]) == (3, 1, 2, 1)  # 0.6 itself is called pneumonia
    assert mid["sensitivity"] == pytest.approx(3 / 4) and mid["specificity"] == pytest.approx(2 / 3)
    assert mid["ppv"] == pytest.approx(3 / 4) and mid["npv"] == pytest.approx(2 / 3)
    assert mid["accuracy"] == pytest.approx(5 / 7) and low["npv"] == pytest.approx(1.0)
    assert (high["tp"], high["fp"], high["ppv"]) == (0, 0, None)  # nothing called: no PPV, not 0


def test_threshold_table_agrees_with_the_headline_metrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.35 * labels + rng.random(300) * 0.65, 0, 1)
    for t in (0.2, 0.5, 0.77):
        row, m = threshold_table(labels, probs, [t])[0], binary_metrics(labels, probs, t)
        assert [[row["tn"], row["fp"]], [row["fn"], row["tp"]]] == m["confusion_matrix"]
        for mine, theirs in (("sensitivity", "recall"), ("specificity", "specificity"), ("ppv", "precision"),
                             ("accuracy", "accuracy")):
            assert row[mine] == pytest.approx(m[theirs], abs=1e-12)


def test_the_gallery_takes_the_most_confident_mistakes_first():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([0.9, 0.6, 0.95, 0.1, 0.05, 0.4, 0.45, 0.8, 0.99])
    picks = pick_examples(labels, probs, 0.5, n=2, n_true=1)
    assert picks == {"false_positive": [2, 0], "false_negative": [4, 5], "true_positive": [8]}
    assert pick_examples(labels, probs, 0.5, n=6)["false_positive"] == [2, 0, 1]


def test_confusion_percentages_are_of_the_true_class():
    cm = [[181, 53], [7, 383]]
    assert row_shares([[3, 1], [0, 0]])[0] == [0.75, 0.25] and all(np.isnan(row_shares([[3, 1], [0, 0]])[1]))
    table = _confusion_table(cm, ["NORMAL", "PNEUMONIA"])
    for cell in ("181 <small>(77.4%)</small>", "53 <small>(22.6%)</small>", "7 <small>(1.8%)</small>",
                 "383 <small>(98.2%)</small>", "<td>234</td>", "<td>390</td>", "true class", "predicted class"):
        assert cell in table


def test_gallery_names_are_escaped_and_only_gallery_files_are_embedded(tmp_path):
    (tmp_path / "gallery").mkdir()
    (tmp_path / "gallery" / "false_positive-1.jpg").write_bytes(b"\xff\xd8 jpeg")
    (tmp_path / "secret.jpg").write_bytes(b"not for the report")
    name = "/x/<img src=x onerror=alert(1)>\"'&.jpeg"
    review = {"threshold": 0.5, "gradcam": {"available": False, "reason": "no <monai>"}, "gallery": [
        {"kind": "false_positive", "path": name, "p_pneumonia": 0.97, "thumbnail": "gallery/false_positive-1.jpg"},
        {"kind": "false_negative", "path": "/y/a.jpeg", "p_pneumonia": 0.01, "thumbnail": "../secret.jpg"}]}
    page = _gallery_section(review, tmp_path) + _gradcam_section(review, tmp_path)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;&quot;&#x27;&amp;.jpeg" in page
    assert page.count("data:image/jpeg;base64,") == 1  # ../secret.jpg is not followed out of gallery/
    assert "P(pneumonia) 0.970" in page and "no &lt;monai&gt;" in page


def test_provenance_names_the_code_the_libraries_and_the_checkpoint(tmp_path):
    import torch

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights" * 1000)
    p = provenance(ckpt, "/data", "val", torch.device("cpu"))
    assert p["checkpoint_sha256"] == hashlib.sha256(b"weights" * 1000).hexdigest() == file_sha256(ckpt)
    assert (p["pneumoscan"], p["torch"], p["numpy"], p["split"], p["data_root"]) == \
        (__version__, torch.__version__, np.__version__, "val", "/data")
    assert p["device"] == "cpu" and p["python"].count(".") == 2 and re.match(r"\d{4}-\d\d-\d\dT", p["date"])
    assert p["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["git_commit"])


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_source_revision_reads_the_checkout_and_its_local_changes(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    assert source_revision(package) == (None, None)  # not in a repository
    git("init", "-q")
    assert source_revision(package) == (None, None)  # in one, but not tracked (a virtualenv in a checkout)
    git("add", "pkg/__init__.py")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert source_revision(package) == (head, False)
    (tmp_path / "notes.txt").write_text("outside the package: not the code's change")
    assert source_revision(package) == (head, False)
    (package / "new.py").write_text("")
    assert source_revision(package) == (head, True)


def _evaluated(tmp_path: Path, out: str) -> tuple[dict, dict, str]:
    from pneumoscan.tasks.evaluate import evaluate

    evaluate(tmp_path / "run" / "best.pt", "val", tmp_path / out, device="cpu", progress=False)
    return (json.loads((tmp_path / out / "metrics.json").read_text()),
            json.loads((tmp_path / out / "review.json").read_text()), (tmp_path / out / "report.html").read_text())


def test_evaluation_writes_the_review_and_the_report_shows_it(tiny_data, tmp_path, monkeypatch):
    from pneumoscan.tasks.report import write_run_report
    from pneumoscan.tasks.train import train

    train(tiny_config(tiny_data, epochs=1), tmp_path / "run", device="cpu", progress=False)
    m, review, page = _evaluated(tmp_path, "ev")
    assert m["provenance"]["checkpoint_sha256"] == file_sha256(tmp_path / "run" / "best.pt")
    assert m["provenance"]["split"] == "val" and m["provenance"]["device"] == "cpu"
    thresholds = [r["threshold"] for r in review["trade_offs"]]
    assert {0.1, 0.5, 0.9, m["threshold"]} <= set(thresholds) and sum(r["operating"] for r in review["trade_offs"]) == 1
    assert all(len([e for e in review["gallery"] if e["kind"] == k]) <= 6 for k in ("false_positive", "false_negative"))
    for entry in review["gallery"]:
        assert (tmp_path / "ev" / entry["thumbnail"]).is_file()
        assert entry["gradcam"] is None or (tmp_path / "ev" / entry["gradcam"]).is_file()
    assert (tmp_path / "ev" / "score_histogram.png").stat().st_size > 1000
    for text in ("Sensitivity (recall)", "ROC AUC", "Specificity", "true class",
                 "Scores and thresholds", "(in use)", "Most confident mistakes", "Grad-CAM examples", "Provenance",
                 "Checkpoint SHA-256", m["provenance"]["checkpoint_sha256"]):
        assert text in page, text
    assert "<td>recall</td>" not in page and "<td>roc_auc</td>" not in page
    if "monai" in sys.modules or _has_monai():
        assert review["gradcam"]["available"] and page.count("-gradcam") == 0  # embedded, not linked
        assert any(e["kind"] == "true_positive" for e in review["gallery"])

    monkeypatch.setitem(sys.modules, "monai.visualize", None)  # as if MONAI were not installed
    m, review, page = _evaluated(tmp_path, "ev-no-monai")
    assert not review["gradcam"]["available"] and "pip install 'pneumoscan[models]'" in review["gradcam"]["reason"]
    assert "pip install &#x27;pneumoscan[models]&#x27;" in page
    assert all(e["gradcam"] is None and e["kind"] != "true_positive" for e in review["gallery"])
    assert page.count("data:image/jpeg;base64,") == len(review["gallery"])  # the plain thumbnails, still shown

    run_page = write_run_report(tmp_path / "run", tmp_path / "ev").read_text()
    assert "1 process)" in run_page and "process(es)" not in run_page
    assert re.search(r"median \d+\.\d training images/s", run_page) and "Provenance" in run_page


def _has_monai() -> bool:
    import importlib.util

    return importlib.util.find_spec("monai") is not None


def test_the_review_of_an_earlier_evaluation_into_the_same_folder_is_replaced(tmp_path, monkeypatch):
    from pneumoscan.tasks import review as review_module

    monkeypatch.setattr(review_module, "gradcam_maps", lambda *a: (None, "not in this test"))
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name in ("false_positive-9.jpg", "true_positive-1-gradcam.jpg", "colour_bar.png", "notes.txt"):
        (gallery / name).write_bytes(b"earlier")
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.9, 0.2, 0.1, 0.3, 0.8, 0.7])
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    review = review_module.write_review(tmp_path, None, [f"/d/{i}.png" for i in range(6)], pixels, labels, probs, 0.5,
                                        None)
    assert [(e["kind"], e["path"]) for e in review["gallery"]] == [("false_positive", "/d/0.png"),
                                                                   ("false_negative", "/d/3.png")]
    assert sorted(p.name for p in gallery.iterdir()) == ["false_negative-1.jpg", "false_positive-1.jpg", "notes.txt"]
    assert json.loads((tmp_path / "review.json").read_text()) == review
