"""Self-describing checkpoints.

A checkpoint is a dict of plain types that loads with `torch.load(path, weights_only=True)`: the
unwrapped model's state_dict, the run's config, preprocessing, class names, decision threshold, the
Grad-CAM layer, metrics, training history and the pneumoscan version. An ensemble's checkpoint
(`pneumoscan.ensemble`) adds an "ensemble" record (members, test-time views); `load` rebuilds it
(`ensemble_model.Ensemble`). Every checkpoint read goes through `read`.
Checkpoints are written atomically (`fileio.save_torch`), so a crash never leaves a half-written file.
The best weights of a run still training (`best.partial.pt`) are marked `unfinished` and refused by `read`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..core.config import Config
from ..io.data import class_names
from ..io.fileio import save_torch
from .ensemble_model import Ensemble
from .models import build_model

FORMAT = "pneumoscan-checkpoint-1"
UNFINISHED = "unfinished"  # True in a run's best weights until `train.finish` gives them their operating point
log = logging.getLogger(__name__)


save = save_torch  # written atomically


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


def config_of(ckpt: dict[str, Any], path: str | os.PathLike) -> Config:
    """The checkpoint's config, range-checked before any model is built from it (ValueError naming `path`)."""
    try:
        return Config.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's config cannot be used ({e})") from None


@dataclass
class LoadedModel:
    model: nn.Module
    config: Config
    threshold: float
    class_names: list[str]
    checkpoint: dict[str, Any]


def _ensemble_of(ckpt: dict[str, Any], cfg: Config, path: str | os.PathLike) -> nn.Module:
    """An ensemble checkpoint's model: one freshly built member per recorded member, and its views."""
    record = ckpt["ensemble"]
    try:
        return Ensemble([build_model(cfg) for _ in record["members"]], record["views"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's ensemble record cannot be used ({e})") from None


def with_data_root(cfg: Config, data_root: str | os.PathLike | None) -> Config:
    """`cfg` with its images under `data_root` instead (unchanged when None or empty)."""
    return replace(cfg, data=replace(cfg.data, root=str(data_root))) if data_root else cfg


def load(path: str | os.PathLike, device: str | torch.device = "cpu",
         data_root: str | os.PathLike | None = None) -> LoadedModel:
    """Load a checkpoint written by `save` and rebuild its model (in eval mode) on `device`; its config's
    images are under `data_root` when given."""
    ckpt = read(path)
    cfg = config_of(ckpt, path)
    model = _ensemble_of(ckpt, cfg, path) if "ensemble" in ckpt else build_model(cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    return LoadedModel(model, with_data_root(cfg, data_root), float(ckpt["threshold"]), list(ckpt["class_names"]), ckpt)


def read(path: str | os.PathLike, allow_unfinished: bool = False) -> dict[str, Any]:
    """A checkpoint's dict, as written by `save` (FileNotFoundError or ValueError naming `path`). The best
    weights of an unfinished run are refused unless `allow_unfinished` (training itself, finishing them)."""
    path = Path(path)
    if not path.is_file():
        unfinished = path.with_name("best.partial.pt") if path.name == "best.pt" else None
        if unfinished is not None and unfinished.is_file():
            raise FileNotFoundError(f"{path}: checkpoint not found; the run in {path.parent} has not finished (it left "
                                    f"best.partial.pt): `pneumoscan train --out {path.parent} --resume` finishes it")
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix.lower() == ".onnx":
        raise ValueError(f"{path}: an ONNX model, not a checkpoint; give the .pt checkpoint it was exported from "
                         "(--backend onnx runs it with ONNX Runtime)")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise ValueError(f"{path}: not a pneumoscan checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file; all mean the same to a user
        # torch's own message advises weights_only=False, which a checkpoint of plain data never needs
        reason = "it holds objects other than plain data" if "weights_only" in str(e) else str(e).strip()[:200]
        raise ValueError(f"{path}: not a readable pneumoscan checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pneumoscan checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__})")
    if not allow_unfinished:
        _check_finished(ckpt, path)
    return ckpt


def _check_finished(ckpt: dict[str, Any], path: Path) -> None:
    """ValueError for the best weights of a run that has not ended: they lack the threshold chosen on validation,
    the calibration and the out-of-distribution detector, so every answer from them would be off. A best.pt
    written by an older pneumoscan in a run that never finished cannot be told for sure: it gets a warning."""
    if ckpt.get(UNFINISHED):
        raise ValueError(f"{path}: the best weights of a training run that has not finished (no threshold chosen on "
                         f"validation, calibration or out-of-distribution detector yet); continue the run with "
                         f"`pneumoscan train --out {path.parent} --resume` and use its best.pt")
    run = path.parent
    if ("calibration" not in ckpt and "ensemble" not in ckpt and path.name == "best.pt"
            and (run / "last.pt").is_file() and not (run / "summary.json").is_file()):
        log.warning("%s: its run has no summary.json and this checkpoint no calibration: it looks like the best "
                    "weights of a run that never finished; `pneumoscan train --out %s --resume` finishes it", path, run)
