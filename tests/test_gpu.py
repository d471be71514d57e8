"""GPU checks: run only where CUDA is available (CI has no GPU; see benchmarks/ for GPU timings)."""

import pytest
import torch

from pneumoscan.predict import Predictor
from pneumoscan.train import train

from .test_train_checkpoint import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_training_and_prediction_on_cuda_match_cpu_prediction(tiny_data, tmp_path):
    summary = train(tiny_config(tiny_data, epochs=1), tmp_path / "run", device="auto", progress=False)
    assert summary["device"].startswith("cuda")
    files = sorted(str(p) for p in (tiny_data / "train" / "NORMAL").iterdir())[:4]
    gpu = [p.probability for p in Predictor(tmp_path / "run" / "best.pt", device="cuda").predict_files(files)]
    cpu = [p.probability for p in Predictor(tmp_path / "run" / "best.pt", device="cpu").predict_files(files)]
    assert max(abs(a - b) for a, b in zip(gpu, cpu)) < 1e-3
