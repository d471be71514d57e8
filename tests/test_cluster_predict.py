"""`predict --engine ray` on a real two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU per node), started
once for the module; every run joins it as a driver through `--ray-address`, as a user's would.

- The invariant: on the same files (radiographs, bad files, a missing path), ray and local predict give the same
  probabilities (1e-5), labels, out-of-distribution flags and error rows, in the same order, as Parquet and as
  CSV, for one model and for an ensemble, and with the prevalence estimated over the whole archive.
- Inputs at archive scale: globs, text files of paths and file:// URIs list what local predict lists.
- Faults: an actor's process killed mid-run is retried by Ray and every image is in the output exactly once;
  a driver killed mid-run is resumed with --resume without rescoring the parts already written.
- The actor pool's defaults on 2 CPUs and on a large cluster; a missing extra is a one-line error.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pneumoscan.apps.cli import main

from .conftest import make_dataset
from .test_invariants import paper_run_args

pytest.importorskip("ray", reason="predict --engine ray needs the cluster extra: pip install '.[cluster]'")
pa = pytest.importorskip("pyarrow")
pa_parquet = pytest.importorskip("pyarrow.parquet")

from pneumoscan.tasks import archive  # noqa: E402  (needs pyarrow)
from pneumoscan.tasks.cluster_predict import plan_pool  # noqa: E402

OBJECT_STORE = 120 * 2**20  # per node: a few parts of 64 px images at a time


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, one CPU each (the head and a worker), stopped after the module."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE,
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two 1-epoch paper-network runs (seeds 0 and 1, 32 px, with their detectors) on 40 synthetic X-rays, their
    ensemble, and the inputs every test scores: the images, an empty file, a text file named .png, an image whose
    name is not UTF-8, a missing path."""
    root = tmp_path_factory.mktemp("cluster")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOSCAN_CACHE", str(root / "cache"))
        data = make_dataset(root / "data", patients_per_class=10, images_per_patient=2)
        for seed in (0, 1):
            assert main([*paper_run_args(data, root / f"seed{seed}", epochs=1, image_size=32), "--seed", str(seed)]) == 0
        assert main(["ensemble", str(root / "seed0" / "best.pt"), str(root / "seed1" / "best.pt"), "--out",
                     str(root / "ens.pt"), "--device", "cpu", "--no-progress"]) == 0
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.png").write_text("not an image")
    os.symlink(next((data / "train" / "NORMAL").iterdir()), os.fsdecode(bytes(bad) + b"/caf\xe9.jpeg"))  # not UTF-8
    inputs = [str(data / "train"), str(bad), str(root / "missing.jpeg")]
    return {"root": root, "data": data, "ckpt": root / "seed0" / "best.pt", "ens": root / "ens.pt", "inputs": inputs}


def rows_of(path: Path) -> list[dict]:
    """A predict output as rows of text cells (Parquet's numbers and nulls as local predict's CSV writes them)."""
    if path.suffix == ".parquet":
        rows = pa_parquet.read_table(path).to_pylist()
        return [{k: "" if v is None else v for k, v in r.items()} for r in rows]
    return list(csv.DictReader(path.open(newline="", encoding="utf-8")))


def assert_same(local: list[dict], ray: list[dict]) -> None:
    """Same files in the same order, probabilities within 1e-5, same labels, flags and errors."""
    assert [r["path"] for r in ray] == [r["path"] for r in local]
    for a, b in zip(local, ray):
        assert (a["error"], a["label"], a["outside_training"]) == (b["error"], b["label"], _flag(b["outside_training"]))
        assert (a["p_pneumonia"] == "") == (b["p_pneumonia"] == "")
        if a["p_pneumonia"] != "":
            # local predict's CSV writes probabilities to 6 decimals and the score to 4
            for k, tolerance in (("p_pneumonia", 1e-5), ("assumed_prevalence", 1e-5), ("ood_score", 1e-4)):
                assert abs(float(a[k]) - float(b[k])) <= tolerance, (k, a, b)
            assert a["prevalence_source"] == b["prevalence_source"]


def _flag(value) -> str:
    return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


def ray_args(cluster, *extra: str) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address, "--device", "cpu", "--part-size", "8",
            "--batch-size", "8", *extra]


@pytest.mark.parametrize("model,out,extra", [
    ("ckpt", "p.parquet", []),
    ("ens", "p.csv", ["--prevalence", "estimated"]),
])
def test_ray_gives_local_predicts_rows_on_two_nodes(cluster, trained, tmp_path, model, out, extra):
    ckpt = str(trained[model])
    assert main(["predict", ckpt, *trained["inputs"], "--out", str(tmp_path / "local.csv"), *extra]) == 0
    assert main(["predict", ckpt, *trained["inputs"], "--out", str(tmp_path / out), *ray_args(cluster, "--actors", "2"),
                 *extra]) == 0
    local, ray = rows_of(tmp_path / "local.csv"), rows_of(tmp_path / out)
    assert len(local) == 44 and sum(bool(r["error"]) for r in local) == 3 and any("\\xe9" in r["path"] for r in local)
    assert "cannot read file" in local[-1]["error"] and "empty" in local[-3]["error"]
    assert_same(local, ray)
    if extra:  # the estimate over the whole archive, as local predict makes it, and its file
        a, b = (json.loads((tmp_path / f"{name}.prevalence.json").read_text()) for name in ("local.csv", out))
        assert abs(a["estimate"]["prevalence"] - b["estimate"]["prevalence"]) <= 1e-5 and a.keys() == b.keys()
        assert a["estimate"]["n"] == b["estimate"]["n"] == 41
        assert {r["prevalence_source"] for r in ray if r["p_pneumonia"]} == {"estimated"}
        assert next(csv.reader((tmp_path / out).open())) == next(csv.reader((tmp_path / "local.csv").open()))
    assert not (tmp_path / f"{out}.parts").exists()


def test_globs_lists_and_file_uris_list_what_local_predict_lists(trained, tmp_path, cluster):
    train = trained["data"] / "train"
    files = archive.list_inputs([str(train)])
    assert len(files) == 40 and files == sorted(files)
    assert archive.list_inputs([f"{train}/**/*.jpeg"]) == files
    (tmp_path / "list.txt").write_text("# the archive\n" + "\n".join(files[:5]) + "\n\n" + f"file://{files[5]}\n")
    assert archive.list_inputs([str(tmp_path / "list.txt")]) == [*files[:5], f"file://{files[5]}"]
    assert archive.list_inputs([f"file://{train}"]) == [f"file://{f}" for f in files]
    assert archive.list_inputs([str(tmp_path / "none*.png")]) == [str(tmp_path / "none*.png")]  # gets its error row
    out = tmp_path / "uri.parquet"
    assert main(["predict", str(trained["ckpt"]), f"file://{train}", "--out", str(out), *ray_args(cluster)]) == 0
    assert main(["predict", str(trained["ckpt"]), str(train), "--out", str(tmp_path / "local.csv")]) == 0
    local = rows_of(tmp_path / "local.csv")
    ray = [{**r, "path": r["path"].removeprefix("file://")} for r in rows_of(out)]
    assert_same(local, ray)


def raylet_children(cluster) -> list[int]:
    """Processes of the cluster's scoring actors (children of its raylets named ray::MapWorker...Scorer)."""
    raylets = {str(p.process.pid) for node in cluster.list_all_nodes() for p in node.all_processes["raylet"]}
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue
        if ppid in raylets and title.startswith("ray::MapWorker") and "Scorer" in title:
            found.append(int(proc.name))
    return found


def many_links(trained, dest: Path, copies: int) -> Path:
    """`copies` links to each of the 40 images: an archive big enough to be caught mid-run."""
    files = archive.list_inputs([str(trained["data"] / "train")])
    dest.mkdir()
    for k in range(copies):
        for i, f in enumerate(files):
            os.symlink(f, dest / f"{k:03d}_{i:02d}.jpeg")
    return dest


def test_an_actor_killed_mid_run_is_retried_and_every_image_is_written_once(cluster, trained, tmp_path):
    folder = many_links(trained, tmp_path / "archive", 10)
    out = tmp_path / "p.parquet"
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("rc", main(
        ["predict", str(trained["ckpt"]), str(folder), "--out", str(out), *ray_args(cluster, "--actors", "2")])))
    job.start()
    parts, killed = out.parent / "p.parquet.parts", []
    deadline = time.monotonic() + 120
    while not killed and job.is_alive() and time.monotonic() < deadline:
        actors = raylet_children(cluster)
        if actors and any(parts.glob("part-*.parquet")):
            written_before = len(list(parts.glob("part-*.parquet")))
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])
        time.sleep(0.05)
    job.join(180)
    assert killed and written_before < 50, "the actor was not killed mid-run"
    assert result["rc"] == 0
    rows = rows_of(out)
    expected = archive.list_inputs([str(folder)])
    assert [r["path"] for r in rows] == expected and len(set(expected)) == 400  # each exactly once, in order
    assert not any(r["error"] for r in rows)
    assert main(["predict", str(trained["ckpt"]), str(folder), "--out", str(tmp_path / "local.csv")]) == 0
    assert_same(rows_of(tmp_path / "local.csv"), rows)


def test_a_killed_driver_is_resumed_without_rescoring_written_parts(cluster, trained, tmp_path, caplog):
    folder = many_links(trained, tmp_path / "archive", 10)
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "pneumoscan", "predict", str(trained["ckpt"]), str(folder), "--out", str(out),
           *ray_args(cluster)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "p.csv.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert 3 <= len(kept) < 50 and not out.exists()
    first = parts / "part-000000.parquet"  # marked: a part scored again would lose the mark
    rows = pa_parquet.read_table(first).to_pylist()
    rows[0]["p"] = 0.123456
    pa_parquet.write_table(pa.Table.from_pylist(rows, schema=archive.part_schema()), first)
    with caplog.at_level("INFO", "pneumoscan.tasks.cluster_predict"):
        assert main(["predict", str(trained["ckpt"]), str(folder), "--out", str(out), *ray_args(cluster), "--resume"]) == 0
    assert f"resuming: {len(kept)} of 50 parts already written, {50 - len(kept)} to score" in caplog.text
    assert main(["predict", str(trained["ckpt"]), str(folder), "--out", str(tmp_path / "local.csv")]) == 0
    ray = rows_of(out)
    assert ray[0]["p_pneumonia"] == "0.123456"
    assert_same(rows_of(tmp_path / "local.csv")[1:], ray[1:])
    assert not parts.exists()
    # --resume keeps only parts of the same run: another listing is refused, naming the folder
    store = archive.PartStore(out, ["a.png"], 8, {})
    store.open(resume=False)
    with pytest.raises(ValueError, match=r"p\.csv\.parts: holds parts of another run \(differs in images, listing"):
        archive.PartStore(out, ["a.png", "b.png"], 8, {}).open(resume=True)


def test_the_pool_fits_two_cpus_and_a_large_cluster():
    small = plan_pool({"CPU": 2.0}, None, "auto", "torch")
    assert (small.actors, small.cpus, small.threads, small.decode_cpus) == (1, 1.0, 1, 1.0)
    two = plan_pool({"CPU": 2.0}, 2, "auto", "torch")
    assert (two.actors, two.cpus, two.decode_cpus) == (2, 0.5, 1.0)  # fractional: the reads keep a CPU
    nodes = plan_pool({"CPU": 2.0}, 2, "auto", "torch", smallest_node=1.0)  # this module's cluster
    assert (nodes.actors, nodes.cpus, nodes.decode_cpus) == (2, 0.5, 0.5)  # an actor and a read on each node
    big = plan_pool({"CPU": 256.0}, None, "auto", "torch")
    assert (big.actors, big.cpus, big.threads) == (32, 4.0, 4)
    gpus = plan_pool({"CPU": 32.0, "GPU": 4.0}, None, "auto", "torch")
    assert (gpus.actors, gpus.gpus, gpus.cpus) == (4, 1.0, 1.0)
    assert plan_pool({"CPU": 32.0, "GPU": 4.0}, None, "cpu", "torch").gpus == 0
    with pytest.raises(RuntimeError, match="no GPU"):
        plan_pool({"CPU": 8.0}, None, "cuda", "torch")


def test_a_missing_extra_is_one_line_naming_it(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if `pneumoscan[cluster]` were not installed
    assert main(["predict", str(trained["ckpt"]), str(trained["data"]), "--out", str(tmp_path / "p.csv"),
                 "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'pneumoscan[cluster]'" in err and "predict --engine ray" in err
