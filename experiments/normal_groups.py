"""The two batches of normals in Kaggle's train/NORMAL (IM-... and NORMAL2-IM-...): how their images differ,
the figures docs/experiments.md ("Honest at a new site") quotes. Every image of each batch:

    .venv/bin/python experiments/normal_groups.py $PNEUMOSCAN_DATA
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def describe(files: list[Path]) -> str:
    sizes, means, sds, mode = [], [], [], {}
    for f in files:
        with Image.open(f) as im:
            mode[im.mode] = mode.get(im.mode, 0) + 1
            sizes.append(im.size)
            g = np.asarray(im.convert("L"), dtype=np.float64)
        means.append(g.mean())
        sds.append(g.std())
    w, h = np.median(np.array(sizes), axis=0)
    return (f"{len(files)} images, median {w:.0f} x {h:.0f} px, modes {mode}, mean grey {np.mean(means):.1f} "
            f"(sd over images {np.std(means):.1f}), contrast (sd of grey) {np.mean(sds):.1f}")


if __name__ == "__main__":
    folder = Path(sys.argv[1]) / "train" / "NORMAL"
    files = sorted(folder.iterdir())
    for name, keep in (("IM-", lambda n: n.startswith("IM-")), ("NORMAL2-IM-", lambda n: n.startswith("NORMAL2-"))):
        print(f"{name}: {describe([f for f in files if keep(f.name)])}")
