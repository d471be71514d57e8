import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.io.images import ImageLoadError, load_for_model, load_grey, resize

from .conftest import real_train_folder


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_rgb_and_grey_jpeg_give_the_same_grey(tmp_path):
    grey = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    Image.fromarray(grey).save(tmp_path / "a.png")
    Image.fromarray(grey).convert("RGB").save(tmp_path / "b.png")
    a, b = load_grey(tmp_path / "a.png"), load_grey(tmp_path / "b.png")
    assert a.shape == (48, 64) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(a, grey)


def _jpeg(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _colours_converted(data: bytes) -> np.ndarray:
    """The reference: every colour channel decoded, then converted to grey."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB").convert("L"))


@pytest.mark.parametrize("options", [{}, {"quality": 95, "subsampling": 0}, {"quality": 60, "progressive": True}])
def test_a_colour_jpeg_of_grey_content_decodes_as_if_its_colours_were_converted(options):
    """The loader has libjpeg decode a colour JPEG's luma alone; for grey content (an X-ray saved in
    colour, as the Kaggle data set is) and for moderate colours that is the reference, pixel for pixel."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    grey = np.clip(128 + 90 * np.sin(x / 9) * np.cos(y / 13) + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8)
    colours = np.clip(128 + 60 * np.stack([np.sin(x / 9), np.cos(y / 7), np.sin((x + y) / 11)], -1), 0, 255)
    for pixels in (np.repeat(grey[..., None], 3, -1), colours.astype(np.uint8)):
        data = _jpeg(pixels, **options)
        assert np.array_equal(load_grey(data, name="x.jpeg"), _colours_converted(data))


def test_the_kaggle_images_decode_as_if_their_colours_were_converted():
    train = real_train_folder()
    files = sorted((train / "NORMAL").glob("*.jpeg"))[:50] + sorted((train / "PNEUMONIA").glob("*.jpeg"))[:50]
    assert files, f"no JPEG under {train}"
    for f in files:
        assert np.array_equal(load_grey(f), _colours_converted(f.read_bytes())), f


def test_a_saturated_colour_jpeg_decodes_to_its_stored_luma():
    """Where colours clip on decoding, converting them loses the luma the JPEG stores (measured: up to
    11 grey levels on pure red, blue and yellow); the loader gives the stored luma itself."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:32, :, 0], pixels[32:, :, 2], pixels[:, :16] = 255, 255, (255, 255, 0)
    data = _jpeg(pixels, quality=90)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("YCbCr", None)  # the decoded planes themselves, not converted to RGB
        luma = np.asarray(img)[..., 0]
    out = load_grey(data, name="x.jpeg")
    assert np.array_equal(out, luma)
    assert not np.array_equal(out, _colours_converted(data))  # the case this test is about


@pytest.mark.parametrize("mode", ["LA", "RGBA", "P", "CMYK", "I;16"])
def test_other_modes_decode_to_grey(mode):
    ramp = np.arange(32 * 32).reshape(32, 32)
    img = Image.fromarray((ramp * 50).astype(np.uint16)) if mode == "I;16" else Image.fromarray((ramp % 256).astype(np.uint8)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = load_grey(buf.getvalue(), name=f"x.{fmt.lower()}")
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out.max() > out.min()


def test_sixteen_bit_uses_its_full_range():
    a = np.linspace(1000, 5000, 16 * 16).reshape(16, 16).astype(np.uint16)
    out = load_grey(_png(Image.fromarray(a)))
    assert out.min() == 0 and out.max() == 255


def test_exif_orientation_is_applied():
    img = Image.fromarray(np.zeros((20, 40), np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert load_grey(buf.getvalue()).shape == (40, 20)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, I am text", "not a recognised image"),
])
def test_bad_bytes_give_a_clear_error_naming_the_file(data, reason):
    with pytest.raises(ImageLoadError, match=reason) as e:
        load_grey(data, name="upload.jpeg")
    assert str(e.value).startswith("upload.jpeg: ")


def test_truncated_jpeg_is_reported(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)).save(buf, format="JPEG")
    path = tmp_path / "cut.jpeg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpeg: .*(corrupt|truncated)"):
        load_grey(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_grey(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_grey(str(tmp_path / "nul\0.png"))


def test_megapixel_limit_refuses_large_images():
    data = _png(Image.new("L", (2000, 1000)))
    with pytest.raises(ImageLoadError, match="over the 1 MP limit"):
        load_grey(data, max_megapixels=1)
    assert load_grey(data, max_megapixels=3).shape == (1000, 2000)


def test_resize_ignores_aspect_ratio_and_knows_its_filters():
    a = np.zeros((30, 60), np.uint8)
    assert resize(a, 20).shape == (20, 20)
    with pytest.raises(ValueError, match="bilinear"):
        resize(a, 20, "fancy")
    assert load_for_model(_png(Image.fromarray(a)), 16, "bilinear").shape == (16, 16)


def test_decompression_bomb_is_refused_from_the_header_alone():
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a 30000 x 30000 grey PNG header (900 MP) with a few bytes of data: never decoded
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    with pytest.raises(ImageLoadError, match="bomb.png: .*(megapixels|decompression bomb)"):
        load_grey(png, name="bomb.png")


def _saved(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "WEBP", "PPM", "ICO", "EPS", "TGA", "PCX", "JPEG2000", "SGI", "DDS"])
def test_only_the_accepted_formats_are_decoded_whatever_the_name(fmt):
    with pytest.raises(ImageLoadError, match="accepted.*JPEG, PNG, DICOM") as e:
        load_grey(_saved(fmt), name="scan.png")
    assert str(e.value).startswith("scan.png: ")


def test_refused_formats_are_named():
    with pytest.raises(ImageLoadError, match="GIF is not an accepted format"):
        load_grey(_saved("GIF"), name="scan.png")


def test_megapixel_limit_applies_above_pillows_own_bomb_limit(monkeypatch, recwarn):
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; the loader's limit is the one that counts
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(Image.new("L", (2000, 1000)))
    assert load_grey(data, max_megapixels=3).shape == (1000, 2000)
    with pytest.raises(ImageLoadError, match="over the 1 MP limit"):
        load_grey(data, max_megapixels=1)
    assert Image.MAX_IMAGE_PIXELS == 1000 and not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_sixteen_bit_png_costs_a_few_bytes_a_pixel():
    import tracemalloc

    a = (np.arange(2000 * 1500, dtype=np.int64) * 7 % 65536).astype(np.uint16).reshape(1500, 2000)
    data = _png(Image.fromarray(a))
    tracemalloc.start()
    try:
        grey = load_grey(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert grey.shape == (1500, 2000) and grey.min() == 0 and grey.max() == 255
    assert peak / a.size < 6, f"{peak / a.size:.1f} bytes a pixel"


def test_sixteen_bit_stretch_matches_the_float_formula():
    rng = np.random.default_rng(3)
    a = rng.integers(1200, 40000, (37, 53)).astype(np.uint16)
    lo, hi = float(a.min()), float(a.max())
    expected = np.round((a.astype(np.float64) - lo) / (hi - lo) * 255.0).astype(np.uint8)
    assert np.array_equal(load_grey(_png(Image.fromarray(a))), expected)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_what_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    """A FIFO would block open() for ever and a device read for ever: each is refused from its stat(), as are
    links that lead nowhere; the error names the file and what it is."""
    fifo, loop, dangling, folder = tmp_path / "x.png", tmp_path / "loop.png", tmp_path / "gone.jpeg", tmp_path / "d.png"
    os.mkfifo(fifo)
    os.symlink(loop.name, loop)
    os.symlink(tmp_path / "nowhere.jpeg", dangling)
    folder.mkdir()
    cases = {fifo: "not a regular file (a FIFO)", folder: "not a regular file (a directory)",
             loop: "a symbolic link that loops", dangling: "a broken symbolic link (its target does not exist)"}
    if os.path.exists("/dev/zero"):
        cases[Path("/dev/zero")] = "not a regular file (a character device)"
    release = threading.Timer(20, _release_a_reader, [fifo])  # should open() block on the FIFO, the test fails
    release.start()
    try:
        for path, reason in cases.items():
            with pytest.raises(ImageLoadError) as e:
                load_grey(path)
            assert str(e.value).startswith(f"{path}: {reason}"), e.value
        os.symlink(fifo, tmp_path / "to-fifo.png")  # a link is judged by what it leads to
        with pytest.raises(ImageLoadError, match="a FIFO"):
            load_grey(tmp_path / "to-fifo.png")
    finally:
        release.cancel()


def _release_a_reader(fifo: Path) -> None:
    """Let an open() blocked on `fifo` return: open its write end (possible only while a reader waits) and close it."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting: nothing to release
        pass
