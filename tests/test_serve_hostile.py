"""The server against hostile clients: oversize chunked and slow uploads, a stuck or dead inference
worker, more decodes than cores, foreign Host headers and cross-site posts, local paths, undefined
metrics, and Schemathesis (a client no one here wrote) against the live server's OpenAPI document.

Every server here listens on 127.0.0.1 only, and every loop and wait is bounded."""

import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("monai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from pneumoscan.apps.serve import create_app  # noqa: E402

from .test_serve import checkpoint, live, png, undefined_metrics_checkpoint  # noqa: E402,F401  (module-scoped fixtures)

ONE = [("files", ("a.png", png(), "image/png"))]


def test_an_oversize_chunked_upload_gets_413_and_the_server_stays_up(checkpoint):  # noqa: F811
    def body():  # no Content-Length: httpx sends it chunked
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    with live(create_app(checkpoint, max_upload_mb=1)) as url:
        r = httpx.post(f"{url}/api/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"},
                       timeout=30)
        assert r.status_code == 413 and "limit is 1 MB" in r.json()["detail"]
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
        assert httpx.post(f"{url}/api/predict", files=ONE, timeout=30).status_code == 200


def test_a_slow_sender_gets_408_in_bounded_time(checkpoint):  # noqa: F811
    with live(create_app(checkpoint, body_timeout_s=1)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                      b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")  # then nothing more
            t0 = time.perf_counter()
            answer = b""
            for _ in range(10):  # the head and the body may come in separate reads
                answer += s.recv(4096)
                if answer.endswith(b"}"):
                    break
            waited = time.perf_counter() - t0
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
        assert waited < 5
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_health_reports_a_dead_inference_worker_and_requests_fail_fast(checkpoint):  # noqa: F811
    app = create_app(checkpoint)
    client = TestClient(app)
    assert client.get("/health").json() == {"status": "ok"}

    def crash(pixels):  # a fault that escapes the per-batch error handling and ends the thread
        raise SystemExit("inference thread crashed")

    app.app.state.predictor.score = crash
    t0 = time.perf_counter()
    r = client.post("/api/predict?heatmap=false", files=ONE)
    assert r.status_code == 503 and "stopped" in r.json()["detail"] and r.headers["retry-after"]
    health = client.get("/health")
    assert health.status_code == 503 and "SystemExit" in health.json()["status"]
    assert client.post("/api/predict", files=ONE).status_code == 503  # later requests too, without waiting
    assert time.perf_counter() - t0 < 5


def stuck_model(monkeypatch):
    """Make every model hang until the returned event is set (or 30 s pass)."""
    from pneumoscan.tasks.predict import Predictor

    real, release = Predictor.score, threading.Event()

    def stuck(self, pixels):
        release.wait(30)
        return real(self, pixels)

    monkeypatch.setattr(Predictor, "score", stuck)
    return release


def timed_post(url):
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/api/predict?heatmap=false", files=ONE, timeout=60)
    return r, time.perf_counter() - t0


def test_health_and_page_answer_while_predictions_wait(checkpoint, monkeypatch):  # noqa: F811
    app = create_app(checkpoint)
    release = stuck_model(monkeypatch)
    try:
        with live(app) as url, ThreadPoolExecutor(48) as pool:
            futures = [pool.submit(timed_post, url) for _ in range(48)]  # more than the 40 threads of the server's pool
            time.sleep(1)
            t0 = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
            assert httpx.get(f"{url}/", timeout=5).status_code == 200
            assert time.perf_counter() - t0 < 2
            release.set()
            codes = {f.result()[0].status_code for f in futures}
    finally:
        release.set()
    assert 200 in codes and codes <= {200, 503}  # scored, or refused as busy with Retry-After


def test_no_prediction_waits_longer_than_the_inference_timeout(checkpoint, monkeypatch):  # noqa: F811
    app = create_app(checkpoint, inference_timeout_s=1)
    release = stuck_model(monkeypatch)
    try:
        with live(app) as url, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: timed_post(url), range(4)))
    finally:
        release.set()
    for r, waited in answers:
        assert r.status_code == 503 and "did not finish within 1 s" in r.json()["detail"] and r.headers["retry-after"]
        assert waited < 5


def test_decode_slots_bound_concurrent_decodes_and_refuse_with_retry_after():
    from pneumoscan.apps.serve import DecodeSlots, Refused

    slots = DecodeSlots(slots=1, max_waiting=1, wait_s=0.3)
    inside, release = threading.Event(), threading.Event()

    def hold():
        inside.set()
        release.wait(10)
        return "held"

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(slots.run, hold)
        assert inside.wait(5)
        waiter = pool.submit(slots.run, lambda: "never")
        for _ in range(100):  # until the second call waits for the slot
            if slots._waiting == 1:
                break
            time.sleep(0.01)
        with pytest.raises(Refused) as refused:  # the slot is taken and the one waiting place too: at once
            slots.run(lambda: "never")
        assert refused.value.status == 503 and refused.value.headers["Retry-After"]
        with pytest.raises(Refused):  # the waiter gives up after wait_s
            waiter.result(5)
        release.set()
        assert first.result(5) == "held"
    assert slots.run(lambda: 7) == 7


def test_giant_images_beyond_the_decoding_slots_get_503_and_the_rest_are_scored(checkpoint):  # noqa: F811
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")  # 81 MP, about 80 KB compressed
    giant = buf.getvalue()
    with live(create_app(checkpoint, decode_slots=1, max_waiting=0)) as url, ThreadPoolExecutor(6) as pool:
        start = threading.Barrier(6)

        def post(_):
            start.wait(10)
            return httpx.post(f"{url}/api/predict?heatmap=false", files=[("files", ("giant.png", giant, "image/png"))],
                              timeout=60)

        answers = list(pool.map(post, range(6)))
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    codes = [r.status_code for r in answers]
    assert 503 in codes and set(codes) <= {200, 422, 503}, codes  # 422: a loader that refuses giants
    assert all(r.headers["retry-after"] and "busy" in r.json()["detail"] for r in answers if r.status_code == 503)


def test_foreign_hosts_and_cross_site_posts_are_refused(checkpoint):  # noqa: F811
    client = TestClient(create_app(checkpoint))
    for host in ("evil.example", "attacker.example:8000", "127.0.0.1.evil.example"):
        r = client.get("/api/model", headers={"host": host})
        assert r.status_code == 400 and "not served here" in r.json()["detail"]
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/api/model", headers={"host": host}).status_code == 200
    for headers in ({"origin": "http://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"},
                    {"sec-fetch-site": "same-site"}):  # another port on localhost is "same-site"
        r = client.post("/api/predict", files=ONE, headers={"host": "127.0.0.1:8000", **headers})
        assert r.status_code == 403 and "cross-site" in r.json()["detail"]
    own_page = {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert client.post("/api/predict", files=ONE, headers=own_page).status_code == 200
    named = TestClient(create_app(checkpoint, allowed_hosts=["xray.example.org"]))
    assert named.get("/health", headers={"host": "xray.example.org"}).status_code == 200
    assert named.get("/health", headers={"host": "evil.example"}).status_code == 400


def test_public_answers_name_no_local_path(checkpoint):  # noqa: F811
    import torch

    data_root = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]["data"]["root"]
    local = [str(checkpoint.parent), str(checkpoint.parent.parent), str(Path(data_root).resolve()), data_root]
    client = TestClient(create_app(checkpoint))
    answers = {route: client.get(route).text for route in ("/", "/api/model", "/api/model-card", "/openapi.json")}
    answers["/api/predict"] = client.post("/api/predict", files=ONE).text
    for route, text in answers.items():
        assert not [p for p in local if p in text], route


def test_undefined_metrics_read_na_and_the_server_starts(undefined_metrics_checkpoint, tmp_path):  # noqa: F811
    from pneumoscan.apps.modelcard import model_card
    from pneumoscan.tasks.report import write_run_report

    ckpt = undefined_metrics_checkpoint
    metrics = json.loads((ckpt.parent / "eval-val" / "metrics.json").read_text())
    assert metrics["precision"] is None and metrics["f1"] is None  # nothing was called pneumonia
    client = TestClient(create_app(ckpt))
    card = client.get("/api/model-card").text
    assert "| precision | n/a | n/a |" in card and "| f1 | n/a | n/a |" in card and "None" not in card
    validation = client.get("/api/model").json()["validation"]
    assert validation["precision"] is None and validation["f1"] is None and validation["n"] == metrics["n"]
    evaluation = (ckpt.parent / "eval-val" / "report.html").read_text()
    run_report = write_run_report(ckpt.parent, ckpt.parent / "eval-val").read_text()
    for report in (evaluation, run_report):
        assert "<td>Precision (PPV)</td><td>n/a" in report and "<td>F1 score</td><td>n/a" in report and "None" not in report
    # without an evaluation file the card lists the checkpoint's own validation record, undefined ones as n/a
    import torch

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["metrics"]["val"]["recall"] = None  # a validation split without pneumonia
    torch.save(saved, tmp_path / "best.pt")
    assert "recall n/a" in model_card(tmp_path / "best.pt")


SCHEMATHESIS_CONFIG = """
# An upload of random bytes is schema-valid but not an image: the documented answer is 422 with each
# file's reason, so a valid-data request may get 422 besides the defaults.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "422"]
"""


def test_schemathesis_finds_no_failure_and_no_5xx_against_the_live_server(checkpoint, tmp_path):  # noqa: F811
    schemathesis = pytest.importorskip("schemathesis")
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is installed but its `st` command is not beside the interpreter"
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    with live(create_app(checkpoint, max_upload_mb=1)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        import requests

        for files, status in ((ONE, 200), ([("files", ("x.txt", b"text", "text/plain"))], 422)):
            r = requests.post(f"{url}/api/predict", files=files, timeout=30)
            assert r.status_code == status
            schema["/api/predict"]["POST"].validate_response(r)  # the answers match the documented models
        run = subprocess.run([st, "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", "all",
                              "--max-examples", "40", "--workers", "1", "--seed", "1", "--generation-database", "none",
                              "--no-color", "--request-timeout", "20"],
                             check=False, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0 and "No issues found" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


def raw_request(port, head, body=b""):
    """A loopback socket that has sent `head` (and the first bytes of a body), then nothing more."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    send_if_open(s, head + body)  # a refusal may close it before the body is all sent: its answer is still there
    return s


def send_if_open(s, data):
    """Send `data` on `s` unless the server has closed the connection."""
    try:
        s.sendall(data)
    except OSError:
        pass


def read_until_closed(s, deadline):
    """What the server sent on `s`, and whether it closed the connection before `deadline` (perf_counter)."""
    data = b""
    try:
        while (left := deadline - time.perf_counter()) > 0:
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:  # closed with the client's bytes unread: a reset, after the answer
        return data, True
    return data, False


@contextlib.contextmanager
def refused_and_left_open(port, head, body, count):
    """`count` connections, one after another: each sends `head` and waits for the answer, then sends
    `body` (a client still sending its upload) and nothing more, and stays open on this side. Yields each
    connection's answer and whether the server closed it within 2 s of answering (it stops at the first one left open)."""
    sockets, answers = [], []
    try:
        for _ in range(count):
            sockets.append(s := raw_request(port, head))
            data, closed = read_until_closed(s, time.perf_counter() + 1)  # the answer, and the close
            send_if_open(s, body)
            more, closed_later = read_until_closed(s, time.perf_counter() + (0 if closed else 1))
            answers.append((data + more, closed or closed_later))
            if not answers[-1][1]:
                break
        yield answers
    finally:
        for s in sockets:
            s.close()


def test_64_idle_refused_connections_are_closed_and_health_stays_up(checkpoint):  # noqa: F811
    # 64 is serve's --max-connections: refused connections left open would take every place
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 2097152\r\nAuthorization: Bearer wrong\r\n\r\n")
    with live(create_app(checkpoint, token="s3cret"), max_connections=64) as url:
        port = int(url.rsplit(":", 1)[1])
        with refused_and_left_open(port, head, b"\0" * 65536, 64) as answers:  # part of the 2 MB, then idle
            t0 = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}  # the 64 still open on this side
            assert time.perf_counter() - t0 < 2
    assert len(answers) == 64
    for data, closed in answers:
        head = data.lower()
        assert head.startswith(b"http/1.1 401") and b"\r\nconnection: close\r\n" in head, data[:300]
        assert b"\r\nwww-authenticate: bearer" in head and closed


def test_64_oversize_chunked_uploads_get_413_and_their_connections_closed(checkpoint):  # noqa: F811
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n") + b"%x\r\n%s\r\n" % (len(part), part)
    chunks = (b"10000\r\n" + b"\0" * 65536 + b"\r\n") * 20  # 1.25 MB of a body with no end, over the 1 MB limit
    with live(create_app(checkpoint, max_upload_mb=1), max_connections=64) as url:
        port = int(url.rsplit(":", 1)[1])
        with refused_and_left_open(port, head + chunks, chunks, 64) as answers:
            assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
        assert httpx.post(f"{url}/api/predict", files=ONE, timeout=30).status_code == 200
    assert len(answers) == 64
    for data, closed in answers:
        assert data.startswith(b"HTTP/1.1 413") and b"limit is 1 MB" in data and closed, data[:300]
        assert b"\r\nconnection: close\r\n" in data.lower()


def slow_head(port, seconds):
    """Send a request head a byte every 0.1 s; how long the server let it go on and what it answered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 100
    t0 = time.perf_counter()
    data, closed = b"", False
    with s:
        for i in range(int(seconds / 0.1)):
            try:
                s.sendall(head[i:i + 1])
            except OSError:
                closed = True
                break
            data, closed = read_until_closed(s, time.perf_counter() + 0.1)
            if closed:
                break
    return time.perf_counter() - t0, data, closed


def test_slow_and_silent_head_senders_are_cut_off_and_health_stays_up(checkpoint):  # noqa: F811
    with live(create_app(checkpoint), max_connections=16, head_timeout_s=1) as url:
        port = int(url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(28) as pool:
            slow = [pool.submit(slow_head, port, 6) for _ in range(24)]  # 3x the 8 that may wait for a head
            silent = [raw_request(port, b"") for _ in range(4)]  # connect and send nothing
            time.sleep(0.5)
            for _ in range(5):
                t0 = time.perf_counter()
                assert httpx.get(f"{url}/health", timeout=2).json() == {"status": "ok"}
                assert time.perf_counter() - t0 < 1
                time.sleep(0.2)
            answers = [f.result(30) for f in slow]
            cut = [read_until_closed(s, time.perf_counter() + 3) for s in silent]
    for waited, data, closed in answers:
        assert closed and waited < 2.5, (waited, data)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data  # 408 once part of a head came
    assert any(data.startswith(b"HTTP/1.1 408") for _, data, _ in answers)
    assert all(closed and data == b"" for data, closed in cut)
    for s in silent:
        s.close()
