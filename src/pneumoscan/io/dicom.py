"""DICOM radiographs to grey uint8, through pydicom (optional: `pip install 'pneumoscan[dicom]'`).

Order of operations, as the standard's display pipeline: stored values -> modality LUT (rescale
slope/intercept or a modality LUT sequence) -> VOI LUT or window centre/width (the first window when
several are given) -> MONOCHROME1 inversion -> 0..255. Without a VOI LUT or window, data of at most 8
stored bits is shown over the range its bits can hold (through the modality LUT), so 8-bit grey levels
stay as they are, as a JPEG's or PNG's do; deeper data is shown over the range of values the image has.

Transfer syntaxes: uncompressed (implicit/explicit VR little endian), deflated and RLE lossless need only
pydicom and numpy; JPEG baseline and extended (8/12-bit), JPEG lossless (process 14 and 14 SV1), JPEG-LS
lossless and near-lossless, and JPEG 2000 (lossless and lossy) decode through pylibjpeg with its libjpeg and
openjpeg plugins (the `dicom` extra); other installed plugins (pyjpegls, python-gdcm, Pillow) are tried after
it. tests/test_dicom_syntaxes.py holds each against files DCMTK encoded. A file whose pixel data cannot be
decoded gets an error that names its transfer syntax.

`acquisition_warnings` (in `dicom_acquisition`, importable from here) reads what the header says about the
acquisition (view, body part, modality, age, colour, bits, field of view) and says in plain sentences what
the model was not trained for.

Hostile files: a deflated dataset is inflated here, within a bound set by the megapixel limit, not by
pydicom; Rows x Columns x frames x samples x bits is checked before any pixel data is decoded, and so is the
size a compressed frame names in its own header (JPEG, JPEG-LS, JPEG 2000) or adds up to (RLE); any
failure, whatever pydicom raises, is a `DicomError`.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dicom_acquisition import acquisition_warnings
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


def _first(ds: Any, keyword: str) -> float:
    """WindowCenter/WindowWidth may be multi-valued: the first one is the default window."""
    value = ds.get(keyword)
    try:
        return float(value if isinstance(value, (str, bytes, int, float)) else value[0])
    except (TypeError, ValueError, IndexError):
        raise DicomError(f"{keyword} is not a number ({value!r})") from None


# a deflated dataset may inflate to this much before its pixel data, then to the pixel data that its
# Rows x Columns x frames x samples x bits declare, plus this much after it (trailing elements)
_INFLATE_HEADER_BYTES = 8 * 2**20
_INFLATE_TRAILER_BYTES = 2**20
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float and Pixel Data
# the widest pixel data accepted, in bytes a pixel (16-bit RGB, 64-bit grey)
_MAX_BYTES_PER_PIXEL = 8


def _not_meta(tag: Any, vr: Any, length: int) -> bool:
    return tag.group != 2


def _inflate(data: bytes, max_pixels: int) -> tuple[Any, bytes] | None:
    """For a deflated Part 10 file: (file meta, inflated dataset), inflated within bounds. None otherwise.

    pydicom inflates the whole stream before reading a single element, however large it grows. Here the
    elements before the pixel data are inflated first (at most _INFLATE_HEADER_BYTES), their image size
    is checked against the limits, and the rest is inflated only as far as that size needs.
    """
    from pydicom.filereader import read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if not is_dicom(data):
        return None
    fp = io.BytesIO(data)
    fp.seek(132)
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_meta)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        head = inflater.decompress(data[fp.tell():], _INFLATE_HEADER_BYTES)
        reached: list[bool] = []

        def at_pixels(tag: Any, vr: Any, length: int) -> bool:
            reached.append(tag in _PIXEL_TAGS)
            return reached[-1]

        header = read_dataset(io.BytesIO(head), is_implicit_VR=False, is_little_endian=True, stop_when=at_pixels)
        if inflater.eof:
            return meta, head
        if not any(reached):
            raise DicomError(f"deflated DICOM header inflates to over {_INFLATE_HEADER_BYTES / 2**20:.0f} MiB "
                             "before any pixel data: refused as a decompression bomb")
        allowed = _check_size(header, max_pixels) + _INFLATE_TRAILER_BYTES
        rest = inflater.decompress(inflater.unconsumed_tail, allowed + 1)
    except zlib.error as e:
        raise DicomError(f"corrupt deflated DICOM dataset ({e})") from None
    if len(rest) > allowed:
        raise DicomError(f"deflated DICOM dataset inflates to more than its {header.get('Columns')}x"
                         f"{header.get('Rows')} image needs: refused as a decompression bomb")
    return meta, head + rest


def _read(data: bytes, max_pixels: int) -> Any:
    """The dataset of DICOM bytes, deflated ones inflated within a bound set by max_pixels."""
    pydicom = _pydicom()
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import read_dataset

    try:
        deflated = _inflate(data, max_pixels)
        if deflated is None:
            return pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
        meta, inflated = deflated
        dataset = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True)
        return FileDataset("", dataset, data[:128], FileMetaDataset(meta), is_implicit_VR=False, is_little_endian=True)
    except DicomError:
        raise
    except Exception as e:  # pydicom raises many types for malformed files
        raise DicomError(f"not a readable DICOM file ({type(e).__name__}: {e})") from None


def _whole_number(ds: Any, keyword: str, default: int) -> int:
    """An integer attribute of the header, or DicomError quoting the value that is not one."""
    try:
        value = ds.get(keyword, default)
        return default if value is None or value == "" else int(value)
    except Exception:
        try:
            raw = ds.get_item(keyword).value
        except Exception:
            raw = "?"
        raise DicomError(f"{keyword} is not a whole number ({raw!r})") from None


def _check_size(ds: Any, max_pixels: int) -> int:
    """Rows x Columns x frames x samples x bits against the limits; the pixel data's size in bytes."""
    rows, cols = _whole_number(ds, "Rows", 0), _whole_number(ds, "Columns", 0)
    frames = max(_whole_number(ds, "NumberOfFrames", 1), 1)  # 0 or less: one frame, as pydicom reads it
    samples, bits = _whole_number(ds, "SamplesPerPixel", 1), _whole_number(ds, "BitsAllocated", 16)
    if rows * cols > max_pixels:
        raise DicomError(f"image is {cols}x{rows} = {rows * cols / 1e6:.1f} megapixels, over the {max_pixels / 1e6:g} MP limit")
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames) is not supported: expected one radiograph")
    if min(rows, cols, frames, samples, bits) < 1:
        raise DicomError(f"image geometry {cols}x{rows}, {frames} frame(s), {samples} sample(s) of {bits} bits has no pixels")
    size = rows * cols * frames * samples * ((bits + 7) // 8)
    if size > max(max_pixels, 1) * _MAX_BYTES_PER_PIXEL:
        raise DicomError(f"pixel data of {cols}x{rows}, {samples} sample(s) of {bits} bits would take "
                         f"{size / 2**20:.1f} MiB, over what the {max_pixels / 1e6:g} MP limit allows")
    return size


def _rle_decoded_size(frame: bytes, limit: int) -> int:
    """Bytes an RLE Lossless frame decodes to, counted from its run headers; stops once over limit."""
    count = min(int.from_bytes(frame[:4], "little"), 15)
    offsets = [int.from_bytes(frame[4 + 4 * i:8 + 4 * i], "little") for i in range(count)] + [len(frame)]
    total = 0
    for start, end in zip(offsets, offsets[1:]):
        pos = start
        while pos < min(end, len(frame)) and total <= limit:
            header = frame[pos]
            if header > 128:  # the next byte, 257 - header times
                total, pos = total + 257 - header, pos + 2
            elif header < 128:  # the next header + 1 bytes as they are
                total, pos = total + header + 1, pos + header + 2
            else:
                pos += 1
    return total


# JPEG start-of-frame markers (processes 1, 2/4, 14 and the rest of ITU T.81; 0xF7: JPEG-LS, T.87)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD9)) | {0x01}


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) named by a JPEG or JPEG-LS stream's start-of-frame segment, whatever its bit
    depth or process; None when the bytes are not such a stream (the decoder will say what they are)."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            if pos + 10 > len(frame):
                return None
            height, width = int.from_bytes(frame[pos + 5:pos + 7], "big"), int.from_bytes(frame[pos + 7:pos + 9], "big")
            if height == 0:
                raise DicomError("JPEG frame without a height in its header (a DNL marker) is not supported")
            return width, height, frame[pos + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
    return None


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) named by a JPEG 2000 codestream's SIZ segment or a JP2 file's header."""
    from PIL import Jpeg2KImagePlugin

    try:
        with Jpeg2KImagePlugin.Jpeg2KImageFile(io.BytesIO(frame)) as stream:
            return (*stream.size, len(stream.getbands()))
    except Exception:  # not a JPEG 2000 stream
        return None


def _check_frame(ds: Any, syntax: Any, size: int) -> None:
    """A compressed frame's own size against the header's, before it is decoded.

    A JPEG, JPEG-LS or JPEG 2000 stream names its width and height; an RLE stream's runs add up to its size.
    pydicom would decode either in full before comparing it with Rows x Columns. A JPEG-family stream must
    also end with its end-of-image marker: some decoders fill a truncated stream's missing rows silently.
    """
    from pydicom.encaps import generate_frames
    from pydicom.uid import RLELossless

    if not getattr(syntax, "is_encapsulated", False) or "PixelData" not in ds:
        return
    frame = next(generate_frames(ds.PixelData, number_of_frames=1), b"")
    rows, cols = _whole_number(ds, "Rows", 0), _whole_number(ds, "Columns", 0)
    if syntax == RLELossless:
        decoded = _rle_decoded_size(frame, size + 2**16)
        if decoded > size + 2**16:
            raise DicomError(f"RLE pixel data decodes to over {decoded / 2**20:.1f} MiB, more than its {cols}x{rows} "
                             "image needs: refused as a decompression bomb")
        return
    named = _jpeg_size(frame) or _j2k_size(frame)
    if named is None:
        return
    if not frame.rstrip(b"\x00").endswith(b"\xff\xd9"):  # JPEG's EOI and JPEG 2000's EOC are both FFD9
        raise DicomError("compressed frame is truncated: it does not end with its end-of-image marker")
    w, h, components = named
    if w * h > rows * cols:
        raise DicomError(f"compressed frame is {w}x{h}, larger than the {cols}x{rows} image the header declares")
    if components > max(_whole_number(ds, "SamplesPerPixel", 1), 1):
        raise DicomError(f"compressed frame has {components} components, more than the header's SamplesPerPixel")


# decoding plugins in the order they are tried: pylibjpeg covers every JPEG-family syntax; Pillow is the last resort
_PLUGIN_ORDER = ("pylibjpeg", "pyjpegls", "gdcm", "pydicom", "pillow")


def _decode(ds: Any, syntax: Any) -> tuple[np.ndarray, str]:
    """(stored values, the plugin that decoded them): native pixel data through pydicom and numpy, compressed
    through the first available plugin of _PLUGIN_ORDER that succeeds."""
    from pydicom.pixels import get_decoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not getattr(syntax, "is_encapsulated", False):
            return ds.pixel_array, "pydicom"
        try:
            available = get_decoder(syntax).available_plugins
        except Exception:  # a transfer syntax pydicom has no decoder for
            raise ValueError("no decoder exists for it") from None
        plugins = sorted(available, key=lambda p: _PLUGIN_ORDER.index(p) if p in _PLUGIN_ORDER else len(_PLUGIN_ORDER))
        if not plugins:
            raise ValueError("no decoder for it is installed: pip install 'pneumoscan[dicom]' (pylibjpeg)")
        failures = []
        for plugin in plugins:
            try:
                ds.pixel_array_options(decoding_plugin=plugin)
                return ds.pixel_array, plugin
            except Exception as e:  # this plugin cannot decode this stream: the next one may
                failures.append(f"{plugin}: {e}")
        raise ValueError("; ".join(failures))


@dataclass
class DicomImage:
    """A decoded DICOM radiograph: display pixels, stored values, how they were decoded, and header warnings."""

    grey: np.ndarray  # 2-D uint8, after the display pipeline
    stored: np.ndarray  # the decoded stored values, before it
    syntax: str  # transfer syntax UID
    plugin: str  # the pydicom decoding plugin used ("pydicom" for native and RLE pixel data)
    warnings: list[str]  # acquisition_warnings of the header


def read_dicom(data: bytes, max_pixels: int) -> DicomImage:
    """DICOM bytes -> DicomImage, size limits checked before decoding. Raises DicomError with the reason."""
    ds = _read(data, max_pixels)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomError("DICOM file has no pixel data (PixelData element missing)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise DicomError(f"unsupported photometric interpretation {photometric or '(missing)'!r}; "
                         f"supported: {', '.join(SUPPORTED_PHOTOMETRIC)}")
    size = _check_size(ds, max_pixels)
    syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
    try:
        _check_frame(ds, syntax, size)
    except DicomError:
        raise
    except Exception as e:  # encapsulation that cannot be split into frames
        raise DicomError(f"cannot read the encapsulated pixel data ({type(e).__name__}: {e})") from None
    try:
        pixels, plugin = _decode(ds, syntax)
    except Exception as e:  # missing decoder plugin, truncated pixel data, ...
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"cannot decode the pixel data (transfer syntax {name}: {e})") from None
    try:
        grey = _to_uint8(pixels, ds, photometric)
    except DicomError:
        raise
    except Exception as e:  # a colour table, window or LUT in the header that does not fit the pixels
        raise DicomError(f"cannot apply the header's display values to the pixels ({type(e).__name__}: {e})") from None
    return DicomImage(grey, pixels, str(syntax), plugin, acquisition_warnings(ds))


def dicom_to_grey(data: bytes, max_pixels: int) -> np.ndarray:
    """DICOM bytes -> 2-D uint8 grey image. Raises DicomError with the reason."""
    return read_dicom(data, max_pixels).grey


def _display(values: np.ndarray, ds: Any, photometric: str, present: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> uint8 through the modality LUT, VOI LUT or window, and MONOCHROME1 inversion.

    Without a window, the range is that of the values where `present` is true (all of them by default).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(values, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds and "VOILUTSequence" not in ds:
        center, width = _first(ds, "WindowCenter"), max(_first(ds, "WindowWidth"), 1.0)
        # DICOM PS3.3 C.11.2.1.2.1 linear window: c - 0.5 - (w - 1) / 2 .. c - 0.5 + (w - 1) / 2
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        shown = values if present is None else values[present]
        lo, hi = float(shown.min()), float(shown.max())
    scaled = np.clip((values - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":  # low values are bright: invert to the usual display
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)


def _to_uint8(pixels: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Decoded pixels -> 2-D uint8 grey: colour converted to L; grey through `_display`.

    Without a window, grey of at most 8 stored bits is shown over every value those bits can hold (0..255
    for 8 bits: the stored values unchanged), deeper grey over the values the image has.
    8- and 16-bit grey goes through a lookup table over every possible stored value, so the float
    arithmetic costs a table, not a copy of the image, and gives the same numbers as per pixel.
    """
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
    if pixels.dtype.kind not in "ui" or pixels.dtype.itemsize > 2:
        return _display(pixels, ds, photometric)
    unsigned = np.dtype(pixels.dtype.str.replace("i", "u"))  # same size and byte order
    codes = pixels.view(unsigned)  # the bit patterns index the table, signed or not
    levels = np.arange(2 ** (8 * unsigned.itemsize), dtype=np.int64).astype(unsigned).view(pixels.dtype)
    present = np.zeros(levels.shape, bool)
    present[codes] = True
    bits = _whole_number(ds, "BitsStored", 8 * unsigned.itemsize)
    if 1 <= bits <= 8 and "VOILUTSequence" not in ds and not ("WindowCenter" in ds and "WindowWidth" in ds):
        # 8-bit data without a window is already display grey: stretching it to its own min-max would make
        # the same pixels score differently as DICOM and as JPEG or PNG, which are used as they are
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if pixels.dtype.kind == "i" else (0, 2**bits - 1)
        present = (levels >= lo) & (levels <= hi)
    return _display(levels, ds, photometric, present)[codes]
