"""The legend under explain's PNGs: the overlay's pixels untouched, a colour bar, and the caption's text."""

import numpy as np
from PIL import ImageDraw

from pneumoscan.tasks.explain import DISCLAIMER, MAP_SCALE, caption, colour_bar, overlay, with_legend


def test_caption_names_the_file_the_probability_the_label_at_the_threshold_and_the_use():
    lines = caption("person1_virus_2.jpeg", 0.91234, "PNEUMONIA", 0.5)
    assert lines == ["person1_virus_2.jpeg", "P(pneumonia) = 0.912: PNEUMONIA at threshold 0.500", DISCLAIMER]
    assert "not for diagnosis" in DISCLAIMER
    assert caption("a.png", 0.25, "NORMAL", 0.7, prior=0.2)[1] == \
        "P(pneumonia) = 0.250 at prevalence 0.200: NORMAL at threshold 0.700"
    assert caption("bad\udcff.png", 0.5, "NORMAL", 0.5)[0] == "bad\\xff.png"  # a file name's non-UTF-8 byte


def _drawn_text(monkeypatch) -> list[str]:
    """Every string `with_legend` draws, in order."""
    drawn: list[str] = []
    real = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *args, **kwargs):
        drawn.append(text)
        return real(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    return drawn


def test_the_legend_goes_below_and_leaves_the_overlay_as_it_is(monkeypatch):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    rgb = overlay(grey, rng.random((12, 12)).astype(np.float32))
    drawn = _drawn_text(monkeypatch)
    lines = caption("IM-0001-0001.jpeg", 0.123, "NORMAL", 0.5)
    out = with_legend(rgb, lines)
    assert out.dtype == np.uint8 and out.shape[0] > 40 and out.shape[1] > 30  # a small image gets a wider strip
    assert np.array_equal(out[:40, :30], rgb)
    assert (out[:40, 30:] == 255).all()  # white beside a narrow image
    text = " ".join(drawn)
    assert MAP_SCALE in text and "low" in drawn and "high" in drawn
    for line in lines:
        assert line in text  # wrapped pieces, drawn in order


def test_a_wide_image_keeps_its_width_and_long_names_are_shortened_in_the_middle(monkeypatch):
    grey = np.full((300, 900), 90, dtype=np.uint8)
    rgb = overlay(grey, np.linspace(0, 1, 900 * 300, dtype=np.float32).reshape(300, 900))
    drawn = _drawn_text(monkeypatch)
    name = "a" * 400 + "_end.jpeg"
    out = with_legend(rgb, caption(name, 0.5, "PNEUMONIA", 0.5))
    assert out.shape[1] == 900 and np.array_equal(out[:300], rgb)
    shortened = next(t for t in drawn if "…" in t)
    assert shortened.startswith("aaa") and shortened.endswith("_end.jpeg") and len(shortened) < len(name)


def test_the_colour_bar_runs_from_the_bare_grey_to_the_strongest_colour():
    bar = colour_bar(100, 5)
    assert bar.shape == (5, 100, 3) and (bar == bar[:1]).all()  # every row the same
    assert (bar[0, 0] == 128).all()  # no evidence: the image shows through unchanged
    assert np.array_equal(bar[0, -1], overlay(np.full((1, 1), 128, np.uint8), np.ones((1, 1), np.float32))[0, 0])
