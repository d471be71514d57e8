"""The fitting step after the weights: validation outputs, calibration, operating point, detector.

Training (`train.finish`) and ensembles (`ensemble.build_ensemble`) both finish a model here: its
validation logits (`validation_logits`), the calibration and the threshold chosen on them with the
training prevalence (`operating_point`), and the out-of-distribution detector fitted on the training
split (`fit_detector_on`, which `fit_checkpoint`, the fit-ood command, runs alone on a finished checkpoint).
Also the pieces they share: a run's splits rebuilt from its config (`training_splits`), a split on the
device (`DeviceSplit`) and the loss (`model_loss`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core.calibration import fit_platt, fit_temperature, model_prior_of
from ..core.config import Config
from ..core.metrics import binary_metrics, choose_threshold, decide, stable_threshold
from ..core.prevalence import sigmoid
from ..core.overlap import training_record
from ..io.data import CachedImages, cache_images, split_samples, task_labels
from ..networks import checkpoint as ckpt_io
from ..networks.checkpoint import unwrap
from ..networks.cuda_graphs import CudaGraphForward
from ..networks.inference import freeze, model_input
from ..networks.models import pneumonia_logit, probabilities
from ..networks.ood import DEFAULT_QUANTILE, Detector, fit_for_model
from ..networks.runtime import select_device

log = logging.getLogger(__name__)


@dataclass
class DeviceSplit:
    """A split's pixels and labels as tensors on the training device."""

    pixels: torch.Tensor  # (N, S, S) uint8
    labels: torch.Tensor  # (N,) float32 class index: 0/1, or 0/1/2 for the three-class task

    @classmethod
    def from_cache(cls, cached: CachedImages, device: torch.device, task: str = "binary") -> "DeviceSplit":
        labels = torch.from_numpy(task_labels(cached.samples, task))
        return cls(torch.from_numpy(cached.pixels).to(device), labels.float().to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, idx: torch.Tensor | slice, cfg: Config) -> torch.Tensor:
        return model_input(self.pixels[idx], cfg.preprocessing)


def model_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
               class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, cross-entropy) — total adds the model's own penalties (Keras' L2 on Dense kernels).

    One logit per image: binary cross-entropy; several (three-class): softmax cross-entropy.
    `class_weights` (one per class) weights each image's loss by its class.
    """
    if logits.dim() == 2:
        bce = F.cross_entropy(logits, targets.long(), weight=class_weights)
    else:
        weight = class_weights[targets.long()] if class_weights is not None else None
        bce = F.binary_cross_entropy_with_logits(logits, targets, weight=weight)
    penalty = getattr(unwrap(model), "regularization_loss", None)
    return (bce + penalty() if penalty else bce), bce


@torch.no_grad()
def validation_logits(model: nn.Module, data: DeviceSplit, cfg: Config,
                      graphs: dict[str, CudaGraphForward] | None = None) -> torch.Tensor:
    """The model's eval-mode outputs for every row of `data`, in batches of cfg.train.eval_batch_size.

    On a GPU, in batches of the training batch size instead, the last one padded: every batch then has
    the shape the training step already ran, whose cuDNN plans are loaded. With `graphs` (a dict kept
    across calls on the same `data`) each batch is a replayed CUDA graph.
    """
    model.eval()
    n = len(data)
    if data.pixels.device.type != "cuda":
        bs = cfg.train.eval_batch_size
        return torch.cat([model(data.inputs(slice(i, i + bs), cfg)) for i in range(0, n, bs)])
    bs = cfg.train.batch_size
    rows = torch.arange(-(-n // bs) * bs, device=data.pixels.device).clamp_(max=n - 1)  # pad with the last row

    def forward(r: torch.Tensor) -> torch.Tensor:
        return model(data.inputs(r, cfg))

    if graphs is not None:
        if "validation" not in graphs:
            graphs["validation"] = CudaGraphForward(forward, bs, data.pixels.device)
        forward = graphs["validation"]
    return torch.cat([forward(rows[i:i + bs]) for i in range(0, n, bs)])[:n]


def validation_figures(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict[str, Any]:
    """Validation loss as Keras reports it (cross-entropy + the model's L2 penalty, none for an ensemble), and
    the threshold metrics of pneumonia vs normal at the recipe's starting threshold (accuracy, ROC AUC,
    recall, specificity; for the three-class task too, plus its own accuracy)."""
    with torch.no_grad():
        loss, bce = model_loss(model, logits, labels)
    probs, class_probs = probabilities(logits)
    y = labels.cpu().numpy()
    m = binary_metrics(y > 0, probs, cfg.train.threshold)
    out = {"loss": float(loss), "bce": float(bce), **{k: m[k] for k in ("accuracy", "roc_auc", "recall", "specificity")}}
    if class_probs is not None:
        out["accuracy_3class"] = float((decide(probs, cfg.train.threshold, class_probs) == y).mean())
    return out


def operating_point(cfg: Config, val_labels: np.ndarray, val_logits: np.ndarray, train_prevalence: float) -> dict[str, Any]:
    """The checkpoint fields that turn raw outputs into reported probabilities and decisions, all chosen on
    validation: the temperature or Platt scaling (when the recipe asks for one), then the threshold on the calibrated
    probabilities (the median over bootstrap resamples for youden / sensitivity, with its 95% interval),
    the training prevalence and the prior the calibrated probabilities refer to."""
    t = cfg.train
    temperature, offset = 1.0, 0.0
    if t.calibration == "temperature":
        temperature = fit_temperature(val_labels, val_logits)
    elif t.calibration == "platt":
        temperature, offset = fit_platt(val_labels, val_logits)
    probs = sigmoid(val_logits.astype(np.float64) / temperature + offset)
    if t.threshold_rule == "fixed" or t.threshold_resamples == 0:
        point = {"threshold": choose_threshold(val_labels, probs, t.threshold_rule, t.target_sensitivity, t.threshold),
                 "interval": None, "resamples": 0}
    else:
        point = stable_threshold(val_labels, probs, t.threshold_rule, t.target_sensitivity, t.threshold,
                                 n_boot=t.threshold_resamples, seed=t.seed)
    return {"threshold": point["threshold"], "threshold_interval": point["interval"],
            "threshold_rule": {"rule": t.threshold_rule, "target_sensitivity": t.target_sensitivity, "chosen_on": "val",
                               "resamples": point["resamples"], "on": "calibrated probabilities"},
            "calibration": {"method": t.calibration, "temperature": temperature, "offset": offset, "fitted_on": "val"},
            "train_prevalence": train_prevalence,
            "model_prior": float(np.mean(val_labels)) if t.calibration == "platt"
            else model_prior_of(train_prevalence, t.class_weight, t.sampling)}


def fit_detector_on(model: nn.Module, data: dict[str, DeviceSplit], cfg: Config,
                    quantile: float = DEFAULT_QUANTILE) -> Detector:
    """The out-of-distribution detector of a (frozen) model: fitted on the training split, threshold on validation."""
    return fit_for_model(model, data["train"].pixels, data["train"].labels.cpu().numpy(), data["val"].pixels,
                         cfg.preprocessing, cfg.train.eval_batch_size, quantile)


@dataclass
class Fitted:
    """What fitting gives a model: its validation outputs and the checkpoint fields chosen from them."""

    logits: torch.Tensor  # validation outputs, float32: (N,) or (N, classes)
    fields: dict[str, Any]  # operating_point's fields, and "ood" when the model names ood_layers


def fit_operating_point(model: nn.Module, data: dict[str, DeviceSplit], cfg: Config,
                        graphs: dict[str, CudaGraphForward] | None = None,
                        features_model: nn.Module | None = None) -> Fitted:
    """The fitting step: `model`'s validation logits (with `graphs`, replayed as CUDA graphs), the operating
    point chosen on them with the training split's prevalence, and the out-of-distribution detector on the
    features of `features_model` (default: `model` frozen) when the model names ood_layers."""
    logits = validation_logits(model, data["val"], cfg, graphs).float()
    train_prevalence = float((data["train"].labels > 0).float().mean())
    fields = operating_point(cfg, data["val"].labels.cpu().numpy() > 0, pneumonia_logit(logits).cpu().numpy(),
                             train_prevalence)
    if getattr(model, "ood_layers", None):
        frozen = features_model if features_model is not None else freeze(model)
        fields["ood"] = fit_detector_on(frozen, data, cfg).to_checkpoint()
    return Fitted(logits, fields)


def training_splits(cfg: Config, progress: bool = True) -> dict[str, CachedImages]:
    """{"train", "val"}: the cached pixels of the patient-level split a run with config `cfg` was trained
    with (recomputed, or remembered, from its data settings)."""
    splits = split_samples(cfg.data)
    return {name: cache_images(splits[name], cfg.preprocessing, progress=progress) for name in ("train", "val")}


def fit_checkpoint(checkpoint: str, data_root: str | None = None, out: str | None = None, device: str = "auto",
                   quantile: float = DEFAULT_QUANTILE, progress: bool = True) -> Detector:
    """fit-ood: fit the detector for an existing checkpoint on its own training split (rebuilt from its config,
    the data under `data_root` if given), threshold on its validation split; write the checkpoint with it to
    `out` (default: in place, atomically)."""
    dev = select_device(device)
    loaded = ckpt_io.load(checkpoint, dev, data_root)
    cfg = loaded.config
    cached = training_splits(cfg, progress)
    data = {name: DeviceSplit.from_cache(split, dev, cfg.data.task) for name, split in cached.items()}
    detector = fit_detector_on(freeze(loaded.model), data, cfg, quantile)
    raw = dict(loaded.checkpoint)
    raw["ood"] = detector.to_checkpoint()
    raw.setdefault("training_images", training_record(cached["train"].pixels, [s.patient for s in cached["train"].samples]))
    ckpt_io.save(raw, out or checkpoint)
    return detector
