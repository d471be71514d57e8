"""Data-parallel training under torchrun: two CPU processes (gloo) train one tiny run."""

import json
import subprocess
import sys

import torch

from pneumoscan.networks import checkpoint as ckpt_io


def test_torchrun_two_cpu_processes(tiny_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pneumoscan", "train", "--data", str(tiny_data), "--out", str(run), "--epochs", "2",
           "--image-size", "48", "--batch-size", "4", "--val-fraction", "0.25", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # logged once, by rank 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2
    # each process trains on its own half of every epoch, in whole batches of 4
    n = summary["train_images"]
    assert all(json.loads(line)["train_images"] == 2 * (n // 2 // 4 * 4) for line in lines)
    state = torch.load(run / "best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["state_dict"])
    ckpt_io.load(run / "best.pt")
    assert (run / "eval-val" / "metrics.json").is_file() and (run / "report.html").is_file()
