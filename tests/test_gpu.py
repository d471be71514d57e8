"""GPU checks: run only where CUDA is available (CI has no GPU; see benchmarks/ for GPU timings)."""

import pytest
import torch
from torch import nn

from pneumoscan.networks.adam import KerasAdam
from pneumoscan.networks.augment import draw_augmentation
from pneumoscan.core.config import Augmentation, Config
from pneumoscan.tasks.predict import Predictor
from pneumoscan.networks.cuda_graphs import CudaGraphStep
from pneumoscan.tasks.train import DeviceSplit, make_step, train

from .test_train_checkpoint import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("graphs", [False, True])
def test_training_and_prediction_on_cuda_match_cpu_prediction(tiny_data, tmp_path, graphs):
    summary = train(tiny_config(tiny_data, epochs=2), tmp_path / "run", device="auto", progress=False, cuda_graphs=graphs)
    assert summary["device"].startswith("cuda")
    files = sorted(str(p) for p in (tiny_data / "train" / "NORMAL").iterdir())[:4]
    gpu = [p.probability for p in Predictor(tmp_path / "run" / "best.pt", device="cuda").predict_files(files)]
    cpu = [p.probability for p in Predictor(tmp_path / "run" / "best.pt", device="cpu").predict_files(files)]
    assert max(abs(a - b) for a, b in zip(gpu, cpu)) < 1e-3


def test_a_cpu_run_resumes_on_the_gpu_with_graphs(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=1)
    train(cfg, tmp_path / "run", device="cpu", progress=False)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    last["config"]["train"]["epochs"] = 2
    torch.save(last, tmp_path / "run" / "last.pt")
    summary = train(cfg, tmp_path / "run", device="cuda", resume=True, progress=False, cuda_graphs=True)
    assert summary["epochs"] == 2 and summary["device"].startswith("cuda")


def _small_net() -> nn.Module:  # no dropout, so eager and replayed steps are comparable number for number
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 1),
                         nn.Flatten(0)).cuda()


def test_replayed_graph_steps_equal_eager_steps_and_follow_the_learning_rate():
    """The LR drops before step 4: a graph that ignored the change would drift away from the eager run."""
    torch.backends.cudnn.deterministic = True
    cfg = Config(augmentation=Augmentation(zoom=0.3, vertical_flip=True))
    gen = torch.Generator().manual_seed(0)
    data = DeviceSplit(torch.randint(0, 256, (64, 16, 16), dtype=torch.uint8).cuda(), (torch.rand(64) < 0.5).float().cuda())
    batches = [(torch.randperm(64, generator=gen)[:8].cuda(),
                {k: v.cuda() for k, v in draw_augmentation(8, cfg.augmentation, gen).items()}) for _ in range(6)]
    eager, graphed = _small_net(), _small_net()
    runs = {}
    for name, net in (("eager", eager), ("graphed", graphed)):
        lr = torch.tensor(1e-2, device="cuda")
        opt = KerasAdam(net.parameters(), lr=lr)  # as make_optimizer builds it for a captured step
        step = make_step(net, data, cfg, opt)
        graph = CudaGraphStep(step, net, opt, *batches[0]) if name == "graphed" else None
        losses = []
        for i, (idx, draws) in enumerate(batches):
            if i == 3:
                lr.fill_(1e-3)  # as Run.set_lr does for a captured optimizer
            if graph:
                losses.append(float(graph(idx, draws)[0]))
            else:
                opt.zero_grad(set_to_none=True)
                losses.append(float(step(idx, draws)[0]))
        runs[name] = losses
    assert runs["eager"] == pytest.approx(runs["graphed"], rel=1e-4)
    for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_validation_on_the_gpu_matches_the_cpu_eager_and_replayed_also_after_the_weights_change():
    """Padded training-size batches, eager and as a CUDA graph; the graph must read the weights in place."""
    from pneumoscan.networks.models import build_model
    from pneumoscan.core.config import TrainConfig
    from pneumoscan.tasks.train import validation_logits as predict_logits

    cfg = Config(train=TrainConfig(batch_size=8, eval_batch_size=16))
    torch.manual_seed(0)
    pixels, labels = torch.randint(0, 256, (21, 150, 150), dtype=torch.uint8), torch.zeros(21)
    cpu_split, gpu_split, graphs = DeviceSplit(pixels, labels), DeviceSplit(pixels.cuda(), labels.cuda()), {}

    def varied_model() -> nn.Module:  # a freshly built model answers the same for every image
        model = build_model(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = 1.0
            model.train()(cpu_split.inputs(slice(None), cfg))  # BatchNorm statistics of these images
        return model.eval()

    first, second = varied_model(), varied_model()
    model = build_model(cfg).cuda()  # stays on the GPU: load_state_dict copies into its tensors, as training does
    for weights in (first, second):
        model.load_state_dict(weights.state_dict())
        cpu = torch.sigmoid(predict_logits(weights, cpu_split, cfg))
        eager = torch.sigmoid(predict_logits(model, gpu_split, cfg).cpu())
        replayed = torch.sigmoid(predict_logits(model, gpu_split, cfg, graphs).cpu())
        assert eager.shape == replayed.shape == cpu.shape == (21,)
        assert cpu.std() > 0.003 and torch.allclose(eager, cpu, atol=1e-3) and torch.allclose(replayed, eager, atol=1e-6)
    assert "validation" in graphs


@pytest.mark.parametrize("graphs", [False, True])
def test_the_best_epochs_logged_validation_equals_evaluate_of_best_pt_on_the_gpu(tmp_path, graphs):
    """The CPU invariant of test_invariants.py, on the GPU: replayed steps and validation, then evaluate.

    cuDNN runs convolutions in TF32 by default and chooses its algorithms per batch shape (validation
    batches are padded to the training batch size, evaluate's are not): the loss agrees to TF32's
    precision, the decisions and the ranking exactly."""
    import json

    from pneumoscan.apps.cli import main

    from .conftest import make_dataset
    from .test_invariants import paper_run_args

    data = make_dataset(tmp_path / "data", patients_per_class=30, images_per_patient=2)
    args = [*paper_run_args(data, tmp_path / "run", epochs=6, image_size=48), "--batchnorm-momentum", "0.1"]
    args[args.index("--device") + 1] = "cuda"
    assert main(args + ([] if graphs else ["--no-cuda-graphs"])) == 0
    logged = json.loads((tmp_path / "run" / "summary.json").read_text())["best_val"]
    evaluated = json.loads((tmp_path / "run" / "eval-val" / "metrics.json").read_text())
    assert logged["roc_auc"] > 0.8
    for key in ("accuracy", "roc_auc", "recall", "specificity"):
        assert logged[key] == pytest.approx(evaluated[key], abs=1e-5), key
    assert logged["bce"] == pytest.approx(evaluated["log_loss"], rel=2e-3)
