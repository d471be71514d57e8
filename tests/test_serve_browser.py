"""The page and the API documentation in a real headless Chromium under the server's Content-Security-Policy:
nothing refused, nothing fetched from another host, and the token carried from the page to /docs."""

import contextlib
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")
pytest.importorskip("monai")

from pneumoscan.apps.serve import create_app  # noqa: E402

from .test_serve import checkpoint, live, png  # noqa: E402,F401  (module-scoped fixture)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OPERATIONS = "document.querySelectorAll('.opblock').length >= 4"  # Swagger UI drew the API's operations


@contextlib.contextmanager
def watched_page(url):
    """A headless Chromium page, with every console message and every URL it requested."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.console, page.requested = [], []
            page.on("console", lambda m: page.console.append(m.text))
            page.on("request", lambda r: page.requested.append(r.url))
            yield page
        finally:
            browser.close()


def wait_until(page, expression, timeout_s=30):
    """Wait until `expression` is true in the page. Through page.evaluate, not wait_for_function, which
    evals its string inside the page: the server's Content-Security-Policy (no 'unsafe-eval') refuses that."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true within {timeout_s} s: {expression}"
        page.wait_for_timeout(100)


def assert_nothing_refused_nor_foreign(page, url):
    refused = [m for m in page.console if "Content Security Policy" in m or "Refused to" in m]
    assert not refused, refused
    foreign = [u for u in page.requested if not u.startswith((url + "/", "data:", "blob:"))]
    assert not foreign, foreign


def test_the_page_and_the_docs_run_under_the_policy_and_fetch_nothing_elsewhere(checkpoint, tmp_path):  # noqa: F811
    image = tmp_path / "chest.png"
    image.write_bytes(png(seed=3))
    with live(create_app(checkpoint)) as url, watched_page(url) as page:
        page.goto(url)
        wait_until(page, "document.getElementById('model').textContent.startsWith('Model:')")  # inline script ran
        assert page.evaluate("getComputedStyle(document.getElementById('drop')).borderStyle") == "dashed"  # inline style
        page.set_input_files("#files", [str(image)])
        page.wait_for_selector(".card img", timeout=30_000)
        assert page.get_attribute(".card img", "src").startswith("data:image/png;base64,")  # the heatmap shows
        page.click("#docs-link")
        wait_until(page, OPERATIONS)
        assert "/api/predict" in page.inner_text("#swagger-ui")
        assert_nothing_refused_nor_foreign(page, url)


def test_the_docs_send_the_token_typed_on_the_page_or_in_their_own_box(checkpoint):  # noqa: F811
    with live(create_app(checkpoint, token="s3cret")) as url, watched_page(url) as page:
        page.goto(f"{url}/docs")
        page.wait_for_selector("#token-form", state="visible")  # the document answered 401: the box asks
        page.fill("#token", "s3cret")
        page.click("#token-form button")
        wait_until(page, OPERATIONS)
        page.goto(url)  # the same tab: the page finds the token the docs stored...
        wait_until(page, "document.getElementById('model').textContent.startsWith('Model:')")
        page.fill("#token", "wrong")
        page.dispatch_event("#token", "change")
        page.goto(f"{url}/docs")  # ...and the docs the one typed on the page
        page.wait_for_selector("#token-form", state="visible")
        assert not page.evaluate(OPERATIONS)
        refused = [m for m in page.console if "Content Security Policy" in m]
        assert not refused, refused
