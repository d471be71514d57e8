"""The out-of-distribution score: the detector on synthetic features, in the checkpoint and in every output,
and on images nobody here made with a model trained on real radiographs."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.apps.cli import main
from pneumoscan.networks.ood import Detector, fit_detector, forward_with_features

from .conftest import real_subset
from .foreign import foreign_sets


def test_mahalanobis_detector_flags_shifted_gaussians_and_a_quantile_of_validation():
    rng = np.random.default_rng(0)
    d = 32
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features: a plain Euclidean distance would do worse
    means = np.stack([np.zeros(d), np.full(d, 2.0)])
    draw = lambda n, k: rng.normal(size=(n, d)) @ mix + means[k]  # noqa: E731
    train = np.concatenate([draw(400, 0), draw(400, 1)])
    labels = np.repeat([0, 1], 400)
    val = np.concatenate([draw(500, 0), draw(500, 1)])
    det = fit_detector(train, labels, val, ("layer",), quantile=0.99)
    assert det.val_flagged == pytest.approx(0.01, abs=0.002) and det.means.shape == (2, d)
    inside = np.concatenate([draw(2000, 0), draw(2000, 1)])
    assert det.flags(det.scores(inside)).mean() < 0.03
    outside = rng.normal(size=(200, d)) @ mix + 1.0 + rng.normal(size=(1, d)) * 1.5  # between and away from the classes
    assert det.flags(det.scores(outside)).mean() > 0.95
    assert det.flags(det.scores(np.full((1, d), np.nan)))[0]  # non-finite features are flagged, never an error
    # the nearest class mean counts: each class's own mean scores far below the threshold
    assert det.scores(means).max() < 0.1 * det.threshold
    with pytest.raises(ValueError, match="quantile"):
        fit_detector(train, labels, val, ("layer",), quantile=1.0)


def test_scores_are_the_distance_to_the_nearest_class_mean_as_scipy_computes_it():
    """The whitened float32 product equals the float64 definition to 1e-6, also far from every mean and from the
    origin, one image at a time (numpy's product) as in a batch (PyTorch's)."""
    from scipy.spatial.distance import mahalanobis

    rng = np.random.default_rng(2)
    d = 48
    train = rng.normal(size=(300, d)) * rng.uniform(0.1, 3.0, d) + 50.0  # features far from the origin
    det = fit_detector(train, np.repeat([0, 1, 2], 100), train[:60], ("layer",))
    features = np.concatenate([train[:5], det.means, 50.0 + rng.normal(size=(5, d)) * 40.0, np.full((1, d), 1e6)])
    expected = [min(mahalanobis(f, m, det.precision) for m in det.means) for f in features]
    # at a class mean the distance is a rounding residual: 0 to within 1e-5
    np.testing.assert_allclose(det.scores(features), expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose([det.scores(f[None])[0] for f in features], expected, rtol=1e-6, atol=1e-5)
    assert np.isinf(det.scores(np.full((2, d), np.inf))).all()


def test_detector_round_trips_through_a_weights_only_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    det = fit_detector(rng.normal(size=(100, 8)), np.repeat([0, 1], 50), rng.normal(size=(50, 8)), ("features.0", "features.3"))
    torch.save({"ood": det.to_checkpoint()}, tmp_path / "c.pt")
    back = Detector.from_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True))
    x = rng.normal(size=(5, 8))
    assert back.layers == ("features.0", "features.3") and np.array_equal(back.scores(x), det.scores(x)) and back.threshold == det.threshold
    assert Detector.from_checkpoint({}) is None  # an older checkpoint: no detector, no error


def test_frozen_form_gives_the_training_forms_features():
    from pneumoscan.networks.inference import freeze
    from pneumoscan.networks.models import create_model

    torch.manual_seed(0)
    model = create_model("seed", image_size=48).eval()
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        _, plain = forward_with_features(model, model.ood_layers, x)
        _, frozen = forward_with_features(freeze(model), model.ood_layers, x.contiguous(memory_format=torch.channels_last))
    assert plain.shape == (3, 480) and torch.allclose(plain, frozen, atol=1e-5)


def test_an_older_checkpoint_gets_no_score_in_every_output(tiny_data, tmp_path):
    from pneumoscan.tasks.predict import Predictor

    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", "--image-size", "48",
                 "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--device", "cpu"]) == 0
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["ood"]["layers"] == ["features.0", "features.1", "features.2", "features.3"]
    assert ckpt["ood"]["precision"].shape == (480, 480)
    m = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert m["ood"]["available"] and 0 <= m["ood"]["fraction_flagged"] <= 1
    rows = list(csv.DictReader((run / "eval-val" / "predictions.csv").open()))
    assert all(r["outside_training"] in ("yes", "no") and float(r["ood_score"]) >= 0 for r in rows)
    assert "Outside what this model was trained on" in (run / "report.html").read_text()
    del ckpt["ood"]
    torch.save(ckpt, tmp_path / "old.pt")
    predictor = Predictor(tmp_path / "old.pt", device="cpu")
    image = str(next((tiny_data / "train" / "NORMAL").iterdir()))
    p = predictor.predict_file(image)
    assert p.probability is not None and p.ood_score is None and p.outside_training is None
    assert main(["predict", str(tmp_path / "old.pt"), image, "--out", str(tmp_path / "p.csv")]) == 0
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    assert row["ood_score"] == "" and row["outside_training"] == "" and row["p_pneumonia"] != ""
    # fit-ood adds a detector to it, from its own training split
    assert main(["fit-ood", str(tmp_path / "old.pt"), "--no-progress", "--device", "cpu"]) == 0
    assert Predictor(tmp_path / "old.pt", device="cpu").predict_file(image).outside_training in (True, False)


@pytest.mark.slow
def test_foreign_images_are_flagged_and_validation_radiographs_are_not(tmp_path):
    """Two epochs of the paper's model at 64 px on 160 real X-rays; then photographs, CT, MR, blanks and noise."""
    from pneumoscan.tasks.predict import Predictor

    data = real_subset(tmp_path / "real", per_class=80)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "2", "--image-size", "64",
                 "--no-progress", "--device", "cpu"]) == 0
    val = list(csv.DictReader((run / "eval-val" / "predictions.csv").open()))
    assert len(val) > 20 and sum(r["outside_training"] == "yes" for r in val) / len(val) <= 0.02
    predictor = Predictor(run / "best.pt", device="cpu")
    items = [item for group in foreign_sets().values() for item in group]
    flagged = [predictor.predict_file(src, name=n) for n, src in items]
    missed = [p.path for p in flagged if not p.outside_training]
    assert len(items) >= 20 and len(missed) <= 0.05 * len(items), missed
    out = tmp_path / "foreign.csv"
    folder = tmp_path / "foreign"
    folder.mkdir()
    for n, src in items[:4]:
        (folder / n).write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
    assert main(["predict", str(run / "best.pt"), str(folder), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0])[-3:] == ["ood_score", "ood_threshold", "outside_training"] and len(rows) == 4


def test_a_model_that_names_no_ood_layers_trains_and_gets_no_score(tiny_data, tmp_path, monkeypatch):
    from pneumoscan.networks import models
    from pneumoscan.tasks import train
    from pneumoscan.tasks.predict import Predictor

    build = models.build_model

    def without_layers(cfg):
        model = build(cfg)
        model.ood_layers = ()
        return model

    monkeypatch.setattr(train, "build_model", without_layers)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "1", "--image-size", "48",
                 "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--device", "cpu"]) == 0
    assert "ood" not in torch.load(run / "best.pt", weights_only=True)
    assert json.loads((run / "eval-val" / "metrics.json").read_text())["ood"]["available"] is False
    image = str(next((tiny_data / "train" / "NORMAL").iterdir()))
    assert Predictor(run / "best.pt", device="cpu").predict_file(image).outside_training is None
