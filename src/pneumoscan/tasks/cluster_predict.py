"""`pneumoscan predict --engine ray`: an archive scored on a Ray cluster, with local predict's records.

Owns the Ray side of the job, and nothing of the scoring itself:
- joining the cluster (`--ray-address`, else `RAY_ADDRESS`, as Ray itself reads it; with neither, a Ray of its own
  on this machine) and choosing the actor pool's size and resources (`plan_pool`);
- the Ray Data pipeline: the listing (`archive.list_inputs`, on the driver: paths only) cut into parts, each read
  and decoded in a Ray task by the project's loader (`decode_part`), scored by an actor pool in which each actor
  loads the checkpoint once into the same `Predictor` local predict uses, with the same backend arguments;
- collecting the scores on the driver into parts (`archive.PartStore`), each written once when all its images are
  in, so that an actor killed mid-run (retried by Ray) leaves every image exactly once, and `--resume` skips the
  parts already written; the driver holds only the parts still in flight;
- the prevalence (`--prevalence`, `--estimate-prevalence`) over the whole archive, then `--out` assembled from the
  parts through the functions local predict uses (`predict.image_result`, `predict.estimate_and_apply`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..core.calibration import move
from ..io.fileio import optional_import, write_json
from ..io.images import ImageLoadError, load_for_model_with_info
from .archive import PartStore, assemble, list_inputs, read_source
from .predict import Predictor, estimate_and_apply, image_result, parse_prevalence

log = logging.getLogger(__name__)
PURPOSE = "predict --engine ray"
ACTOR_CPU_SHARE = 0.5  # of the cluster's CPUs, for the actors together; the rest reads and decodes
MAX_ACTOR_CPUS = 4.0  # threads one model uses well on a CPU; more CPUs make more actors


@dataclass(frozen=True)
class RayOptions:
    """How the job runs on Ray: the cluster, the pool, the parts, resuming and progress."""

    address: str | None = None  # None: RAY_ADDRESS, else a local Ray of its own
    actors: int | None = None  # None: one per GPU, else one per MAX_ACTOR_CPUS of the actors' CPU share
    part_size: int = 256  # images per part: the unit of resuming and of the driver's memory
    resume: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Pool:
    """The actor pool: how many, and what each asks Ray for."""

    actors: int
    cpus: float
    gpus: float
    threads: int
    decode_cpus: float = 1.0  # each read and decode task


def plan_pool(cluster: dict[str, float], actors: int | None, device: str, backend: str,
              smallest_node: float | None = None) -> Pool:
    """Actors for `cluster` (Ray's resource totals; `smallest_node`: the fewest CPUs of one node). GPUs where the
    cluster has them and the device allows (one actor per GPU by default); else the actors share ACTOR_CPU_SHARE
    of the CPUs, whole or fractional, so that the read and decode tasks keep CPUs of their own (on 2 CPUs,
    whole-CPU actors starve them); no request is larger than the smallest node can grant beside an actor."""
    if actors is not None and actors < 1:
        raise ValueError(f"--actors must be at least 1, not {actors}")
    gpus = cluster.get("GPU", 0) if (device == "auto" or device.startswith("cuda")) and backend in ("torch", "auto") else 0
    cpus = max(cluster.get("CPU", 1.0), 1.0)
    node = min(cpus, smallest_node or cpus)
    decode = round(min(1.0, node * (1 - ACTOR_CPU_SHARE)), 2) or 0.01
    if gpus >= 1:
        n = actors or int(gpus)
        each = round(min(1.0, node * ACTOR_CPU_SHARE, cpus * ACTOR_CPU_SHARE / n), 2) or 0.01
        return Pool(n, each, min(1.0, gpus / n), 1, decode)
    if device.startswith("cuda"):
        raise RuntimeError("--device cuda was asked for but the Ray cluster has no GPU")
    share = cpus * ACTOR_CPU_SHARE
    n = actors or max(1, math.ceil(share / MAX_ACTOR_CPUS))
    each = round(min(MAX_ACTOR_CPUS, node, share / n), 2) or 0.01
    return Pool(n, each, 0.0, max(1, int(each)), decode)


def has_ray_token() -> bool:
    """Whether this machine holds a Ray authentication token where Ray looks for one."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return os.path.isfile(os.path.join(os.path.expanduser("~"), ".ray", "auth_token"))


def connect(address: str | None) -> tuple[Any, bool]:
    """Ray, joined to `address` or RAY_ADDRESS, else started here; and whether this call started the connection
    (and so ends it). A process already connected (a test, a notebook) keeps its connection."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"  # never a cluster found by guessing
    ray = optional_import("ray", "cluster", PURPOSE)
    if ray.is_initialized():
        return ray, False
    kwargs = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    except ConnectionError as e:
        # joining, Ray does not look for a token by itself; a cluster with token authentication refuses it
        hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token"
                if "RAY_AUTH_MODE" not in os.environ and has_ray_token() else "")
        raise ConnectionError(f"{str(e).strip().splitlines()[-1]}{hint}") from None
    return ray, True


def decode_part(batch: dict[str, np.ndarray], image_size: int, resize_filter: str) -> dict[str, np.ndarray]:
    """Ray task: one part's files read where this task runs and decoded by the project's loader; an unreadable
    file keeps its row, with blank pixels and its error."""
    paths = [os.fsdecode(p) for p in batch["path"]]  # bytes: a file name need not be UTF-8
    pixels = np.zeros((len(paths), image_size, image_size), np.uint8)
    errors, warnings = [""] * len(paths), [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            image = load_for_model_with_info(read_source(path), image_size, resize_filter, name=path)
        except ImageLoadError as e:
            errors[i] = str(e)
            continue
        pixels[i], warnings[i] = image.grey, "\n".join(image.warnings)
    return {"index": np.asarray(batch["index"], np.int64), "path": np.array(list(batch["path"]), dtype=object),
            "pixels": pixels, "error": np.array(errors, dtype=object), "warnings": np.array(warnings, dtype=object)}


class Scorer:
    """Ray actor: one `Predictor` loaded once, scoring decoded batches into a part's rows (raw scores at the
    predictor's prior; the records are made on the driver, at the prior the whole run ends up with)."""

    def __init__(self, checkpoint: str, predictor_args: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.predictor = Predictor(checkpoint, **predictor_args)

    def __call__(self, batch: dict[str, np.ndarray]):
        pa = optional_import("pyarrow", "cluster", PURPOSE)
        errors = [str(e) for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if not e]
        p = [None] * len(errors)
        class_probs: list = [None] * len(errors)
        ood: list = [None] * len(errors)
        if good:
            probs, cps, scores = self.predictor.score(np.asarray(batch["pixels"])[good])
            for k, i in enumerate(good):
                p[i] = float(probs[k])
                class_probs[i] = None if cps is None else [float(c) for c in cps[k]]
                ood[i] = None if scores is None else float(scores[k])
        warnings = [str(w).split("\n") if w else [] for w in batch["warnings"]]
        return pa.table({"index": pa.array(np.asarray(batch["index"], np.int64)),
                         "path": pa.array([bytes(x) for x in batch["path"]], pa.binary()),
                         "p": pa.array(p, pa.float64()), "class_probs": pa.array(class_probs, pa.list_(pa.float64())),
                         "ood": pa.array(ood, pa.float64()), "warnings": pa.array(warnings, pa.list_(pa.string())),
                         "error": pa.array([e or None for e in errors], pa.string())})


def build_dataset(ray: Any, listing: list[str], store: PartStore, todo: list[int], checkpoint: str,
                  predictor: Predictor, predictor_args: dict, pool: Pool, batch_size: int):
    """The Ray Data pipeline over the parts in `todo`: a block of paths per part, decode tasks, the actor pool."""
    pa = optional_import("pyarrow", "cluster", PURPOSE)
    blocks = [pa.table({"index": pa.array(list(store.bounds(p)), pa.int64()),
                        "path": pa.array([os.fsencode(listing[i]) for i in store.bounds(p)], pa.binary())})
              for p in todo]
    prep = predictor.prep
    ds = ray.data.from_arrow(blocks)
    # decode tasks ask for what the actors leave; with the actors' request they would be fused into the actors
    ds = ds.map_batches(decode_part, batch_size=None, batch_format="numpy", num_cpus=pool.decode_cpus,
                        fn_kwargs={"image_size": prep.image_size, "resize_filter": prep.resize_filter})
    return ds.map_batches(Scorer, batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=pool.actors),
                          fn_constructor_kwargs={"checkpoint": checkpoint, "predictor_args": predictor_args,
                                                 "threads": pool.threads},
                          num_cpus=pool.cpus, num_gpus=pool.gpus or None)  # Ray Data spreads actors over nodes


def collect_parts(ds, store: PartStore, todo: list[int], progress: bool) -> None:
    """Stream the scored rows into parts, writing each part once all its images are in; a row delivered twice
    (a retried task) counts once."""
    from tqdm import tqdm

    pending: dict[int, dict[int, dict]] = {}
    written = set(range(store.parts)) - set(todo)
    done = sum(len(store.bounds(p)) for p in written)
    with tqdm(total=store.n, initial=done, unit="image", desc="predict (ray)", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                part = row["index"] // store.part_size
                if part in written or row["index"] in pending.get(part, {}):
                    continue
                pending.setdefault(part, {})[row["index"]] = row
                bar.update(1)
                if len(pending[part]) == len(store.bounds(part)):
                    store.write(part, pending.pop(part))
                    written.add(part)
    missing = set(range(store.parts)) - written
    if missing:
        raise RuntimeError(f"{len(missing)} parts of {store.folder} were never scored; run again with --resume")


def final_output(store: PartStore, predictor: Predictor, prevalence: float | str | None, estimate: bool
                 ) -> tuple[Any, dict | None]:
    """The map every record is reported at, as local predict chooses it (`predict.score_paths`), with the EM
    estimate over the whole archive when asked for; and the estimate."""
    output = predictor.output
    if (isinstance(prevalence, float) and not estimate) or (prevalence is None and not estimate):
        return output, None
    probs = store.probabilities()
    if not len(probs):
        raise ValueError("no image could be read, so no prevalence can be estimated")
    at_model, _ = move(probs, None, output.prior_used, output.model_prior)
    return estimate_and_apply(at_model, output, prevalence, estimate)


def part_records(rows: list[dict], predictor: Predictor, output: Any) -> list:
    """A part's raw scores as records at `output`'s prior, made as local predict makes them."""
    scored = [r for r in rows if r["error"] is None]
    probs = np.array([r["p"] for r in scored], dtype=np.float64)
    cps = np.array([r["class_probs"] for r in scored]) if scored and scored[0]["class_probs"] is not None else None
    probs, cps = move(probs, cps, predictor.output.prior_used, output.prior_used)
    moved = iter(range(len(scored)))
    records = []
    for r in rows:
        if r["error"] is not None:
            records.append(predictor.failure(os.fsdecode(r["path"]), r["error"]))
            continue
        k = next(moved)
        records.append(image_result(os.fsdecode(r["path"]), float(probs[k]), None if cps is None else cps[k], predictor.class_names,
                                    output, predictor.ood, r["ood"], r["warnings"]))
    return records


def predict_on_ray(checkpoint: str | os.PathLike, inputs: Iterable[str], out: str | os.PathLike, device: str = "auto",
                   batch_size: int = 32, backend: str = "torch", prevalence: float | str | None = None,
                   estimate: bool = False, options: RayOptions = RayOptions(), **backend_args: Any
                   ) -> tuple[int, list[str], dict | None]:
    """Score every image the inputs name on a Ray cluster and write `out` (Parquet for .parquet, else CSV) with local
    predict's columns, in input order. Returns (images, the error of each unreadable one, the EM estimate or None).
    `backend_args` go to every actor's `Predictor` as they are."""
    optional_import("ray", "cluster", PURPOSE)  # before any work: a missing extra is the first thing said
    prevalence = parse_prevalence(prevalence)
    fixed = prevalence if isinstance(prevalence, float) and not estimate else None
    checkpoint = os.path.abspath(checkpoint)
    if options.part_size < 1 or batch_size < 1:
        raise ValueError("--batch-size and --part-size must be at least 1")
    predictor = Predictor(checkpoint, device="cpu", prevalence=fixed)  # the driver's copy: classes, prior, detector
    listing = list_inputs(inputs)
    if not listing:
        raise ValueError("no images found under the inputs given")
    settings = {"checkpoint": checkpoint, "checkpoint_bytes": os.path.getsize(checkpoint),
                "scoring_prior": predictor.output.prior_used}
    store = PartStore(out, listing, options.part_size, settings)
    store.open(options.resume)
    todo = sorted(set(range(store.parts)) - store.done())
    if options.resume:
        log.info("resuming: %d of %d parts already written, %d to score", store.parts - len(todo), store.parts, len(todo))
    if todo:
        run_parts(listing, store, todo, checkpoint, predictor, options, batch_size,
                  {"device": device, "batch_size": batch_size, "backend": backend, "prevalence": fixed, **backend_args})
    del listing
    output, estimated = final_output(store, predictor, prevalence, estimate)
    errors: list[str] = []

    def batches():
        for rows in (store.read(p).to_pylist() for p in range(store.parts)):
            records = part_records(rows, predictor, output)
            errors.extend(r.error for r in records if r.error)
            yield records

    assemble(out, batches(), predictor.class_names)
    if estimated is not None:
        write_json(f"{out}.prevalence.json", {"estimate": estimated, **output.describe()})
    import shutil

    shutil.rmtree(store.folder)
    return store.n, errors, estimated


def run_parts(listing: list[str], store: PartStore, todo: list[int], checkpoint: str, predictor: Predictor,
              options: RayOptions, batch_size: int, predictor_args: dict) -> None:
    """Join (or start) Ray, run the pipeline over the parts in `todo`, and leave Ray as it was found."""
    ray, started = connect(options.address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job's own bar counts images; Ray's counts blocks per operator
        ctx.execution_options.preserve_order = False
        ctx.max_errored_blocks = 0
        logging.getLogger("ray.data").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
        smallest = min((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=None)
        pool = plan_pool(ray.cluster_resources(), options.actors, predictor_args["device"], predictor_args["backend"],
                         smallest)
        log.info("Ray cluster %s: %d actors of %.2f CPU, %.2f GPU", ray.cluster_resources(), pool.actors, pool.cpus,
                 pool.gpus)
        # an actor sees the GPU Ray gave it as its only one
        predictor_args = {**predictor_args, "device": "cuda" if pool.gpus else
                          ("cpu" if predictor_args["device"] == "auto" else predictor_args["device"])}
        ds = build_dataset(ray, listing, store, todo, checkpoint, predictor, predictor_args, pool, batch_size)
        try:
            collect_parts(ds, store, todo, options.progress)
        except ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()
            raise RuntimeError(f"the Ray job failed: {first[-1] if first else type(e).__name__}; "
                               f"finished parts are kept, run again with --resume") from None
    finally:
        if started:
            ray.shutdown()
