#!/usr/bin/env python3
"""`pneumoscan dicomweb` against the DICOM node on the same radiographs, each beside its own Orthanc.

N real images of the data set (the first N/2 of NORMAL/ and of PNEUMONIA/) are made into DX instances by DCMTK
(JPEG-LS, as `bench_dicom_node.py` makes them; not timed). Then, on the same instances:

- DICOMweb: an Orthanc with its DICOMweb plugin holds them; `pneumoscan dicomweb --store-results` runs as a
  subprocess, as deployed. Timed: its pass, from the QIDO-RS search to the last report stored by STOW-RS (the
  seconds it prints; loading the model is not in them), and the whole command (start to exit, model and
  Python start included).
- DIMSE: `bench_dicom_node.run`: Orthanc sends them to `pneumoscan dicom-node` over one association, timed until
  every report is back in Orthanc (the node was started, and its model loaded, before the clock starts).

Prints a table and one JSON line.

    .venv/bin/python benchmarks/bench_dicomweb.py [--checkpoint runs/x/best.pt] [--n 100] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_dicom_node  # noqa: E402
from benchmarks.machine_peak import machine  # noqa: E402
from tests.pacs import DICOMWEB_CONFIG, Orthanc  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "runs" / "paper-s0" / "best.pt"


def count_reports(pacs: Orthanc) -> int:
    found = pacs.http.post("/tools/find", json={"Level": "Instance", "Query": {"Modality": "SR"}})
    found.raise_for_status()
    return len(found.json())


def run_dicomweb(args: argparse.Namespace, files: list[Path], work: Path) -> dict:
    pacs = Orthanc(work / "orthanc-web", extra=DICOMWEB_CONFIG)
    try:
        for f in files:
            pacs.upload(f.read_bytes())
        command = [sys.executable, "-m", "pneumoscan", "dicomweb", str(args.checkpoint), "--url", pacs.dicomweb_url,
                   "--out", str(work / "web"), "--store-results", "--workers", str(args.workers), "--device", "cpu"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        whole_s = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"pneumoscan dicomweb failed:\n{done.stderr}")
        reports = count_reports(pacs)
    finally:
        pacs.stop()
    said = re.search(r"(\d+) scored.* (\d+) report\(s\) stored.* in ([0-9.]+) s;", done.stdout)
    if not said or int(said.group(1)) != len(files) or reports != len(files):
        raise RuntimeError(f"expected {len(files)} scored and reported, got: {done.stdout} ({reports} reports in Orthanc)")
    return {"pass_seconds": float(said.group(3)), "command_seconds": round(whole_s, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", type=Path, default=bench_dicom_node.DEFAULT_DATA,
                   help="a train folder with NORMAL/ and PNEUMONIA/ (default: $PNEUMOSCAN_DATA/train)")
    p.add_argument("--n", type=int, default=100, help="instances (half of each class)")
    p.add_argument("--workers", type=int, default=4, help="pneumoscan dicomweb --workers")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for each mode")
    args = p.parse_args()
    if not args.checkpoint.exists():
        sys.exit(f"no checkpoint at {args.checkpoint}: pass --checkpoint")
    with tempfile.TemporaryDirectory(prefix="bench-dicomweb-") as work:
        files = bench_dicom_node.make_instances(args.data, args.n, Path(work) / "instances", "jpls")
        web = run_dicomweb(args, files, Path(work))
        node = bench_dicom_node.run(argparse.Namespace(**{**vars(args), "codec": "jpls"}), Path(work) / "node")
    s = {"instances": len(files), "workers": args.workers, "checkpoint": str(args.checkpoint),
         "dicomweb_pass_seconds": web["pass_seconds"], "dicomweb_command_seconds": web["command_seconds"],
         "node_store_seconds": node["store_seconds"], "node_end_to_end_seconds": node["end_to_end_seconds"],
         "load_average": round(os.getloadavg()[0], 1), **{k: machine()[k] for k in ("cpu", "extensions")},
         "cores": os.cpu_count()}
    n = s["instances"]
    print(f"{n} DX instances (JPEG-LS), each mode beside its own Orthanc")
    print(f"{s['cpu']}; extensions {' '.join(s['extensions']) or 'none listed'}; {s['cores']} cores; load {s['load_average']}")
    print(f"{'mode':<58}{'seconds':>9}{'per s':>8}")
    for label, seconds in (("DICOMweb: QIDO-RS to the last report stored (STOW-RS)", s["dicomweb_pass_seconds"]),
                           ("DICOMweb: the whole command (model load included)", s["dicomweb_command_seconds"]),
                           ("DIMSE node: C-STOREs answered, scored and recorded", s["node_store_seconds"]),
                           ("DIMSE node: until every report is in Orthanc", s["node_end_to_end_seconds"])):
        print(f"{label:<58}{seconds:>9.2f}{n / seconds:>8.1f}")
    print(json.dumps(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
