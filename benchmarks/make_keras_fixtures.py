#!/usr/bin/env python3
"""Writes tests/fixtures/keras/: the notebook's Keras model for each activation of Table IV, real
radiographs as Keras loads them, Keras' eval-mode outputs and the state after one Keras training step.

Runs ONLY in the TensorFlow venv (``bash benchmarks/setup_tf.sh``); tests/test_keras_parity.py reads
what it writes without TensorFlow::

    .venv-tf/bin/python benchmarks/make_keras_fixtures.py --data "$PNEUMOSCAN_DATA/train"

The model is keras_baseline.build_model at 64 px instead of 150 (only the first Dense layer's input
and the PReLU slopes' shapes change; 64 px is the smallest size whose last feature map is 2 x 2, so the
Flatten order is exercised). Seeded: the same command writes the same arrays.

* Weights: He-uniform draws (activations keep their scale through the layers) rounded to multiples of a power of two (so the files compress),
  the same draws for every activation; PReLU slopes and biases drawn non-zero, so that a transposed or
  mis-assigned weight changes the outputs; BatchNorm moving statistics set to the statistics of the
  batch (in inference mode, layer by layer), so eval-mode activations stay in range even with
  LeakyReLU(30).
* Files, exactly as Keras writes them, packed in models.tar.xz (identical weights compress once):
  ``<act>.keras`` (model.save), ``<act>.h5`` (legacy model.save), and for prelu also
  ``prelu_checkpoint.h5`` (what ModelCheckpoint("x.h5") writes) and ``prelu.weights.h5`` (save_weights).
* images.npz: 16 radiographs (8 per class, seeded choice) as keras.utils.load_img(target_size=(64, 64))
  gives them (nearest), their labels and paths relative to --data; for the resize comparison, the 3
  smallest JPEGs of the data set as bytes (concatenated; small_ends: where each ends), with load_img's 150 px and 64 px pixels.
* <act>.npz: eval-mode probabilities and logits for the 16 images; one training step on them (Adam 1e-3,
  epsilon 1e-7, binary cross-entropy plus the Dense layers' L2 0.01, BatchNorm moving statistics updated)
  with every Dropout rate set to 0 for the step (Keras' and PyTorch's dropout masks cannot be made
  equal otherwise): the loss, the update of every trainable weight (after - before) as int8 in units of
  1e-5 (exact to 5e-6, a twentieth of the test's 1e-4: the first Adam step moves a weight by at most
  the learning rate), and the moving statistics after the step in float32.
"""
from __future__ import annotations

import argparse
import os
import io
import json
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras_baseline as kb  # noqa: E402  (TensorFlow set up there: quiet logs, the model)

import numpy as np  # noqa: E402

keras, tf = kb.keras, kb.tf
SIZE = 64
N_IMAGES = 16
ACTIVATIONS = {"relu": "relu", "leaky_relu": "leaky0.3", "leaky_relu_30": "leaky30", "prelu": "prelu"}
DELTA_UNIT = 1e-5  # int8 units of the stored updates


def pick_images(data: Path, rng: np.random.Generator) -> list[tuple[Path, int]]:
    picked = []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        files = sorted(p for p in (data / cls).iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        picked += [(files[i], label) for i in sorted(rng.choice(len(files), N_IMAGES // 2, replace=False))]
    return picked


def load_grey(path: Path | io.BytesIO, size: int) -> np.ndarray:
    """keras.utils.load_img(target_size=(size, size)) -> uint8; the three channels of a grey X-ray are equal."""
    rgb = np.asarray(keras.utils.load_img(path, target_size=(size, size)), dtype=np.uint8)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all(), path
    return rgb[..., 0].copy()


def images_fixture(data: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    picked = pick_images(data, rng)
    smallest = sorted((p for p in data.rglob("*.jpeg")), key=lambda p: (p.stat().st_size, p.name))[:3]
    return {
        "pixels": np.stack([load_grey(p, SIZE) for p, _ in picked]),
        "labels": np.array([y for _, y in picked], np.float32),
        "paths": np.array([str(p.relative_to(data)) for p, _ in picked]),
        "small_names": np.array([str(p.relative_to(data)) for p in smallest]),
        "small_bytes": np.frombuffer(b"".join(p.read_bytes() for p in smallest), np.uint8),
        "small_ends": np.cumsum([p.stat().st_size for p in smallest]),
        "small_150": np.stack([load_grey(p, 150) for p in smallest]),
        "small_64": np.stack([load_grey(p, SIZE) for p in smallest]),
    }


def quantised(rng: np.random.Generator, shape: tuple[int, ...], limit: float, levels: int = 8) -> np.ndarray:
    """Uniform in about [-limit, limit], on a grid of a power of two (few distinct floats: they compress)."""
    step = 2.0 ** np.floor(np.log2(limit / levels))
    return (rng.integers(-levels, levels + 1, size=shape) * step).astype(np.float32)


def set_weights(model: keras.Model, seed: int) -> None:
    """Seeded weights, the same for every activation (PReLU slopes from their own stream)."""
    rng, slopes = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            shape, name = tuple(w.shape), w.name
            if name in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                field = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
                fan_in = field * (1 if name == "depthwise_kernel" else shape[-2])
                values.append(quantised(rng, shape, np.sqrt(6.0 / fan_in)))  # He: activations keep their scale
            elif name == "bias":
                values.append(quantised(rng, shape, 0.05, 4))
            elif name == "gamma":
                values.append(1.0 + quantised(rng, shape, 0.25, 4))
            elif name == "beta":
                values.append(quantised(rng, shape, 0.1, 4))
            elif name == "alpha":
                values.append(0.25 + quantised(slopes, shape, 0.5, 8))
            else:  # moving statistics: set from the data in calibrate_batchnorm
                values.append(w.numpy())
        layer.set_weights(values)


def calibrate_batchnorm(model: keras.Model, x: np.ndarray) -> None:
    """Each BatchNorm's moving mean and variance := its input's statistics on x (inference mode, in order)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            probe = keras.Model(model.inputs, layer.input)
            h = probe.predict(x, verbose=0).astype(np.float64)
            gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
            layer.set_weights([gamma, beta, h.mean((0, 1, 2)).astype(np.float32), h.var((0, 1, 2)).astype(np.float32)])


def write_model_files(model: keras.Model, act: str, folder: Path, every_format: bool) -> list[Path]:
    files = [folder / f"{act}.keras", folder / f"{act}.h5"]
    model.save(files[0])
    model.save(files[1])
    if every_format:
        checkpoint = keras.callbacks.ModelCheckpoint(str(folder / f"{act}_checkpoint.h5"))
        checkpoint.set_model(model)
        checkpoint.on_epoch_end(0, logs={"loss": 0.0})  # what ModelCheckpoint writes at an epoch's end
        model.save_weights(folder / f"{act}.weights.h5")
        files += [folder / f"{act}_checkpoint.h5", folder / f"{act}.weights.h5"]
    return files


def outputs(model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode P(pneumonia) as Keras computes it, and the logit (last Dense before its sigmoid, float64)."""
    probs = model.predict(x, verbose=0).reshape(-1)
    features = keras.Model(model.inputs, model.layers[-1].input).predict(x, verbose=0).astype(np.float64)
    kernel, bias = model.layers[-1].get_weights()
    return probs, (features @ kernel.astype(np.float64) + bias).reshape(-1)


def one_step(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """One Keras training step (dropout rates 0); the loss and the state after it, keyed layer/index."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-7), loss="binary_crossentropy")
    before = [w.numpy().copy() for w in model.weights]
    pred = model(x, training=True)  # the loss by hand, to check what train_on_batch reports
    loss_check = float(np.mean(keras.losses.binary_crossentropy(y, pred).numpy()) + sum(float(v) for v in model.losses))
    for w, value in zip(model.weights, before):  # that call moved the BatchNorm statistics: put them back
        w.assign(value)
    loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
    assert abs(loss - loss_check) <= 1e-5 * max(1.0, abs(loss)), (loss, loss_check)
    out: dict[str, np.ndarray] = {"step_loss": np.array(loss, np.float64)}
    start = {id(w): value for w, value in zip(model.weights, before)}
    for layer in model.layers:
        for i, w in enumerate(layer.weights):
            if w.trainable:
                delta = (w.numpy().astype(np.float64) - start[id(w)]) / DELTA_UNIT
                assert np.abs(delta).max() < 127, (w.path, np.abs(delta).max())
                out[f"delta/{layer.name}/{i}"] = np.round(delta).astype(np.int8)
            else:
                out[f"after/{layer.name}/{i}"] = w.numpy().astype(np.float32)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required="PNEUMOSCAN_DATA" not in os.environ,
                    default=Path(os.environ["PNEUMOSCAN_DATA"]) / "train" if "PNEUMOSCAN_DATA" in os.environ else None,
                    help="the Kaggle train folder (NORMAL/, PNEUMONIA/)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/keras")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    staging = args.out / ".staging"
    staging.mkdir(exist_ok=True)
    images = images_fixture(args.data, np.random.default_rng(args.seed))
    np.savez_compressed(args.out / "images.npz", **images)
    x = np.repeat(images["pixels"][..., None], 3, axis=3).astype(np.float32) * np.float32(1.0 / 255.0)
    y = images["labels"].reshape(-1, 1)
    files, summary = [], {}
    for act, kb_name in ACTIVATIONS.items():
        keras.backend.clear_session()  # layer names restart at conv2d, conv2d_1, ... for every model
        model = kb.build_model(kb_name, image_size=SIZE)
        set_weights(model, args.seed)
        calibrate_batchnorm(model, x)
        files += write_model_files(model, act, staging, every_format=act == "prelu")
        probs, logits = outputs(model, x)
        assert probs.std() > 1e-3, f"{act}: outputs do not vary across images ({probs})"
        step = one_step(model, x, y)
        np.savez_compressed(args.out / f"{act}.npz", probs=probs, logits=logits, **step)
        summary[act] = {"params": model.count_params(), "probs": [round(float(p), 4) for p in probs],
                        "step_loss": float(step["step_loss"])}
    with tarfile.open(args.out / "models.tar.xz", "w:xz", preset=9) as tar:
        for f in files:
            info = tar.gettarinfo(f, arcname=f.name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
    for f in files:
        f.unlink()
    staging.rmdir()
    manifest = {"image_size": SIZE, "seed": args.seed, "delta_unit": DELTA_UNIT, "tensorflow": tf.__version__,
                "keras": keras.__version__, "numpy": np.__version__, "written": time.strftime("%Y-%m-%d"),
                "dropout_during_step": 0.0, "models": [f.name for f in files], "summary": summary}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    print(json.dumps({"sizes": sizes, "total": sum(sizes.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
