"""Property-based fuzzing of the image loader: any bytes give a grey image or an ImageLoadError, never a crash.

Seeds: JPEG and PNG (8- and 16-bit) and, with pydicom installed, DICOM files of several transfer
syntaxes; they are mutated byte by byte, and DICOM headers are also written with arbitrary values.
"""

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumoscan.io.images import ImageLoadError, load_grey


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for fmt, mode in (("JPEG", "L"), ("JPEG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "I;16")):
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65535, (24, 20), dtype=np.uint16))
        else:
            img = Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    for shape, lo, hi in (((9, 7), 1000, 1003), ((16, 12), 0, 4096), ((3, 40), 60000, 65535)):  # 16-bit PNGs
        buf = io.BytesIO()
        Image.fromarray(rng.integers(lo, hi, shape, dtype=np.uint16)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _dicom(syntax: str = "1.2.840.10008.1.2.1", photometric: str = "MONOCHROME2", shape=(10, 8), bits: int = 16,
           samples: int = 1, frame: bytes | None = None, **header) -> bytes:
    """A small DICOM file; with `frame`, pixel data encapsulated as the (compressed) `syntax` says."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.tag import Tag
    from pydicom.uid import UID, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    meta.TransferSyntaxUID = UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, samples
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    for key, value in header.items():
        if isinstance(value, str):  # written as it is, even where it is not a valid number
            tag = Tag(tag_for_keyword(key))
            raw = value.encode() + b" " * (len(value) % 2)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
        else:
            setattr(ds, key, value)
    n = shape[0] * shape[1] * samples
    pixels = (np.arange(n) * 37 % (1 << bits)).astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    ds.PixelData = encapsulate([frame]) if frame is not None else pixels
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # header values that are not valid DICOM are the point
        ds.save_as(buf, implicit_vr=syntax == "1.2.840.10008.1.2", little_endian=True, enforce_file_format=True)
    return buf.getvalue()


def _dicom_seeds() -> list[bytes]:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return []
    from pydicom.pixels.encoders import RLELosslessEncoder

    grey = (np.arange(80) % 200).astype(np.uint8).reshape(10, 8)
    jpeg = io.BytesIO()
    Image.fromarray(grey).save(jpeg, format="JPEG")
    rle = RLELosslessEncoder.encode(grey, rows=10, columns=8, samples_per_pixel=1, bits_allocated=8, bits_stored=8,
                                    pixel_representation=0, photometric_interpretation="MONOCHROME2",
                                    number_of_frames=1)
    return [
        _dicom(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=100, WindowWidth=400, NumberOfFrames=1),
        _dicom("1.2.840.10008.1.2", "MONOCHROME1"),  # implicit VR
        _dicom("1.2.840.10008.1.2.1.99", WindowCenter=[300, 500], WindowWidth=[600, 100]),  # deflated
        _dicom(photometric="RGB", bits=8, samples=3),
        _dicom("1.2.840.10008.1.2.4.50", bits=8, frame=jpeg.getvalue()),  # JPEG baseline
        _dicom("1.2.840.10008.1.2.5", bits=8, frame=rle),  # RLE lossless
    ]


IMAGE_SEEDS, DICOM_SEEDS = _image_seeds(), _dicom_seeds()
SEEDS = IMAGE_SEEDS + DICOM_SEEDS


def _check(data: bytes) -> None:
    try:
        grey = load_grey(data, name="fuzz.bin", max_megapixels=4)
    except ImageLoadError as e:
        assert str(e).startswith("fuzz.bin: ") and e.reason
        return
    assert grey.dtype == np.uint8 and grey.ndim == 2 and grey.size > 0


def test_every_seed_decodes():
    for seed in SEEDS:
        assert load_grey(seed, name="seed").ndim == 2


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _check(data)


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       st.integers(0, 10_000))
def test_mutated_files(seed, flips, cut):
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    _check(bytes(data[: max(1, len(data) - cut % len(data))]))


_NUMBER_TEXT = st.text(alphabet="0123456789x.-+eE\\ ", min_size=1, max_size=10)
_HEADERS = st.fixed_dictionaries({}, optional={
    **{k: _NUMBER_TEXT for k in ("NumberOfFrames", "WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept")},
    **{k: st.integers(0, 65535) for k in ("BitsStored", "HighBit", "PixelRepresentation")},
})


@pytest.mark.skipif(not DICOM_SEEDS, reason="pydicom not installed")
@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"]),
       st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"]),
       st.tuples(st.integers(1, 12), st.integers(1, 12)), st.sampled_from([8, 16]), st.sampled_from([1, 3]), _HEADERS)
def test_dicom_headers_with_arbitrary_values(syntax, photometric, shape, bits, samples, header):
    try:
        data = _dicom(syntax, photometric, shape, bits, samples, **header)
    except (ValueError, TypeError, OverflowError, OSError):  # a value pydicom will not even write
        return
    _check(data)
