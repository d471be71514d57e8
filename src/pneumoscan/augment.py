"""Training augmentation on whole batches of tensors, on whatever device the batch is on.

Reproduces Keras ImageDataGenerator(zoom_range=z, vertical_flip=True): each image gets a zoom factor
drawn uniformly in [1 - z, 1 + z] for each axis independently, applied about the image centre with
bilinear interpolation and edge replication ('nearest' fill mode), then an up-down flip with p = 0.5.

The random draws are separate from their application (`draw_augmentation`, then `augment_batch`):
training draws a whole epoch at once on the CPU generator and moves it to the device in one copy,
so the per-step work has no host-device traffic and can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .config import Augmentation


def draw_augmentation(n: int, aug: Augmentation, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random draws for n images: 'zoom' (n, 2) factors, 'vflip' / 'hflip' (n,) booleans, as `aug` asks."""
    draws = {}
    if aug.zoom > 0:
        draws["zoom"] = 1 - aug.zoom + 2 * aug.zoom * torch.rand(n, 2, generator=generator)
    if aug.vertical_flip:
        draws["vflip"] = torch.rand(n, generator=generator) < 0.5
    if aug.horizontal_flip:
        draws["hflip"] = torch.rand(n, generator=generator) < 0.5
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
    return x
