#!/usr/bin/env python3
"""The paper's original Keras/TensorFlow pipeline, as a speed baseline for pneumoscan.

This script is standalone and runs ONLY in the separate benchmark venv made by
``benchmarks/setup_tf.sh`` (``.venv-tf/``); TensorFlow is never a pneumoscan dependency
and nothing here imports pneumoscan.

It rebuilds the notebook's model and input pipeline exactly:

* model: 150x150x3 -> Conv2D(16) -> Conv2D(16) -> MaxPool -> 4 x [SeparableConv2D -> ACT ->
  SeparableConv2D -> ACT -> BatchNorm -> MaxPool (-> Dropout)] -> Flatten -> Dense 512/128/64 (relu,
  L2 0.01) with Dropout 0.6/0.4/0.25 -> Dense(1, sigmoid, L2 0.01); Adam(1e-3), binary cross-entropy.
* data: ImageDataGenerator(rescale=1/255, zoom_range=0.5, vertical_flip=True)
  .flow_from_directory(train_dir, target_size=(150, 150), batch_size=16, class_mode='binary', shuffle=True)
* predict: keras.utils.load_img(target_size=(150, 150)) -> img_to_array -> / 255 -> model.predict(batch 32)

Modes (each prints exactly one JSON object, as the LAST line of stdout)::

    .venv-tf/bin/python benchmarks/keras_baseline.py train --data DATA/train --steps 60
    .venv-tf/bin/python benchmarks/keras_baseline.py train --data DATA/train --epochs 1
    .venv-tf/bin/python benchmarks/keras_baseline.py train-arrays --steps 60
    .venv-tf/bin/python benchmarks/keras_baseline.py predict --data DATA/train --limit 256
    .venv-tf/bin/python benchmarks/keras_baseline.py train --files train.tsv --epochs 2 --save model.keras \
        --eval-files val.tsv --eval-out val_keras.csv
    .venv-tf/bin/python benchmarks/keras_baseline.py evaluate --weights model.keras --files val.tsv

A file list (``--files``, ``--eval-files``) has one image per line, ``PATH<TAB>LABEL`` (0 normal,
1 pneumonia): pneumoscan's own split, so a Keras model can be trained on pneumoscan's training split
and scored on its validation split (docs/keras.md). ``evaluate`` and ``--eval-files`` score images the
notebook's way (load_img nearest, /255) and report accuracy at 0.5 and ROC AUC.

Timing: a Keras callback stamps ``time.perf_counter()`` at the end of every training batch; the
steady-state rate excludes the first ``--warmup`` steps (graph tracing, first allocations).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # must precede the TensorFlow import
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import argparse
import contextlib
import json
import math
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # Keras 3 deprecation / PyDataset chatter; figures go to stdout as JSON

import numpy as np

try:
    import tensorflow as tf
    import keras
except ImportError as exc:  # pragma: no cover - only outside the benchmark venv
    sys.exit(
        f"keras_baseline.py needs TensorFlow ({exc}); run `bash benchmarks/setup_tf.sh` and use "
        ".venv-tf/bin/python (TensorFlow is not a pneumoscan dependency)."
    )

try:  # absl (used by TF) may still log a line or two at import
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
except Exception:  # pragma: no cover
    pass
tf.get_logger().setLevel("ERROR")

# ImageDataGenerator is deprecated in Keras 3 and no longer exported as
# keras.preprocessing.image.ImageDataGenerator (Keras >= 3.x removed it from the public keras.*
# namespace); it survives, unchanged, under the tf.keras compatibility namespace that TF ships
# (keras._tf_keras) and as keras.src.legacy.preprocessing.image. Use whichever is there.
try:
    from tensorflow.keras.preprocessing.image import ImageDataGenerator  # type: ignore
except ImportError:  # pragma: no cover
    try:
        from keras.preprocessing.image import ImageDataGenerator  # type: ignore  # Keras 2 / early 3
    except ImportError:
        from keras.src.legacy.preprocessing.image import ImageDataGenerator  # type: ignore

IMG_SIZE = 150
BATCH_SIZE = 16
PREDICT_BATCH_SIZE = 32
ACTIVATIONS = ("prelu", "relu", "leaky0.3", "leaky30")
# 2,973,985 with PReLU (per-element alphas: 659,648 of them); the others lack those alphas.
EXPECTED_PARAMS = {"prelu": 2_973_985, "relu": 2_314_337, "leaky0.3": 2_314_337, "leaky30": 2_314_337}
IMAGE_EXTS = {".jpeg", ".jpg", ".png"}


# --------------------------------------------------------------------------- model


def make_activation(name: str) -> keras.layers.Layer:
    if name == "prelu":
        return keras.layers.PReLU(alpha_initializer="zeros")
    if name == "relu":
        return keras.layers.ReLU()
    if name == "leaky0.3":
        # Keras 3 renamed LeakyReLU(alpha=...) to negative_slope (alpha= still works, with a warning)
        return keras.layers.LeakyReLU(negative_slope=0.3)
    if name == "leaky30":
        return keras.layers.LeakyReLU(negative_slope=30.0)
    raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


def build_model(activation: str = "prelu", image_size: int = IMG_SIZE) -> keras.Model:
    """The notebook's model (paper Figure 9), compiled with Adam(1e-3) / binary cross-entropy.

    Another `image_size` changes only the first Dense layer's input size (and the PReLU slopes' shapes)."""
    L = keras.layers
    l2 = keras.regularizers.l2
    layers: list = [
        keras.Input(shape=(image_size, image_size, 3)),
        L.Conv2D(16, 3, padding="same"),
        L.Conv2D(16, 3, padding="same"),
        L.MaxPool2D(2),
    ]
    for filters, dropout in ((32, 0.0), (64, 0.0), (128, 0.2), (256, 0.2)):
        layers += [
            L.SeparableConv2D(filters, 3, padding="same"),
            make_activation(activation),
            L.SeparableConv2D(filters, 3, padding="same"),
            make_activation(activation),
            L.BatchNormalization(),
            L.MaxPool2D(2),
        ]
        if dropout:
            layers.append(L.Dropout(dropout))
    layers += [
        L.Flatten(),
        L.Dense(512, activation="relu", kernel_regularizer=l2(0.01)),
        L.Dropout(0.6),
        L.Dense(128, activation="relu", kernel_regularizer=l2(0.01)),
        L.Dropout(0.4),
        L.Dense(64, activation="relu", kernel_regularizer=l2(0.01)),
        L.Dropout(0.25),
        L.Dense(1, activation="sigmoid", kernel_regularizer=l2(0.01)),
    ]
    model = keras.Sequential(layers, name=f"paper_cnn_{activation}")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=1e-3),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )
    n = model.count_params()
    assert image_size != IMG_SIZE or n == EXPECTED_PARAMS[activation], f"{activation}: {n} params, expected {EXPECTED_PARAMS[activation]}"
    return model


# --------------------------------------------------------------------------- timing helpers


class BatchTimer(keras.callbacks.Callback):
    """Stamps perf_counter at every train-batch end (and epoch bounds); optionally stops after N steps."""

    def __init__(self, max_steps: int | None = None):
        super().__init__()
        self.max_steps = max_steps
        self.batch_ends: list[float] = []
        self.batch_epoch: list[int] = []  # epoch index of each stamped batch
        self.batch_index: list[int] = []  # batch index within its epoch
        self.epoch_bounds: list[tuple[float, float]] = []
        self.start = 0.0
        self._epoch = 0
        self._epoch_start = 0.0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.batch_ends.append(time.perf_counter())
        self.batch_epoch.append(self._epoch)
        self.batch_index.append(batch)
        if self.max_steps is not None and len(self.batch_ends) >= self.max_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_bounds.append((self._epoch_start, time.perf_counter()))


def batch_images(n_samples: int, batch_size: int, batch_index: int) -> int:
    return max(0, min(batch_size, n_samples - batch_index * batch_size))


def steady_state(timer: BatchTimer, n_samples: int, batch_size: int, warmup: int) -> dict:
    """images/s over the steps after the first `warmup` ones (from the end of step `warmup`)."""
    n = len(timer.batch_ends)
    if n <= warmup + 1:
        raise SystemExit(f"need more than warmup+1={warmup + 1} steps to measure, got {n}")
    imgs = sum(batch_images(n_samples, batch_size, b) for b in timer.batch_index[warmup:])
    seconds = timer.batch_ends[-1] - timer.batch_ends[warmup - 1] if warmup else timer.batch_ends[-1] - timer.start
    return {
        "images_per_s": imgs / seconds,
        "steady_steps": n - warmup,
        "steady_images": imgs,
        "steady_seconds": seconds,
        "ms_per_step": 1000.0 * seconds / (n - warmup),
        "warmup_steps": warmup,
        "warmup_seconds": timer.batch_ends[warmup - 1] - timer.start if warmup else 0.0,
    }


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def env_info(args) -> dict:
    return {
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "threads": {
            "cpu_count": os.cpu_count(),
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),  # 0 = TF default (all cores)
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
        "activation": args.activation,
        "seed": args.seed,
    }


def emit(result: dict) -> None:
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False), flush=True)


# --------------------------------------------------------------------------- modes


def read_file_list(path: Path) -> tuple[list[str], np.ndarray]:
    """A PATH<TAB>LABEL list: (paths, labels as float32)."""
    paths, labels = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            file, label = line.rsplit("\t", 1)
            labels.append(float(int(label)))
        except ValueError:
            raise SystemExit(f"{path}:{n}: expected PATH<TAB>LABEL (0 or 1), got {line!r}") from None
        paths.append(file)
    if not paths:
        raise SystemExit(f"{path}: no images listed")
    return paths, np.asarray(labels, np.float32)


def linked_folder(list_file: Path, folder: Path) -> Path:
    """A NORMAL/ + PNEUMONIA/ folder of symbolic links to the listed images, for flow_from_directory."""
    paths, labels = read_file_list(list_file)
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / cls).mkdir(parents=True, exist_ok=True)
    for i, (p, y) in enumerate(zip(paths, labels)):
        (folder / ("PNEUMONIA" if y else "NORMAL") / f"{i:05d}_{Path(p).name}").symlink_to(Path(p).resolve())
    return folder


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic, ties counted half (average ranks)."""
    from scipy.stats import rankdata

    pos = labels > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(scores.astype(np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_files(model: keras.Model, list_file: Path, out_csv: Path | None = None) -> dict:
    """The notebook's scoring of listed images (load_img nearest, /255, predict): accuracy at 0.5, ROC AUC."""
    paths, labels = read_file_list(list_file)
    size = model.input_shape[1]
    x = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(size, size))) / 255.0 for p in paths])
    probs = model.predict(x.astype(np.float32), batch_size=PREDICT_BATCH_SIZE, verbose=0).reshape(-1).astype(np.float64)
    if out_csv:
        lines = ["path,label,probability"] + [f"{p},{int(y)},{q:.9g}" for p, y, q in zip(paths, labels, probs)]
        Path(out_csv).write_text("\n".join(lines) + "\n")
    return {"files": str(list_file), "n": len(paths), "accuracy": float(((probs >= 0.5) == (labels > 0)).mean()),
            "roc_auc": roc_auc(labels, probs), "mean_probability": float(probs.mean())}


def mode_evaluate(args) -> dict:
    if args.weights is None or args.files is None:
        raise SystemExit("evaluate needs --weights (a saved .keras or .h5 model) and --files (PATH<TAB>LABEL list)")
    model = keras.models.load_model(str(args.weights))
    result = {"mode": "evaluate", "model": str(args.weights), **score_files(model, args.files, args.eval_out)}
    result.update(env_info(args))
    return result


def mode_train(args) -> dict:
    if (args.data is None) == (args.files is None):
        raise SystemExit("train needs --data (a folder with NORMAL/ and PNEUMONIA/ subfolders) or --files (a list)")
    if args.files is not None:
        import tempfile

        args.data = linked_folder(args.files, Path(tempfile.mkdtemp(prefix="keras_baseline_")))
    model = build_model(args.activation)
    datagen = ImageDataGenerator(rescale=1.0 / 255, zoom_range=0.5, vertical_flip=True)
    gen = datagen.flow_from_directory(
        str(args.data),
        target_size=(IMG_SIZE, IMG_SIZE),
        batch_size=BATCH_SIZE,
        class_mode="binary",
        shuffle=True,
        seed=args.seed,
    )
    steps_per_epoch = len(gen)  # ceil(samples / 16), as the notebook's fit(train_gen, epochs=...)
    if args.epochs is not None:
        epochs, max_steps = args.epochs, None
    else:
        epochs, max_steps = math.ceil(args.steps / steps_per_epoch), args.steps
    timer = BatchTimer(max_steps=max_steps)
    if args.workers > 1:  # Keras 3: PyDataset parallelism is set on the dataset, not on fit()
        gen.workers = args.workers  # type: ignore[attr-defined]
        gen.use_multiprocessing = False  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    hist = model.fit(gen, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0, callbacks=[timer])
    total = time.perf_counter() - t0
    if args.files is not None:  # the folder of links made above
        import shutil

        shutil.rmtree(args.data)
    result = {
        "mode": "train",
        "pipeline": "ImageDataGenerator(rescale=1/255, zoom_range=0.5, vertical_flip=True).flow_from_directory",
        "n_images": gen.samples,
        "class_indices": gen.class_indices,
        "batch_size": BATCH_SIZE,
        "steps": len(timer.batch_ends),
        "steps_per_epoch": steps_per_epoch,
        **steady_state(timer, gen.samples, BATCH_SIZE, args.warmup),
        "seconds": total,
        "overall_images_per_s": sum(batch_images(gen.samples, BATCH_SIZE, b) for b in timer.batch_index) / total,
        "loss_last": float(hist.history["loss"][-1]),
        "accuracy_last": float(hist.history["accuracy"][-1]),
        "params": model.count_params(),
        "workers": args.workers,
    }
    if args.epochs is not None:
        secs = [b - a for a, b in timer.epoch_bounds]
        result["epoch_seconds"] = secs
        result["first_epoch_seconds"] = secs[0]
        result["first_epoch_images_per_s"] = gen.samples / secs[0]
        if len(secs) > 1:
            result["later_epoch_images_per_s"] = gen.samples * (len(secs) - 1) / sum(secs[1:])
    if args.save:
        model.save(str(args.save))
        result["saved"] = str(args.save)
    if args.eval_files:
        result["eval"] = score_files(model, args.eval_files, args.eval_out)
    result["peak_rss_mb"] = peak_rss_mb()
    result.update(env_info(args))
    return result


def mode_train_arrays(args) -> dict:
    model = build_model(args.activation)
    rng = np.random.default_rng(args.seed)
    pool_steps = min(args.steps, 32)  # a pool of random images, cycled (memory stays small)
    n_pool = pool_steps * BATCH_SIZE
    x = rng.random((n_pool, IMG_SIZE, IMG_SIZE, 3), dtype=np.float32)
    y = rng.integers(0, 2, size=(n_pool, 1)).astype(np.float32)
    timer = BatchTimer(max_steps=args.steps)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=math.ceil(args.steps / pool_steps), shuffle=True, verbose=0,
              callbacks=[timer])
    total = time.perf_counter() - t0
    result = {
        "mode": "train-arrays",
        "pipeline": "model.fit on in-memory float32 arrays",
        "n_images": len(timer.batch_ends) * BATCH_SIZE,
        "batch_size": BATCH_SIZE,
        "steps": len(timer.batch_ends),
        **steady_state(timer, n_pool, BATCH_SIZE, args.warmup),
        "seconds": total,
        "params": model.count_params(),
        "peak_rss_mb": peak_rss_mb(),
    }
    result.update(env_info(args))
    return result


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def mode_predict(args) -> dict:
    if args.data is None:
        raise SystemExit("predict needs --data (a folder of images, searched recursively)")
    paths = list_images(Path(args.data))
    if args.limit:
        # spread the sample over both class folders rather than taking the first N of NORMAL
        rng = np.random.default_rng(args.seed)
        if len(paths) > args.limit:
            paths = [paths[i] for i in sorted(rng.choice(len(paths), size=args.limit, replace=False))]
    if not paths:
        raise SystemExit(f"no images under {args.data}")
    model = build_model(args.activation)
    if args.weights:
        model.load_weights(args.weights)

    # Warm the predict function once (graph tracing) so the timings below are steady-state; the
    # cold first call is reported separately.
    t0 = time.perf_counter()
    model.predict(np.zeros((PREDICT_BATCH_SIZE, IMG_SIZE, IMG_SIZE, 3), np.float32), batch_size=PREDICT_BATCH_SIZE,
                  verbose=0)
    cold_seconds = time.perf_counter() - t0

    # --- the notebook's way: load_img -> img_to_array -> /255, then model.predict(batch 32)
    t0 = time.perf_counter()
    arrays = []
    for p in paths:
        img = keras.utils.load_img(str(p), target_size=(IMG_SIZE, IMG_SIZE))
        arrays.append(keras.utils.img_to_array(img) / 255.0)
    x = np.stack(arrays).astype(np.float32)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs = model.predict(x, batch_size=PREDICT_BATCH_SIZE, verbose=0).reshape(-1)
    t_pred = time.perf_counter() - t1
    total = time.perf_counter() - t0

    # --- model alone on in-memory random arrays
    n_arr = args.array_images
    xa = np.random.default_rng(args.seed).random((n_arr, IMG_SIZE, IMG_SIZE, 3), dtype=np.float32)
    model.predict(xa[:PREDICT_BATCH_SIZE], batch_size=PREDICT_BATCH_SIZE, verbose=0)  # warm
    ta = time.perf_counter()
    model.predict(xa, batch_size=PREDICT_BATCH_SIZE, verbose=0)
    t_arr = time.perf_counter() - ta

    result = {
        "mode": "predict",
        "pipeline": "keras.utils.load_img(150x150) -> img_to_array / 255 -> model.predict(batch_size=32)",
        "n_images": len(paths),
        "batch_size": PREDICT_BATCH_SIZE,
        "images_per_s": len(paths) / total,
        "seconds": total,
        "load_seconds": t_load,
        "load_images_per_s": len(paths) / t_load,
        "predict_seconds": t_pred,
        "predict_images_per_s": len(paths) / t_pred,
        "cold_first_predict_seconds": cold_seconds,
        "arrays_n_images": n_arr,
        "arrays_seconds": t_arr,
        "arrays_images_per_s": n_arr / t_arr,
        "mean_probability": float(probs.mean()),
        "weights": str(args.weights) if args.weights else None,
        "params": model.count_params(),
        "peak_rss_mb": peak_rss_mb(),
    }
    result.update(env_info(args))
    return result


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("train", "train-arrays", "predict", "evaluate"))
    ap.add_argument("--data", type=Path, help="train: folder with NORMAL/ and PNEUMONIA/; predict: folder of images")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="train / train-arrays: number of batches (default 60)")
    g.add_argument("--epochs", type=int, default=None, help="train: whole epochs instead of --steps")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the steady-state rate (default 10)")
    ap.add_argument("--limit", type=int, default=None, help="predict: use at most this many images (random sample)")
    ap.add_argument("--array-images", type=int, default=512, help="predict: random arrays for the model-alone rate")
    ap.add_argument("--weights", type=Path, default=None,
                    help="predict: optional Keras .weights.h5 to load; evaluate: the saved model (.keras or .h5)")
    ap.add_argument("--files", type=Path, default=None,
                    help="train: images to train on, evaluate: images to score (PATH<TAB>LABEL per line)")
    ap.add_argument("--save", type=Path, default=None, help="train: save the trained model here (.keras or .h5)")
    ap.add_argument("--eval-files", type=Path, default=None, help="train: score these images after training")
    ap.add_argument("--eval-out", type=Path, default=None, help="train / evaluate: per-image probabilities (CSV)")
    ap.add_argument("--activation", choices=ACTIVATIONS, default="prelu")
    ap.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0 = TF default, all cores)")
    ap.add_argument("--inter-threads", type=int, default=0, help="TF inter-op threads (0 = TF default)")
    ap.add_argument("--workers", type=int, default=1,
                    help="train: PyDataset loader threads (1 = the notebook's default, loading in line)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.epochs is not None and args.mode != "train":
        ap.error("--epochs only applies to train")
    if args.steps is None and args.epochs is None:
        args.steps = 60
    if args.steps is not None and args.steps <= args.warmup + 1:
        ap.error(f"--steps must exceed --warmup + 1 ({args.warmup + 1})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.inter_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    keras.utils.set_random_seed(args.seed)
    fn = {"train": mode_train, "train-arrays": mode_train_arrays, "predict": mode_predict, "evaluate": mode_evaluate}[args.mode]
    # keep stdout for the JSON line: Keras' own prints ("Found N images...") go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        result = fn(args)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
