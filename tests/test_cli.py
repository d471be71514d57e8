"""End to end through the command line: train -> evaluate -> predict."""

import csv
import json

import pytest

from pneumoscan.apps.cli import main

from .conftest import real_subset


def test_train_evaluate_predict_on_generated_images(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", "--image-size", "48",
                 "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--device", "cpu"]) == 0
    assert (run / "eval-val" / "metrics.json").is_file()
    report = (run / "report.html").read_text()
    assert "Results on the val split" in report and "official test split (<i>theirs</i>)" in report
    assert report.count("data:image/png;base64,") >= 6 and "not a medical device" in report
    assert main(["evaluate", str(run / "best.pt"), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "threshold"):
        assert m[key] is None or 0 <= m[key] <= 1, key
    assert len(m["confusion_matrix"]) == 2 and m["n"] == sum(map(sum, m["confusion_matrix"]))
    assert "Results on the val split" in (tmp_path / "ev" / "report.html").read_text()
    for png in ("accuracy.png", "loss.png", "roc.png", "pr.png", "confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "ev" / png).stat().st_size > 1000

    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    out_csv = tmp_path / "pred.csv"
    assert main(["predict", str(run / "best.pt"), str(tiny_data / "train" / "NORMAL"), str(bad), "--out", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 25
    good = [r for r in rows if not r["error"]]
    assert len(good) == 24 and all(0 <= float(r["p_pneumonia"]) <= 1 and r["label"] in ("NORMAL", "PNEUMONIA") for r in good)
    assert rows[-1]["path"] == str(bad) and "broken.jpeg" in rows[-1]["error"] and rows[-1]["p_pneumonia"] == ""


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


def test_export_and_onnx_prediction_agree_with_torch(tiny_data, tmp_path):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", "--image-size", "48",
                 "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--no-eval", "--device", "cpu"]) == 0
    assert main(["export", str(run / "best.pt"), "--out", str(tmp_path / "model.onnx")]) == 0
    assert (tmp_path / "model.onnx").stat().st_size > 100_000
    folder = str(tiny_data / "train" / "PNEUMONIA")
    assert main(["predict", str(run / "best.pt"), folder, "--out", str(tmp_path / "t.csv")]) == 0
    assert main(["predict", str(run / "best.pt"), folder, "--out", str(tmp_path / "o.csv"), "--backend", "onnx"]) == 0
    torch_rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    onnx_rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert [r["path"] for r in torch_rows] == [r["path"] for r in onnx_rows]
    for a, b in zip(torch_rows, onnx_rows):
        assert abs(float(a["p_pneumonia"]) - float(b["p_pneumonia"])) < 1e-4


def test_compare_activations_over_seeds(tiny_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(tiny_data), "--out", str(out), "--activations", "relu", "prelu", "--seeds", "0", "1",
            "--epochs", "1", "--image-size", "48", "--batch-size", "8", "--val-fraction", "0.25", "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0
    r = json.loads((out / "compare.json").read_text())
    assert set(r["table"]) == {"relu", "prelu"} and len(r["runs"]["relu"]) == 2
    for col in ("train_accuracy", "accuracy", "train_loss", "loss", "roc_auc"):
        assert r["table"]["prelu"][col]["sd"] is not None
    assert {t["metric"] for t in r["tests"]} == {"accuracy", "roc_auc", "loss"}
    md = (out / "compare.md").read_text()
    assert "± " in md and "Table IV (theirs" in md
    assert "<table>" in (out / "report.html").read_text()
    # finished runs are reused, not retrained
    stamp = (out / "relu-s0" / "best.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "relu-s0" / "best.pt").stat().st_mtime_ns == stamp


def test_training_lists_bad_files_and_goes_on_or_stops_with_strict(tiny_data, tmp_path, capsys):
    bad = tiny_data / "train" / "NORMAL" / "IM-9999-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    common = ["--data", str(tiny_data), "--epochs", "1", "--image-size", "48", "--batch-size", "8",
              "--val-fraction", "0.25", "--no-progress", "--device", "cpu", "--no-eval"]
    assert main(["train", "--out", str(tmp_path / "a"), *common]) == 0
    assert str(bad) in json.loads((tmp_path / "a" / "summary.json").read_text())["unreadable_files"]
    assert main(["train", "--out", str(tmp_path / "b"), "--strict", *common]) == 2
    err = capsys.readouterr().err
    assert "--strict" in err and str(bad) in err and "Traceback" not in err


def test_help_does_not_load_pytorch_or_scikit_learn(tmp_path):
    """`pneumoscan --help` and argument errors answer at once: the heavy libraries load when a command runs.
    The command's exit status survives `run`'s quick exit."""
    import subprocess
    import sys

    code = ("import sys; from pneumoscan.apps.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    missing = tmp_path / "missing"
    proc = subprocess.run([sys.executable, "-m", "pneumoscan", "audit", "--data", str(missing), "--out", str(tmp_path / "a")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"pneumoscan audit: error: {missing}: data folder not found (pass --data or set PNEUMOSCAN_DATA)"]


def test_evaluate_refuses_images_the_checkpoint_was_trained_on_and_warns_on_few(tiny_data, tmp_path, capsys):
    """Another root holding copies of training images (renamed, so no patient id gives them away): evaluate's
    "val" of it is refused in one line, or scored with --allow-training-images under loud warnings, with
    intervals that do not collapse to [1, 1]."""
    import shutil

    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", "--image-size", "48",
                 "--batch-size", "8", "--no-eval", "--no-progress", "--device", "cpu"]) == 0
    trained = json.loads((run / "split.json").read_text())["train"]["files"]
    subset = tmp_path / "subset"
    for cls, prefix in (("NORMAL", "IM-9"), ("PNEUMONIA", "person9")):
        (subset / "train" / cls).mkdir(parents=True)
        for k, f in enumerate([f for f in trained if f"/{cls}/" in f][:8]):
            name = f"{prefix}{k:03d}-0001.jpeg" if cls == "NORMAL" else f"{prefix}{k:03d}_virus_1.jpeg"
            shutil.copy(f, subset / "train" / cls / name)
    capsys.readouterr()
    args = ["evaluate", str(run / "best.pt"), "--data", str(subset), "--split", "val", "--out", str(tmp_path / "ev"),
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images best.pt was trained on" in err[0].replace(str(run) + "/", "") and "--allow-training-images" in err[0]
    assert main(args + ["--allow-training-images"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["training_overlap"]["images"] == m["n"] and m["training_overlap"]["patients"] == 0
    assert any("training images of this checkpoint" in w for w in m["warnings"])
    assert any(w.startswith("few images") for w in m["warnings"])
    assert "Wilson" in m["ci_method"] and all(0 <= lo < hi <= 1 for lo, hi in (m["ci95"][k] for k in ("accuracy", "recall")))
    assert m["ci95"]["accuracy"][0] < 0.9  # a handful of images bounds nothing tightly, whatever the model scored
    assert "warning: " in capsys.readouterr().err
