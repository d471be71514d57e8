"""The three-class task (normal / bacterial / viral): labels from file names, training, evaluation, prediction."""

import csv
import json

import numpy as np
import pytest
import torch

from pneumoscan.apps.cli import main
from pneumoscan.io.data import DataError, Sample, task_labels
from pneumoscan.core.metrics import decide, multiclass_metrics
from pneumoscan.networks.models import pneumonia_logit


def test_labels_come_from_the_file_names_and_a_missing_type_is_a_clear_error():
    samples = [Sample("a/IM-1-1.jpeg", 0, "IM-1"), Sample("b/person2_bacteria_1.jpeg", 1, "person2", "bacteria"),
               Sample("b/person3_virus_1.jpeg", 1, "person3", "virus")]
    assert task_labels(samples, "binary").tolist() == [0, 1, 1]
    assert task_labels(samples, "three-class").tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="bacteria' or 'virus'.*person4.jpeg"):
        task_labels(samples + [Sample("b/person4.jpeg", 1, "person4")], "three-class")


def test_pneumonia_probability_of_three_logits_is_one_minus_p_normal():
    logits = torch.randn(32, 3) * 4
    p = torch.sigmoid(pneumonia_logit(logits))
    assert torch.allclose(p, 1 - torch.softmax(logits, 1)[:, 0], atol=1e-6)
    one = torch.randn(5)
    assert torch.equal(pneumonia_logit(one), one)


def test_decision_rule_and_per_class_metrics():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.45, 0.25, 0.30]])
    # P(pneumonia) = 0.3, 0.8, 0.9, 0.55: at threshold 0.5 the last is pneumonia although NORMAL is its likeliest class
    assert decide(1 - probs[:, 0], 0.5, probs).tolist() == [0, 1, 2, 2]
    assert decide(1 - probs[:, 0], 0.6, probs).tolist() == [0, 1, 2, 0]
    m = multiclass_metrics(np.array([0, 1, 2, 0]), probs, 0.5, ("NORMAL", "BACTERIAL", "VIRAL"))
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["VIRAL"]["precision"] == pytest.approx(0.5) and m["per_class"]["NORMAL"]["recall"] == pytest.approx(0.5)


def test_three_class_train_evaluate_predict_explain_and_serve(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--task", "three-class", "--epochs", "2",
                 "--image-size", "48", "--batch-size", "8", "--val-fraction", "0.25", "--class-weight", "balanced",
                 "--no-progress", "--device", "cpu"]) == 0
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["class_names"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    assert "val_accuracy_3class" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    m = json.loads((run / "eval-val" / "metrics.json").read_text())
    t = m["three_class"]
    assert len(t["confusion_matrix"]) == 3 and sum(map(sum, t["confusion_matrix"])) == m["n"]
    assert set(t["per_class"]) == {"NORMAL", "BACTERIAL", "VIRAL"} and 0 <= t["accuracy"] <= 1
    assert len(m["confusion_matrix"]) == 2  # the headline figures stay pneumonia vs normal
    assert "Three classes" in (run / "report.html").read_text()
    with open(run / "eval-val" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"p_NORMAL", "p_BACTERIAL", "p_VIRAL"} <= set(rows[0])
    assert all(abs(1 - float(r["p_NORMAL"]) - float(r["p_pneumonia"])) < 1e-5 for r in rows)

    images = sorted((tiny_data / "train" / "PNEUMONIA").iterdir())[:3]
    assert main(["predict", str(run / "best.pt"), *map(str, images), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["label"] in ("NORMAL", "BACTERIAL", "VIRAL") and r["p_VIRAL"] for r in rows)
    assert main(["export", str(run / "best.pt"), "--out", str(tmp_path / "m.onnx")]) == 2  # binary models only
    # evaluate as predict: auto takes torch for three classes, an exported backend by name is refused
    assert main(["evaluate", str(run / "best.pt"), "--out", str(tmp_path / "ev"), "--backend", "auto", "--no-progress",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["backend"] == "torch"
    assert main(["evaluate", str(run / "best.pt"), "--out", str(tmp_path / "ev2"), "--backend", "onnx", "--no-progress",
                 "--device", "cpu"]) == 2

    pytest.importorskip("monai")
    assert main(["explain", str(run / "best.pt"), str(images[0]), "--out", str(tmp_path / "cam")]) == 0
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pneumoscan.apps.serve import create_app

    client = TestClient(create_app(run / "best.pt"))
    r = client.post("/api/predict", files=[("files", (images[0].name, images[0].read_bytes(), "image/jpeg"))])
    item = r.json()["results"][0]
    assert r.status_code == 200 and item["heatmap_png"] and item["label"] in ("NORMAL", "BACTERIAL", "VIRAL")
    assert set(item["probabilities"]) == {"NORMAL", "BACTERIAL", "VIRAL"}
    assert item["p_pneumonia"] == pytest.approx(1 - item["probabilities"]["NORMAL"], abs=1e-5)
