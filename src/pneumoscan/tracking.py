"""Optional experiment tracking: epoch scalars and the final plots of a run, written for TensorBoard.

`pip install 'pneumoscan[tensorboard]'`, then `tensorboard --logdir runs/` compares runs side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .fileio import optional_import

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
