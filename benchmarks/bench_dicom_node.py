#!/usr/bin/env python3
"""The DICOM node's throughput beside a real PACS: Orthanc sends N radiographs, the reports come back.

One run: N real images of the data set (the first N/2 of NORMAL/ and of PNEUMONIA/) are made into DX
instances by DCMTK (grey JPEG -> img2dcm -> JPEG-LS with ``dcmcjpls``, or JPEG lossless with
``dcmcjpeg +el`` under ``--codec jpeg-lossless``) and uploaded to an Orthanc started on loopback (not
timed). Then, timed from one clock start:

- store: Orthanc's ``POST /modalities/pneumoscan/store`` with every instance id, synchronous: one
  association, N C-STOREs, each answered by the node once the instance is scored and its row written
  (instances/s = N / this time);
- end to end: until all N Structured Reports are in Orthanc (they are sent back by the node's sender
  thread while later instances are still being scored).

The node is ``pneumoscan dicom-node`` as a subprocess, as deployed. Prints a table and one JSON line.

    .venv/bin/python benchmarks/bench_dicom_node.py [--checkpoint runs/x/best.pt] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_dicom_node import NodeProcess, Orthanc, free_port, make_radiograph  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / ".." / "fresh" / "runs" / "paper-quickstart" / "best.pt"
DEFAULT_DATA = Path(os.environ.get("PNEUMOSCAN_DATA", ".")) / "train"  # the README's data folder


def make_instances(data: Path, n: int, folder: Path, codec: str) -> list[Path]:
    jpegs = [f for cls in ("NORMAL", "PNEUMONIA") for f in sorted((data / cls).iterdir())[: n // 2]]
    return [make_radiograph(j, folder / f"{i:04d}.dcm", patient_id=f"BENCH-{i:04d}", codec=codec)
            for i, j in enumerate(jpegs)]


def count_reports(pacs: Orthanc) -> int:
    found = pacs.http.post("/tools/find", json={"Level": "Series", "Query": {"Modality": "SR"}})
    found.raise_for_status()
    return len(found.json())


def run(args: argparse.Namespace, work: Path) -> dict:
    t = time.perf_counter()
    files = make_instances(Path(args.data), args.n, work / "instances", args.codec)
    made_s = time.perf_counter() - t
    node_port = free_port()
    pacs = Orthanc(work / "orthanc", {"pneumoscan": ("PNEUMOSCAN", "127.0.0.1", node_port)})
    node = None
    try:
        node = NodeProcess([str(args.checkpoint), "--out", str(work / "node"), "--port", str(node_port),
                            "--send-to", f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "--device", "cpu"], work / "cache")
        node.wait_for("listening on", timeout=300)
        ids = [pacs.upload(f.read_bytes())["ID"] for f in files]
        start = time.perf_counter()
        r = pacs.store("pneumoscan", ids)
        stored_s = time.perf_counter() - start
        if r.status_code != 200:
            raise RuntimeError(f"Orthanc could not send the instances: {r.status_code} {r.text}")
        deadline = time.monotonic() + args.timeout
        while (reports := count_reports(pacs)) < len(ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {reports} of {len(ids)} reports came back within {args.timeout:g} s")
            time.sleep(0.05)
        end_to_end_s = time.perf_counter() - start
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
    sizes = [f.stat().st_size for f in files]
    return {"instances": len(files), "codec": args.codec, "mean_instance_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "checkpoint": str(args.checkpoint), "store_seconds": round(stored_s, 2),
            "instances_per_s": round(len(files) / stored_s, 1), "end_to_end_seconds": round(end_to_end_s, 2),
            "reports_per_s": round(len(files) / end_to_end_s, 1), "made_seconds": round(made_s, 1),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a train folder with NORMAL/ and PNEUMONIA/ (default: $PNEUMOSCAN_DATA/train)")
    p.add_argument("--n", type=int, default=200, help="instances (half of each class)")
    p.add_argument("--codec", choices=["jpls", "jpeg-lossless"], default="jpls")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the reports")
    args = p.parse_args()
    if not args.checkpoint.exists():
        sys.exit(f"no checkpoint at {args.checkpoint}: pass --checkpoint")
    with tempfile.TemporaryDirectory(prefix="bench-dicom-node-") as work:
        s = run(args, Path(work))
    print(f"DICOM node beside Orthanc: {s['instances']} DX instances ({s['codec']}, {s['mean_instance_kb']} KB each "
          f"on average), one association")
    print(f"{'stage':<34}{'seconds':>9}{'per s':>8}")
    print(f"{'Orthanc -> node, scored (C-STORE)':<34}{s['store_seconds']:>9.2f}{s['instances_per_s']:>8.1f}")
    print(f"{'until every report is in Orthanc':<34}{s['end_to_end_seconds']:>9.2f}{s['reports_per_s']:>8.1f}")
    print(json.dumps(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
