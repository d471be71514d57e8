import json
import logging

import numpy as np
import pytest
import torch

from pneumoscan.networks import checkpoint as ckpt_io
from pneumoscan.networks import models
from pneumoscan.core.config import Config, DataConfig, Preprocessing, TrainConfig
from pneumoscan.tasks.rundir import RunDirError
from pneumoscan.tasks.train import EarlyStopping, train


def tiny_config(root, epochs=2, **train_kw) -> Config:
    return Config(data=DataConfig(root=str(root), val_fraction=0.25),
                  preprocessing=Preprocessing(image_size=48),
                  train=TrainConfig(epochs=epochs, batch_size=8, eval_batch_size=16, **train_kw))


def test_config_round_trips_through_json():
    cfg = Config().override("train", epochs=3).override("model", activation="relu")
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        Config.from_dict({"train": {"bogus": 1}})


def test_training_writes_a_self_describing_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(tiny_data), out, device="cpu", progress=False)
    assert {"best.pt", "last.pt", "metrics.jsonl", "config.json", "split.json", "summary.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert ckpt["preprocessing"]["image_size"] == 48 and ckpt["threshold"] == 0.5
    assert ckpt["cam_layer"] and len(ckpt["history"]) == 2 and ckpt["version"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    loaded = ckpt_io.load(out / "best.pt")
    assert loaded.config.preprocessing.image_size == 48 and not loaded.model.training
    assert summary["epochs"] == 2 and summary["peak_memory_mb"] > 0
    phases = summary["timings"]
    assert list(phases) == [f"{p}_seconds" for p in ("split", "decode", "to_device", "model", "epochs", "after_epochs")]
    assert abs(sum(phases.values()) - summary["wall_seconds"]) < 0.5


def test_resume_continues_exactly_where_it_stopped(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=3)
    train(cfg, tmp_path / "straight", device="cpu", progress=False)
    train(cfg.override("train", epochs=2), tmp_path / "resumed", device="cpu", progress=False)
    # the interrupted run is continued with the full epoch budget
    last = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    last["config"]["train"]["epochs"] = 3
    ckpt_io.save(last, tmp_path / "resumed" / "last.pt")
    train(cfg, tmp_path / "resumed", device="cpu", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6), k
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 3


def test_existing_run_folder_is_not_overwritten_by_accident(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="--overwrite"):
        train(tiny_config(tiny_data, epochs=1), out, device="cpu", progress=False)
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(tiny_config(tiny_data, epochs=1), out, device="cpu", resume=True, progress=False)
    train(tiny_config(tiny_data, epochs=1), out, device="cpu", overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_batch_larger_than_the_training_set_is_a_clear_error(tiny_data, tmp_path):
    from pneumoscan.io.data import DataError

    with pytest.raises(DataError, match="batch size 4096 is larger than the"):
        train(tiny_config(tiny_data, epochs=1).override("train", batch_size=4096), tmp_path / "run", device="cpu",
              progress=False)
    with pytest.raises(ValueError, match="CUDA graphs"):
        train(tiny_config(tiny_data, epochs=1), tmp_path / "run2", device="cpu", progress=False, cuda_graphs=True)


def test_early_stopping_follows_keras_semantics():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert not stopper.step(0.70)
    assert not stopper.step(0.75)  # not better by 0.1
    assert stopper.step(0.79)
    stopper = EarlyStopping(patience=2, min_delta=0.1, state=stopper.state())
    assert stopper.step(0.5)


def test_cuda_request_without_gpu_is_an_error():
    from pneumoscan.networks.runtime import select_device

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"


def test_bad_checkpoint_file_is_a_clear_error(tmp_path):
    """Each refusal is one line naming the file and the reason, never torch's advice to unpickle code."""
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"x.pt: not a pneumoscan checkpoint \(not a file written by torch.save\)"):
        ckpt_io.load(bad)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ValueError, match="model.onnx: an ONNX model, not a checkpoint"):
        ckpt_io.load(tmp_path / "model.onnx")
    torch.save({"format": ckpt_io.FORMAT, "code": np.random.default_rng(0)}, bad)  # an object, not plain data
    with pytest.raises(ValueError) as refused:
        ckpt_io.load(bad)
    assert "holds objects other than plain data" in str(refused.value) and "weights_only=False" not in str(refused.value)
    assert "\n" not in str(refused.value)
    torch.save({"hello": 1}, bad)
    with pytest.raises(ValueError, match="not a pneumoscan checkpoint"):
        ckpt_io.load(bad)
    bad.write_bytes(bad.read_bytes()[:60])  # a zip cut short
    with pytest.raises(ValueError, match="x.pt: not a readable pneumoscan checkpoint"):
        ckpt_io.load(bad)


def test_balanced_sampling_draws_both_classes_equally_often():
    from pneumoscan.networks.runtime import Distributed
    from pneumoscan.tasks.train import epoch_order

    labels = torch.tensor([0] * 100 + [1] * 300)
    cfg = Config().override("train", sampling="balanced")
    order = epoch_order(labels, cfg, epoch=1, ddp=Distributed())
    assert len(order) == 400
    share = float(labels[order].float().mean())
    assert 0.4 < share < 0.6
    assert torch.equal(order, epoch_order(labels, cfg, epoch=1, ddp=Distributed()))
    halves = [epoch_order(labels, cfg, 1, Distributed(rank=r, world_size=2)) for r in (0, 1)]
    assert [len(h) for h in halves] == [200, 200]
    plain = epoch_order(labels, Config(), epoch=1, ddp=Distributed())
    assert sorted(plain.tolist()) == list(range(400))


def test_balanced_class_weights_equalise_the_classes():
    from pneumoscan.tasks.train import balanced_class_weights, model_loss

    labels = torch.tensor([0.0] * 25 + [1.0] * 75)
    w = balanced_class_weights(labels)
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3]))
    assert float(w[0] * 25) == pytest.approx(float(w[1] * 75))
    logits = torch.zeros(4)
    targets = torch.tensor([0.0, 1.0, 1.0, 1.0])
    plain, _ = model_loss(torch.nn.Identity(), logits, targets)
    weighted, _ = model_loss(torch.nn.Identity(), logits, targets, torch.tensor([3.0, 1.0]))
    assert float(weighted) == pytest.approx(float(plain) * (3 + 1 + 1 + 1) / 4)


def test_graph_warmup_state_is_put_back_exactly():
    """What CudaGraphStep relies on, checked on the CPU: warm-up steps leave no trace in weights or Adam state."""
    from pneumoscan.networks.cuda_graphs import _restore, _snapshot

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = _snapshot(model, opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 4)).sum().backward()
        opt.step()
    assert not torch.equal(before["0.weight"], model.state_dict()["0.weight"])
    _restore(model, opt, saved)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(float(v.abs().sum()) == 0 for st in opt.state.values() for v in st.values())


def test_adam_state_resumes_in_its_parameters_layout():
    """A CPU run's channels-last state must fit a GPU run's default-layout weights (and back)."""
    from pneumoscan.tasks.train import state_in_parameter_layouts

    for saved_format, param_format in ((torch.channels_last, torch.contiguous_format),
                                       (torch.contiguous_format, torch.channels_last)):
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=saved_format)
        opt = torch.optim.Adam(conv.parameters(), fused=True)
        conv(torch.rand(1, 3, 5, 5)).sum().backward()
        opt.step()
        saved = opt.state_dict()
        conv = conv.to(memory_format=param_format)
        opt = torch.optim.Adam(conv.parameters(), fused=True)
        opt.load_state_dict(saved)
        assert opt.state[conv.weight]["exp_avg"].stride() != conv.weight.stride()
        state_in_parameter_layouts(opt)
        for p in conv.parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][key].stride() == p.stride()
                assert torch.equal(opt.state[p][key], saved["state"][0 if p is conv.weight else 1][key])


def test_the_warm_up_completes_and_draws_from_no_random_stream(caplog):
    """What start_warm_up promises (train starts it on a GPU only; checked here on the CPU)."""
    from pneumoscan.networks.cuda_graphs import start_warm_up
    from pneumoscan.tasks.train import total_loss

    torch.manual_seed(0)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.DEBUG, logger="pneumoscan.networks.cuda_graphs"):
        start_warm_up(Config(), torch.device("cpu"), total_loss).join()
    assert "failed" not in caplog.text
    assert torch.equal(torch.get_rng_state(), rng)


def test_every_recipe_round_trips_and_builds_its_model():
    from pneumoscan.core.config import RECIPES, recipe

    pytest.importorskip("monai")  # resnet18-224
    for name in RECIPES:
        cfg = recipe(name)
        assert cfg.recipe == name and Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        size = cfg.preprocessing.image_size
        model = models.build_model(cfg).eval()
        assert model(torch.zeros(2, 1, size, size)).shape == (2,)
    momenta = {m.momentum for m in models.build_model(recipe("large-batch")).modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(momenta) == 1 and momenta.pop() == pytest.approx(1 - 0.99 ** 16, abs=1e-4)


def test_freed_training_memory_is_reused_without_page_faults():
    import ctypes
    import resource

    from pneumoscan.networks.runtime import keep_freed_memory

    try:
        ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc")
    keep_freed_memory()
    torch.empty(5_000_000).fill_(1)  # 20 MB: taken from the heap now, and kept there when freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(5_000_000).fill_(1)
    # glibc's default maps and unmaps each block: about 4,900 faults per 20 MB block, 44,000-49,000 here
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 10_000
