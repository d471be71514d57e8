"""What a checkpoint was trained and validated on, and how much of an evaluated split it has already seen.

Training records in the checkpoint a 64-bit BLAKE2b fingerprint of every training image's pixels as the
model saw them (8 bytes an image: 35 KB for the Kaggle training split) and the training patients' ids.
`evaluate` compares the images it scores against both: an image the model was trained on, pixel for
pixel, makes a figure that says nothing about new patients, so evaluation refuses it unless asked; an
image of a training patient (by the data set's file-name convention) gets a warning.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch


def pixel_fingerprints(pixels: np.ndarray) -> np.ndarray:
    """(N, 8) uint8: a BLAKE2b digest of each (S, S) uint8 image's pixels."""
    return np.array([np.frombuffer(hashlib.blake2b(np.ascontiguousarray(p).tobytes(), digest_size=8).digest(),
                                   dtype=np.uint8) for p in pixels], dtype=np.uint8).reshape(len(pixels), 8)


def training_record(pixels: np.ndarray, patients: Sequence[str]) -> dict[str, Any]:
    """The checkpoint's "training_images" entry: count, pixel fingerprints (a uint8 tensor, so the
    checkpoint still loads with weights_only=True) and the sorted patient ids."""
    return {"count": int(len(pixels)), "fingerprints": torch.from_numpy(pixel_fingerprints(pixels)),
            "patients": sorted(set(patients))}


def training_overlap(ckpt: dict[str, Any], pixels: np.ndarray, paths: Sequence[str],
                     patients: Sequence[str]) -> dict[str, Any]:
    """How many of these images the checkpoint was trained on (pixel for pixel) and how many belong to its
    training patients; "checked" is False for a checkpoint that records neither (older than this check)."""
    record = ckpt.get("training_images")
    if not record:
        return {"checked": False, "images": None, "patients": None, "examples": []}
    seen = {bytes(row) for row in np.asarray(record["fingerprints"], dtype=np.uint8)}
    same = [i for i, fp in enumerate(pixel_fingerprints(pixels)) if bytes(fp) in seen]
    known = set(record.get("patients", ()))
    return {"checked": True, "images": len(same), "patients": sum(p in known for p in patients),
            "examples": [paths[i] for i in same[:5]]}


def validation_record(pneumonia_logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The checkpoint's "validation_outputs" entry: the raw pneumonia logit and the class of every validation
    image (5 bytes an image), from which `adapt` takes the validation confusion matrix at any threshold."""
    return {"logits": torch.as_tensor(np.asarray(pneumonia_logits, dtype=np.float32)),
            "labels": torch.as_tensor(np.asarray(labels).astype(np.uint8))}
