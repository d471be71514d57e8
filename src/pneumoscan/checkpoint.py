"""Self-describing checkpoints and atomic file writes.

A checkpoint is a dict of plain types that loads with `torch.load(path, weights_only=True)`: the
unwrapped model's state_dict, the run's config, preprocessing, class names, decision threshold, the
Grad-CAM layer, metrics, training history and the pneumoscan version. Every file is written to a
temporary name in the same folder and renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import Config
from .data import class_names
from .models import create_model

FORMAT = "pneumoscan-checkpoint-1"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save(obj: dict[str, Any], path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def make_checkpoint(model: nn.Module, cfg: Config, *, threshold: float, metrics: dict[str, Any] | None = None,
                    history: list[dict[str, Any]] | None = None, epoch: int | None = None) -> dict[str, Any]:
    model = unwrap(model)
    return {
        "format": FORMAT,
        "version": __version__,
        "model": cfg.model.name,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": cfg.to_dict(),
        "preprocessing": cfg.to_dict()["preprocessing"],
        "class_names": list(class_names(cfg.data.task)),
        "threshold": float(threshold),
        "cam_layer": getattr(model, "cam_layer", ""),
        "metrics": metrics or {},
        "history": history or [],
        "epoch": epoch,
    }


def build_model(cfg: Config) -> nn.Module:
    """The model a config describes, freshly initialised."""
    n = len(class_names(cfg.data.task))
    return create_model(cfg.model.name, activation=cfg.model.activation, in_channels=cfg.preprocessing.channels,
                        image_size=cfg.preprocessing.image_size, batchnorm_momentum=cfg.model.batchnorm_momentum,
                        num_outputs=1 if n == 2 else n)


@dataclass
class LoadedModel:
    model: nn.Module
    config: Config
    threshold: float
    class_names: list[str]
    checkpoint: dict[str, Any]


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint written by `save` and rebuild its model (in eval mode) on `device`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file; all mean the same to a user
        raise ValueError(f"{path}: not a readable pneumoscan checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pneumoscan checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__})")
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return LoadedModel(model, cfg, float(ckpt["threshold"]), list(ckpt["class_names"]), ckpt)
