"""An ensemble as one model: `Ensemble(members, views)` and its test-time views (TTA).

Its output is the mean of the members' logits over the members and the test-time views of each image.
Test-time views (`--tta zoom`) are those training augmentation taught: central zooms by 0.9 and 1.1
(when the recipe's zoom range covers them) and an up-down flip (when the recipe flips), made by
`augment.augment_batch` with fixed draws, beside the image as it is. The views of a batch go through
each member as one batch, the image as it is first: layer hooks (out-of-distribution features, Grad-CAM)
take their first N rows, the un-augmented images. Building an ensemble's checkpoint is `pneumoscan.ensemble`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.config import Augmentation
from .augment import augment_batch

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
