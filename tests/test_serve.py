"""The HTTP API in-process: predictions with heatmaps, per-file errors, limits, token, model card, page."""

import contextlib
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("monai")
from fastapi.testclient import TestClient  # noqa: E402

from pneumoscan.apps.serve import create_app  # noqa: E402

from .test_train_checkpoint import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pneumoscan.tasks.train import train

    from .conftest import make_dataset

    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(root / "data")
    train(tiny_config(data, epochs=1), root / "run", device="cpu", progress=False)
    return root / "run" / "best.pt"


@pytest.fixture(scope="module")
def undefined_metrics_checkpoint(checkpoint, tmp_path_factory):
    """A copy of the run whose model calls nothing pneumonia (last layer zeroed, bias -30), evaluated on
    validation: its precision and F1 are undefined (None in metrics.json)."""
    import shutil

    import torch

    from pneumoscan.tasks.evaluate import evaluate

    run = tmp_path_factory.mktemp("undefined-metrics")
    for f in ("split.json", "config.json", "summary.json", "metrics.jsonl"):
        shutil.copy(checkpoint.parent / f, run / f)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    last = [k for k in ckpt["state_dict"] if k.endswith(".weight")][-1].removesuffix(".weight")  # the output layer
    ckpt["state_dict"][f"{last}.weight"].zero_()
    ckpt["state_dict"][f"{last}.bias"].fill_(-30.0)
    torch.save(ckpt, run / "best.pt")
    evaluate(run / "best.pt", "val", run / "eval-val", device="cpu", progress=False)
    return run / "best.pt"


def png(size=(64, 64), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, size[::-1], dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def live(app, **config):
    """The app under a real uvicorn on a free loopback port, in a thread, configured as `pneumoscan serve`
    configures it (`serve_http.server_config`, `config` passed on); yields its base URL."""
    import uvicorn

    from pneumoscan.apps.serve_http import server_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(app, port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def client(checkpoint):
    return TestClient(create_app(checkpoint, max_upload_mb=1))


def test_predict_several_files_with_heatmaps_and_a_bad_one(client):
    files = [("files", ("a.png", png(seed=1), "image/png")), ("files", ("../../etc/passwd", b"not an image", "text/plain")),
             ("files", ("b.png", png((80, 60), seed=2), "image/png"))]
    r = client.post("/api/predict", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["filename"] for x in res] == ["a.png", "passwd", "b.png"]  # names shown, never used as paths
    for x in (res[0], res[2]):
        assert 0 <= x["p_pneumonia"] <= 1 and x["label"] in x["class_names"] and x["error"] is None
        heat = Image.open(io.BytesIO(__import__("base64").b64decode(x["heatmap_png"])))
        assert heat.mode == "RGB"
    assert Image.open(io.BytesIO(__import__("base64").b64decode(res[2]["heatmap_png"]))).size == (80, 60)
    assert "not a recognised image" in res[1]["error"] and res[1]["p_pneumonia"] is None


def test_no_heatmap_on_request_and_same_probability(client):
    one = [("files", ("a.png", png(seed=1), "image/png"))]
    a = client.post("/api/predict", files=one).json()["results"][0]
    b = client.post("/api/predict?heatmap=false", files=one).json()["results"][0]
    assert b["heatmap_png"] is None and abs(a["p_pneumonia"] - b["p_pneumonia"]) < 1e-6
    # the out-of-distribution score rides along either way, with its flag against the model's threshold
    threshold = client.get("/api/model").json()["ood_threshold"]
    assert a["ood_score"] == pytest.approx(b["ood_score"], rel=1e-4) and a["ood_score"] >= 0
    assert a["outside_training"] == (a["ood_score"] >= threshold) == b["outside_training"]


def test_bad_requests_get_clear_4xx_and_the_server_stays_up(client):
    assert client.post("/api/predict", files=[("files", ("x.txt", b"hello", "text/plain"))]).status_code == 422
    assert client.post("/api/predict", json={"a": 1}).status_code == 415
    assert client.post("/api/predict", files=[("other", ("a.png", png(), "image/png"))]).status_code == 400
    big = client.post("/api/predict", files=[("files", ("big.png", b"\0" * (2 * 1024 * 1024), "image/png"))])
    assert big.status_code == 413 and "limit is 1 MB" in big.json()["detail"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.post("/api/predict", files=[("files", ("a.png", png(), "image/png"))]).status_code == 200


def test_token_protects_the_api_and_its_schema_but_not_the_page(checkpoint):
    client = TestClient(create_app(checkpoint, token="s3cret"))
    for route in ("/api/model", "/api/model-card", "/openapi.json", "/redoc", "/no-such-route"):
        r = client.get(route)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), route
        assert "Authorization: Bearer <token>" in r.json()["detail"] and r.headers["connection"] == "close"
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme's name is case-insensitive
        assert client.get("/api/model", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200, scheme
    for wrong in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer", "Bearers3cret"):
        r = client.get("/api/model", headers={"Authorization": wrong})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"], wrong
    r = client.post("/api/predict", files=[("files", ("a.png", png(), "image/png"))], headers={"Authorization": "bearer s3cret"})
    assert r.status_code == 200
    for route in ("/", "/health", "/docs", "/static/docs.js", "/static/swagger-ui-bundle.js", "/static/swagger-ui.css"):
        assert client.get(route).status_code == 200, route  # open: the page, the health check, the docs' files


def test_the_openapi_document_declares_the_bearer_scheme_a_generated_client_sends(checkpoint):
    schema = TestClient(create_app(checkpoint, token="s3cret")).get(
        "/openapi.json", headers={"Authorization": "Bearer s3cret"}).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["bearer"]["description"]}
    assert schema["security"] == [{"bearer": []}]  # every operation needs it...
    assert schema["paths"]["/health"]["get"]["security"] == []  # ...but the health check
    assert "security" not in schema["paths"]["/api/predict"]["post"]
    open_schema = TestClient(create_app(checkpoint)).get("/openapi.json").json()  # no token: the scheme, not required
    assert "bearer" in open_schema["components"]["securitySchemes"] and "security" not in open_schema


SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def test_every_answer_carries_the_security_headers_and_a_policy_of_self(client):
    import base64
    import hashlib
    import re

    page = client.get("/")
    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'"
    assert "unsafe" not in page.headers["content-security-policy"] and "http" not in page.headers["content-security-policy"]
    for tag in ("script", "style"):  # the page's inline blocks are allowed by their hash, and nothing else inline
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, re.DOTALL)
        digests = [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]
        assert len(blocks) == 1 and policy[f"{tag}-src"].split() == ["'self'", *digests]
    big = client.post("/api/predict", files=[("files", ("big.png", b"\0" * (2 * 1024 * 1024), "image/png"))])
    for r in (page, client.get("/health"), client.get("/docs"), client.get("/api/model"), big,
              client.get("/api/model", headers={"host": "evil.example"})):
        assert {k: r.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, r.url
        assert r.headers["content-security-policy"] == page.headers["content-security-policy"]
    assert big.status_code == 413 and big.headers["connection"] == "close"


def test_the_docs_page_loads_swagger_ui_from_this_server_only(client):
    import re

    docs = client.get("/docs")
    assert docs.headers["content-type"].startswith("text/html") and "<script>" not in docs.text and "style=" not in docs.text
    assert "//" not in docs.text  # no URL of another host, absolute or protocol-relative
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert sorted(assets) == ["static/docs.js", "static/swagger-ui-bundle.js", "static/swagger-ui.css"]
    kinds = {".js": "text/javascript", ".css": "text/css"}
    for asset in assets:
        r = client.get(f"/{asset}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kinds[asset[asset.rfind("."):]]), asset
    assert "SwaggerUIBundle" in client.get("/static/swagger-ui-bundle.js").text
    assert client.get("/redoc").status_code == 404  # ReDoc is not served (see docs/serving.md)


def test_model_info_card_page_and_openapi(client):
    info = client.get("/api/model").json()
    assert info["class_names"] == ["NORMAL", "PNEUMONIA"] and "not a medical device" in info["disclaimer"]
    card = client.get("/api/model-card").text
    assert "## Intended use" in card and "## Limitations" in card and "Pediatric" in card
    assert f"at or above {info['ood_threshold']:.2f}" in card and "outside what this model was trained on" in card
    page = client.get("/")
    assert "not a medical device" in page.text and "api/predict" in page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_the_page_is_the_packaged_file_and_links_the_docs_and_the_model_card(client):
    from importlib.resources import files

    packaged = files("pneumoscan.apps").joinpath("static", "index.html").read_text(encoding="utf-8")
    page = client.get("/").text
    assert page == packaged
    assert 'href="docs"' in page and 'href="api/model-card"' in page  # relative: they work behind a path prefix
    assert client.get("/docs").status_code == 200


def test_model_card_reports_confidence_intervals_from_an_evaluation(checkpoint):
    from pneumoscan.apps.modelcard import model_card

    card = model_card(checkpoint, checkpoint.parent / "eval-val" / "metrics.json") \
        if (checkpoint.parent / "eval-val" / "metrics.json").is_file() else None
    if card is None:
        from pneumoscan.tasks.evaluate import evaluate

        evaluate(checkpoint, "val", checkpoint.parent / "eval-val", device="cpu", progress=False)
        card = model_card(checkpoint, checkpoint.parent / "eval-val" / "metrics.json")
    assert "95% CI" in card and "| roc_auc |" in card


def test_concurrent_images_are_batched_and_each_gets_its_own_result(checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    from pneumoscan.tasks.explain import cam_for_pixels
    from pneumoscan.tasks.predict import Predictor
    from pneumoscan.tasks.scoring import InferenceBatcher

    predictor = Predictor(checkpoint, device="cpu")
    batcher = InferenceBatcher(predictor, max_batch=4)
    pixels = np.random.default_rng(1).integers(0, 256, (10, 48, 48), dtype=np.uint8)
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda i: batcher.score(pixels[i], heatmap=i % 2 == 0), range(10)))
    for i, (heat, prob, class_probs, ood) in enumerate(results):
        assert class_probs is None  # a binary model
        assert ood == pytest.approx(float(predictor.ood_scores(pixels[i][None])[0]), rel=1e-4)
        alone_heat, alone_prob = cam_for_pixels(predictor, pixels[i])
        assert prob == pytest.approx(alone_prob, abs=1e-5)
        assert (heat is None) if i % 2 else np.allclose(heat, alone_heat, atol=1e-4)


def test_an_inference_failure_reaches_the_request_and_the_batcher_lives_on(checkpoint):
    from pneumoscan.tasks.predict import Predictor
    from pneumoscan.tasks.scoring import InferenceBatcher

    batcher = InferenceBatcher(Predictor(checkpoint, device="cpu"))
    with pytest.raises(RuntimeError):
        batcher.score(np.zeros((48, 48, 5), dtype=np.uint8), heatmap=False)  # not a grey image: the model refuses it
    _, prob, _, _ = batcher.score(np.zeros((48, 48), dtype=np.uint8), heatmap=False)
    assert 0 <= prob <= 1
