"""Training augmentation on whole batches of tensors, on whatever device the batch is on.

Reproduces Keras ImageDataGenerator(zoom_range=z, vertical_flip=True): each image gets a zoom factor
drawn uniformly in [1 - z, 1 + z] for each axis independently, applied about the image centre with
bilinear interpolation and edge replication ('nearest' fill mode), then an up-down flip with p = 0.5.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .config import Augmentation


def augment_batch(x: torch.Tensor, aug: Augmentation, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: (B, C, H, W) float. Returns a new augmented batch; random draws come from `generator`."""
    b = x.shape[0]
    if aug.zoom > 0:
        # Keras maps output pixel p to input (p - c) * zoom + c: the sampling grid is scaled by the factor.
        zoom = 1 - aug.zoom + 2 * aug.zoom * torch.rand(b, 2, generator=generator, device="cpu")
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = zoom[:, 0], zoom[:, 1]
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    if aug.vertical_flip:
        x = _flip_some(x, dim=2, generator=generator)
    if aug.horizontal_flip:
        x = _flip_some(x, dim=3, generator=generator)
    return x


def _flip_some(x: torch.Tensor, dim: int, generator: torch.Generator | None) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(dim), x)
