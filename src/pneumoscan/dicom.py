"""DICOM radiographs to grey uint8, through pydicom (optional: `pip install 'pneumoscan[dicom]'`).

Order of operations, as the standard's display pipeline: stored values -> modality LUT (rescale
slope/intercept or a modality LUT sequence) -> VOI LUT or window centre/width (the first window when
several are given; the full range of values when none is) -> MONOCHROME1 inversion -> 0..255.

Transfer syntaxes (tested ones marked *): uncompressed implicit/explicit VR little endian* and deflated
need only pydicom and numpy; RLE lossless decodes with pydicom's own numpy decoder; JPEG baseline 8-bit*
(and extended) decodes through Pillow, already a dependency. JPEG-LS*, JPEG lossless and JPEG 2000 need
a plugin: `pylibjpeg` with `pylibjpeg-libjpeg` / `pylibjpeg-openjpeg`, or `python-gdcm`. A file whose pixel
data cannot be decoded gets an error that names its transfer syntax (* : the JPEG-LS case is the error).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from .fileio import optional_import

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
DICOM_SUFFIXES = (".dcm", ".dicom")


class DicomError(Exception):
    """A DICOM file that cannot be turned into an image; the message is the reason (no file name)."""


def is_dicom(data: bytes) -> bool:
    """The DICOM Part 10 preamble: 128 bytes, then 'DICM'."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _pydicom() -> Any:
    try:
        return optional_import("pydicom", "dicom", "reading DICOM")
    except ImportError as e:
        raise DicomError(str(e)) from None


def _first(value: Any) -> float:
    """WindowCenter/WindowWidth may be multi-valued: the first one is the default window."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def dicom_to_grey(data: bytes, max_pixels: int) -> np.ndarray:
    """DICOM bytes -> 2-D uint8 grey image. Raises DicomError with the reason."""
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
    except Exception as e:  # pydicom raises many types for malformed files
        raise DicomError(f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("DICOM file has no pixel data (PixelData element missing)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise DicomError(f"unsupported photometric interpretation {photometric or '(missing)'!r}; "
                         f"supported: {', '.join(SUPPORTED_PHOTOMETRIC)}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > max_pixels:
        raise DicomError(f"image is {cols}x{rows} = {rows * cols / 1e6:.1f} megapixels, over the {max_pixels / 1e6:g} MP limit")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported: expected one radiograph")
    syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as e:  # missing decoder plugin, truncated pixel data, ...
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"cannot decode the pixel data (transfer syntax {name}: {e}); compressed syntaxes need a "
                         "plugin such as pylibjpeg or python-gdcm") from None
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"):
        from PIL import Image

        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, ds)
        elif photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = np.clip(pixels, 0, 255).astype(np.uint8) if pixels.dtype != np.uint8 else pixels
        return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)
    if pixels.ndim != 2:
        raise DicomError(f"unexpected pixel array of shape {pixels.shape} for {photometric}")

    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds).astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        # DICOM PS3.3 C.11.2.1.2.1 linear window: c - 0.5 - (w - 1) / 2 .. c - 0.5 + (w - 1) / 2
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        lo, hi = float(values.min()), float(values.max())
    scaled = np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # low values are bright: invert to the usual display
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)
