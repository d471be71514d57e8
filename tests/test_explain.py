"""Grad-CAM: right size, finite, in [0, 1], and sensitive to the model's weights (the saliency sanity check)."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.networks import models
from pneumoscan.apps.cli import main
from pneumoscan.tasks.explain import cam_for_pixels, explain_image
from pneumoscan.tasks.predict import Predictor

from .test_train_checkpoint import tiny_config

pytest.importorskip("monai")


@pytest.fixture
def trained(tiny_data, tmp_path):
    from pneumoscan.tasks.train import train

    train(tiny_config(tiny_data, epochs=1), tmp_path / "run", device="cpu", progress=False)
    return tmp_path / "run" / "best.pt"


def test_heatmap_has_the_image_size_and_is_finite_in_unit_range(trained, tiny_data, tmp_path):
    img = (np.random.default_rng(0).integers(0, 255, (90, 70))).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    rgb, heat, prob = explain_image(Predictor(trained, device="cpu"), tmp_path / "x.png")
    assert rgb.shape == (90, 70, 3) and rgb.dtype == np.uint8
    assert heat.shape == (90, 70) and np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert 0 <= prob <= 1


def test_heatmap_changes_when_the_weights_are_randomised(trained, tiny_data, tmp_path):
    predictor = Predictor(trained, device="cpu")
    pixels = predictor.load(sorted((tiny_data / "train" / "PNEUMONIA").iterdir())[0])
    heat, _ = cam_for_pixels(predictor, pixels)
    again, _ = cam_for_pixels(predictor, pixels)
    assert np.allclose(heat, again)  # deterministic, and the model is left in eval mode
    assert not predictor.model.training
    torch.manual_seed(123)
    for m in predictor.model.modules():
        if hasattr(m, "reset_parameters") and m is not predictor.model:
            m.reset_parameters()
    randomised, _ = cam_for_pixels(predictor, pixels)
    assert np.abs(heat - randomised).mean() > 0.05


def test_explain_command_writes_pngs_and_carries_on_past_bad_files(trained, tiny_data, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    folder = tiny_data / "train" / "NORMAL"
    assert main(["explain", str(trained), str(folder), str(bad), "--out", str(tmp_path / "ex")]) == 0
    rows = list(csv.DictReader((tmp_path / "ex" / "explanations.csv").open()))
    assert len(rows) == 25
    assert rows[-1]["error"].startswith(str(bad)) and rows[-1]["heatmap"] == ""
    assert rows[-1]["ood_score"] == rows[-1]["outside_training"] == ""
    for r in rows[:-1]:
        png = Image.open(tmp_path / "ex" / r["heatmap"])
        # the 64 x 64 overlay at the top left, the legend strip below it (as wide as its caption needs)
        assert png.width >= 64 and png.height > 64 and png.mode == "RGB" and 0 <= float(r["p_pneumonia"]) <= 1
        assert float(r["ood_score"]) >= 0 and r["outside_training"] in ("yes", "no")
    first = np.asarray(Image.open(tmp_path / "ex" / rows[0]["heatmap"]))
    rgb, _, _ = explain_image(Predictor(trained, device="cpu"), rows[0]["path"])
    # a second Grad-CAM pass agrees to ~1e-4, which moves a blended pixel by far less than one grey level
    assert np.abs(first[:64, :64].astype(int) - rgb.astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_gradcam_works_for_the_reference_models(name, tmp_path):
    from pneumoscan.core.config import Config, Preprocessing

    cfg = Config(preprocessing=Preprocessing(image_size=64)).override("model", name=name)
    model = models.build_model(cfg)
    ckpt_io.save(ckpt_io.make_checkpoint(model, cfg, threshold=0.5), tmp_path / "m.pt")
    predictor = Predictor(tmp_path / "m.pt", device="cpu")
    pixels = (np.random.default_rng(0).integers(0, 255, (64, 64))).astype(np.uint8)
    heat, prob = cam_for_pixels(predictor, pixels)
    assert heat.shape == (64, 64) and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
    assert not predictor.model.training


def test_batched_maps_equal_one_image_at_a_time(trained):
    from pneumoscan.tasks.explain import cam_for_batch

    predictor = Predictor(trained, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    heats, probs, class_probs, _ = cam_for_batch(predictor, pixels)
    assert class_probs is None
    for i in range(3):
        heat, prob = cam_for_pixels(predictor, pixels[i])
        assert np.allclose(heat, heats[i], atol=1e-4) and prob == pytest.approx(float(probs[i]), abs=1e-5)


def test_map_equals_grad_cam_computed_by_hand_with_the_strongest_evidence_at_one(trained, tiny_data):
    """Grad-CAM = ReLU(sum_k mean(dlogit/dA_k) * A_k) at the hooked layer, upsampled, scaled to [0, 1] (not flipped)."""
    predictor = Predictor(trained, device="cpu")
    torch.manual_seed(0)  # random weights: the one-epoch model's maps are mostly empty
    for m in predictor.model.modules():
        if hasattr(m, "reset_parameters") and m is not predictor.model:
            m.reset_parameters()
    assert _maps_checked_against_hand(predictor, tiny_data) >= 3


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "leaky_relu_30", "prelu"])
def test_grad_cam_of_every_activation_equals_the_map_by_hand(activation, tiny_data, tmp_path):
    """Every rectifier of Table IV, including those without parameters at the hooked layer (ReLU and
    LeakyReLU start no autograd graph there), on freshly initialised weights."""
    from dataclasses import replace

    cfg = tiny_config(tiny_data)
    cfg = replace(cfg, model=replace(cfg.model, activation=activation))
    model = models.build_model(cfg)
    torch.manual_seed(0)  # PyTorch's default initialisation: evidence in every map, unlike Keras' zero PReLU slopes
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    ckpt_io.save(ckpt_io.make_checkpoint(model, cfg, threshold=0.5), tmp_path / "m.pt")
    assert _maps_checked_against_hand(Predictor(tmp_path / "m.pt", device="cpu"), tiny_data) >= 3


def _maps_checked_against_hand(predictor: Predictor, tiny_data) -> int:
    """How many images' explain maps equal Grad-CAM computed by hand (an empty map counts as agreeing only
    when the hand-made one is flat too)."""
    from torch.nn import functional as F

    model = predictor.model
    saved = {}
    hook = model.get_submodule(predictor.cam_layer).register_forward_hook(lambda m, i, o: saved.update(a=o))
    checked = 0
    for path in sorted((tiny_data / "train").rglob("*.jpeg"))[::4]:
        pixels = predictor.load(str(path))
        heat, _ = cam_for_pixels(predictor, pixels)
        x = torch.as_tensor(pixels.copy(), dtype=torch.float32)[None, None] / 255
        with torch.enable_grad():
            logit = model(x.requires_grad_(True))
            grad = torch.autograd.grad(logit.sum(), saved["a"])[0]
        cam = F.relu((grad.mean((2, 3), keepdim=True) * saved["a"]).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=pixels.shape, mode="bilinear", align_corners=False)[0, 0].detach().numpy()
        if cam.max() - cam.min() < 1e-9:
            assert heat.max() == 0  # no evidence anywhere: an empty map
            continue
        assert np.allclose(heat, (cam - cam.min()) / (cam.max() - cam.min()), atol=1e-4)
        assert heat.flat[cam.argmax()] == pytest.approx(1.0)
        checked += 1
    hook.remove()
    return checked
