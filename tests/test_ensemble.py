"""Seed ensembles and test-time augmentation as one checkpoint, on short paper-recipe runs of synthetic X-rays.

- The ensemble's probability is the mean of its members' logits through its own calibration.
- K = 1 with --tta zoom is the mean over the views (identity, zooms 0.9 and 1.1, up-down flip), not the member.
- evaluate, predict, predict --backend onnx, explain and the HTTP API agree on an ensemble with TTA; its
  Grad-CAM map is the mean of the members' maps.
- Members that differ in more than their seed are refused with the file and the setting named.
- The checkpoint loads with weights_only=True and carries its operating point and detector.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.apps.cli import main
from pneumoscan.io.images import load_for_model
from pneumoscan.networks.inference import freeze, predict_logits

from .conftest import make_dataset
from .test_invariants import assert_every_path_agrees, paper_run_args, read_csv

# BatchNorm statistics of the last batch and a large step: outputs that differ between images within 4 epochs
RECIPE = ["--lr", "0.01", "--batchnorm-momentum", "1.0", "--calibration", "temperature", "--threshold-rule", "youden",
          "--threshold-resamples", "50", "--no-eval"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two paper-network runs (seeds 0 and 1, 4 epochs, 32 px) on 64 synthetic X-rays, their ensemble with and
    without TTA, and the first run alone with TTA."""
    root = tmp_path_factory.mktemp("ensemble")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOSCAN_CACHE", str(root / "cache"))
        data = make_dataset(root / "data", patients_per_class=16, images_per_patient=2)
        members = []
        for seed in (0, 1):
            out = root / f"seed{seed}"
            assert main([*paper_run_args(data, out, epochs=4, image_size=32), "--seed", str(seed), *RECIPE]) == 0
            members.append(out / "best.pt")
        common = ["--device", "cpu", "--no-progress"]
        assert main(["ensemble", *map(str, members), "--out", str(root / "ens.pt"), *common]) == 0
        assert main(["ensemble", *map(str, members), "--tta", "zoom", "--out", str(root / "ens_tta.pt"), *common]) == 0
        assert main(["ensemble", str(members[0]), "--tta", "zoom", "--out", str(root / "tta1.pt"), *common]) == 0
        yield {"root": root, "data": data, "members": members, "ens": root / "ens.pt", "ens_tta": root / "ens_tta.pt",
               "tta1": root / "tta1.pt"}


def val_images(runs) -> tuple[list[str], np.ndarray]:
    """The validation split's files (as evaluate lists them) and their pixels at the members' input size."""
    files = sorted(json.loads((runs["members"][0].parent / "split.json").read_text())["val"]["files"])
    cfg = ckpt_io.load(runs["members"][0]).config.preprocessing
    return files, np.stack([load_for_model(f, cfg.image_size, cfg.resize_filter) for f in files])


def raw_logits(path: Path, pixels: np.ndarray) -> torch.Tensor:
    loaded = ckpt_io.load(path)
    return predict_logits(freeze(loaded.model), torch.from_numpy(pixels), loaded.config.preprocessing)


def calibrated(ckpt: dict, logits: torch.Tensor) -> np.ndarray:
    cal = ckpt["calibration"]
    return 1 / (1 + np.exp(-(logits.double().numpy() / cal["temperature"] + cal["offset"])))


def test_the_ensembles_probability_is_the_mean_of_its_members_logits_through_its_calibration(runs, tmp_path):
    files, pixels = val_images(runs)
    ens = torch.load(runs["ens"], weights_only=True)
    assert ens["calibration"]["method"] == "temperature" and ens["calibration"]["temperature"] != 1.0
    members = [raw_logits(p, pixels) for p in runs["members"]]
    expected = calibrated(ens, torch.stack(members).mean(0))
    assert main(["predict", str(runs["ens"]), *files, "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    got = read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose([float(got[f]["p_pneumonia"]) for f in files], expected, atol=2e-6)
    for member in members:  # the mean is not any one member
        assert (member - torch.stack(members).mean(0)).abs().max() > 1e-3


def test_one_member_with_tta_is_the_mean_over_its_views_and_not_the_member_alone(runs):
    from pneumoscan.networks.augment import augment_batch
    from pneumoscan.core.config import Augmentation
    from pneumoscan.tasks.predict import Predictor

    _, pixels = val_images(runs)
    ckpt = torch.load(runs["tta1"], weights_only=True)
    assert [v["name"] for v in ckpt["ensemble"]["views"]] == ["identity", "zoom 0.9", "zoom 1.1", "up-down flip"]
    loaded = ckpt_io.load(runs["members"][0])
    model, prep = freeze(loaded.model), loaded.config.preprocessing
    x = prep.normalize(torch.from_numpy(pixels).float().unsqueeze(1))

    def zoom(z: float) -> torch.Tensor:
        return augment_batch(x, Augmentation(), draws={"zoom": torch.full((len(x), 2), z)})

    with torch.no_grad():
        views = [model(v) for v in (x, zoom(0.9), zoom(1.1), x.flip(2))]
    by_hand = torch.stack(views).mean(0)
    assert (by_hand - views[0]).abs().max() > 1e-3  # the views really change the output
    np.testing.assert_allclose(raw_logits(runs["tta1"], pixels).numpy(), by_hand.numpy(), atol=1e-5)
    got = Predictor(runs["tta1"], device="cpu").predict_arrays(pixels)
    np.testing.assert_allclose(got, calibrated(ckpt, by_hand), atol=1e-5)


def test_every_inference_path_agrees_on_an_ensemble_with_tta(runs, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("monai")
    pytest.importorskip("fastapi")
    from pneumoscan.networks.export import OnnxPredictor, remembered_onnx_bytes

    ens = str(runs["ens_tta"])
    assert main(["evaluate", ens, "--split", "val", "--out", str(tmp_path / "eval"), "--device", "cpu",
                 "--no-progress"]) == 0
    client, results = assert_every_path_agrees(runs["ens_tta"], tmp_path / "eval" / "predictions.csv", tmp_path,
                                               min_files=16, n_explain=4, n_api=3)
    assert all(r["heatmap_png"] for r in results)
    assert "ensemble of 2 members (seeds 0, 1)" in client.get("/api/model-card").text
    assert client.get("/api/model").json()["ensemble"].startswith("ensemble of 2 members (seeds 0, 1)")
    assert "ensemble of 2 members" in (tmp_path / "eval" / "report.html").read_text()
    meta = json.loads(OnnxPredictor(remembered_onnx_bytes(ens)).metadata["ensemble"])  # the export predict made
    assert meta["seeds"] == [0, 1] and len(meta["views"]) == 4


def test_the_ensembles_gradcam_is_the_mean_of_its_members_maps(runs):
    pytest.importorskip("monai")
    from pneumoscan.tasks.explain import _min_max, cam_for_pixels
    from pneumoscan.tasks.predict import Predictor

    _, pixels = val_images(runs)
    for ens in (runs["ens"], runs["ens_tta"]):
        heat, _ = cam_for_pixels(Predictor(ens, device="cpu"), pixels[0])
        maps = [cam_for_pixels(Predictor(m, device="cpu"), pixels[0])[0] for m in runs["members"]]
        assert np.abs(maps[0] - maps[1]).max() > 0.05  # the members look at different places
        expected = _min_max(torch.from_numpy(np.mean(maps, 0))[None, None])[0, 0].numpy()
        np.testing.assert_allclose(heat, expected, atol=1e-4)


def test_members_that_differ_in_more_than_the_seed_are_refused_naming_the_file(runs, tmp_path, capsys):
    first = str(runs["members"][0])
    for section, key, value in (("preprocessing", "image_size", 48), ("data", "task", "three-class")):
        ckpt = torch.load(runs["members"][1], weights_only=True)  # configs are compared first: no weights load
        ckpt["config"][section][key] = value
        other = tmp_path / f"{key}.pt"
        ckpt_io.save(ckpt, other)
        assert main(["ensemble", first, str(other), "--out", str(tmp_path / "e.pt"), "--device", "cpu"]) == 2
        assert f"{other}: {section}.{key} is {value!r} where {first} has" in capsys.readouterr().err
    assert main(["ensemble", first, first, "--out", str(tmp_path / "e.pt"), "--device", "cpu"]) == 2
    assert "the same checkpoint is given twice" in capsys.readouterr().err
    assert main(["ensemble", first, str(runs["members"][1]), "--out", first, "--device", "cpu"]) == 2
    assert f"{first}: is one of the members" in capsys.readouterr().err
    assert not (tmp_path / "e.pt").exists()


def test_the_checkpoint_loads_with_weights_only_and_carries_its_operating_point_and_detector(runs, tmp_path):
    ckpt = torch.load(runs["ens_tta"], weights_only=True)
    assert ckpt["format"] == "pneumoscan-checkpoint-1"
    lo, hi = ckpt["threshold_interval"]
    assert lo <= ckpt["threshold"] <= hi and ckpt["threshold_rule"]["chosen_on"] == "val"
    assert ckpt["calibration"]["method"] == "temperature" and ckpt["calibration"]["fitted_on"] == "val"
    assert 0 < ckpt["train_prevalence"] < 1
    layers = ckpt["ood"]["layers"]
    assert any(n.startswith("members.0.") for n in layers) and any(n.startswith("members.1.") for n in layers)
    record = ckpt["ensemble"]
    assert [m["seed"] for m in record["members"]] == [0, 1] and all(m["val"]["roc_auc"] for m in record["members"])
    assert ckpt["metrics"]["val"]["roc_auc"] is not None and len(record["views"]) == 4
    assert ckpt["cam_layer"] == ["members.0.features.3.3", "members.1.features.3.3"]
    # fit-ood refits the same detector from the same split
    assert main(["fit-ood", str(runs["ens_tta"]), "--out", str(tmp_path / "refit.pt"), "--device", "cpu",
                 "--no-progress"]) == 0
    refit = torch.load(tmp_path / "refit.pt", weights_only=True)["ood"]
    assert refit["threshold"] == pytest.approx(ckpt["ood"]["threshold"], rel=1e-6)


def test_the_views_are_those_training_augmentation_taught():
    from pneumoscan.core.config import Augmentation
    from pneumoscan.tasks.ensemble import tta_views

    def names(aug: Augmentation) -> list[str]:
        return [v["name"] for v in tta_views("zoom", aug)]

    assert names(Augmentation(zoom=0.5, vertical_flip=True)) == ["identity", "zoom 0.9", "zoom 1.1", "up-down flip"]
    assert names(Augmentation(zoom=0.2, vertical_flip=False)) == ["identity", "zoom 0.9", "zoom 1.1"]
    assert names(Augmentation(zoom=0.05, vertical_flip=True)) == ["identity", "up-down flip"]
    assert [v["name"] for v in tta_views("none", Augmentation())] == ["identity"]
    with pytest.raises(ValueError, match="taught none of the test-time views"):
        tta_views("zoom", Augmentation(zoom=0.0, vertical_flip=False))


def test_freezing_an_ensemble_gives_each_paper_network_its_fast_form(runs):
    from pneumoscan.networks.inference import FrozenSeedCNN

    loaded = ckpt_io.load(runs["ens_tta"])
    frozen = freeze(loaded.model)
    assert all(isinstance(m, FrozenSeedCNN) for m in frozen.members)
    assert not any(isinstance(m, FrozenSeedCNN) for m in loaded.model.members)  # the original is left as it is
