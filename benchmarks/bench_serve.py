#!/usr/bin/env python3
"""Load test of `pneumoscan serve` on loopback: concurrent clients posting X-rays for a bounded time.

Starts the server as a subprocess on 127.0.0.1, then runs three phases of `--seconds` each with
`--clients` threads: (1) good uploads only; (2) good uploads mixed with bad ones (empty, truncated,
text, random bytes) at `--bad-share`; (3) hostile: good uploads mixed at `--bad-share` with
decompression bombs (a PNG that claims 900 MP, a 98 MP one of zeros) and 16-bit giants (49 MP), while
two more clients send their bodies a byte a second, one more streams oversize chunked uploads, rounds of
`--idle-refused` connections each send the head of a 2 MB upload with a wrong token and part of its body
and then nothing, `--slow-heads` clients send request heads a byte a second (reconnecting when cut off),
and /health is asked twice a second. The server runs with a token, which the other clients send.
Reports requests/s, p50/p99 latency, status codes per kind of upload, whether the server answered
/health after each phase, /health's latency during the hostile phase, how long the slow heads were held,
and the server's peak resident memory (VmHWM) after each phase. Traffic goes to 127.0.0.1 only, and
every loop is bounded.

    .venv/bin/python benchmarks/bench_serve.py --checkpoint runs/x/best.pt [--clients 8 --seconds 30] [--no-heatmap]

`--backend` is the server's (default auto). `--compare-backends torch,onnx,openvino,openvino-bf16` instead
runs only the good-uploads phase (probabilities only) once per backend, each on a fresh server, and
reports requests/s and p50/p99 side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import io
import zlib
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def bad_payloads(good: bytes) -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    return [("empty.jpeg", b""), ("truncated.jpeg", good[: len(good) // 3]), ("notes.txt", b"this is not an X-ray"),
            ("noise.png", bytes(rng.getrandbits(8) for _ in range(4096)))]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def hostile_payloads() -> list[tuple[str, bytes]]:
    """Decompression bombs and 16-bit giants, each small on the wire."""
    header = png(np.zeros((8, 8), np.uint8))
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    liar = header[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + header[33:]
    ramp = (np.arange(7000, dtype=np.uint32)[None, :] * 9 + np.arange(7000, dtype=np.uint32)[:, None]).astype(np.uint16)
    return [("bomb-900mp-header.png", liar), ("bomb-98mp-zeros.png", png(np.zeros((9900, 9900), np.uint8))),
            ("giant-16bit-49mp.png", png(ramp))]


TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def count(codes: dict, lock: threading.Lock, key: str, n: int = 1) -> None:
    with lock:
        codes[key] = codes.get(key, 0) + n


def slow_sender(port: int, deadline: float, codes: dict, lock: threading.Lock) -> None:
    """Send the head of an upload, then one byte a second, until the server answers (or the phase ends)."""
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n"
                          b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                          b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
                answer = b""
                while not answer and time.perf_counter() < deadline + 60:
                    try:
                        answer = s.recv(64)
                    except TimeoutError:
                        s.sendall(b"x")
                code = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "no answer"
        except OSError as e:
            code = f"transport error: {type(e).__name__}"
        with lock:
            codes[f"slow sender {code}"] = codes.get(f"slow sender {code}", 0) + 1


def chunked_oversize(url: str, deadline: float, codes: dict, lock: threading.Lock) -> None:
    """Stream uploads over the limit without a Content-Length (chunked), one after another."""
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="huge.png"\r\n\r\n'
        for _ in range(400):  # 25 MB, over the default 20 MB limit
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    with httpx.Client(timeout=30, headers=AUTH) as client:
        while time.perf_counter() < deadline:
            try:
                code = str(client.post(f"{url}/api/predict", content=body(),
                                       headers={"content-type": "multipart/form-data; boundary=b"}).status_code)
            except httpx.HTTPError as e:
                code = f"transport error: {type(e).__name__}"
            with lock:
                codes[f"chunked oversize {code}"] = codes.get(f"chunked oversize {code}", 0) + 1


def answer_and_close(s: socket.socket, within: float) -> tuple[bytes, bool]:
    """What the server sent on `s` within `within` seconds, and whether it closed the connection."""
    data, end = b"", time.perf_counter() + within
    try:
        while (left := end - time.perf_counter()) > 0:
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except TimeoutError:
        pass
    except OSError:  # reset: closed with the client's bytes unread
        return data, True
    return data, False


def idle_refused(port: int, n: int, deadline: float, codes: dict, lock: threading.Lock) -> None:
    """Rounds of `n` connections, each sending a 2 MB upload's head with a wrong token and 64 KB of its
    body, then nothing for 5 s: counted by answer, and as "left open" when the server kept one 3 s after
    answering."""
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 2097152\r\n\r\n")
    while time.perf_counter() < deadline:
        sockets, round_end = [], time.perf_counter() + 5
        try:
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                sockets.append(s)
                try:
                    s.sendall(head + b"\0" * 65536)
                except OSError:
                    pass
            for s in sockets:
                data, closed = answer_and_close(s, 3)
                code = data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else "none"
                count(codes, lock, f"idle refused {code}" if closed else f"idle refused {code} left open")
            time.sleep(max(0.0, min(round_end, deadline) - time.perf_counter()))  # idle, the sockets still open here
        except OSError as e:
            count(codes, lock, f"idle refused transport error: {type(e).__name__}")
        finally:
            for s in sockets:
                s.close()


def slow_head(port: int, deadline: float, codes: dict, lock: threading.Lock, held: list) -> None:
    """Send a request head a byte a second until the server cuts it off, again and again; `held` gets how
    long each connection lasted."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 1000
    while time.perf_counter() < deadline:
        t0, data, closed = time.perf_counter(), b"", False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                for i in range(len(head)):
                    if time.perf_counter() > deadline + 30:
                        break
                    s.sendall(head[i:i + 1])
                    data, closed = answer_and_close(s, 1)
                    if closed:
                        break
        except OSError:
            closed = True
        code = data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else ("closed" if closed else "held")
        count(codes, lock, f"slow head {code}" if code != "held" else "slow head still open")
        with lock:
            held.append(time.perf_counter() - t0)


def health_poller(url: str, deadline: float, codes: dict, lock: threading.Lock, latency: list) -> None:
    """Ask /health twice a second; `latency` gets each answer's seconds (None for no answer)."""
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            code = str(httpx.get(f"{url}/health", timeout=5).status_code)
            with lock:
                latency.append(time.perf_counter() - t0)
        except httpx.HTTPError as e:
            code = f"transport error: {type(e).__name__}"
            with lock:
                latency.append(None)
        count(codes, lock, f"health {code}")
        time.sleep(max(0.0, 0.5 - (time.perf_counter() - t0)))


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (Linux VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def phase(url: str, images: list[tuple[str, bytes]], bad: list[tuple[str, bytes]], clients: int, seconds: float,
          bad_share: float, heatmap: bool, extra: tuple = ()) -> dict:
    """`clients` threads posting for `seconds`; `extra` names more client loops, called as f(deadline, codes, lock).
    Status codes are counted per kind of upload ("good", the bad file's name, or the extra loop's kind)."""
    deadline = time.perf_counter() + seconds
    lat: list[float] = []
    codes: dict[str, int] = {}
    good_lat: list[float] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(timeout=30, headers=AUTH) as client:
            while time.perf_counter() < deadline:
                is_bad = bool(bad) and rng.random() < bad_share
                name, data = rng.choice(bad) if is_bad else rng.choice(images)
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/api/predict", params={"heatmap": str(heatmap).lower()},
                                    files=[("files", (name, data, "application/octet-stream"))])
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = f"transport error: {type(e).__name__}"
                dt = time.perf_counter() - t0
                key = f"{name if is_bad else 'good'} {code}"
                with lock:
                    lat.append(dt)
                    codes[key] = codes.get(key, 0) + 1
                    if not is_bad:
                        good_lat.append(dt)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    threads += [threading.Thread(target=f, args=(deadline, codes, lock)) for f in extra]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summary(lat, good_lat, codes, wall, httpx.get(f"{url}/health", timeout=10).status_code == 200)


def is_server_error(key: str, code: str) -> bool:
    """A transport error, a 5xx other than 503 (busy), or a connection the server should have closed and did not."""
    if key.endswith(("left open", "still open")):
        return True
    if key.startswith("slow head "):  # cut off: with 408, or closed without an answer
        return False
    return not code.isdigit() or (code.startswith("5") and code != "503")


def summary(lat: list[float], good_lat: list[float], codes: dict[str, int], wall: float, healthy: bool) -> dict:
    """Rates, latencies, codes per kind and the server errors among them (`is_server_error`)."""
    ms = np.array(lat) * 1000
    code_of = {key: key.rsplit(" ", 1)[-1] for key in codes}
    server_errors = sum(n for k, n in codes.items() if is_server_error(k, code_of[k]))
    good_answered = sum(n for k, n in codes.items() if k.startswith("good ") and code_of[k] == "200")
    return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "status_codes": dict(sorted(codes.items())),
            "server_errors": server_errors, "busy_503": sum(n for k, n in codes.items() if code_of[k] == "503"),
            "good_scored": good_answered, "good_requests": len(good_lat),
            "good_p99_ms": round(float(np.percentile(np.array(good_lat) * 1000, 99)), 1) if good_lat else None,
            "healthy_after": healthy}


def start_server(args: argparse.Namespace, url: str) -> subprocess.Popen:
    """`pneumoscan serve` with a token on loopback, once it answers /health (at most 60 s)."""
    server = subprocess.Popen([sys.executable, "-m", "pneumoscan", "serve", args.checkpoint, "--port", str(args.port),
                               "--backend", args.backend,
                               "--max-batch", str(args.max_batch), "--body-timeout", str(args.body_timeout),
                               "--token", TOKEN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    for _ in range(120):  # bounded wait for start-up
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("server did not start within 60 s")


def hostile_phase(args: argparse.Namespace, url: str, images: list, heatmap: bool) -> dict:
    """The hostile phase: bombs and giants among the uploads, and every hostile client beside them."""
    held: list[float] = []
    latency: list[float | None] = []
    extra = (lambda d, c, lock: slow_sender(args.port, d, c, lock),) * 2 + (
        lambda d, c, lock: chunked_oversize(url, d, c, lock),
        lambda d, c, lock: idle_refused(args.port, args.idle_refused, d, c, lock),
        lambda d, c, lock: health_poller(url, d, c, lock, latency),
    ) + (lambda d, c, lock: slow_head(args.port, d, c, lock, held),) * args.slow_heads
    result = phase(url, images, hostile_payloads(), args.clients, args.seconds, args.bad_share, heatmap, extra)
    answered = [t for t in latency if t is not None]
    result["health"] = {"asked": len(latency), "ok": result["status_codes"].get("health 200", 0),
                        "p50_ms": round(float(np.percentile(answered, 50)) * 1000, 1) if answered else None,
                        "max_ms": round(max(answered) * 1000, 1) if answered else None}
    result["slow_heads_held_s"] = {"connections": len(held), "max": round(max(held), 1) if held else None,
                                   "p50": round(float(np.percentile(held, 50)), 1) if held else None}
    return result


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it, and the cores this process may use."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        name = "?"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def print_report(results: dict, rss: dict, alive: bool) -> None:
    for name, r in results.items():
        print(f"{name:16} {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
              f"good scored {r['good_scored']}/{r['good_requests']}  server errors {r['server_errors']}  "
              f"503 busy {r['busy_503']}  healthy after: {r['healthy_after']}  peak RSS {rss[name.split()[0]]} MB")
        print(f"{'':16} codes {r['status_codes']}")
    hostile = results["hostile"]
    print(f"/health during the hostile phase: {hostile['health']}; slow heads held (s): {hostile['slow_heads_held_s']}")
    print(f"server alive after all phases: {alive}; peak RSS {max(v for v in rss.values() if v)} MB")


def compare_backends(args: argparse.Namespace, url: str, images: list) -> int:
    """The good-uploads phase, probabilities only, on a fresh server per backend."""
    results = {}
    for backend in args.compare_backends.split(","):
        args.backend = backend
        server = start_server(args, url)
        try:
            phase(url, images, [], 2, 3, 0, False)  # warm-up
            results[backend] = phase(url, images, [], args.clients, args.seconds, 0, False)
        finally:
            server.terminate()
            server.wait(timeout=30)
    for backend, r in results.items():
        print(f"{backend:16} {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
              f"good scored {r['good_scored']}/{r['good_requests']}  server errors {r['server_errors']}")
    print(json.dumps({"clients": args.clients, "seconds": args.seconds, "heatmap": False, "max_batch": args.max_batch,
                      "backends": results, "machine": cpu_name(), "date": time.strftime("%Y-%m-%d")}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=str(Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train"), help="a train folder (default: $PNEUMOSCAN_DATA/train)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--bad-share", type=float, default=0.25)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--no-heatmap", action="store_true", help="ask for probabilities only")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: no batching)")
    ap.add_argument("--body-timeout", type=float, default=10, help="the server's --body-timeout (slow senders get 408)")
    ap.add_argument("--idle-refused", type=int, default=64, help="connections per round that are refused, then idle")
    ap.add_argument("--slow-heads", type=int, default=40, help="clients sending request heads a byte a second")
    ap.add_argument("--backend", default="auto", help="the server's --backend (default: auto)")
    ap.add_argument("--compare-backends", help="comma-separated backends: the good-uploads phase once per backend")
    args = ap.parse_args()

    files = sorted(Path(args.data).rglob("*.jpeg"))
    images = [(p.name, p.read_bytes()) for p in random.Random(0).sample(files, min(64, len(files)))]
    url = f"http://127.0.0.1:{args.port}"
    heatmap = not args.no_heatmap
    if args.compare_backends:
        return compare_backends(args, url, images)
    server = start_server(args, url)
    try:
        phase(url, images, [], 2, 3, 0, heatmap)  # warm-up
        rss = {"after start": peak_rss_mb(server.pid)}
        results = {"good uploads": phase(url, images, [], args.clients, args.seconds, 0, heatmap)}
        rss["good"] = peak_rss_mb(server.pid)
        results["mixed with bad"] = phase(url, images, bad_payloads(images[0][1]), args.clients, args.seconds,
                                          args.bad_share, heatmap)
        rss["mixed"] = peak_rss_mb(server.pid)
        results["hostile"] = hostile_phase(args, url, images, heatmap)
        rss["hostile"] = peak_rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    print_report(results, rss, alive)
    print(json.dumps({"clients": args.clients, "seconds": args.seconds, "heatmap": heatmap, "max_batch": args.max_batch,
                      "idle_refused": args.idle_refused, "slow_heads": args.slow_heads, **results,
                      "server_alive_after": alive, "peak_rss_mb": rss, "machine": cpu_name(),
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
