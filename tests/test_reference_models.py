"""ResNet-18 and DenseNet-121 from MONAI: built by name, trainable with the same commands, local pretrained weights."""

import re

import pytest
import torch

from pneumoscan.apps.cli import main
from pneumoscan.networks.models import create_model, load_pretrained

monai_nets = pytest.importorskip("monai.networks.nets")


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_reference_models_take_grey_or_rgb_and_give_one_logit(name):
    model = create_model(name).eval()
    grey = torch.rand(2, 1, 64, 64)
    assert model(grey).shape == (2,)
    assert torch.allclose(model(grey.expand(-1, 3, -1, -1)), model(grey), atol=1e-5)
    assert model.get_submodule(model.cam_layer) is not None


def test_resnet18_loads_torchvision_layout_weights(tmp_path):
    torch.manual_seed(0)
    imagenet = monai_nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000, conv1_t_size=7,
                                   conv1_t_stride=2, shortcut_type="B", bias_downsample=False)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    model = create_model("resnet18")
    report = load_pretrained(model, str(tmp_path / "resnet18.pth"))
    assert torch.allclose(model.net.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.net.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert report["missing"] == ["fc.bias", "fc.weight"]


def test_densenet121_loads_torchvision_names(tmp_path):
    imagenet = monai_nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=1000)
    # torchvision names the dense layers' modules without MONAI's 'layers.' level
    tv = {re.sub(r"\.layers\.", ".", k): v for k, v in imagenet.state_dict().items()}
    assert any(".denselayer1.norm1." in k for k in tv)
    torch.save(tv, tmp_path / "densenet121.pth")
    model = create_model("densenet121")
    report = load_pretrained(model, str(tmp_path / "densenet121.pth"))
    w = model.net.features.denseblock1.denselayer1.layers.conv1.weight
    assert torch.equal(w, imagenet.features.denseblock1.denselayer1.layers.conv1.weight)
    assert all(k.startswith("class_layers") for k in report["missing"])


def test_pretrained_file_errors_are_clear(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: cannot read pretrained weights"):
        load_pretrained(create_model("resnet18"), str(tmp_path / "junk.pth"))
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        load_pretrained(create_model("resnet18"), str(tmp_path / "other.pth"))


def test_resnet18_trains_through_the_cli(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--model", "resnet18", "--epochs", "1",
                 "--image-size", "64", "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--device", "cpu"]) == 0
    assert (run / "eval-val" / "metrics.json").is_file()
