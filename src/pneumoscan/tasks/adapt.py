"""`pneumoscan adapt`: a checkpoint fitted to a site from a batch of that site's images.

`adapt_model` works on a loaded checkpoint and decoded pixels (the shift benchmark calls it directly);
`adapt_checkpoint` is the command: it reads the images (folders or files, like predict; a bad file is
listed and skipped), the optional labels CSV (`path,label`: a file name among the images, NORMAL or
PNEUMONIA), and writes the adapted checkpoint, which records what was adapted, from how many images,
and the site's prevalence as the prior every command then reports at. The arithmetic is in `shift`.
"""

from __future__ import annotations

import copy
import csv
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..core.calibration import fit_offset, output_map
from ..core.prevalence import estimate_prevalence, sigmoid
from ..core.shift import (FEW_IMAGES, MIN_IMAGES, PRIOR_STRENGTH, ValidationRecord, adapt_batchnorm, em_weights_loop,
                          expected_rates, leave_one_out_rates, prevalence_check)
from ..io.data import DataError
from ..io.images import ImageLoadError
from ..networks import checkpoint as ckpt_io
from ..networks.inference import freeze, model_input, predict_logits
from ..networks.models import pneumonia_logit
from ..networks.runtime import memory_format

LABELS = {"NORMAL": 0, "PNEUMONIA": 1}
MIN_LABELLED_PER_CLASS = 10


def batchnorm_mix(ckpt: dict[str, Any]) -> float:
    """The pneumonia share of the batches training normalised with: 0.5 under balanced sampling, else the
    training split's."""
    cfg = ckpt_io.config_of(ckpt, "checkpoint")
    return 0.5 if cfg.train.sampling == "balanced" else float(ckpt.get("train_prevalence") or 0.5)


def validation_record(ckpt: dict[str, Any], output: Any) -> ValidationRecord | None:
    """The checkpoint's validation outputs, calibrated at its model prior, or None for an older checkpoint."""
    rec = ckpt.get("validation_outputs")
    if not rec:
        return None
    probs = output.with_prior(None).apply(sigmoid(np.asarray(rec["logits"], dtype=np.float64)))[0]
    return ValidationRecord(probs, (np.asarray(rec["labels"]) > 0).astype(int))


def _raw_logits(model: torch.nn.Module, pixels: np.ndarray, prep: Any, batch_size: int = 64) -> np.ndarray:
    """The pneumonia logit of every image, from the frozen inference form of `model` as it is now."""
    out = predict_logits(freeze(model), torch.from_numpy(np.ascontiguousarray(pixels)), prep, batch_size)
    return pneumonia_logit(out.float()).cpu().numpy().astype(np.float64)


def adapt_model(loaded: Any, ckpt_path: str | os.PathLike, pixels: np.ndarray, labels: np.ndarray | None = None,
                batchnorm: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(a copy of `loaded.model` fitted to the site of (N, S, S) uint8 `pixels`, the record of what was done).

    `labels` (N,) holds 0 / 1 for labelled images and -1 for the rest: with at least
    `MIN_LABELLED_PER_CLASS` of each class the calibration is refitted on them and the site's sensitivity,
    specificity and accuracy are estimated."""
    ckpt, prep = loaded.checkpoint, loaded.config.preprocessing
    output = output_map(ckpt, ckpt_path, loaded.threshold).with_prior(None)
    model = copy.deepcopy(loaded.model).eval().to(memory_format=memory_format(torch.device("cpu")))
    source = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(np.ascontiguousarray(pixels))

    def score(_: Any) -> np.ndarray:
        return output.apply(sigmoid(_raw_logits(model, pixels, prep)))[0]

    def adapt(weights: np.ndarray) -> None:
        model.load_state_dict(source)
        adapt_batchnorm(model, x, lambda p: model_input(p, prep), weights)

    record: dict[str, Any] = {"images": int(len(pixels)), "batchnorm": None}
    if batchnorm:
        mix = batchnorm_mix(ckpt)
        rounds = em_weights_loop(score, adapt, output.model_prior, mix)
        record["batchnorm"] = {"layers_adapted": sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                     for m in model.modules()),
                               "site_share": len(pixels) / (len(pixels) + PRIOR_STRENGTH),
                               "class_mix_kept": mix, "prevalence_by_round": rounds}
    p_model = score(None)
    record["prevalence"] = prevalence_check(p_model, output.model_prior, output.threshold, validation_record(ckpt, output))
    record["prevalence"]["source"] = "unlabelled images"
    if labels is not None and (labels >= 0).any():
        record["labelled"] = fit_labels(_raw_logits(model, pixels, prep), labels, record, output.temperature)
    return model, record


def fit_labels(logits: np.ndarray, labels: np.ndarray, record: dict[str, Any], temperature: float) -> dict[str, Any]:
    """The calibration's offset refitted on the labelled rows (the temperature kept from validation), the
    prevalence re-estimated by EM on the rest with it, and the rates to expect at the site by leave-one-out.
    DataError when a class has too few rows."""
    known = labels >= 0
    y, z = labels[known].astype(int), logits[known]
    counts = {name: int((y == v).sum()) for name, v in LABELS.items()}
    if min(counts.values()) < MIN_LABELLED_PER_CLASS:
        raise DataError(f"labels: {counts['NORMAL']} NORMAL and {counts['PNEUMONIA']} PNEUMONIA rows; refitting the "
                        f"calibration needs at least {MIN_LABELLED_PER_CLASS} of each")

    def fit(y_: np.ndarray, z_: np.ndarray) -> tuple[float, float]:
        return temperature, fit_offset(y_, z_, temperature)

    offset = fit(y, z)[1]
    labelled_mix = float(y.mean())
    rest = logits[~known] if (~known).sum() >= MIN_IMAGES else logits
    em = estimate_prevalence(sigmoid(rest / temperature + offset), labelled_mix)
    decisions = leave_one_out_rates(z, y, em["prevalence"], fit)
    record["prevalence"].update(prevalence=em["prevalence"], interval=em["interval"],
                                source="unlabelled images, calibrated on the labelled rows", trusted=True,
                                n=em["n"], labelled_check=record["prevalence"].get("prevalence"))
    return {"rows": counts, "calibration": {"method": "platt", "temperature": temperature, "offset": offset,
                                            "fitted_on": "site labels (the offset; the temperature from validation)",
                                            "model_prior": labelled_mix},
            "expected": expected_rates(decisions, y, em["prevalence"], em["interval"])}


def read_labels(path: str | os.PathLike, image_paths: list[str]) -> np.ndarray:
    """The labels CSV as (N,) 0 / 1 / -1 aligned with `image_paths`: rows name a file among the images (by
    its path as given, or its file name when that is unique). DataError naming the file, row and reason."""
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(image_paths):
        by_name.setdefault(Path(p).name, []).append(i)
    index = {p: i for i, p in enumerate(image_paths)}
    labels = np.full(len(image_paths), -1, dtype=int)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: a labels CSV needs the columns path,label (found {reader.fieldnames})")
            for row_no, row in enumerate(reader, start=2):
                labels[_row_index(path, row_no, row, index, by_name)] = _label_of(path, row_no, row["label"])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the labels ({e})") from None
    return labels


def _row_index(path: Any, row_no: int, row: dict[str, str], index: dict[str, int], by_name: dict[str, list[int]]) -> int:
    name = (row.get("path") or "").strip()
    if name in index:
        return index[name]
    found = by_name.get(Path(name).name, [])
    if len(found) != 1:
        why = "is not among the images" if not found else f"names {len(found)} of the images; give its path"
        raise DataError(f"{path}, row {row_no}: {name!r} {why}")
    return found[0]


def _label_of(path: Any, row_no: int, text: str | None) -> int:
    label = (text or "").strip().upper()
    if label not in LABELS:
        raise DataError(f"{path}, row {row_no}: label {text!r} is not NORMAL or PNEUMONIA")
    return LABELS[label]


def decode_site(inputs: Iterable[str], prep: Any) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(the readable images' paths, their (N, S, S) pixels, {path: reason} for the rest)."""
    from ..io.images import expand_paths, load_for_model

    paths, pixels, errors = [], [], {}
    for path in expand_paths(inputs):
        try:
            pixels.append(load_for_model(path, prep.image_size, prep.resize_filter))
            paths.append(path)
        except ImageLoadError as e:
            errors[path] = e.reason
    size = prep.image_size
    return paths, np.stack(pixels) if pixels else np.zeros((0, size, size), np.uint8), errors


def adapt_checkpoint(checkpoint: str | os.PathLike, inputs: Iterable[str], out: str | os.PathLike,
                     labels_csv: str | os.PathLike | None = None, batchnorm: bool = True,
                     device: str = "cpu") -> dict[str, Any]:
    """Adapt `checkpoint` to the images under `inputs` and write the adapted checkpoint to `out`; returns
    the adaptation record (also stored in the checkpoint as "adaptation"). DataError when fewer than
    `MIN_IMAGES` images could be read, or the labels cannot be used."""
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise ValueError(f"{out}: is the checkpoint being adapted; write the adapted one to another file")
    loaded = ckpt_io.load(checkpoint, device)
    paths, pixels, errors = decode_site(inputs, loaded.config.preprocessing)
    if len(paths) < MIN_IMAGES:
        raise DataError(f"{len(paths)} readable images under {', '.join(map(str, inputs))}: adapting to a site needs "
                        f"at least {MIN_IMAGES} (a few hundred for a precise prevalence)")
    labels = read_labels(labels_csv, paths) if labels_csv else None
    model, record = adapt_model(loaded, checkpoint, pixels, labels, batchnorm)
    record.update(unreadable=errors, checkpoint=str(checkpoint), warnings=_warnings(record))
    adapted = dict(loaded.checkpoint)
    adapted["state_dict"] = {k: v.detach().cpu() for k, v in ckpt_io.unwrap(model).state_dict().items()}
    if "labelled" in record:
        cal = record["labelled"]["calibration"]
        adapted["calibration"] = {k: cal[k] for k in ("method", "temperature", "offset", "fitted_on")}
        adapted["model_prior"] = cal["model_prior"]
        adapted["threshold"], adapted["threshold_rule"] = 0.5, {"rule": "fixed", "chosen_on": "site labels"}
        adapted["threshold_interval"] = None
    adapted["adaptation"] = record
    ckpt_io.save(adapted, out)
    return record


def _warnings(record: dict[str, Any]) -> list[str]:
    found = []
    if record["images"] < FEW_IMAGES:
        found.append(f"only {record['images']} images: the statistics and the prevalence are imprecise "
                     f"(a few hundred are better)")
    prevalence = record["prevalence"]
    if not prevalence.get("trusted", True):
        found.append("the prevalence estimate is not to be trusted: " + "; ".join(prevalence["reasons"]))
    return found


def summary(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """What every output says about a checkpoint's adaptation to a site (None when it was not adapted): from
    how many images, the site's prevalence and whether to trust it, the expected rates when labels were given."""
    record = ckpt.get("adaptation")
    if not record:
        return None
    prevalence = record.get("prevalence", {})
    labelled = record.get("labelled") or {}
    return {"images": record.get("images"), "batchnorm": bool(record.get("batchnorm")),
            "prevalence": prevalence.get("prevalence"), "prevalence_interval": prevalence.get("interval"),
            "prevalence_trusted": prevalence.get("trusted"), "labelled_rows": labelled.get("rows"),
            "expected": labelled.get("expected"), "warnings": record.get("warnings", [])}
