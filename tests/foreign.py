"""Images nobody here made that are not chest radiographs: the out-of-distribution test set.

scikit-learn's and scikit-image's bundled sample photographs, pydicom's CT and MR test files, blank
images and uniform noise, each as (name, file path or encoded bytes) for `Predictor.load`.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

# scikit-image's photographs bundled in its wheel (no download)
SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "coffee", "coins", "moon", "rocket", "page", "text", "horse",
                  "hubble_deep_field", "retina", "immunohistochemistry", "brick", "grass", "gravel", "clock")


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def foreign_sets(size: int = 512, seed: int = 0) -> dict[str, list[tuple[str, str | bytes]]]:
    """Set name -> [(image name, path or PNG bytes)]."""
    from pydicom.data import get_testdata_file
    from sklearn.datasets import load_sample_images

    sk = load_sample_images()
    sets: dict[str, list[tuple[str, str | bytes]]] = {
        "scikit-learn photos": [(f"sklearn_{os.path.basename(n).rsplit('.', 1)[0]}.png", png(img)) for n, img in zip(sk.filenames, sk.images)],
        "pydicom CT and MR": [(n, get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")],
        "blank (black, grey, white)": [(f"blank_{v}.png", png(np.full((size, size), v, np.uint8))) for v in (0, 128, 255)],
    }
    try:
        import skimage.data as skd
    except ImportError:  # the `test` extra installs it
        pass
    else:
        photos = []
        for n in SKIMAGE_PHOTOS:
            img = np.asarray(getattr(skd, n)())
            img = img.astype(np.float64) if img.dtype == bool else img
            if img.dtype != np.uint8:
                img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
            photos.append((f"skimage_{n}.png", png(img[..., :3] if img.ndim == 3 else img)))
        sets["scikit-image photos"] = photos
    rng = np.random.default_rng(seed)
    sets["uniform noise"] = [(f"noise_{k}.png", png(rng.integers(0, 256, (size, size), dtype=np.uint8))) for k in range(3)]
    return sets
