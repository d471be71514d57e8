"""Tracking a run: each epoch's row of metrics.jsonl (`epoch_row`, `log_epoch`), and, optionally, epoch
scalars and the final plots of a run written for TensorBoard.

`pip install 'pneumoscan[tensorboard]'`, then `tensorboard --logdir runs/` compares runs side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .fileio import append_text, optional_import

SCALARS = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_accuracy",
           "accuracy/val": "val_accuracy", "roc_auc/val": "val_roc_auc", "sensitivity/val": "val_recall",
           "specificity/val": "val_specificity", "lr": "lr", "speed/train_images_per_s": "train_images_per_s"}


class TensorBoardLogger:
    """Writes into RUN_DIR/tensorboard; safe to use from rank 0 only."""

    def __init__(self, run_dir: str | Path):
        optional_import("tensorboard", "tensorboard", "--tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log_epoch(self, row: dict[str, Any]) -> None:
        for tag, key in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def log_plots(self, folder: str | Path, step: int) -> None:
        for png in sorted(Path(folder).glob("*.png")):
            image = np.asarray(Image.open(png).convert("RGB"))
            self.writer.add_image(f"plots/{png.stem}", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def epoch_row(epoch: int, lr: float, tr: dict[str, Any], va: dict[str, Any], val_seconds: float,
              epoch_seconds: float) -> dict[str, Any]:
    """One line of metrics.jsonl."""
    return {"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
            "val_loss": va["loss"], "val_bce": va["bce"], "val_accuracy": va["accuracy"], "val_roc_auc": va["roc_auc"],
            "val_recall": va["recall"], "val_specificity": va["specificity"],
            **({"val_accuracy_3class": va["accuracy_3class"]} if "accuracy_3class" in va else {}),
            "train_images": tr["images"], "train_seconds": round(tr["seconds"], 2),
            "train_images_per_s": round(tr["images_per_s"], 1), "val_seconds": round(val_seconds, 2),
            "epoch_seconds": round(epoch_seconds, 2)}


def log_epoch(out: Path, row: dict[str, Any], tracker: TensorBoardLogger | None) -> None:
    """Print an epoch's row, append it to metrics.jsonl and give it to TensorBoard when tracking."""
    print(json.dumps(row), flush=True)
    append_text(out / "metrics.jsonl", json.dumps(row) + "\n")
    if tracker:
        tracker.log_epoch(row)
