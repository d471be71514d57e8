"""Operating points that travel: stable thresholds, temperature calibration, the prior as a site property."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from pneumoscan.core.calibration import OutputMap, fit_offset, fit_platt, fit_temperature, nll, output_map
from pneumoscan.apps.cli import main
from pneumoscan.core.config import Config, DataConfig, Preprocessing, TrainConfig
from pneumoscan.core.metrics import binary_metrics, choose_threshold, stable_threshold
from pneumoscan.core.prevalence import estimate_prevalence, shift_prior, sigmoid


def test_the_logit_shift_is_bayes_rule():
    p = np.array([1e-4, 0.1, 0.5, 0.73, 0.999])
    old, new = 0.74, 0.3
    # direct: reweight each class's posterior by the ratio of the priors, then normalise
    pos, neg = p * new / old, (1 - p) * (1 - new) / (1 - old)
    assert shift_prior(p, old, new) == pytest.approx(pos / (pos + neg), rel=1e-10)
    assert shift_prior(p, old, old) == pytest.approx(p, rel=1e-12)
    with pytest.raises(ValueError, match="strictly between"):
        shift_prior(p, old, 1.0)


def _calibrated_scores(n: int, prior: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels at `prior` and their exact posteriors at the training prior 0.74 (logit | class ~ N(+-2, 1))."""
    y = (rng.random(n) < prior).astype(int)
    z = rng.normal(np.where(y == 1, 2.0, -2.0), 1.0)
    return y, sigmoid(4 * z + np.log(0.74 / 0.26))  # the likelihood ratio of the two normals, times the prior odds


@pytest.mark.parametrize("prevalence", [0.3, 0.5, 0.62, 0.9])
def test_em_recovers_the_prevalence_of_a_resampled_validation_set(prevalence):
    rng = np.random.default_rng(1)
    y, p = _calibrated_scores(4000, 0.74, rng)
    # validation resampled to the site's prevalence: 745 images, classes drawn with replacement
    n_pos = round(745 * prevalence)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == 1), n_pos), rng.choice(np.flatnonzero(y == 0), 745 - n_pos)])
    est = estimate_prevalence(p[idx], 0.74)
    assert est["prevalence"] == pytest.approx(prevalence, abs=0.05)
    assert est["interval"][0] <= est["prevalence"] <= est["interval"][1]
    assert est["interval"][1] - est["interval"][0] < 0.1


def test_moving_to_the_true_prior_gains_accuracy_at_even_odds():
    rng = np.random.default_rng(2)
    y, p = _calibrated_scores(20000, 0.2, rng)  # a site with 20% pneumonia, a model trained at 74%
    raw = binary_metrics(y, p, 0.5)["accuracy"]
    moved = binary_metrics(y, shift_prior(p, 0.74, 0.2), 0.5)["accuracy"]
    assert moved > raw + 0.005


def _plateau(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Validation nearly separable, with a flat stretch of Youden's J from 0.05 to 0.13 (as an external check once found):
    inside it, every NORMAL image is followed by as many PNEUMONIA images as the class ratio."""
    inside = np.linspace(0.055, 0.125, 16)
    kind = np.array([0, 1, 1, 1] * 4)
    neg = np.concatenate([rng.uniform(0, 0.05, 200), inside[kind == 0]])
    pos = np.concatenate([rng.uniform(0.13, 1, 600), inside[kind == 1]])
    return np.r_[np.zeros(len(neg)), np.ones(len(pos))].astype(int), np.r_[neg, pos]


def test_the_stable_threshold_sits_inside_a_plateau_not_at_its_edge():
    y, p = _plateau(np.random.default_rng(0))
    j = [binary_metrics(y, p, t)["recall"] + binary_metrics(y, p, t)["specificity"] - 1 for t in (0.06, 0.09, 0.12)]
    assert max(j) - min(j) < 0.01  # flat
    assert choose_threshold(y, p, "youden") > 0.11  # the plain optimum: the plateau's upper edge
    point = stable_threshold(y, p, "youden", n_boot=200, seed=0)
    assert 0.065 < point["threshold"] < 0.105
    lo, hi = point["interval"]
    assert lo < point["threshold"] < hi and lo < 0.06 and hi > 0.11  # the interval spans the plateau
    assert stable_threshold(y, p, "youden", n_boot=200, seed=0) == point  # seeded


def test_an_exactly_flat_gap_gives_its_centre_and_fixed_stays_fixed():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(500)].astype(int)
    p = np.r_[rng.uniform(0, 0.05, 200), rng.uniform(0.13, 1, 500)]
    centre = (p[:200].max() + p[200:].min()) / 2
    assert stable_threshold(y, p, "youden", n_boot=0)["threshold"] == pytest.approx(centre)
    assert choose_threshold(y, p, "youden") == pytest.approx(p[200:].min())
    assert stable_threshold(y, p, "fixed") == {"threshold": 0.5, "interval": None, "resamples": 0, "point": 0.5}
    sens = stable_threshold(y, p, "sensitivity", target=0.95, n_boot=100)
    assert binary_metrics(y, p, sens["point"])["recall"] >= 0.95


def test_temperature_scaling_lowers_validation_nll_and_keeps_auc_and_even_odds_decisions():
    rng = np.random.default_rng(3)
    y = (rng.random(800) < 0.74).astype(int)
    logits = 6 * rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)  # overconfident: 3x the true log odds
    t = fit_temperature(y, logits)
    assert 2 < t < 5
    assert nll(y, logits, t) < nll(y, logits) - 0.05
    raw, cal = sigmoid(logits), sigmoid(logits / t)
    # the same ranking; only pairs within metrics.TIE_TOLERANCE of a logit may group differently as ties
    assert binary_metrics(y, cal)["roc_auc"] == pytest.approx(binary_metrics(y, raw)["roc_auc"], abs=1e-4)
    assert np.array_equal(raw >= 0.5, cal >= 0.5)
    assert OutputMap(temperature=t).apply(raw)[0] == pytest.approx(cal, rel=1e-6)


def test_platt_scaling_corrects_a_biased_model_that_a_temperature_cannot():
    rng = np.random.default_rng(4)
    y = (rng.random(1000) < 0.3).astype(int)
    true_logit = rng.normal(np.where(y == 1, 1.5, -1.5), 1.0) * 3  # the exact log odds at a 50% prior
    true_logit += np.log(0.3 / 0.7)
    biased = 0.05 * true_logit + 0.4  # underconfident, and every output above 0.5 (as a barely trained model)
    t, b = fit_platt(y, biased)
    assert t == pytest.approx(0.05, rel=0.15) and b == pytest.approx(-8, rel=0.15)
    assert nll(y, biased, t, b) < nll(y, biased, fit_temperature(y, biased)) - 0.1
    cal = sigmoid(biased / t + b)
    # the same ranking; only pairs within metrics.TIE_TOLERANCE of a logit may group differently as ties
    assert binary_metrics(y, cal)["roc_auc"] == pytest.approx(binary_metrics(y, sigmoid(biased))["roc_auc"], abs=1e-4)
    assert cal.mean() == pytest.approx(y.mean(), abs=0.01)  # 0.5 means even odds at validation's prevalence
    assert estimate_prevalence(cal, float(y.mean()), n_boot=0)["prevalence"] == pytest.approx(y.mean(), abs=0.02)
    assert fit_platt(y, -biased) == (1.0, 0.0)  # a reversed ranking is never fitted


def test_an_offset_alone_stays_determined_where_a_few_separable_rows_make_platt_run_away():
    """20 labelled rows per class that the model separates: Platt's slope runs away (probabilities of 0 and 1,
    so EM reads the class mix as the share called); the offset alone, the temperature kept, recovers a
    known shift of the logits, and EM on a site's other images lands near its mix."""
    rng = np.random.default_rng(7)
    y = np.repeat([0, 1], 20)
    true_z = np.where(y == 1, rng.uniform(1.0, 6.0, 40), rng.uniform(-6.0, -1.0, 40))  # separable at 0
    t_plain, _ = fit_platt(y, true_z + 1.5)
    assert t_plain < 0.3  # the slope is at least three times steeper than the logits'
    b = fit_offset(y, true_z + 1.5, 1.0)
    assert b == pytest.approx(-1.5, abs=0.6)
    site_y = (rng.random(2000) < 0.25).astype(int)  # the site: a quarter pneumonia, its logits shifted by 1.5
    site_z = rng.normal(np.where(site_y == 1, 3.0, -3.0), 2.0) + 1.5
    estimate = estimate_prevalence(sigmoid(site_z + b), 0.5, n_boot=0)["prevalence"]
    assert estimate == pytest.approx(site_y.mean(), abs=0.03)
    with pytest.raises(ValueError, match="both classes"):
        fit_offset(np.zeros(5), np.arange(5.0), 1.0)


def test_the_operating_point_training_stores_for_each_calibration():
    from pneumoscan.tasks.fitting import operating_point

    rng = np.random.default_rng(5)
    y = (rng.random(600) < 0.7).astype(int)
    z = 0.1 * rng.normal(np.where(y == 1, 3.0, -3.0), 1.0) + 0.5
    plain = Config(train=TrainConfig(threshold_rule="youden", threshold_resamples=20))
    paper = operating_point(Config(), y, z, 0.74)
    assert paper["threshold"] == 0.5 and paper["threshold_interval"] is None and paper["model_prior"] == 0.74
    assert paper["calibration"] == {"method": "none", "temperature": 1.0, "offset": 0.0, "fitted_on": "val"}
    youden = operating_point(plain, y, z, 0.74)
    assert youden["threshold_interval"][0] <= youden["threshold"] <= youden["threshold_interval"][1]
    platt = operating_point(Config(train=TrainConfig(calibration="platt")), y, z, 0.74)
    assert platt["calibration"]["offset"] != 0 and platt["model_prior"] == pytest.approx(y.mean())
    balanced = operating_point(Config(train=TrainConfig(calibration="temperature", class_weight="balanced")), y, z, 0.74)
    assert balanced["model_prior"] == 0.5 and balanced["calibration"]["temperature"] != 1.0
    om = output_map({**platt, "config": Config().to_dict()}, "nowhere/best.pt", platt["threshold"])
    assert om.apply(sigmoid(z))[0].mean() == pytest.approx(y.mean(), abs=0.01)


def test_output_map_moves_an_roc_threshold_with_the_probabilities_but_not_a_fixed_one():
    p = np.linspace(0.01, 0.99, 99)
    youden = OutputMap(model_prior=0.74, threshold=0.3, moves_threshold=True).with_prior(0.3)
    fixed = OutputMap(model_prior=0.74, threshold=0.5).with_prior(0.3)
    moved, _ = youden.apply(p)
    assert np.array_equal(moved >= youden.decision_threshold, p >= 0.3)  # same ROC point, same decisions
    assert fixed.decision_threshold == 0.5 and (fixed.apply(p)[0] >= 0.5).sum() < (p >= 0.5).sum()
    three = np.array([[0.2, 0.5, 0.3], [0.9, 0.06, 0.04]])
    q, classes = fixed.apply(1 - three[:, 0], three)
    assert classes.sum(1) == pytest.approx(1) and classes[:, 0] == pytest.approx(1 - q)
    assert classes[:, 1] / classes[:, 2] == pytest.approx(three[:, 1] / three[:, 2])
    with pytest.raises(ValueError, match="does not record"):
        OutputMap().with_prior(0.3)


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """A tiny run that calibrates by temperature and picks a stable Youden threshold."""
    from pneumoscan.tasks.train import train

    from .conftest import make_dataset

    root = tmp_path_factory.mktemp("calibrated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOSCAN_CACHE", str(root / "cache"))
        data = make_dataset(root / "data", patients_per_class=16)
        cfg = Config(data=DataConfig(root=str(data), val_fraction=0.25), preprocessing=Preprocessing(image_size=48),
                     train=TrainConfig(epochs=2, batch_size=8, eval_batch_size=16, threshold_rule="youden",
                                       calibration="temperature", threshold_resamples=50))
        summary = train(cfg, root / "run", device="cpu", progress=False)
        yield data, root / "run", summary


def test_training_stores_calibration_interval_and_prevalence(tuned_run):
    _, run, summary = tuned_run
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["calibration"]["method"] == "temperature" and ckpt["calibration"]["temperature"] > 0
    lo, hi = ckpt["threshold_interval"]
    assert lo <= ckpt["threshold"] <= hi and ckpt["threshold_rule"]["resamples"] == 50
    assert ckpt["train_prevalence"] == pytest.approx(0.5) and ckpt["model_prior"] == pytest.approx(0.5)
    assert summary["threshold_interval"] == ckpt["threshold_interval"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_prevalence_reaches_evaluate_predict_explain_and_the_api(tuned_run, tmp_path):
    data, run, summary = tuned_run
    best = str(run / "best.pt")
    assert main(["evaluate", best, "--out", str(tmp_path / "ev"), "--no-progress", "--device", "cpu",
                 "--prevalence", "0.2", "--estimate-prevalence"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["prior"] == 0.2 and m["prior_source"] == "given" and m["at_model_prior"]["prior"] == pytest.approx(0.5)
    # a Youden threshold is an ROC point: it moves with the probabilities, so the decisions stay the same
    assert m["accuracy"] == m["at_model_prior"]["accuracy"] and m["threshold"] != m["at_model_prior"]["threshold"]
    assert m["roc_auc"] == pytest.approx(summary["best_val"]["roc_auc"], abs=1e-5)  # neither map changes ranking
    assert m["prevalence_estimate"]["interval"] and m["operating_point"]["calibration"]["method"] == "temperature"
    assert {r["assumed_prevalence"] for r in _rows(tmp_path / "ev" / "predictions.csv")} == {"0.200000"}
    report = (tmp_path / "ev" / "report.html").read_text()
    assert "prevalence of 0.200" in report and "Calibration: temperature" in report and "95% bootstrap interval" in report
    files = sorted(str(f) for f in (data / "train" / "PNEUMONIA").iterdir())[:4]
    assert main(["predict", best, *files, "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    assert main(["predict", best, *files, "--out", str(tmp_path / "q.csv"), "--device", "cpu", "--prevalence", "estimated"]) == 0
    base, moved = _rows(tmp_path / "p.csv"), _rows(tmp_path / "q.csv")
    est = json.loads((tmp_path / "q.csv.prevalence.json").read_text())["estimate"]["prevalence"]
    assert moved[0]["prevalence_source"] == "estimated" and float(moved[0]["assumed_prevalence"]) == pytest.approx(est, abs=1e-6)
    for a, b in zip(base, moved):
        assert float(b["p_pneumonia"]) == pytest.approx(float(shift_prior(float(a["p_pneumonia"]), 0.5, est)), abs=2e-6)
    assert main(["explain", best, files[0], "--out", str(tmp_path / "cams"), "--device", "cpu", "--prevalence", "0.9"]) == 0
    assert _rows(tmp_path / "cams" / "explanations.csv")[0]["assumed_prevalence"] == "0.900000"
    assert main(["predict", best, *files, "--out", str(tmp_path / "x.csv"), "--prevalence", "1.5"]) == 2
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pneumoscan.apps.serve import create_app

    client = TestClient(create_app(best))
    upload = [("files", ("a.jpeg", open(files[0], "rb").read(), "image/jpeg"))]
    plain = client.post("/api/predict?heatmap=false", files=upload).json()["results"][0]
    at = client.post("/api/predict?heatmap=false&prevalence=0.1", files=upload).json()["results"][0]
    assert plain["assumed_prevalence"] == pytest.approx(0.5) and at["assumed_prevalence"] == 0.1 and at["prevalence_source"] == "given"
    assert at["p_pneumonia"] == pytest.approx(float(shift_prior(plain["p_pneumonia"], 0.5, 0.1)), abs=1e-6)
    assert client.post("/api/predict?prevalence=1", files=upload).status_code == 422
    info = client.get("/api/model").json()
    assert info["calibration"]["method"] == "temperature" and info["threshold_interval"] and info["assumed_prevalence"] == 0.5


def test_an_old_checkpoint_keeps_its_raw_probabilities(tuned_run, tmp_path):
    from pneumoscan.networks.inference import model_input
    from pneumoscan.networks.models import probabilities
    from pneumoscan.tasks.predict import Predictor

    _, run, _ = tuned_run
    ckpt = torch.load(run / "best.pt", weights_only=True)
    for key in ("calibration", "threshold_interval", "train_prevalence", "model_prior"):
        del ckpt[key]
    ckpt["threshold_rule"] = {"rule": "fixed"}
    ckpt["threshold"] = 0.5
    torch.save(ckpt, tmp_path / "old.pt")  # no split.json beside it: the prior is unknown
    om = output_map(ckpt, tmp_path / "old.pt", 0.5)
    assert om.temperature == 1.0 and om.model_prior is None and om.threshold_interval is None
    pixels = np.random.default_rng(0).integers(0, 255, (2, 48, 48)).astype(np.uint8)
    old, new = Predictor(tmp_path / "old.pt", device="cpu"), Predictor(run / "best.pt", device="cpu")
    with torch.no_grad():
        direct = probabilities(old.model(model_input(pixels.copy(), old.prep, old.device)))[0]
    raw = old.predict_arrays(pixels)
    assert np.array_equal(raw, direct)  # untouched, bit for bit
    t = new.output.temperature
    assert new.predict_arrays(pixels) == pytest.approx(sigmoid(np.log(raw / (1 - raw)) / t), abs=1e-6)
    with pytest.raises(ValueError, match="does not record"):
        Predictor(tmp_path / "old.pt", device="cpu", prevalence=0.3)
    (tmp_path / "split.json").write_text((run / "split.json").read_text())
    assert output_map(ckpt, tmp_path / "old.pt", 0.5).model_prior == pytest.approx(0.5)


def test_an_onnx_export_carries_the_temperature_its_threshold_needs(tuned_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from pneumoscan.networks.export import OnnxPredictor, export_onnx

    _, run, _ = tuned_run
    ckpt = torch.load(run / "best.pt", weights_only=True)
    onnx = OnnxPredictor(export_onnx(run / "best.pt", tmp_path / "m.onnx"))
    t = ckpt["calibration"]["temperature"]
    assert onnx.temperature == pytest.approx(t) and onnx.threshold == pytest.approx(ckpt["threshold"])
    raw = 0.8
    assert onnx.calibrated(raw) == pytest.approx(float(sigmoid(np.log(raw / (1 - raw)) / t)))

