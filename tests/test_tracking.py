import pytest

from pneumoscan.apps.cli import main

pytest.importorskip("tensorboard")


def test_tensorboard_gets_epoch_scalars_and_final_plots(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--epochs", "2", "--image-size", "48",
                 "--batch-size", "8", "--val-fraction", "0.25", "--no-progress", "--device", "cpu", "--tensorboard"]) == 0
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/train", "loss/val", "accuracy/val", "roc_auc/val", "lr"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("loss/val")] == [1, 2]
    assert {"plots/roc", "plots/confusion_matrix", "plots/loss"} <= set(tags["images"])
