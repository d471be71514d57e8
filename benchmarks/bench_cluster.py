#!/usr/bin/env python3
"""`pneumoscan predict --engine ray` against local predict on this machine, and an archive of 20,000 files.

One run measures, each as the `pneumoscan predict` command a user types (a fresh process: start-up, the
model load and, for Ray, joining the cluster and starting the actors are all counted):

(a) local predict on N images (`--limit`, a seeded sample across NORMAL/ and PNEUMONIA/ of the train folder,
    linked into a temporary folder; every file read once beforehand so no run pays for a cold disk);
(b) `--engine ray` on the same files, on a one-node Ray cluster with all the machine's CPUs;
(c) the same on a two-node cluster on this machine (`ray.cluster_utils.Cluster`: a head and a worker node,
    half the CPUs each; the same CPUs in all, so the figure is the cost of two nodes, not a speed-up);
(d) (a), (b) and (c) again over a synthetic archive of `--archive` files (default 20,000): links to the train
    folder's images, cycled, in 100 folders.

Each run reports its wall time, images/s and the peak resident memory of the command's own process (the
driver, not Ray's workers). With the archive, each engine's cost of one image is the slope between the two
sizes (free of start-up, model load, joining the cluster and starting actors, whose sum is its fixed cost),
and Ray's per-image overhead is its slope minus local predict's. Without
`--checkpoint`, a freshly initialised paper model (150 px, with a detector) is used, as in bench_predict.py:
speed does not depend on the weights.

    .venv/bin/python benchmarks/bench_cluster.py --limit 1024 --archive 20000

Prints a table, then one JSON line (the last line) with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECT_STORE = 1 << 30  # per node
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import choose_files, fresh_checkpoint  # noqa: E402 (the scripts beside this one)
from machine_peak import machine  # noqa: E402


def run_predict(args: list[str], env: dict) -> dict:
    """`pneumoscan predict ARGS` in a fresh process: wall seconds and that process's peak resident memory."""
    cmd = [sys.executable, "-m", "pneumoscan", "predict", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"seconds": seconds, "driver_peak_mb": usage.ru_maxrss / 1024, "summary": out.strip().splitlines()[-1]}


def on_cluster(nodes: int, cpus: int, args: list[str], env: dict) -> dict:
    """`predict --engine ray ARGS` joined to a fresh `nodes`-node cluster of `cpus` CPUs in all."""
    from ray.cluster_utils import Cluster

    each = cpus // nodes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": each, "object_store_memory": OBJECT_STORE,
                                                            "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=each, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        return run_predict([*args, "--engine", "ray", "--ray-address", cluster.address], env)
    finally:
        cluster.shutdown()


def archive_folder(files: list[Path], dest: Path, n: int) -> Path:
    """`n` links to `files`, cycled, in 100 sub-folders (as an archive spreads its files)."""
    for i in range(n):
        folder = dest / f"{i % 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpeg").symlink_to(files[i % len(files)].resolve())
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(os.environ.get("PNEUMOSCAN_DATA", "data/chest_xray"), "train"))
    ap.add_argument("--checkpoint", help="default: a freshly initialised paper model")
    ap.add_argument("--limit", type=int, default=1024, help="images for (a)-(c)")
    ap.add_argument("--archive", type=int, default=20000, help="files in the synthetic archive (d); 0 skips it")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    data = Path(a.data)
    cpus = os.cpu_count() or 2
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        tmp = Path(tmp)
        files = choose_files(data, a.limit, a.seed)
        folder = archive_folder(files, tmp / "images", len(files))
        for f in files:
            f.read_bytes()
        ckpt = a.checkpoint or str(fresh_checkpoint(tmp, files))
        runs = {"local": lambda args: run_predict(args, env),
                "ray_1_node": lambda args: on_cluster(1, cpus, args, env),
                "ray_2_node": lambda args: on_cluster(2, cpus, args, env)}
        results = {}
        for name, run in runs.items():
            out = str(tmp / f"{name}.{'csv' if name == 'local' else 'parquet'}")
            results[name] = {"images": len(files), **run([ckpt, str(folder), "--device", "cpu", "--out", out])}
        if a.archive:
            big = archive_folder(choose_files(data, 0, a.seed), tmp / "archive", a.archive)
            for name, run in runs.items():
                out = str(tmp / f"archive_{name}.{'csv' if name == 'local' else 'parquet'}")
                results[f"archive_{name}"] = {"images": a.archive,
                                              **run([ckpt, str(big), "--device", "cpu", "--out", out])}
        marginal(results)
    report(results, len(files), cpus)
    return 0


def marginal(results: dict) -> None:
    """images/s of each run; with the archive, each engine's cost of one more image (the slope between the two
    sizes, free of start-up), its fixed cost, and Ray's overhead per image over local predict's."""
    for r in results.values():
        r["images_per_s"] = r["images"] / r["seconds"]
    for name in ("local", "ray_1_node", "ray_2_node"):
        small, big = results[name], results.get(f"archive_{name}")
        if big:
            per_image = (big["seconds"] - small["seconds"]) / (big["images"] - small["images"])
            big["marginal_ms_per_image"] = 1000 * per_image
            big["fixed_seconds"] = small["seconds"] - small["images"] * per_image
    for name in ("ray_1_node", "ray_2_node"):
        if "marginal_ms_per_image" in results.get(f"archive_{name}", {}):
            results[f"archive_{name}"]["overhead_ms_per_image"] = (results[f"archive_{name}"]["marginal_ms_per_image"]
                                                                   - results["archive_local"]["marginal_ms_per_image"])


def report(results: dict, n: int, cpus: int) -> None:
    m = machine()
    print(f"{n} images, {cpus} CPUs, {m['cpu']}; extensions {' '.join(m['extensions']) or 'none listed'}")
    print(f"{'run':<22} {'images':>7} {'images/s':>9} {'wall s':>8} {'driver MB':>10} {'ms/image':>9} "
          f"{'fixed s':>8} {'Ray overhead ms/image':>22}")
    for name, r in results.items():
        cells = [r.get(k) for k in ("marginal_ms_per_image", "fixed_seconds", "overhead_ms_per_image")]
        shown = ["" if c is None else f"{c:.2f}" for c in cells]
        print(f"{name:<22} {r['images']:>7} {r['images_per_s']:>9.1f} {r['seconds']:>8.1f} {r['driver_peak_mb']:>10.0f} "
              f"{shown[0]:>9} {shown[1]:>8} {shown[2]:>22}")
    print(json.dumps({"images": n, "cpus": cpus, "date": time.strftime("%Y-%m-%d"), **results}))


if __name__ == "__main__":
    sys.exit(main())
