"""Grad-CAM explanations: where in the X-ray the model found evidence for pneumonia.

Uses MONAI's maintained GradCAM (`pip install 'pneumoscan[models]'`) on the layer the checkpoint names
(`cam_layer`); for an ensemble, which names one layer per member, the mean of the members' maps. The
map is computed at the model's input size on exactly the pixels the model saw, normalised to [0, 1],
resized to the original image and drawn over it. `explain_paths` is the batch job
behind `pneumoscan explain`: one PNG per image (the overlay, and below it the map's colour bar and a
caption: file, P(pneumonia), label) and a CSV of probabilities; a bad file gets its error in the CSV and
the job goes on.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..io.fileio import atomic_write_bytes, optional_import, printable
from ..io.images import ImageLoadError, load_grey_with_info, resize
from ..io.records import result_cells, result_columns, write_results_csv
from ..networks.inference import model_input
from ..networks.models import pneumonia_logit, probabilities
from ..networks.ood import captured_features
from .predict import Predictor, expand_paths


class _TwoDimLogits(nn.Module):
    """MONAI's CAM expects (B, classes) logits: expose the pneumonia logit as one class (for a three-class
    model, log(P(bacterial) + P(viral)) - log P(normal)), keeping the model's own outputs (the probabilities
    come from the same forward pass as the map)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.outputs = out.detach()
        return pneumonia_logit(out).unsqueeze(1)


def _gradcam(model: nn.Module, cam_layer: str | Sequence[str]):
    """MONAI's GradCAM of the pneumonia logit at `cam_layer`, or at each of several layers (an ensemble's
    members: `_cam_maps` averages their maps)."""
    GradCAM = optional_import("monai.visualize", "models", "Grad-CAM").GradCAM

    layers = [cam_layer] if isinstance(cam_layer, str) else list(cam_layer)
    if not layers or not all(layers):
        raise ValueError(f"{type(model).__name__} names no Grad-CAM layer")
    for m in model.modules():  # an in-place op after the hooked layer would break its backward hook
        if hasattr(m, "inplace"):
            m.inplace = False
    # Only the gradient from the output down to the hooked layers is needed: with every other parameter
    # frozen, autograd's graph starts at those layers and the backward pass skips the layers below them.
    for param in model.parameters():
        param.requires_grad_(False)
    hooked = [param for layer in layers for param in model.get_submodule(layer).parameters()]
    for param in hooked:
        param.requires_grad_(True)
    # MONAI puts the module back in the mode it found it in: give it the model's (eval) mode.
    # MONAI's default post-processing maps each map's (min, max) to (1, 0), flipping it: scale it the right way up.
    targets = [f"model.{layer}" for layer in layers]
    cam = GradCAM(nn_module=_TwoDimLogits(model).train(model.training),
                  target_layers=targets[0] if len(targets) == 1 else targets, postprocessing=_min_max)
    # A hooked layer without parameters (ReLU, LeakyReLU) starts no graph: the input's gradient must start it.
    cam.needs_input_grad = not hooked
    return cam


def _cam_maps(cam: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) Grad-CAM maps in [0, 1] for the batch `x`, from one forward and backward pass.

    With several target layers, each layer's map (Grad-CAM's weighting: its gradient averaged over
    positions) is upsampled and scaled to [0, 1], and their mean is scaled to [0, 1] again. Layers that see
    more rows than `x` (an ensemble's test-time views) give the maps of their first N rows, the images as
    they are."""
    n = len(x)
    if getattr(cam, "needs_input_grad", False):
        x = x.detach().requires_grad_(True)
    if len(cam.nn_module.target_layers) == 1:
        return cam(x, class_idx=0)[:n]
    _, activations, gradients = cam.nn_module(x, class_idx=0)
    maps = []
    for acti, grad in zip(activations, gradients):
        acti, grad = acti[:n], grad[:n]
        weights = grad.flatten(2).mean(2)[:, :, None, None]
        raw = torch.relu((weights * acti).sum(1, keepdim=True))
        maps.append(cam.postprocessing(cam.upsampler(x.shape[2:])(raw)))
    return _min_max(torch.stack(maps).mean(0))


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of a (B, 1, H, W) batch to [0, 1], its strongest evidence at 1 (a flat map gives 0)."""
    lo = maps.amin((1, 2, 3), keepdim=True)
    span = maps.amax((1, 2, 3), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / span.clamp(min=1e-12), torch.zeros_like(maps))


_CAMS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def cam_for_pixels(predictor: Predictor, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(heatmap in [0, 1] at the model's input size, probability) for one (S, S) uint8 image."""
    heats, probs, _, _ = cam_for_batch(predictor, np.asarray(pixels)[None])
    return heats[0], float(probs[0])


def cam_for_batch(predictor: Predictor, pixels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(heatmaps (N, S, S) in [0, 1], P(pneumonia) (N,), per-class probabilities (N, K) or None for a binary
    model, out-of-distribution scores (N,) or None without a detector) for N (S, S) uint8 images, all from
    one forward pass.

    Each map is that image's own (eval mode: no image affects another). The first call freezes the
    model's parameters (it is an inference model from here on).
    """
    # Grad-CAM runs on the PyTorch model, which every Predictor holds (on the CPU for the exported backends);
    # with an exported backend, the probabilities and scores are that backend's, from a second pass (below)
    model = predictor.model
    if model not in _CAMS:  # hooks are registered once per model, not per image
        _CAMS[model] = _gradcam(model, predictor.cam_layer)
    cam = _CAMS[model]
    x = model_input(np.array(pixels, dtype=np.uint8), predictor.prep, predictor.device)
    detector = predictor.ood if predictor.onnx is None else None  # an exported backend scores the detector below
    with captured_features(model, detector.layers if detector else ()) as features, torch.enable_grad(), \
            warnings.catch_warnings():
        # expected: the hook fires for the layer's output gradient, which is the one Grad-CAM uses
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        heat = _cam_maps(cam, x)  # computed in eval mode
    model.zero_grad(set_to_none=True)
    heat = heat[:, 0].detach().float().cpu().numpy()
    heat = np.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0).clip(0, 1)
    if predictor.onnx is not None:
        return (heat, *predictor.score(pixels))
    ood = detector.scores(features(len(x))) if detector else None
    # MONAI wraps our module in its ModelWithHooks; the probabilities go through the predictor's map as in predict
    return (heat, *predictor.output.apply(*probabilities(cam.nn_module.model.outputs)), ood)


def resize_heat(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A [0, 1] heatmap resized (bilinear) to `shape` = (height, width)."""
    if heat.shape == shape:
        return heat
    resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(shape[::-1], Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0, 1)


def overlay(grey: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8: the grey image with the heatmap (resized to it) blended in a perceptual colour map."""
    from matplotlib import colormaps

    heat_full = resize_heat(heat, grey.shape)
    colour = colormaps["turbo"](heat_full)[..., :3]
    base = np.repeat(grey[..., None] / 255.0, 3, axis=2)
    weight = alpha * heat_full[..., None]  # cold regions stay readable as the X-ray
    return np.round(255 * ((1 - weight) * base + weight * colour)).astype(np.uint8)


def png_bytes(rgb: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG-encode an RGB image; level 1 encodes several times faster than 6 for slightly larger files."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


DISCLAIMER = "Research tool, not a medical device: not for diagnosis or treatment decisions."
MAP_SCALE = "Grad-CAM, normalised per image: relative evidence for pneumonia"
_LEGEND_WIDTH = 480  # px: below this the caption would not fit legibly; a narrower image gets white beside it


def caption(name: str, probability: float, label: str, threshold: float, prior: float | None = None) -> list[str]:
    """The lines written under an explain PNG: the file's name, P(pneumonia) and the label at the decision
    threshold (and the prevalence the probability is at, when one was given), and what the tool is for."""
    at = "" if prior is None else f" at prevalence {prior:.3f}"
    return [printable(name), f"P(pneumonia) = {probability:.3f}{at}: {label} at threshold {threshold:.3f}", DISCLAIMER]


def colour_bar(width: int, height: int) -> np.ndarray:
    """RGB uint8 (height, width): heatmap values 0 (left) to 1 (right) drawn by `overlay` over mid grey, so
    the bar shows the colours (and the fading out of weak evidence) that the overlays show."""
    ramp = np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))
    return overlay(np.full((height, width), 128, dtype=np.uint8), ramp)


def with_legend(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """`rgb` unchanged at the top left, above a white strip holding the map's colour bar and `lines`; the
    strip is at least `_LEGEND_WIDTH` wide, and its text scales with the image's width."""
    from PIL import ImageDraw

    h, w = rgb.shape[:2]
    width = max(w, _LEGEND_WIDTH)
    font = _font(max(12, round(width / 40)))
    ascent, descent = font.getmetrics()
    line, pad = ascent + descent, max(4, (ascent + descent) // 3)
    inner = width - 2 * pad
    text = [*_wrap(MAP_SCALE, font, inner), None, *(t for s in lines for t in _wrap(s, font, inner))]  # None: bar
    canvas = Image.new("RGB", (width, h + pad + len(text) * line + line + pad), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + pad
    for t in text:
        if t is None:  # the bar, with its two ends named on the line below it
            canvas.paste(Image.fromarray(colour_bar(inner, line)), (pad, y))
            draw.text((pad, y + line), "low", fill="black", font=font)
            draw.text((width - pad, y + line), "high", fill="black", font=font, anchor="ra")
            y += 2 * line
        else:
            draw.text((pad, y), t, fill="black", font=font)
            y += line
    return np.asarray(canvas)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    """DejaVu Sans at `size` px: matplotlib (a dependency) ships it, so text looks the same everywhere."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """`text` broken at spaces into lines at most `width` px wide; a word wider than that (a long file name)
    keeps its start and end around an ellipsis."""
    lines: list[str] = []
    for word in text.split(" "):
        if font.getlength(word) > width:
            keep = len(word)
            while keep > 2 and font.getlength(word[:keep // 2] + "…" + word[len(word) - keep + keep // 2:]) > width:
                keep -= 1
            word = word[:keep // 2] + "…" + word[len(word) - keep + keep // 2:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def explain_image(predictor: Predictor, source: str | os.PathLike | bytes, name: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """(overlay RGB at the original size, heatmap at the original size in [0, 1], P(pneumonia)). Raises ImageLoadError."""
    rgb, heat, prob = _explain(predictor, source, name)[:3]
    return rgb, heat, prob


def _explain(predictor: Predictor, source: str | os.PathLike | bytes, name: str | None = None):
    image = load_grey_with_info(source, name=name)  # the header's warnings from the same decode
    grey = image.grey
    pixels = resize(grey, predictor.prep.image_size, predictor.prep.resize_filter)
    heats, probs, class_probs, ood = cam_for_batch(predictor, pixels[None])
    heat_full = resize_heat(heats[0], grey.shape)  # once, for both the overlay and the caller
    return (overlay(grey, heat_full), heat_full, float(probs[0]), None if class_probs is None else class_probs[0],
            None if ood is None else float(ood[0]), image.warnings)


def explain_paths(checkpoint: str | os.PathLike, inputs: Iterable[str], out_dir: str | os.PathLike,
                  device: str = "auto", prevalence: float | None = None, backend: str = "torch") -> list[dict[str, str]]:
    """Write OUT/<name>_gradcam.png per image and OUT/explanations.csv: `path`, predict's result record
    (`records.result_columns`) and `heatmap`, the PNG's file name. Returns the CSV's rows. `backend` scores
    the images as predict's does; the heatmaps come from the PyTorch model whatever it is."""
    out = Path(out_dir)
    predictor = Predictor(checkpoint, device=device, prevalence=prevalence, backend=backend)
    names = predictor.class_names
    rows, used = [], set()
    for path in expand_paths(inputs):
        try:
            rgb, _, prob, class_probs, ood, found = _explain(predictor, path)
        except ImageLoadError as e:
            rows.append({"path": path, **result_cells(predictor.failure(path, str(e)), names), "heatmap": ""})
        else:
            stem = Path(path).stem
            name = f"{stem}_gradcam.png"
            k = 1
            while name in used:  # same file name in two folders
                k += 1
                name = f"{stem}_{k}_gradcam.png"
            used.add(name)
            lines = caption(Path(path).name, prob, predictor.label_of(prob, class_probs), predictor.threshold,
                            predictor.output.prior)
            atomic_write_bytes(out / name, png_bytes(with_legend(rgb, lines)))
            result = predictor.prediction(path, prob, class_probs, ood, found)
            rows.append({"path": path, **result_cells(result, names), "heatmap": name})
    write_results_csv(out / "explanations.csv", ["path", *result_columns(names), "heatmap"], rows)
    return rows
