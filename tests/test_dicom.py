"""DICOM through the one loader: modality LUT, windowing, MONOCHROME1, and clear errors for what is not supported."""

import io

import numpy as np
import pytest

from pneumoscan.io.images import ImageLoadError, load_grey

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, RLELossless,  # noqa: E402
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


def _meta_end(data: bytes) -> int:
    """Where a Part 10 file's dataset starts: after the (0002,0000) group length's group."""
    return 132 + 12 + int.from_bytes(data[140:144], "little")


def _deflated(pixels: np.ndarray, extra: bytes = b"", before_pixels: bool = False, **kw) -> bytes:
    """A deflated DICOM file; `extra` (explicit VR LE elements) goes before the pixel data or after it."""
    import zlib

    plain = make_dicom(pixels, **kw)
    dataset = plain[_meta_end(plain):]
    at = dataset.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    dataset = dataset[:at] + extra + dataset[at:] if before_pixels else dataset + extra
    deflated = make_dicom(pixels, syntax=DeflatedExplicitVRLittleEndian, **kw)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflated[:_meta_end(deflated)] + packer.compress(dataset) + packer.flush()


def _zeros_element(tag: bytes, n: int) -> bytes:
    """An explicit VR LE OB element of n zero bytes."""
    return tag + b"OB\x00\x00" + n.to_bytes(4, "little") + bytes(n)


def test_deflated_dicom_decodes_like_the_uncompressed_one():
    data = make_dicom(RAMP, syntax=DeflatedExplicitVRLittleEndian, WindowCenter=1000, WindowWidth=1500)
    assert DeflatedExplicitVRLittleEndian.encode() in data[:_meta_end(data)]
    assert np.array_equal(load_grey(data, name="z.dcm"), load_grey(make_dicom(RAMP, WindowCenter=1000, WindowWidth=1500)))


@pytest.mark.parametrize("before_pixels", [False, True])
def test_deflate_bomb_is_refused_in_bounded_memory(before_pixels):
    import tracemalloc

    # a 1 x 1 image with 64 MiB of zeros (about 64 KB deflated): trailing padding, or a private element before the pixels
    tag = b"\x09\x00\x10\x10" if before_pixels else b"\xfc\xff\xfc\xff"
    bomb = _deflated(np.ones((1, 1), np.uint16), _zeros_element(tag, 64 * 2**20), before_pixels=before_pixels)
    assert len(bomb) < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ImageLoadError, match="bomb.dcm: .*decompression bomb"):
            load_grey(bomb, name="bomb.dcm", max_megapixels=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_deflated_dicom_with_a_small_trailer_still_decodes():
    data = _deflated(RAMP, _zeros_element(b"\xfc\xff\xfc\xff", 1000))
    assert np.array_equal(load_grey(data, name="t.dcm"), load_grey(make_dicom(RAMP)))


def test_pixel_data_size_is_checked_before_decoding():
    # 30 x 40 pixels are within 0.0015 MP, but 3 samples of 64 bits each are not within its bytes
    with pytest.raises(ImageLoadError, match="over what the 0.0015 MP limit allows"):
        load_grey(make_dicom(RAMP, SamplesPerPixel=3, BitsAllocated=64), name="wide.dcm", max_megapixels=0.0015)


@pytest.mark.parametrize("keyword", ["NumberOfFrames", "Rows", "WindowCenter"])
def test_malformed_header_values_are_a_per_file_error(keyword):
    if keyword == "Rows":  # Rows is binary (US): declare 2 values where one belongs
        data = make_dicom(RAMP)
        at = data.index(b"\x28\x00\x10\x00US\x02\x00")
        data = data[:at] + b"\x28\x00\x10\x00US\x04\x00" + data[at + 8:at + 10] + b"\x01\x00" + data[at + 10:]
    else:  # a number written as text that is not one
        data = make_dicom(RAMP, **{keyword: "12345"}, WindowWidth=100).replace(b"12345 ", b"1x579 ")
    with pytest.raises(ImageLoadError, match=keyword) as e:
        load_grey(data, name="odd.dcm")
    assert str(e.value).startswith("odd.dcm: ")


def _peak_of(fn) -> int:
    """The largest traced allocation total (numpy included) while fn runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_rle_dicom_decodes_like_the_uncompressed_one():
    ds = pydicom.dcmread(io.BytesIO(make_dicom(RAMP)))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert np.array_equal(load_grey(buf.getvalue(), name="r.dcm"), load_grey(make_dicom(RAMP)))


def test_rle_bomb_is_refused_before_decoding():
    # a 1 x 1 image whose one RLE segment repeats a byte 128 times every 2 bytes: 1 MiB decodes to 64 MiB
    segment = b"\x81\x07" * 2**19
    frame = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + bytes(56) + segment
    bomb = make_dicom(np.ones((1, 1), np.uint8), syntax=RLELossless, frame=frame)

    def load():
        with pytest.raises(ImageLoadError, match="rle.dcm: .*decompression bomb"):
            load_grey(bomb, name="rle.dcm")
    assert _peak_of(load) < 8 * 2**20


def test_jpeg_frame_larger_than_the_header_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 9).save(buf, format="JPEG", quality=10)
    data = make_dicom(np.ones((1, 1), np.uint8), syntax=JPEGBaseline8Bit, frame=buf.getvalue())

    def load():
        with pytest.raises(ImageLoadError, match="j.dcm: compressed frame is 3000x3000, larger than the 1x1 image"):
            load_grey(data, name="j.dcm")
    assert _peak_of(load) < 4 * 2**20


# --- 8-bit grey without a window: the stored values as they are, as a PNG's ------------------------------

def _eight_bit(grey: np.ndarray, photometric: str = "MONOCHROME2", **extra) -> bytes:
    """An uncompressed 8-bit DICOM of `grey` (stored as given), no window, no VOI LUT."""
    return make_dicom(None, photometric, Rows=grey.shape[0], Columns=grey.shape[1], BitsAllocated=8, BitsStored=8,
                      HighBit=7, PixelRepresentation=0, PixelData=grey.tobytes(), **extra)


def _png(grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()


def _narrow_grey() -> np.ndarray:
    """A generated radiograph within 30..210: stretching it to its own min-max would change every level."""
    from .conftest import synthetic_xray

    grey = (30 + synthetic_xray(np.random.default_rng(7), 1, 64).astype(np.int64) * 180 // 255).astype(np.uint8)
    assert grey.min() > 0 and grey.max() < 255
    return grey


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The paper's network, trained one epoch on generated images."""
    from pneumoscan.tasks.train import train

    from .conftest import make_dataset
    from .test_train_checkpoint import tiny_config

    root = tmp_path_factory.mktemp("eight-bit")
    train(tiny_config(make_dataset(root / "data"), epochs=1), root / "run", device="cpu", progress=False)
    return root / "run" / "best.pt"


@pytest.mark.parametrize("photometric, extra", [("MONOCHROME2", {}), ("MONOCHROME1", {}),
                                                 ("MONOCHROME2", dict(RescaleSlope=1, RescaleIntercept=0))])
def test_eight_bit_dicom_without_a_window_scores_as_the_same_png(small_model, photometric, extra):
    from dataclasses import replace

    from pneumoscan.io.images import load_for_model
    from pneumoscan.tasks.predict import Predictor

    grey = _narrow_grey()
    stored = 255 - grey if photometric == "MONOCHROME1" else grey  # MONOCHROME1: low values are bright
    dicom, png = _eight_bit(stored, photometric, **extra), _png(grey)
    assert np.array_equal(load_grey(dicom, name="a.dcm"), grey) and np.array_equal(load_grey(png, name="a.png"), grey)
    assert np.array_equal(load_for_model(dicom, 48, "nearest"), load_for_model(png, 48, "nearest"))
    predictor = Predictor(small_model, device="cpu")
    # the same uint8 input through the same network in one process: the same arithmetic, so equal exactly
    as_dicom, as_png = predictor.predict_file(dicom, name="a.dcm"), predictor.predict_file(png, name="a.png")
    assert as_dicom.error is None and replace(as_dicom, path="a.png") == as_png  # probability, label, OOD score...


def test_eight_bit_dicom_with_a_window_is_still_windowed():
    grey = _narrow_grey()
    windowed = load_grey(_eight_bit(grey, WindowCenter=120.5, WindowWidth=64), name="w.dcm")
    assert np.all(windowed[grey <= 88] == 0) and np.all(windowed[grey >= 152] == 255)


def test_deeper_than_eight_bits_without_a_window_is_still_stretched_to_its_range():
    twelve = _narrow_grey().astype(np.uint16) * 16  # 480 .. 3360 of 0 .. 4095
    grey = load_grey(make_dicom(twelve, BitsStored=12, HighBit=11), name="t.dcm")
    assert grey.min() == 0 and grey.max() == 255
