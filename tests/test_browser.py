"""End to end in a real headless Chromium (Debian's package, driven by Playwright): upload, see the result."""

import shutil

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("monai")

from pneumoscan.serve import create_app  # noqa: E402

from .test_serve import checkpoint, live, undefined_metrics_checkpoint  # noqa: E402,F401  (module-scoped fixtures)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def server(checkpoint):  # noqa: F811
    with live(create_app(checkpoint)) as url:
        yield url


def test_upload_shows_probability_heatmap_toggle_and_per_file_error(server, tmp_path):
    good = tmp_path / "chest.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    checker = tmp_path / "checker.png"  # nothing like an X-ray: outside what the model was trained on
    Image.fromarray((np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)).save(checker)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server)
        assert "not a medical device" in page.inner_text("body")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Model:')")
        page.set_input_files("#files", [str(good), str(bad), str(checker)])
        page.wait_for_selector(".card >> nth=2", timeout=30_000)
        cards = page.query_selector_all(".card")
        assert [c.get_attribute("data-filename") for c in cards] == ["chest.png", "broken.jpeg", "checker.png"]
        assert "outside what this model was trained on" in cards[2].query_selector(".ood").inner_text()
        assert "probability of PNEUMONIA" in cards[0].inner_text()
        img = cards[0].query_selector("img")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        cards[0].query_selector(".heat-toggle").uncheck()
        assert img.get_attribute("src").startswith("blob:")
        error = cards[1].query_selector(".error").inner_text()
        assert error.startswith("Error: ") and ("corrupt" in error or "not a recognised image" in error)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_undefined_validation_metrics_read_na_on_the_page(undefined_metrics_checkpoint):  # noqa: F811
    with live(create_app(undefined_metrics_checkpoint)) as url, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('validation').textContent.startsWith('Validation')")
        shown = page.inner_text("#validation")
        browser.close()
    assert "precision n/a" in shown and "f1 n/a" in shown and "accuracy 0.500" in shown
