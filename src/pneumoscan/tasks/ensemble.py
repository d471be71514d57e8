"""Seed ensembles as one checkpoint, with optional test-time augmentation (TTA).

K runs of one recipe that differ only in their seed become one model, `Ensemble(members, views)`
(`ensemble_model`), whose output is the mean of the members' logits over the members
and the test-time views of each image. Its checkpoint is an ordinary pneumoscan checkpoint (format
"pneumoscan-checkpoint-1", loadable with `torch.load(weights_only=True)`): the members' weights under
"members.<i>.", the shared config, and an "ensemble" record (the members' files, seeds and validation
figures, the views). `checkpoint.load` rebuilds it, so evaluate, predict, explain, serve, export and
fit-ood take it as they take one model.

The operating point and the out-of-distribution detector are refitted on validation exactly as training
fits one model's (`fitting.fit_operating_point`: calibration, the threshold by the recipe's rule with its
bootstrap interval, the training prevalence; the detector on the features of every member at its
`ood_layers`, concatenated).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.config import Config
from ..core.overlap import training_record
from ..networks import checkpoint as ckpt_io
from ..networks.ensemble_model import Ensemble, tta_views
from ..networks.inference import freeze
from ..networks.runtime import select_device
from .fitting import DeviceSplit, fit_operating_point, training_splits, validation_figures

log = logging.getLogger(__name__)


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
    return ckpt_io.with_data_root(configs[0], data_root)


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{k}" if isinstance(values, dict) else section: v
            for section, values in cfg.to_dict().items()
            for k, v in (values.items() if isinstance(values, dict) else [(section, values)])}


def _load_members(paths: Sequence[str], device: torch.device, data_root: str | None) -> tuple[list[Any], Config]:
    """(the members loaded on `device`, their shared config): the configs are compared first, then the
    models built."""
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


def build_ensemble(paths: Sequence[str | os.PathLike], out: str | os.PathLike, tta: str = "none",
                   data_root: str | None = None, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Combine the checkpoints at `paths` into one ensemble checkpoint at `out` (written atomically), its
    operating point and out-of-distribution detector fitted on the members' own split; returns a summary."""
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
    fitted = fit_operating_point(model, data, cfg, features_model=model)
    val = validation_figures(model, fitted.logits, data["val"].labels, cfg)
    ckpt = ckpt_io.make_checkpoint(plain, cfg, threshold=cfg.train.threshold, metrics={"val": val})
    ckpt.update(fitted.fields)
    ckpt["cam_layer"] = list(plain.cam_layer)
    ckpt["training_images"] = training_record(cached["train"].pixels, [s.patient for s in cached["train"].samples])
    if "ood" not in ckpt:
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

