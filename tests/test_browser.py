"""End to end in a real headless Chromium (Debian's package, driven by Playwright): upload, see the result."""

import contextlib
import re
import shutil

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("monai")

from pneumoscan.apps.serve import create_app  # noqa: E402

from .test_serve import checkpoint, live, undefined_metrics_checkpoint  # noqa: E402,F401  (module-scoped fixtures)
from .test_serve_browser import wait_until, watched_page  # noqa: E402  (the policy forbids wait_for_function's eval)

MODEL_LOADED = "document.getElementById('model').textContent.startsWith('Model:')"
PERCENT = re.compile(r"\d{1,2}\.\d+%")


@pytest.fixture
def server(checkpoint):  # noqa: F811
    with live(create_app(checkpoint)) as url:
        yield url


@contextlib.contextmanager
def browser_page(url):
    """A new headless Chromium page opened at `url`."""
    with watched_page(url) as page:
        page.goto(url)
        yield page


def test_upload_shows_probability_heatmap_toggle_and_per_file_error(server, tmp_path):
    good = tmp_path / "chest.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    checker = tmp_path / "checker.png"  # nothing like an X-ray: outside what the model was trained on
    Image.fromarray((np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)).save(checker)
    with browser_page(server) as page:
        assert "not a medical device" in page.inner_text("body")
        wait_until(page, MODEL_LOADED)
        page.set_input_files("#files", [str(good), str(bad), str(checker)])
        page.wait_for_selector(".card >> nth=2", timeout=30_000)
        cards = page.query_selector_all(".card")
        assert [c.get_attribute("data-filename") for c in cards] == ["chest.png", "broken.jpeg", "checker.png"]
        assert "outside what this model was trained on" in cards[2].query_selector(".ood").inner_text().lower()
        assert "probability of pneumonia" in cards[0].inner_text()
        assert PERCENT.fullmatch(cards[0].query_selector(".p").inner_text())  # a percentage, not 0.xxx
        # the out-of-distribution score beside the threshold it is flagged at
        assert re.fullmatch(r"Out-of-distribution score \d+\.\d\d \(flagged at \d+\.\d\d or more\)\.",
                            cards[0].query_selector(".oodscore").inner_text())
        img = cards[0].query_selector("img")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        cards[0].query_selector(".heat-toggle").uncheck()
        assert img.get_attribute("src").startswith("blob:")
        error = cards[1].query_selector(".error").inner_text()
        assert error.startswith("Error: ") and ("corrupt" in error or "not a recognised image" in error)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_probabilities_read_as_percentages_that_never_round_to_0_or_100(server):
    with browser_page(server) as page:
        shown = page.evaluate("[0.9997, 0.0003, 0.5, 0.173, 0.999999, 1e-7, 1 - 1e-15, 0, 1, null].map(p => pct(p))")
        assert shown == ["99.97%", "0.03%", "50.0%", "17.3%", "99.9999%", "0.00001%", "over 99.9999999999%", "0%",
                         "100%", "n/a"]
        # beside its threshold, a probability reads differently from it
        assert page.evaluate("[pct(0.49996, 0.5), pct(0.5, 0.49996)]") == ["49.996%", "50.000%"]
        wait_until(page, MODEL_LOADED)
        page.evaluate("""show({filename: 'near-one.png', p_pneumonia: 0.9997, label: 'PNEUMONIA', threshold: 0.5,
                               probabilities: null, error: null, warnings: [], assumed_prevalence: 0.743,
                               prevalence_source: 'model', ood_score: 40.5, ood_threshold: 12.25, outside_training: true,
                               class_names: ['NORMAL', 'PNEUMONIA'], model: 'seed', heatmap_png: null}, '')""")
        card = page.inner_text(".card")
    assert "Pneumonia · probability of pneumonia 99.97%" in card and "Called pneumonia at 50.0% or more" in card
    assert "assumes 74.3% pneumonia among the images" in card
    assert "Out-of-distribution score 40.50 (flagged at 12.25 or more)" in card
    assert "Outside what this model was trained on" in card and "means little" in card


def test_model_line_uses_plain_names_and_links_the_docs_and_the_model_card(server):
    with browser_page(server) as page:
        wait_until(page, MODEL_LOADED)
        model, validation = page.inner_text("#model"), page.inner_text("#validation")
        assert "the paper's CNN, PReLU activations" in model and "seed (prelu)" not in model
        assert re.search(r"Probabilities assume \d+\.\d% pneumonia among the images \(the training mix\)", model)
        assert re.search(r"Decision: an image is called pneumonia at a probability of \d+\.\d+% or more", model)
        assert re.search(r"ROC AUC \d\.\d{3} · Sensitivity \d\.\d{3} · Specificity \d\.\d{3} · Accuracy", validation)
        assert "roc_auc" not in validation and "recall" not in validation
        assert page.request.get(page.eval_on_selector("#docs-link", "a => a.href")).ok  # the OpenAPI page
        assert page.is_visible("#card-link")  # no token: a plain link works
        assert "## Intended use" in page.request.get(page.eval_on_selector("#card-link", "a => a.href")).text()
        page.click("#card summary")
        wait_until(page, "document.getElementById('card-text').textContent.includes('## Limitations')")


def test_with_a_token_the_page_fetches_model_info_and_card_with_it(checkpoint):  # noqa: F811
    with live(create_app(checkpoint, token="s3cret")) as url, browser_page(url) as page:
        wait_until(page, "document.getElementById('model').textContent.includes('needs the API token')")
        assert not page.is_visible("#card-link")  # a link could not carry the token
        page.click("#card summary")
        wait_until(page, "document.getElementById('card-text').textContent.includes('needs the API token')")
        page.fill("#token", "s3cret")
        page.dispatch_event("#token", "change")
        wait_until(page, MODEL_LOADED)
        wait_until(page, "document.getElementById('card-text').textContent.includes('## Intended use')")


def test_undefined_validation_metrics_read_na_on_the_page(undefined_metrics_checkpoint):  # noqa: F811
    with live(create_app(undefined_metrics_checkpoint)) as url, browser_page(url) as page:
        wait_until(page, "document.getElementById('validation').textContent.startsWith('Validation')")
        shown = page.inner_text("#validation")
    assert "Precision (positive predictive value) n/a" in shown and "F1 score n/a" in shown
    assert "Accuracy 0.500" in shown
