"""Seed ensembles as one checkpoint, with optional test-time augmentation (TTA).

K runs of one recipe that differ only in their seed become one model, `Ensemble(members, views)`, whose
output is the mean of the members' logits over the members and the test-time views of each image. Its
checkpoint is an ordinary pneumoscan checkpoint (format "pneumoscan-checkpoint-1", loadable with
`torch.load(weights_only=True)`): the members' weights under "members.<i>.", the shared config, and an
"ensemble" record (the members' files, seeds and validation figures, the views). `checkpoint.load`
rebuilds it, so evaluate, predict, explain, serve, export and fit-ood take it as they take one model.

The operating point is refitted on validation exactly as training fits one model's
(`train.operating_point`: calibration, the threshold by the recipe's rule with its bootstrap interval,
the training prevalence), and so is the out-of-distribution detector (`ood.fit_for_model`, on the
features of every member at its `ood_layers`, concatenated).

Test-time views (`--tta zoom`) are those training augmentation taught: central zooms by 0.9 and 1.1
(when the recipe's zoom range covers them) and an up-down flip (when the recipe flips), made by
`augment.augment_batch` with fixed draws, beside the image as it is. The views of a batch go through
each member as one batch, the image as it is first: layer hooks (out-of-distribution features, Grad-CAM)
take their first N rows, the un-augmented images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .augment import augment_batch
from .config import Augmentation, Config

log = logging.getLogger(__name__)

TTA_CHOICES = ("none", "zoom")
TTA_ZOOMS = (0.9, 1.1)
IDENTITY = {"name": "identity"}


def tta_views(tta: str, aug: Augmentation) -> list[dict[str, Any]]:
    """The test-time views for `tta` given the members' training augmentation: the image as it is, then
    (for "zoom") the central zooms the zoom range covers and an up-down flip if training flipped."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_CHOICES)}")
    views = [dict(IDENTITY)]
    if tta == "none":
        return views
    if aug.zoom >= max(abs(1 - z) for z in TTA_ZOOMS) - 1e-9:
        views += [{"name": f"zoom {z:g}", "zoom": z} for z in TTA_ZOOMS]
    else:
        log.warning("the members were trained with zoom range %g: no zoom views (they would show what training "
                    "never did)", aug.zoom)
    if aug.vertical_flip:
        views.append({"name": "up-down flip", "vflip": True})
    if len(views) == 1:
        raise ValueError(f"--tta zoom: the members' training augmentation (zoom {aug.zoom:g}, no vertical flip) "
                         "taught none of the test-time views; use --tta none")
    return views


def _check_views(views: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    views = [dict(v) for v in views]
    if not views or views[0] != IDENTITY:
        raise ValueError(f"an ensemble's first view must be the image as it is ({IDENTITY}), not {views[:1]}")
    for v in views[1:]:
        if set(v) - {"name", "zoom", "vflip"} or ("zoom" in v) == ("vflip" in v):
            raise ValueError(f"not a test-time view: {v} (one of zoom: factor, vflip: true)")
    return views


class Ensemble(nn.Module):
    """The mean of the members' outputs (logits) over the members and the test-time `views` of each image.

    `cam_layer` lists each member's Grad-CAM layer (explain averages their maps); `ood_layers` lists every
    member's out-of-distribution layers, prefixed with its path (the detector sees them concatenated)."""

    def __init__(self, members: Sequence[nn.Module], views: Sequence[dict[str, Any]] = (IDENTITY,)):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.views = _check_views(views)
        self.cam_layer = tuple(f"members.{i}.{m.cam_layer}" for i, m in enumerate(members)
                               if getattr(m, "cam_layer", ""))
        if all(getattr(m, "ood_layers", ()) for m in members):
            self.ood_layers = tuple(f"members.{i}.{name}" for i, m in enumerate(members) for name in m.ood_layers)

    def features_model(self) -> "Ensemble":
        """The same members without test-time views: the out-of-distribution features are those of the images
        as they are, so fitting the detector need not score the other views."""
        return self if len(self.views) == 1 else Ensemble(list(self.members)).train(self.training)

    def view_batch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (V * N, C, S, S): every view of the batch, view by view, the images as they are first."""
        parts = [x]
        for view in self.views[1:]:
            if "zoom" in view:
                draws = {"zoom": x.new_full((x.shape[0], 2), float(view["zoom"]))}
            else:
                draws = {"vflip": torch.ones(x.shape[0], dtype=torch.bool, device=x.device)}
            parts.append(augment_batch(x, Augmentation(), draws=draws))
        return torch.cat(parts) if len(parts) > 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        batch = self.view_batch(x)
        out = torch.stack([member(batch) for member in self.members])  # (K, V * N, ...)
        return out.reshape(-1, n, *out.shape[2:]).mean(0)


def describe(ckpt: dict[str, Any]) -> str:
    """One line naming an ensemble checkpoint's members (seeds) and views; '' for a single model."""
    record = ckpt.get("ensemble")
    if not isinstance(record, dict):
        return ""
    seeds = ", ".join(str(m.get("seed")) for m in record.get("members", []))
    views = ", ".join(v.get("name", "?") for v in record.get("views", []))
    return f"ensemble of {len(record.get('members', []))} members (seeds {seeds}); test-time views: {views}"


def shared_config(configs: Sequence[Config], class_names: Sequence[Sequence[str]], paths: Sequence[str],
                  data_root: str | None) -> Config:
    """The members' common config (the first member's, its data root replaced by `data_root` when given);
    ValueError naming the file and the setting when a member differs in anything but train.seed (or the
    data root, when `data_root` is given)."""
    ignored = {"train.seed"} | ({"data.root"} if data_root else set())
    ref = _flat(configs[0])
    for cfg, names, path in zip(configs[1:], class_names[1:], paths[1:]):
        other = _flat(cfg)
        for key in ref:
            if key not in ignored and other[key] != ref[key]:
                hint = "; pass --data ROOT if they are the same images" if key == "data.root" else ""
                raise ValueError(f"{path}: {key} is {other[key]!r} where {paths[0]} has {ref[key]!r}; ensemble "
                                 f"members must share every setting but train.seed{hint}")
        if list(names or []) != list(class_names[0] or []):
            raise ValueError(f"{path}: class names {names} differ from {paths[0]}'s {class_names[0]}")
    cfg = configs[0]
    return replace(cfg, data=replace(cfg.data, root=str(data_root))) if data_root else cfg


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{k}" if isinstance(values, dict) else section: v
            for section, values in cfg.to_dict().items()
            for k, v in (values.items() if isinstance(values, dict) else [(section, values)])}


def _load_members(paths: Sequence[str], device: torch.device, data_root: str | None) -> tuple[list[Any], Config]:
    """(the members loaded on `device`, their shared config): the configs are compared first, then the
    models built."""
    from . import checkpoint as ckpt_io

    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise ValueError("the same checkpoint is given twice: members must be different runs")
    raw = [ckpt_io.read(p) for p in paths]
    for path, ckpt in zip(paths, raw):
        if "ensemble" in ckpt:
            raise ValueError(f"{path}: already an ensemble; give its members' checkpoints instead")
    configs = [ckpt_io.config_of(c, p) for c, p in zip(raw, paths)]
    cfg = shared_config(configs, [c.get("class_names") for c in raw], paths, data_root)
    seeds = [c.train.seed for c in configs]
    if len(set(seeds)) < len(seeds):
        log.warning("members share a seed (seeds %s): runs with the same seed may be the same model", seeds)
    return [ckpt_io.load(p, device) for p in paths], cfg


def validation_figures(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict[str, Any]:
    """The figures training records for a model's validation (cross-entropy; accuracy, ROC AUC, recall,
    specificity at the recipe's starting threshold); an ensemble has no weight penalty, so loss = bce."""
    from .metrics import binary_metrics, decide
    from .models import probabilities
    from .train import model_loss

    with torch.no_grad():
        loss, bce = model_loss(model, logits, labels)
    probs, class_probs = probabilities(logits)
    y = labels.cpu().numpy()
    m = binary_metrics(y > 0, probs, cfg.train.threshold)
    out = {"loss": float(loss), "bce": float(bce),
           **{k: m[k] for k in ("accuracy", "roc_auc", "recall", "specificity")}}
    if class_probs is not None:
        out["accuracy_3class"] = float((decide(probs, cfg.train.threshold, class_probs) == y).mean())
    return out


def build_ensemble(paths: Sequence[str | os.PathLike], out: str | os.PathLike, tta: str = "none",
                   data_root: str | None = None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Combine the checkpoints at `paths` into one ensemble checkpoint at `out` (written atomically), its
    operating point and out-of-distribution detector fitted on the members' own split; returns a summary."""
    from . import checkpoint as ckpt_io
    from .inference import freeze
    from .models import pneumonia_logit
    from .ood import fit_for_model, training_splits
    from .overlap import training_record
    from .runtime import select_device
    from .train import DeviceSplit, operating_point, validation_logits

    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("give at least one checkpoint")
    if any(Path(out).resolve() == Path(p).resolve() for p in paths):
        raise ValueError(f"{out}: is one of the members; write the ensemble to another file")
    dev = select_device(device)
    loaded, cfg = _load_members(paths, dev, data_root)
    views = tta_views(tta, cfg.augmentation)
    plain = Ensemble([m.model for m in loaded], views)
    model = freeze(plain)
    cached = training_splits(cfg, progress)
    data = {name: DeviceSplit.from_cache(c, dev, cfg.data.task) for name, c in cached.items()}
    logits = validation_logits(model, data["val"], cfg).float()
    val = validation_figures(model, logits, data["val"].labels, cfg)
    val_labels = data["val"].labels.cpu().numpy() > 0
    train_prevalence = float((data["train"].labels > 0).float().mean())
    ckpt = ckpt_io.make_checkpoint(plain, cfg, threshold=cfg.train.threshold, metrics={"val": val})
    ckpt.update(operating_point(cfg, val_labels, pneumonia_logit(logits).cpu().numpy(), train_prevalence))
    ckpt["cam_layer"] = list(plain.cam_layer)
    ckpt["training_images"] = training_record(cached["train"].pixels, [s.patient for s in cached["train"].samples])
    if hasattr(model, "ood_layers"):
        ckpt["ood"] = fit_for_model(model, data["train"].pixels, data["train"].labels.cpu().numpy(),
                                    data["val"].pixels, cfg.preprocessing, cfg.train.eval_batch_size).to_checkpoint()
    else:
        log.warning("a member names no ood_layers: this ensemble gets no out-of-distribution score")
    ckpt["ensemble"] = {
        "members": [{"path": p, "seed": m.config.train.seed, "epoch": m.checkpoint.get("epoch"),
                     "threshold": m.threshold, "val": m.checkpoint.get("metrics", {}).get("val", {})}
                    for p, m in zip(paths, loaded)],
        "views": views, "tta": tta, "combined": "mean of the members' logits over members and views",
        "val_images": len(data["val"]), "train_images": len(data["train"]),
    }
    ckpt_io.save(ckpt, out)
    return {"out": str(out), "members": len(paths), "seeds": [m.config.train.seed for m in loaded],
            "views": [v["name"] for v in views], "val": val, "threshold": ckpt["threshold"],
            "threshold_interval": ckpt["threshold_interval"], "calibration": ckpt["calibration"],
            "ood": None if "ood" not in ckpt else {k: ckpt["ood"][k] for k in ("threshold", "quantile", "val_flagged")},
            "members_val": [{"seed": m.config.train.seed, **{k: m.checkpoint.get("metrics", {}).get("val", {}).get(k)
                                                            for k in ("accuracy", "roc_auc", "bce")}} for m in loaded]}

