"""Every DICOM transfer syntax, encoded by tools no one here wrote, decodes through the loader to the original.

From a real radiograph of the data set, an uncompressed 8-bit and a 12-bit DICOM are written; DCMTK's
dcmcjpeg, dcmcjpls, dcmcrle and dcmconv encode them (JPEG 2000, which this DCMTK lacks, is encoded by
OpenJPEG through pydicom's `compress` and pylibjpeg-openjpeg). Lossless syntaxes must give the same stored
values and display pixels; JPEG-LS near-lossless stays within its NEAR bound on the stored values; lossy JPEG
and JPEG 2000 keep a PSNR floor on the display pixels.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pneumoscan.io.dicom import read_dicom  # noqa: E402
from pneumoscan.io.images import ImageLoadError, load_grey  # noqa: E402

from .conftest import real_train_folder  # noqa: E402

NEAR = 2  # dcmcjpls +md: the largest difference a near-lossless stored value may have
PSNR_FLOOR_DB = 40.0
LIMIT = 100_000_000


def _write(path: Path, pixels: np.ndarray, bits: int) -> Path:
    """An uncompressed (explicit VR little endian) MONOCHROME2 DICOM of `pixels`, `bits` stored."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[int, Path]:
    """{8: 8-bit DICOM, 12: 12-bit DICOM} of the first NORMAL radiograph of the real train split."""
    from PIL import Image

    folder = real_train_folder() / "NORMAL"
    source = sorted(folder.iterdir())[0]
    grey = np.asarray(Image.open(source).convert("L"), dtype=np.float64)
    # 12 bits: the radiograph scaled by 16 and smoothed over 2x2, so the low 4 bits carry image content
    padded = np.pad(grey, ((0, 1), (0, 1)), mode="edge")
    smooth = (padded[:-1, :-1] + padded[1:, :-1] + padded[:-1, 1:] + padded[1:, 1:]) / 4
    out = tmp_path_factory.mktemp("syntaxes")
    return {8: _write(out / "u8.dcm", grey.astype(np.uint8), 8),
            12: _write(out / "u12.dcm", np.clip(np.round(smooth * 16), 0, 4095).astype(np.uint16), 12)}


def _dcmtk(tool: str, *options: str):
    def encode(src: Path, dst: Path) -> None:
        if shutil.which(tool) is None:
            pytest.skip(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
        subprocess.run([tool, *options, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return encode


def _openjpeg(syntax: str, **options):
    def encode(src: Path, dst: Path) -> None:
        ds = pydicom.dcmread(src)
        ds.compress(syntax, encoding_plugin="pylibjpeg", **options)
        ds.save_as(dst)
    return encode


EXACT, NEAR_LOSSLESS, LOSSY = "exact", "near-lossless", "lossy"
# (transfer syntax UID, name, bits of the original, encoder, decoding plugin expected, check)
CASES = [
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline", 8, _dcmtk("dcmcjpeg", "+eb", "+q", "90"), "pylibjpeg", LOSSY),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended 12-bit", 12, _dcmtk("dcmcjpeg", "+ee", "+q", "90"), "pylibjpeg", LOSSY),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless P14", 8, _dcmtk("dcmcjpeg", "+el"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless P14", 12, _dcmtk("dcmcjpeg", "+el"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.70", "JPEG Lossless SV1", 8, _dcmtk("dcmcjpeg", "+e1"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.70", "JPEG Lossless SV1", 12, _dcmtk("dcmcjpeg", "+e1"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless", 8, _dcmtk("dcmcjpls", "+el"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless", 12, _dcmtk("dcmcjpls", "+el"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless", 8, _dcmtk("dcmcjpls", "+en", "+md", str(NEAR)), "pylibjpeg",
     NEAR_LOSSLESS),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless", 12, _dcmtk("dcmcjpls", "+en", "+md", str(NEAR)), "pylibjpeg",
     NEAR_LOSSLESS),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless", 8, _openjpeg("1.2.840.10008.1.2.4.90"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless", 12, _openjpeg("1.2.840.10008.1.2.4.90"), "pylibjpeg", EXACT),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000", 8, _openjpeg("1.2.840.10008.1.2.4.91", j2k_psnr=[45]), "pylibjpeg", LOSSY),
    ("1.2.840.10008.1.2.5", "RLE Lossless", 8, _dcmtk("dcmcrle"), "pydicom", EXACT),
    ("1.2.840.10008.1.2.5", "RLE Lossless", 12, _dcmtk("dcmcrle"), "pydicom", EXACT),
    ("1.2.840.10008.1.2.1.99", "Deflated Explicit VR", 8, _dcmtk("dcmconv", "+td"), "pydicom", EXACT),
    ("1.2.840.10008.1.2.1.99", "Deflated Explicit VR", 12, _dcmtk("dcmconv", "+td"), "pydicom", EXACT),
    ("1.2.840.10008.1.2", "Implicit VR", 12, _dcmtk("dcmconv", "+ti"), "pydicom", EXACT),
]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("uid, name, bits, encode, plugin, check", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}bit-{c[4]}" for c in CASES])
def test_syntax_decodes_to_the_original(originals, tmp_path, uid, name, bits, encode, plugin, check):
    src, dst = originals[bits], tmp_path / "encoded.dcm"
    encode(src, dst)
    assert pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid, "the encoder made another syntax"
    original = read_dicom(src.read_bytes(), LIMIT)
    decoded = read_dicom(dst.read_bytes(), LIMIT)
    assert decoded.syntax == uid and decoded.plugin == plugin
    grey = load_grey(dst)  # the loader every command uses
    np.testing.assert_array_equal(grey, decoded.grey)
    assert decoded.stored.shape == original.stored.shape and decoded.warnings == []
    if check == EXACT:
        np.testing.assert_array_equal(decoded.stored, original.stored)
        np.testing.assert_array_equal(grey, original.grey)
    elif check == NEAR_LOSSLESS:
        deviation = np.abs(decoded.stored.astype(np.int64) - original.stored.astype(np.int64)).max()
        assert 0 < deviation <= NEAR, f"near-lossless deviation {deviation}, bound {NEAR}"
    else:
        assert not np.array_equal(decoded.stored, original.stored), "a lossy syntax gave identical values"
        assert _psnr(grey, original.grey) >= PSNR_FLOOR_DB


COMPRESSED = pytest.mark.parametrize("uid, bits, encode", [
    ("1.2.840.10008.1.2.4.51", 12, _dcmtk("dcmcjpeg", "+ee")),
    ("1.2.840.10008.1.2.4.57", 12, _dcmtk("dcmcjpeg", "+el")),
    ("1.2.840.10008.1.2.4.80", 12, _dcmtk("dcmcjpls", "+el")),
    ("1.2.840.10008.1.2.4.81", 8, _dcmtk("dcmcjpls", "+en")),
    ("1.2.840.10008.1.2.4.90", 12, _openjpeg("1.2.840.10008.1.2.4.90")),
], ids=["jpeg-extended-12bit", "jpeg-lossless-12bit", "jpeg-ls", "jpeg-ls-near", "jpeg2000"])


@COMPRESSED
def test_frame_larger_than_the_header_is_refused_before_decoding(originals, tmp_path, uid, bits, encode):
    """The frame's own header names its size: a DICOM header declaring fewer pixels is refused before decoding."""
    dst = tmp_path / "encoded.dcm"
    encode(originals[bits], dst)
    ds = pydicom.dcmread(dst)
    assert ds.file_meta.TransferSyntaxUID == uid
    ds.Rows, ds.Columns = ds.Rows // 4, ds.Columns // 4
    ds.save_as(dst)
    with pytest.raises(ImageLoadError, match=r"compressed frame is \d+x\d+, larger than the \d+x\d+ image"):
        load_grey(dst)


@COMPRESSED
def test_a_truncated_frame_is_refused_not_filled_in(originals, tmp_path, uid, bits, encode):
    """A frame cut to a third of its length is an error: some decoders would fill the missing rows silently."""
    from pydicom.encaps import encapsulate, generate_frames

    dst = tmp_path / "encoded.dcm"
    encode(originals[bits], dst)
    ds = pydicom.dcmread(dst)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    ds.save_as(dst)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_grey(dst)


def test_a_missing_decoder_names_the_extra_to_install(originals, tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    dst = tmp_path / "ls.dcm"
    _dcmtk("dcmcjpls", "+el")(originals[8], dst)
    monkeypatch.setattr(Decoder, "available_plugins", property(lambda self: ()))  # as without pylibjpeg & co.
    with pytest.raises(ImageLoadError, match=r"JPEG-LS Lossless.*no decoder for it is installed: pip install 'pneumoscan\[dicom\]'"):
        load_grey(dst)
