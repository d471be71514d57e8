"""End to end through the command line: train -> evaluate -> predict."""

import csv
import json

import pytest

from pneumoscan.cli import main

from .conftest import real_subset


def test_train_evaluate_predict_on_generated_images(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", "--image-size", "48",
                 "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--device", "cpu"]) == 0
    assert (run / "eval-val" / "metrics.json").is_file()
    report = (run / "report.md").read_text()
    assert "Validation metrics" in report and "paper, official test split (theirs)" in report
    assert main(["evaluate", str(run / "best.pt"), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "threshold"):
        assert m[key] is None or 0 <= m[key] <= 1, key
    assert len(m["confusion_matrix"]) == 2 and m["n"] == sum(map(sum, m["confusion_matrix"]))
    for png in ("accuracy.png", "loss.png", "roc.png", "confusion_matrix.png"):
        assert (tmp_path / "ev" / png).stat().st_size > 1000

    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out_csv = tmp_path / "pred.csv"
    assert main(["predict", str(run / "best.pt"), str(tiny_data / "train" / "NORMAL"), str(bad), "--out", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 25
    good = [r for r in rows if not r["error"]]
    assert len(good) == 24 and all(0 <= float(r["probability"]) <= 1 and r["label"] in ("NORMAL", "PNEUMONIA") for r in good)
    assert rows[-1]["path"] == str(bad) and "broken.jpeg" in rows[-1]["error"] and rows[-1]["probability"] == ""


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data folder not found" in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "e")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_on_a_small_real_subset(tmp_path):
    """One short epoch of the paper's model on 240 real X-rays, then evaluate and predict (a few minutes on 2 cores)."""
    data = real_subset(tmp_path / "real", per_class=120)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--no-progress", "--device", "cpu"]) == 0
    m = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert m["n"] > 20 and m["data"]["patients"] > 10
    assert main(["evaluate", str(run / "best.pt"), "--split", "train", "--out", str(tmp_path / "ev")]) == 0
    out_csv = tmp_path / "p.csv"
    assert main(["predict", str(run / "best.pt"), str(data / "train" / "PNEUMONIA"), "--out", str(out_csv)]) == 0
    assert len(list(csv.DictReader(out_csv.open()))) == 120
