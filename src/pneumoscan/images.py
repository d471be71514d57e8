"""The one image loader: every path (train, evaluate, predict) turns a file into grey uint8 pixels here.

Errors are raised as `ImageLoadError`, whose message names the file and the reason, so batch jobs can
record it and carry on.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import DICOM_SUFFIXES, DicomError, dicom_to_grey, is_dicom

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", *DICOM_SUFFIXES)
# decompression-bomb guard for every command; PNEUMOSCAN_MAX_MEGAPIXELS overrides it
DEFAULT_MAX_MEGAPIXELS = float(os.environ.get("PNEUMOSCAN_MAX_MEGAPIXELS", "100"))
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageLoadError(Exception):
    """A file that cannot be read as an image; str() is '<file>: <reason>'."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _to_grey(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> 2-D uint8 grey. 16-bit and float images are stretched to their own range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return np.round(a).astype(np.uint8)
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def load_grey(source: str | os.PathLike | bytes, name: str | None = None, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """Decode a JPEG, PNG or DICOM file (a path or its bytes) into a 2-D uint8 grey array.

    JPEG/PNG: EXIF orientation applied; 16-bit images stretched to their own range. DICOM: see `dicom`.

    `name` is what error messages call the file (defaults to the path). Raises ImageLoadError.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ImageLoadError(label, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageLoadError(label, "file is empty (0 bytes)")
    limit = int(max_megapixels * 1_000_000)
    if is_dicom(data) or label.lower().endswith(DICOM_SUFFIXES):
        try:
            return dicom_to_grey(data, limit)
        except DicomError as e:
            raise ImageLoadError(label, str(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > limit:
                    raise ImageLoadError(label, f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the {max_megapixels:g} MP limit")
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to turn
                grey = _to_grey(img)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(label, "not a recognised image (expected JPEG, PNG or DICOM)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(label, f"decompression bomb refused ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(label, f"corrupt or truncated image ({e})") from None
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise ImageLoadError(label, f"unexpected pixel array of shape {grey.shape}")
    return grey


def resize(grey: np.ndarray, size: int, resize_filter: str = "nearest") -> np.ndarray:
    """Resize a grey uint8 image to size x size, ignoring aspect ratio (as the paper does)."""
    if resize_filter not in _FILTERS:
        raise ValueError(f"unknown resize filter {resize_filter!r}; choose one of {', '.join(_FILTERS)}")
    if grey.shape == (size, size):
        return grey
    return np.asarray(Image.fromarray(grey).resize((size, size), _FILTERS[resize_filter]))


def load_for_model(source: str | os.PathLike | bytes, size: int, resize_filter: str, name: str | None = None,
                   max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """Decode and resize: the uint8 size x size array that the cache stores and models consume."""
    return resize(load_grey(source, name=name, max_megapixels=max_megapixels), size, resize_filter)
