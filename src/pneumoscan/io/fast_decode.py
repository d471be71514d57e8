"""The fast image loader: the pixels of `images.load_for_model_with_info`, sooner, for the common JPEG.

This module owns one thing: `load_for_model_fast`, a second implementation of
`images.load_for_model_with_info` for the prediction pipeline. A baseline or progressive JPEG without
EXIF metadata, grey or YCbCr, is decoded by simplejpeg (libjpeg-turbo, asked for the grey channel alone: the same
libjpeg luma path Pillow's ``draft("L")`` takes, with the same accurate integer IDCT), which skips
Pillow's file-object and plugin layers; about 110 against 175 microseconds for a 224 x 224 radiograph
(docs/performance.md). Everything else goes to the reference loader, so errors, EXIF orientation,
CMYK, PNG and DICOM stay exactly as `images` does them: a file simplejpeg cannot decode, or one whose
header says it is over the megapixel limit, is handed to the reference too, which then names the reason.

tests/test_fast_decode.py holds the two loaders equal on the project's radiographs, colour JPEGs,
rotated JPEGs and bad files. Without simplejpeg (``pip install 'pneumoscan[openvino]'``) this is the
reference loader.
"""

from __future__ import annotations

import importlib.util
import os

from .dicom import DICOM_SUFFIXES
from .images import DEFAULT_MAX_MEGAPIXELS, LoadedImage, load_for_model_with_info, read_file, resize

_JPEG = b"\xff\xd8\xff"
_HAVE_SIMPLEJPEG = importlib.util.find_spec("simplejpeg") is not None


def _plain_jpeg(data: bytes) -> bool:
    """A JPEG with no EXIF block (so no orientation to apply): the only files the fast decoder takes."""
    return data.startswith(_JPEG) and b"Exif\x00" not in data[:65536]


def load_for_model_fast(source: str | os.PathLike | bytes, size: int, resize_filter: str, name: str | None = None,
                        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> LoadedImage:
    """`images.load_for_model_with_info`, the same pixels and the same errors. Raises ImageLoadError."""
    if not _HAVE_SIMPLEJPEG:
        return load_for_model_with_info(source, size, resize_filter, name, max_megapixels)
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    data = source if isinstance(source, bytes) else read_file(source, label)
    if _plain_jpeg(data) and not label.lower().endswith(DICOM_SUFFIXES):
        import simplejpeg

        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            # grey and YCbCr only: libjpeg's CMYK, YCCK and RGB paths differ from Pillow's (CMYK does, tested)
            if colorspace in ("Gray", "YCbCr") and w * h <= max_megapixels * 1_000_000:
                grey = simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=False, fastupsample=False)[:, :, 0]
                return LoadedImage(resize(grey, size, resize_filter))
        except (ValueError, RuntimeError):  # simplejpeg's errors; the reference loader names the reason
            pass
    return load_for_model_with_info(data, size, resize_filter, label, max_megapixels)
