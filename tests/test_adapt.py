"""`pneumoscan adapt`: the arithmetic of `shift` against hand-made cases, the labels CSV's errors, the
adapted checkpoint through every command, and adaptation recovering what a shifted site costs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.apps.cli import main
from pneumoscan.core.shift import adapt_batchnorm, batchnorm_layers, bbse, class_weights, prevalence_check

from .conftest import real_subset


def test_batchnorm_statistics_are_the_weighted_moments_of_each_layers_input_layer_after_layer():
    """Two BatchNorm layers in a row: the second is measured on inputs normalised by the first's new statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).double().eval()
    x = torch.rand(10, 1, 8, 8, dtype=torch.float64) * 4 + 1
    w = np.linspace(0.5, 2.0, 10)
    assert batchnorm_layers(model, x[:1]) == [model[1], model[3]]
    adapt_batchnorm(model, x, lambda p: p, w, batch_size=3, strength=0)

    def moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ww = torch.as_tensor(w / w.mean())[:, None]
        mean = (ww * t.mean((2, 3))).sum(0) / ww.sum()
        return mean, (ww * (t * t).mean((2, 3))).sum(0) / ww.sum() - mean ** 2

    with torch.no_grad():
        first = model[0](x)
        m1, v1 = moments(first)
        m2, v2 = moments(model[2](model[1](first)))
    for bn, (m, v) in ((model[1], (m1, v1)), (model[3], (m2, v2))):
        torch.testing.assert_close(bn.running_mean, m, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(bn.running_var, v, rtol=1e-9, atol=1e-12)


def test_the_training_statistics_keep_prior_strength_images_worth_of_weight():
    model = nn.Sequential(nn.BatchNorm2d(1)).double().eval()
    x = torch.full((16, 1, 2, 2), 3.0, dtype=torch.float64)
    adapt_batchnorm(model, x, lambda p: p, np.ones(16), strength=16)
    assert float(model[0].running_mean) == pytest.approx(1.5) and float(model[0].running_var) == pytest.approx(0.5)


def test_class_weights_give_the_classes_their_training_shares():
    rng = np.random.default_rng(0)
    y = (rng.random(20000) < 0.3).astype(float)  # a site with 30% pneumonia, posteriors certain
    w = class_weights(y, float(y.mean()), 0.74)
    assert (w * y).sum() / w.sum() == pytest.approx(0.74, abs=1e-9)


def test_bbse_inverts_the_confusion_matrix_and_refuses_one_that_does_not_separate():
    rng = np.random.default_rng(1)
    y = rng.random(40000) < 0.35
    decided = np.where(y, rng.random(y.size) < 0.9, rng.random(y.size) < 0.2)  # sensitivity 0.9, specificity 0.8
    assert bbse(decided.astype(float), 0.5, 0.9, 0.8) == pytest.approx(0.35, abs=0.01)
    assert bbse(decided.astype(float), 0.5, 0.5, 0.5) is None


def test_a_site_that_differs_in_more_than_its_mix_is_not_trusted():
    """EM on outputs that moved up for every image (an appearance shift) against BBSE: they disagree."""
    from pneumoscan.core.shift import ValidationRecord

    rng = np.random.default_rng(2)
    val_y = (rng.random(2000) < 0.5).astype(int)
    val_p = np.clip(np.where(val_y == 1, rng.beta(8, 2, 2000), rng.beta(2, 8, 2000)), 1e-6, 1 - 1e-6)
    site_y = rng.random(600) < 0.5
    site_p = np.where(site_y, rng.beta(8, 2, 600), rng.beta(2, 8, 600))
    calm = prevalence_check(site_p, 0.5, 0.5, ValidationRecord(val_p, val_y))
    assert calm["trusted"] and abs(calm["prevalence"] - 0.5) < 0.06 and abs(calm["bbse"] - 0.5) < 0.06
    shifted = prevalence_check(np.clip(site_p ** 0.35, 0, 1 - 1e-6), 0.5, 0.5, ValidationRecord(val_p, val_y))
    assert not shifted["trusted"] and any("disagree" in r for r in shifted["reasons"])


# --- through the command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The paper network trained briefly on 250 real radiographs of each class (BatchNorm statistics that
    follow the weights within these few steps); its validation split, changed in contrast, is the new site."""
    root = tmp_path_factory.mktemp("adapt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOSCAN_CACHE", str(root / "cache"))
        data = real_subset(root / "data", per_class=250)
        run = root / "run"
        assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "8", "--image-size", "64",
                     "--batch-size", "16", "--val-fraction", "0.3", "--batchnorm-momentum", "0.1", "--no-progress",
                     "--device", "cpu", "--no-eval", "--seed", "0"]) == 0
    return run


def _site(run, tmp_path, factor: float = 1.0) -> tuple[list, list]:
    """The run's validation images written as PNGs, their contrast scaled by `factor` (a flatter exposure):
    (paths, labels)."""
    from PIL import Image

    from pneumoscan.io.images import load_grey
    from pneumoscan.core.sites import contrast, shifted

    files = json.loads((run / "split.json").read_text())["val"]["files"]
    paths, labels = [], []
    for i, f in enumerate(files):
        out = tmp_path / "site" / f"image{i:03d}.png"
        out.parent.mkdir(exist_ok=True)
        Image.fromarray(shifted(load_grey(f), contrast(factor), seed=i)).save(out)
        paths.append(out)
        labels.append("PNEUMONIA" if "/PNEUMONIA/" in f else "NORMAL")
    return paths, labels


def test_labels_csv_errors_name_the_file_the_row_and_the_reason(trained, tmp_path, capsys):
    paths, labels = _site(trained, tmp_path)
    bad = tmp_path / "labels.csv"
    cases = [("path,label\nimage000.png,MAYBE\n", "row 2: label 'MAYBE' is not NORMAL or PNEUMONIA"),
             ("path,label\nnot-there.png,NORMAL\n", "row 2: 'not-there.png' is not among the images"),
             ("file,diagnosis\nimage000.png,NORMAL\n", "needs the columns path,label"),
             ("path,label\nimage000.png,NORMAL\n", "refitting the calibration needs at least 10 of each")]
    for text, message in cases:
        bad.write_text(text)
        code = main(["adapt", str(trained / "best.pt"), str(tmp_path / "site"), "--labels", str(bad),
                     "--out", str(tmp_path / "a.pt")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (message, err)
    few = tmp_path / "few"
    few.mkdir()
    for p in paths[:5]:
        (few / p.name).write_bytes(p.read_bytes())
    assert main(["adapt", str(trained / "best.pt"), str(few), "--out", str(tmp_path / "a.pt")]) == 2
    assert "needs at least 20" in capsys.readouterr().err


def test_adaptation_recovers_the_accuracy_a_flatter_site_costs(trained, tmp_path, capsys):
    """Validation at 0.6 of its contrast: the unadapted model calls many normal images pneumonia; unlabelled
    adaptation recovers at least half of the accuracy lost (how much is lost depends on the trained weights,
    hence on the CPU's rounding), estimates the prevalence, and every command reports at it."""
    paths, labels = _site(trained, tmp_path, factor=0.6)
    truth = {p.name: lab for p, lab in zip(paths, labels)}
    prevalence = np.mean([lab == "PNEUMONIA" for lab in labels])

    def accuracy(csv_path):
        rows = list(csv.DictReader(open(csv_path)))
        return np.mean([r["label"] == truth[r["path"].rsplit("/", 1)[1]] for r in rows]), rows

    (tmp_path / "clean").mkdir()
    _site(trained, tmp_path / "clean")  # the same images as they were, for what the shift costs
    assert main(["predict", str(trained / "best.pt"), str(tmp_path / "clean" / "site"), "--out", str(tmp_path / "clean.csv")]) == 0
    assert main(["predict", str(trained / "best.pt"), str(tmp_path / "site"), "--out", str(tmp_path / "before.csv")]) == 0
    (clean, _), (before, _) = accuracy(tmp_path / "clean.csv"), accuracy(tmp_path / "before.csv")
    assert clean - before >= 0.1, (clean, before)  # the flatter site costs the unadapted model
    capsys.readouterr()
    assert main(["adapt", str(trained / "best.pt"), str(tmp_path / "site"), "--out", str(tmp_path / "adapted.pt")]) == 0
    out = capsys.readouterr().out
    assert "site prevalence" in out and "wrote" in out
    assert main(["predict", str(tmp_path / "adapted.pt"), str(tmp_path / "site"), "--out", str(tmp_path / "after.csv")]) == 0
    after, rows = accuracy(tmp_path / "after.csv")
    assert after - before >= 0.5 * (clean - before), (clean, before, after)  # at least half of it recovered
    assert {r["prevalence_source"] for r in rows} == {"adapted"}
    record = ckpt_io.read(tmp_path / "adapted.pt")["adaptation"]
    assert record["images"] == len(paths) and abs(record["prevalence"]["prevalence"] - prevalence) < 0.2
    assert float(rows[0]["assumed_prevalence"]) == pytest.approx(record["prevalence"]["prevalence"], abs=1e-6)


def test_labelled_rows_refit_the_calibration_and_say_what_to_expect(trained, tmp_path, capsys):
    paths, labels = _site(trained, tmp_path, factor=0.6)
    table = tmp_path / "labels.csv"
    chosen = [i for c in ("NORMAL", "PNEUMONIA") for i in [k for k, lab in enumerate(labels) if lab == c][:10]]
    table.write_text("path,label\n" + "".join(f"{paths[i].name},{labels[i]}\n" for i in chosen))
    assert main(["adapt", str(trained / "best.pt"), str(tmp_path / "site"), "--labels", str(table),
                 "--out", str(tmp_path / "adapted.pt")]) == 0
    assert "expected at the site: accuracy" in capsys.readouterr().out
    ckpt = ckpt_io.read(tmp_path / "adapted.pt")
    expected = ckpt["adaptation"]["labelled"]["expected"]
    assert expected["labelled"] == {"PNEUMONIA": 10, "NORMAL": 10}
    assert 0 <= expected["accuracy_ci95"][0] <= expected["accuracy"] <= expected["accuracy_ci95"][1] <= 1
    assert ckpt["calibration"]["fitted_on"].startswith("site labels") and ckpt["threshold"] == 0.5
    source = ckpt_io.read(trained / "best.pt")["calibration"]  # the temperature is validation's, the offset refitted
    assert ckpt["calibration"]["temperature"] == source["temperature"] and ckpt["calibration"]["method"] == "platt"
    assert main(["evaluate", str(tmp_path / "adapted.pt"), "--data", str(trained.parent / "data"), "--split", "val",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["adaptation"]["labelled_rows"] == {"NORMAL": 10, "PNEUMONIA": 10} and m["prior_source"] == "adapted"
    from pneumoscan.apps.modelcard import model_card

    card = model_card(tmp_path / "adapted.pt")
    assert "## Adapted to a site" in card and "leave-one-out over 20 labelled images" in card
    from fastapi.testclient import TestClient

    from pneumoscan.apps.serve import create_app

    info = TestClient(create_app(tmp_path / "adapted.pt")).get("/api/model").json()
    assert info["prevalence_source"] == "adapted" and info["adaptation"]["images"] == len(paths)
    assert info["adaptation"]["labelled_rows"] == {"NORMAL": 10, "PNEUMONIA": 10}
    assert info["adaptation"]["expected"]["accuracy"] == pytest.approx(expected["accuracy"])
