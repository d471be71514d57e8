"""Training augmentation on whole batches of tensors, on whatever device the batch is on.

Reproduces Keras ImageDataGenerator(zoom_range=z, vertical_flip=True): each image gets a zoom factor
drawn uniformly in [1 - z, 1 + z] for each axis independently, applied about the image centre with
bilinear interpolation and edge replication ('nearest' fill mode), then an up-down flip with p = 0.5.
Intensity augmentation (not in the paper; off unless asked for) follows: a gamma, a contrast factor about
the image's mean and a brightness offset, each drawn per image, the result clipped to 0..1.

The random draws are separate from their application (`draw_augmentation`, then `augment_batch`):
training draws a whole epoch at once on the CPU generator and moves it to the device in one copy,
so the per-step work has no host-device traffic and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..core.config import Augmentation


def draw_augmentation(n: int, aug: Augmentation, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random draws for n images: 'zoom' (n, 2) factors, 'vflip' / 'hflip' (n,) booleans, as `aug` asks."""
    draws = {}
    if aug.zoom > 0:
        draws["zoom"] = 1 - aug.zoom + 2 * aug.zoom * torch.rand(n, 2, generator=generator)
    if aug.vertical_flip:
        draws["vflip"] = torch.rand(n, generator=generator) < 0.5
    if aug.horizontal_flip:
        draws["hflip"] = torch.rand(n, generator=generator) < 0.5
    for key, spread, centre in (("gamma", aug.gamma, 1.0), ("contrast", aug.contrast, 1.0),
                                ("brightness", aug.brightness, 0.0)):
        if spread > 0:
            draws[key] = centre - spread + 2 * spread * torch.rand(n, generator=generator)
    return draws


def augment_batch(x: torch.Tensor, aug: Augmentation, generator: torch.Generator | None = None,
                  draws: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """x: (B, C, H, W) float. Returns a new augmented batch, from `draws` or fresh draws from `generator`."""
    if draws is None:
        draws = draw_augmentation(x.shape[0], aug, generator)
    if "zoom" in draws:
        # Keras maps output pixel p to input (p - c) * zoom + c: the sampling grid is scaled by the factor.
        zoom = draws["zoom"].to(x.device, x.dtype)
        theta = F.pad(torch.diag_embed(zoom), (0, 1))  # (B, 2, 3): no rotation, shear or shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    for key, dim in (("vflip", 2), ("hflip", 3)):
        if key in draws:
            x = torch.where(draws[key].to(x.device)[:, None, None, None], x.flip(dim), x)
    return _intensity(x, draws)


def _intensity(x: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Gamma, then contrast about each image's mean, then brightness, clipped to 0..1 (values are 0..1)."""
    per_image = {k: draws[k].to(x.device, x.dtype)[:, None, None, None] for k in ("gamma", "contrast", "brightness")
                 if k in draws}
    if not per_image:
        return x
    if "gamma" in per_image:
        x = x.clamp(0, 1).pow(per_image["gamma"])
    if "contrast" in per_image:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * per_image["contrast"] + mean
    if "brightness" in per_image:
        x = x + per_image["brightness"]
    return x.clamp(0, 1)
