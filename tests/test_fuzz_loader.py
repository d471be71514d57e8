"""Property-based fuzzing of the image loader: any bytes give a grey image or an ImageLoadError, never a crash."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumoscan.images import ImageLoadError, load_grey


def _seed_files() -> list[bytes]:
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
    return out


SEEDS = _seed_files()


def _check(data: bytes) -> None:
    try:
        grey = load_grey(data, name="fuzz.bin", max_megapixels=4)
    except ImageLoadError as e:
        assert str(e).startswith("fuzz.bin: ") and e.reason
        return
    assert grey.dtype == np.uint8 and grey.ndim == 2 and grey.size > 0


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _check(data)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       st.integers(0, 10_000))
def test_mutated_images(seed, flips, cut):
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    _check(bytes(data[: max(1, len(data) - cut % len(data))]))
