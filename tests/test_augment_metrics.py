import numpy as np
import pytest
import torch

from pneumoscan.networks.augment import augment_batch, draw_augmentation
from pneumoscan.core.config import Augmentation
from pneumoscan.core.metrics import binary_metrics


def test_no_augmentation_is_identity():
    x = torch.rand(4, 1, 20, 20)
    y = augment_batch(x, Augmentation(zoom=0, vertical_flip=False), torch.Generator().manual_seed(0))
    assert torch.equal(x, y)


def test_zoom_factor_one_is_identity_up_to_rounding():
    x = torch.rand(2, 1, 30, 30)
    y = augment_batch(x, Augmentation(zoom=1e-9, vertical_flip=False), torch.Generator().manual_seed(0))
    assert torch.allclose(x, y, atol=1e-5)


def test_vertical_flip_flips_about_half_the_images_up_down():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(200, 1, 1, 1)
    y = augment_batch(x, Augmentation(zoom=0, vertical_flip=True), torch.Generator().manual_seed(0))
    flipped = (y == x.flip(2)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 70 < int(flipped.sum()) < 130


def test_zoom_keeps_shape_range_and_is_reproducible():
    x = torch.rand(8, 1, 50, 50)
    aug = Augmentation(zoom=0.5, vertical_flip=True)
    a = augment_batch(x, aug, torch.Generator().manual_seed(3))
    b = augment_batch(x, aug, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.allclose(a, x)


def test_intensity_augmentation_off_draws_nothing_new():
    """The paper's draws (and so its runs' random streams) are unchanged while intensity augmentation is off."""
    draws = draw_augmentation(10, Augmentation(), torch.Generator().manual_seed(0))
    assert set(draws) == {"zoom", "vflip"}


def test_intensity_augmentation_matches_its_definition():
    x = torch.rand(64, 1, 12, 12)
    aug = Augmentation(zoom=0, vertical_flip=False, gamma=0.4, contrast=0.3, brightness=0.1)
    draws = draw_augmentation(64, aug, torch.Generator().manual_seed(1))
    y = augment_batch(x, aug, draws=draws)
    g, c, b = (draws[k].view(-1, 1, 1, 1) for k in ("gamma", "contrast", "brightness"))
    assert float(g.min()) >= 0.6 and float(g.max()) <= 1.4 and float(b.abs().max()) <= 0.1
    powered = x ** g
    mean = powered.mean(dim=(1, 2, 3), keepdim=True)
    expected = ((powered - mean) * c + mean + b).clamp(0, 1)
    assert torch.allclose(y, expected, atol=1e-6)
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert not torch.allclose(y, x, atol=1e-3)


def test_binary_metrics_on_a_known_confusion_matrix():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9, 0.6, 0.4, 0.95, 0.55])
    m = binary_metrics(labels, probs, threshold=0.5)
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["recall"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(5 / 6)
    assert 0 < m["roc_auc"] <= 1 and m["n"] == 10


def test_binary_metrics_with_one_class_has_no_auc():
    m = binary_metrics(np.ones(5), np.full(5, 0.9))
    assert m["roc_auc"] is None and m["specificity"] is None and m["recall"] == 1.0


def test_threshold_rules():
    from pneumoscan.core.metrics import choose_threshold

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert choose_threshold(labels, probs, "fixed", fixed=0.5) == 0.5
    assert choose_threshold(labels, probs, "youden") == pytest.approx(0.7)  # sens 0.75, spec 1.0
    t = choose_threshold(labels, probs, "sensitivity", target=1.0)
    assert t == pytest.approx(0.4)  # the highest threshold catching every positive
    assert binary_metrics(labels, probs, t)["recall"] == 1.0
    with pytest.raises(ValueError, match="youden"):
        choose_threshold(labels, probs, "magic")


def test_calibration_of_perfectly_calibrated_scores_is_small():
    from pneumoscan.core.metrics import calibration

    rng = np.random.default_rng(0)
    probs = rng.uniform(0, 1, 20000)
    labels = rng.uniform(0, 1, 20000) < probs
    c = calibration(labels, probs)
    assert c["ece"] < 0.02 and sum(b["n"] for b in c["bins"]) == 20000
    assert calibration(labels, np.clip(probs * 0.3, 0, 1))["ece"] > 0.2


def test_bootstrap_intervals_contain_the_point_estimate_and_shrink_with_n():
    from pneumoscan.core.metrics import bootstrap_ci

    rng = np.random.default_rng(1)

    def data(n):
        y = rng.integers(0, 2, n)
        return y, np.clip(y * 0.3 + rng.uniform(0, 0.7, n), 0, 1)

    y, p = data(300)
    ci = bootstrap_ci(y, p, 0.5, n_boot=300)
    point = binary_metrics(y, p, 0.5)
    for k in ("accuracy", "recall", "specificity", "roc_auc"):
        assert ci[k][0] <= point[k] <= ci[k][1], k
    y2, p2 = data(3000)
    ci2 = bootstrap_ci(y2, p2, 0.5, n_boot=300)
    assert ci2["accuracy"][1] - ci2["accuracy"][0] < ci["accuracy"][1] - ci["accuracy"][0]


def test_probabilities_within_float32_noise_rank_as_ties_in_every_ranking_metric():
    """A nearly constant model scored by two inference forms whose outputs differ in float32's last bits
    gets one ROC AUC (0.5, all tied), not two chance values; well separated scores keep scikit-learn's."""
    from sklearn.metrics import roc_auc_score

    from pneumoscan.core.metrics import binary_metrics, bootstrap_ci, ranking_scores, roc_points

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    base = 0.7310586
    one, other = (base + rng.uniform(-2e-7, 2e-7, 400) for _ in range(2))
    assert roc_auc_score(y, one) != roc_auc_score(y, other)  # what float noise alone does to a raw AUC
    assert binary_metrics(y, one)["roc_auc"] == binary_metrics(y, other)["roc_auc"] == 0.5
    assert bootstrap_ci(y, one, 0.5, n_boot=50)["roc_auc"] == [0.5, 0.5]
    assert len(roc_points(y, one)[0]) == 2  # one step: every score tied
    p = rng.permutation(np.linspace(0.001, 0.999, 400))  # neighbours 2.5e-3 apart: no tie
    assert binary_metrics(y, p)["roc_auc"] == roc_auc_score(y, p)
    assert np.array_equal(ranking_scores(p), p) and ranking_scores(np.array([])).size == 0


def test_wilson_intervals_do_not_collapse_where_every_image_is_right():
    from pneumoscan.core.metrics import confidence_intervals, wilson_interval

    assert wilson_interval(12, 12) == pytest.approx([0.7575, 1.0], abs=1e-4)
    assert wilson_interval(0, 12)[0] == 0.0 and wilson_interval(0, 0) is None
    lo, hi = wilson_interval(706, 745)  # the textbook formula, and the bootstrap's neighbourhood at this size
    assert lo == pytest.approx(0.9292, abs=1e-4) and hi == pytest.approx(0.9615, abs=1e-4)
    y = np.array([0] * 6 + [1] * 6)
    intervals, degenerate = confidence_intervals(y, np.where(y == 1, 0.9, 0.1), 0.5)
    assert intervals["accuracy"][0] < 0.8 and intervals["accuracy"][1] == 1.0
    assert set(degenerate) == {"f1", "roc_auc", "average_precision"}
