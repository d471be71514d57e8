#!/usr/bin/env python3
"""Load test of `pneumoscan serve` on loopback: concurrent clients posting X-rays for a bounded time.

Starts the server as a subprocess on 127.0.0.1, then runs two phases of `--seconds` each with
`--clients` threads: (1) good uploads only; (2) good uploads mixed with bad ones (empty, truncated,
text, random bytes) at `--bad-share`. Reports requests/s, p50/p99 latency, status codes, and whether the
server answered /health after each phase. Traffic goes to 127.0.0.1 only, and every loop is bounded.

    .venv/bin/python benchmarks/bench_serve.py --checkpoint runs/x/best.pt [--clients 8 --seconds 30] [--no-heatmap]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def bad_payloads(good: bytes) -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    return [("empty.jpeg", b""), ("truncated.jpeg", good[: len(good) // 3]), ("notes.txt", b"this is not an X-ray"),
            ("noise.png", bytes(rng.getrandbits(8) for _ in range(4096)))]


def phase(url: str, images: list[tuple[str, bytes]], bad: list[tuple[str, bytes]], clients: int, seconds: float,
          bad_share: float, heatmap: bool) -> dict:
    deadline = time.perf_counter() + seconds
    lat: list[float] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(timeout=30) as client:
            while time.perf_counter() < deadline:
                name, data = rng.choice(bad) if bad and rng.random() < bad_share else rng.choice(images)
                t0 = time.perf_counter()
                try:
                    r = client.post(f"{url}/api/predict", params={"heatmap": str(heatmap).lower()},
                                    files=[("files", (name, data, "application/octet-stream"))])
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = f"transport error: {type(e).__name__}"
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    server_errors = sum(n for c, n in codes.items() if not c.isdigit() or c.startswith("5"))
    return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "status_codes": codes, "server_errors": server_errors,
            "healthy_after": healthy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "chest_xray" / "train"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--bad-share", type=float, default=0.25)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--no-heatmap", action="store_true", help="ask for probabilities only")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (1: no batching)")
    args = ap.parse_args()

    files = sorted(Path(args.data).rglob("*.jpeg"))
    images = [(p.name, p.read_bytes()) for p in random.Random(0).sample(files, min(64, len(files)))]
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "pneumoscan", "serve", args.checkpoint, "--port", str(args.port),
                               "--max-batch", str(args.max_batch)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        for _ in range(120):  # bounded wait for start-up
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise SystemExit("server did not start")
        heatmap = not args.no_heatmap
        phase(url, images, [], 2, 3, 0, heatmap)  # warm-up
        good = phase(url, images, [], args.clients, args.seconds, 0, heatmap)
        mixed = phase(url, images, bad_payloads(images[0][1]), args.clients, args.seconds, args.bad_share, heatmap)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"clients": args.clients, "seconds": args.seconds, "heatmap": heatmap, "max_batch": args.max_batch,
              "good": good, "mixed": mixed,
              "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    for name, r in (("good uploads", good), ("mixed with bad", mixed)):
        print(f"{name:16} {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
              f"codes {r['status_codes']}  server errors {r['server_errors']}  healthy after: {r['healthy_after']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
