"""Synthetic sites built from a labelled split: scanner-like changes of appearance, and class mixes.

A new hospital's images differ from the training ones in how they look (exposure, processing, detector
resolution, compression, collimation) and in how many children have pneumonia. The shift benchmark
(`benchmarks/shift_benchmark.py`) measures adaptation and training options on validation images changed
by `SHIFTS` (applied to the decoded grey image at its own resolution, before the model's resize) and
resampled by `mixed_subset`; no test split is read.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def contrast(factor: float) -> Shift:
    """Deviations from the image's mean grey scaled by `factor` (a flatter or harsher exposure curve)."""
    return lambda g, _: _clip(g.mean() + factor * (g.astype(np.float64) - g.mean()))


def gamma(power: float) -> Shift:
    """Grey levels (0..1) raised to `power`: another detector response or display processing."""
    return lambda g, _: _clip(255 * (g / 255.0) ** power)


def brightness(offset: float) -> Shift:
    return lambda g, _: _clip(g.astype(np.float64) + offset)


def blur(sigma_fraction: float) -> Shift:
    """Gaussian blur of `sigma_fraction` of the image's width: a softer detector or motion."""
    return lambda g, _: np.asarray(Image.fromarray(g).filter(ImageFilter.GaussianBlur(sigma_fraction * g.shape[1])))


def noise(sigma: float) -> Shift:
    """Additive Gaussian noise of `sigma` grey levels: a lower dose."""
    return lambda g, rng: _clip(g + rng.normal(0, sigma, g.shape))


def jpeg(quality: int) -> Shift:
    """Re-encoded as JPEG at `quality`: a PACS that stores lossy copies."""
    def apply(g: np.ndarray, _: np.random.Generator) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(g).save(buf, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    return apply


def resolution(scale: float) -> Shift:
    """Down to `scale` of the size and back up: a coarser detector."""
    def apply(g: np.ndarray, _: np.random.Generator) -> np.ndarray:
        h, w = g.shape
        small = Image.fromarray(g).resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.Resampling.BOX)
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
    return apply


def border(fraction: float) -> Shift:
    """The image shrunk into a black frame `fraction` of its size on each side: wider collimation."""
    def apply(g: np.ndarray, _: np.random.Generator) -> np.ndarray:
        h, w = g.shape
        dh, dw = int(h * fraction), int(w * fraction)
        out = np.zeros_like(g)
        out[dh:h - dh, dw:w - dw] = np.asarray(Image.fromarray(g).resize((w - 2 * dw, h - 2 * dh), Image.Resampling.BOX))
        return out
    return apply


def crop(keep: float) -> Shift:
    """The central `keep` of the image, enlarged back to its size: tighter collimation."""
    def apply(g: np.ndarray, _: np.random.Generator) -> np.ndarray:
        h, w = g.shape
        dh, dw = int(h * (1 - keep) / 2), int(w * (1 - keep) / 2)
        return np.asarray(Image.fromarray(g[dh:h - dh, dw:w - dw]).resize((w, h), Image.Resampling.BILINEAR))
    return apply


def combined(*shifts: Shift) -> Shift:
    def apply(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for s in shifts:
            g = s(g, rng)
        return g
    return apply


SHIFTS: dict[str, Shift] = {
    "none": lambda g, _: g,
    "contrast 0.6": contrast(0.6),
    "gamma 0.6": gamma(0.6),
    "gamma 1.6": gamma(1.6),
    "brightness +40": brightness(40),
    "blur 1%": blur(0.01),
    "noise 12": noise(12),
    "jpeg q15": jpeg(15),
    "resolution 0.3": resolution(0.3),
    "border 10%": border(0.10),
    "crop 80%": crop(0.80),
    "site A (flat, dark, soft, noisy)": combined(contrast(0.75), gamma(1.3), blur(0.006), noise(6)),
    "site B (bright, harsh, lossy)": combined(brightness(25), contrast(1.25), jpeg(30)),
}


def shifted(grey: np.ndarray, shift: Shift, seed: int) -> np.ndarray:
    """`grey` (2-D uint8) changed by `shift`, its random draws seeded per image."""
    return shift(grey, np.random.default_rng(seed))


def mixed_subset(labels: np.ndarray, prevalence: float, size: int, seed: int) -> np.ndarray:
    """Indices of at most `size` images with a share `prevalence` of label 1, drawn without replacement
    (fewer when a class runs out), sorted."""
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n = min(size, int(len(pos) / prevalence) if prevalence > 0 else size,
            int(len(neg) / (1 - prevalence)) if prevalence < 1 else size)
    k = int(round(n * prevalence))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)]))
