"""Shared fixtures: tiny generated data sets in Kaggle layout, and a subset of the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The real data set, where the README tells users to put it: $PNEUMOSCAN_DATA (`make test DATA=...` sets it).
# Unset, the tests that need real radiographs skip and say why; set to a folder that is not there, they fail.
DATA_VARIABLE = os.environ.get("PNEUMOSCAN_DATA", "")
REAL_DATA = Path(DATA_VARIABLE).expanduser() if DATA_VARIABLE else None


def real_train_folder() -> Path:
    """ROOT/train of the real data set; skips the test when PNEUMOSCAN_DATA is unset, fails when it is wrong."""
    if REAL_DATA is None:
        pytest.skip("needs the real data set: set PNEUMOSCAN_DATA=/path/to/chest_xray (or make test DATA=...)")
    train = REAL_DATA / "train"
    if not (train / "NORMAL").is_dir() or not (train / "PNEUMONIA").is_dir():
        pytest.fail(f"PNEUMOSCAN_DATA={DATA_VARIABLE}: no train/NORMAL and train/PNEUMONIA folders there")
    return train


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own pixel cache so tests never see each other's (or a user's) cache."""
    monkeypatch.setenv("PNEUMOSCAN_CACHE", str(tmp_path_factory.mktemp("cache")))


def synthetic_xray(rng: np.random.Generator, label: int, size: int = 64) -> np.ndarray:
    """A grey 'chest' whose PNEUMONIA images carry bright blobs in the lung fields: learnable in a few steps."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 60 + 80 * np.exp(-((xx - 0.5) ** 2) / 0.08) + rng.normal(0, 12, (size, size))
    if label:
        for _ in range(3):
            cy, cx = rng.uniform(0.3, 0.8), rng.choice([0.3, 0.7]) + rng.uniform(-0.08, 0.08)
            img += 90 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, patients_per_class: int = 12, images_per_patient: int = 2, size: int = 64, seed: int = 0,
                 splits: tuple[str, ...] = ("train",)) -> Path:
    """Kermany-style names: IM-####-####.jpeg for NORMAL, person#_bacteria_#.jpeg / _virus_ for PNEUMONIA."""
    rng = np.random.default_rng(seed)
    n = 0
    for split in splits:
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for p in range(patients_per_class):
                pid = n = n + 1
                for k in range(images_per_patient):
                    kind = "bacteria" if p % 2 else "virus"
                    name = f"IM-{pid:04d}-{k + 1:04d}.jpeg" if label == 0 else f"person{pid}_{kind}_{k + 1}.jpeg"
                    img = synthetic_xray(rng, label, size)
                    mode = "RGB" if k % 2 else "L"  # both kinds the real data set has
                    Image.fromarray(img).convert(mode).save(d / name, quality=95)
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def real_subset(dest: Path, per_class: int) -> Path:
    """Symlinks to the first `per_class` images of each class of the real train split (`real_train_folder`)."""
    train = real_train_folder()
    for cls in ("NORMAL", "PNEUMONIA"):
        src = train / cls
        out = dest / "train" / cls
        out.mkdir(parents=True)
        for f in sorted(src.iterdir())[:per_class]:
            os.symlink(f.resolve(), out / f.name)
    return dest
