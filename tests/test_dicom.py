"""DICOM through the one loader: modality LUT, windowing, MONOCHROME1, and clear errors for what is not supported."""

import io

import numpy as np
import pytest

from pneumoscan.images import ImageLoadError, load_grey

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless,  # noqa: E402
                         SecondaryCaptureImageStorage, generate_uid)
from PIL import Image  # noqa: E402


def make_dicom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", syntax=ExplicitVRLittleEndian,
               frame: bytes | None = None, **extra) -> bytes:
    """A DX image; with `frame`, 8-bit pixel data encapsulated as the compressed `syntax` says."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    if frame is not None:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = encapsulate([frame])
    for k, v in extra.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


RAMP = (np.arange(40 * 30).reshape(40, 30) * 3).astype(np.uint16)  # 0 .. 3597


def test_monochrome2_full_range_without_window():
    grey = load_grey(make_dicom(RAMP), name="a.dcm")
    assert grey.shape == (40, 30) and grey.dtype == np.uint8
    assert grey[0, 0] == 0 and grey[-1, -1] == 255 and np.all(np.diff(grey.ravel().astype(int)) >= 0)


def test_monochrome1_is_inverted():
    grey = load_grey(make_dicom(RAMP, "MONOCHROME1"), name="b.dcm")
    assert grey[0, 0] == 255 and grey[-1, -1] == 0


def test_modality_lut_then_window():
    # stored 0..3597 -> HU-like -1024..2573 with intercept -1024; window 0 +- 500 saturates both ends
    grey = load_grey(make_dicom(RAMP, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=1000), name="c.dcm")
    values = RAMP.astype(float) - 1024
    assert np.all(grey[values < -500] == 0) and np.all(grey[values > 500] == 255)
    mid = (values > -400) & (values < 400)
    assert 0 < grey[mid].min() < grey[mid].max() < 255


def test_multi_valued_window_uses_the_first():
    a = load_grey(make_dicom(RAMP, WindowCenter=[1000, 3000], WindowWidth=[500, 100]), name="d.dcm")
    b = load_grey(make_dicom(RAMP, WindowCenter=1000, WindowWidth=500), name="d.dcm")
    assert np.array_equal(a, b)


def test_dicom_is_detected_by_content_whatever_the_name(tmp_path):
    path = tmp_path / "scan.bin"
    path.write_bytes(make_dicom(RAMP))
    assert load_grey(path).shape == (40, 30)


@pytest.mark.parametrize("data, reason", [
    (lambda: make_dicom(None), "no pixel data"),
    (lambda: make_dicom(RAMP, "HSV"), "unsupported photometric interpretation 'HSV'"),
    (lambda: make_dicom(RAMP, syntax=JPEGLSLossless, frame=b"\xff\xd8 not really JPEG-LS"),
     "cannot decode the pixel data .transfer syntax JPEG-LS"),
    (lambda: make_dicom(RAMP)[:300], "DICOM"),
])
def test_bad_dicom_gives_one_clear_error(data, reason):
    with pytest.raises(ImageLoadError, match=reason) as e:
        load_grey(data(), name="bad.dcm")
    assert str(e.value).startswith("bad.dcm: ")


def test_megapixel_limit_applies_to_dicom():
    with pytest.raises(ImageLoadError, match="over the 0.001 MP limit"):
        load_grey(make_dicom(RAMP), name="big.dcm", max_megapixels=0.001)


def test_jpeg_baseline_dicom_decodes_through_pillow():
    img = (np.arange(40 * 30).reshape(40, 30) % 200 + 20).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    grey = load_grey(make_dicom(img, syntax=JPEGBaseline8Bit, frame=buf.getvalue()), name="j.dcm")
    assert grey.shape == (40, 30)
    assert np.corrcoef(grey.ravel().astype(float), img.ravel().astype(float))[0, 1] > 0.98
