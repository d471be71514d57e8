"""The one image loader: every path (train, evaluate, predict) turns a file into grey uint8 pixels here.

Errors are raised as `ImageLoadError`, whose message names the file and the reason, so batch jobs can
record it and carry on. Only the formats in `ACCEPTED_FORMATS` are decoded: the bytes pick the format
(whatever the file is called), and anything else is refused before a decoder sees it.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin

from .dicom import DICOM_SUFFIXES, DicomError, is_dicom, read_dicom

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", *DICOM_SUFFIXES)
ACCEPTED_FORMATS = ("JPEG", "PNG", "DICOM")
# decompression-bomb guard for every command; PNEUMOSCAN_MAX_MEGAPIXELS overrides it
DEFAULT_MAX_MEGAPIXELS = float(os.environ.get("PNEUMOSCAN_MAX_MEGAPIXELS", "100"))
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
# Pillow's decoders for the accepted raster formats, chosen by signature. Calling them directly skips
# Image.open's search over every registered format and Pillow's global MAX_IMAGE_PIXELS check: the
# megapixel limit below is the one that applies.
_DECODERS: tuple[tuple[bytes, type[ImageFile.ImageFile]], ...] = (
    (b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile),
    (b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile),
)
# signatures of formats Pillow could read but the loader refuses, to name them in the error
_REFUSED = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
            (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WEBP"), (b"%!PS", "PostScript/EPS"),
            (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
            (b"\xffO\xffQ", "JPEG 2000"), (b"P1", "PNM"), (b"P2", "PNM"), (b"P3", "PNM"), (b"P4", "PNM"),
            (b"P5", "PNM"), (b"P6", "PNM"), (b"P7", "PAM"), (b"qoif", "QOI"), (b"\x00\x00\x00\x1cftyp", "HEIF/AVIF"))


class _Refused(Exception):
    """Bytes that are not one of the accepted raster formats; the message says what is accepted."""


class ImageLoadError(Exception):
    """A file that cannot be read as an image; str() is '<file>: <reason>'."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def is_image_candidate(path: Path) -> bool:
    """An entry of a searched folder that gets a result: an image name that is not a folder. FIFOs, devices
    and broken symbolic links are candidates too, so that they get their error instead of vanishing."""
    return is_image_file(path) and not path.is_dir()


def expand_paths(inputs: Iterable[str]) -> list[str]:
    """Files as given, folders searched recursively for images; a missing path is kept so it gets an error row,
    and so is a folder's FIFO, device or broken symbolic link with an image name (`is_image_candidate`)."""
    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(str(f) for f in sorted(p.rglob("*")) if is_image_candidate(f))
        else:
            found.append(str(p))
    return found


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")
    return f"not a regular file ({kind})"


def _unreachable(path: str | os.PathLike, e: OSError) -> str:
    """Why stat() failed, naming a broken symbolic link as such."""
    if e.errno == errno.ELOOP:
        return "a symbolic link that loops (too many levels of symbolic links)"
    if e.errno == errno.ENOENT and os.path.islink(path):
        return "a broken symbolic link (its target does not exist)"
    return f"cannot read file ({e.strerror or e})"


def read_file(path: str | os.PathLike, label: str | None = None) -> bytes:
    """The bytes of a regular file, or ImageLoadError naming it and the reason. A FIFO, socket, device or
    folder is refused before it is opened: reading one can block for ever or never end."""
    label = label or str(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            # O_NONBLOCK: should the file have been swapped for a FIFO since stat(), open() still returns at once
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with open(fd, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if stat.S_ISREG(mode):
                    return f.read()
    except OSError as e:
        raise ImageLoadError(label, _unreachable(path, e)) from None
    except ValueError as e:  # a path with a NUL character
        raise ImageLoadError(label, f"cannot read file ({e})") from None
    raise ImageLoadError(label, _not_regular(mode))


def _accepted() -> str:
    return ", ".join(ACCEPTED_FORMATS)


def _stretch(a: np.ndarray) -> np.ndarray:
    """Integer or float pixels -> uint8, their own range stretched to 0..255 (rounded)."""
    lo, hi = a.min(), a.max()
    if not hi > lo:  # one value, or NaN
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(lo), float(hi)
    if a.dtype.kind == "u" and a.dtype.itemsize <= 2:
        # a lookup table indexed by the pixel values: 1 byte a pixel, the rounding of the float formula
        levels = np.arange(2 ** (8 * a.dtype.itemsize), dtype=np.float64)
        lut = np.round(np.clip((levels - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
        return lut[a]
    out = a.astype(np.float32)  # wider integers and floats: one float32 copy, scaled in place
    np.subtract(out, np.float32(lo), out=out)
    np.multiply(out, np.float32(255.0 / (hi - lo)), out=out)
    np.nan_to_num(out, copy=False)
    np.clip(np.rint(out, out=out), 0, 255, out=out)
    return out.astype(np.uint8)


def _to_grey(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> 2-D uint8 grey. 16-bit and float images are stretched to their own range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _stretch(np.asarray(img))
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)


def _open(data: bytes) -> ImageFile.ImageFile:
    """The decoder of an accepted format, or _Refused naming what the bytes are and what is accepted."""
    for signature, decoder in _DECODERS:
        if data.startswith(signature):
            return decoder(io.BytesIO(data))
    known = next((name for signature, name in _REFUSED if data.startswith(signature)), None)
    if known:
        raise _Refused(f"{known} is not an accepted format (accepted: {_accepted()})")
    raise _Refused(f"not a recognised image (accepted formats: {_accepted()})")


def _decode_raster(data: bytes, label: str, max_megapixels: float) -> np.ndarray:
    """JPEG or PNG bytes -> grey uint8, refusing images over the megapixel limit before decoding."""
    try:
        with _open(data) as img:
            w, h = img.size
            if w * h > max_megapixels * 1_000_000:
                raise ImageLoadError(label, f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, over the {max_megapixels:g} MP limit")
            # a colour JPEG's grey is its luma: libjpeg decodes that channel alone, without the colour
            # conversion; for grey content the same pixels as decoding the colours and converting them
            img.draft("L", None)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to turn
            return _to_grey(img)
    except ImageLoadError:
        raise
    except _Refused as e:
        raise ImageLoadError(label, str(e)) from None
    except MemoryError:
        raise ImageLoadError(label, "not enough memory to decode the image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(label, f"corrupt or truncated image ({e})") from None
    except Exception as e:  # a decoder's unexpected failure on hostile bytes is still one file's error
        raise ImageLoadError(label, f"cannot decode the image ({type(e).__name__}: {e})") from None


@dataclass
class LoadedImage:
    """A decoded file: its grey pixels and what its header says the model was not trained for."""

    grey: np.ndarray  # 2-D uint8
    warnings: list[str] = field(default_factory=list)  # `dicom.acquisition_warnings`; none for JPEG and PNG


def load_grey_with_info(source: str | os.PathLike | bytes, name: str | None = None,
                        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> LoadedImage:
    """Decode a JPEG, PNG or DICOM file (a path or its bytes) into a LoadedImage: 2-D uint8 grey, and warnings.

    JPEG/PNG: EXIF orientation applied; 16-bit images stretched to their own range. DICOM: see `dicom`.
    Other formats are refused, whatever the file is called.

    `name` is what error messages call the file (defaults to the path). Raises ImageLoadError, and
    nothing else, for any bytes.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    data = source if isinstance(source, bytes) else read_file(source, label)
    if not data:
        raise ImageLoadError(label, "file is empty (0 bytes)")
    found: list[str] = []
    if is_dicom(data) or label.lower().endswith(DICOM_SUFFIXES):
        try:
            image = read_dicom(data, int(max_megapixels * 1_000_000))
        except DicomError as e:
            raise ImageLoadError(label, str(e)) from None
        except MemoryError:
            raise ImageLoadError(label, "not enough memory to decode the DICOM pixel data") from None
        except Exception as e:  # read_dicom names its failures; anything else is still this file's error
            raise ImageLoadError(label, f"malformed DICOM ({type(e).__name__}: {e})") from None
        grey, found = image.grey, image.warnings
    else:
        grey = _decode_raster(data, label, max_megapixels)
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise ImageLoadError(label, f"unexpected pixel array of shape {grey.shape}")
    return LoadedImage(grey, found)


def load_grey(source: str | os.PathLike | bytes, name: str | None = None, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """The 2-D uint8 grey pixels of `load_grey_with_info`. Raises ImageLoadError, and nothing else, for any bytes."""
    return load_grey_with_info(source, name, max_megapixels).grey


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


def load_for_model_with_info(source: str | os.PathLike | bytes, size: int, resize_filter: str, name: str | None = None,
                             max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> LoadedImage:
    """`load_for_model`, with the file's warnings: one decode."""
    image = load_grey_with_info(source, name=name, max_megapixels=max_megapixels)
    return LoadedImage(resize(image.grey, size, resize_filter), image.warnings)
