"""One result record per scored image, under the same names in every output.

`ImageResult` is what predict, evaluate, explain, the DICOM node and the web API report about one image;
each front end adds only what identifies the image (a path, an uploaded file's name, DICOM UIDs) and
what it alone has (evaluate the true label, explain the heatmap file). `result_columns` and
`result_cells` are the CSV form every command writes; `result_json` the API's.

The columns, for a person reading the CSV:
- `p_pneumonia`: the probability of pneumonia (0-1), calibrated, at `assumed_prevalence`;
- `label`: the decision, PNEUMONIA when `p_pneumonia` is at or above `threshold`;
- `p_<CLASS>`: each class's probability, three-class models only;
- `error`: why the file could not be scored (the other cells are then empty);
- `warnings`: what about the image may make the answer less reliable, joined by "; ";
- `assumed_prevalence`: the share of pneumonia among the images that `p_pneumonia` assumes (Bayes' prior);
  `prevalence_source` says where it comes from: `model` (the training split's mix, after calibration),
  `given` (`--prevalence`), `estimated` (`--prevalence estimated`) or `adapted` (`pneumoscan adapt`);
- `ood_score`, `ood_threshold`, `outside_training`: the out-of-distribution score, the score at or above
  which an image is flagged, and the flag (empty for a checkpoint without a detector).

A text cell that a spreadsheet would run as a formula (it starts with `=`, `+`, `-`, `@`, a tab or a carriage
return, after any single quotes) is written with a single quote in front (`spreadsheet_safe`, OWASP's
convention for CSV injection); `original_cell` takes it off again. Numbers are written as they are.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .fileio import atomic_write_text


@dataclass
class ImageResult:
    """What is known about one scored (or unreadable) image."""

    path: str  # as given: a file path, an uploaded file's name, a DICOM instance's file
    p_pneumonia: float | None  # P(pneumonia) for either task; None when the image could not be scored
    label: str | None
    threshold: float | None = None  # the decision threshold that applies to p_pneumonia
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    probabilities: dict[str, float] | None = None  # per class, three-class models only
    assumed_prevalence: float | None = None  # the prior p_pneumonia is at (None: unknown to the checkpoint)
    prevalence_source: str = "model"  # model | given | estimated
    ood_score: float | None = None  # None: no detector, an unreadable image, or an infinite score (flagged)
    ood_threshold: float | None = None
    outside_training: bool | None = None  # None without a detector

    @property
    def probability(self) -> float | None:
        """Deprecated name of `p_pneumonia`, kept for code written against pneumoscan 0.x."""
        return self.p_pneumonia


def result_columns(class_names: Sequence[str]) -> list[str]:
    """The record's CSV columns, after the front end's own leading columns; three-class models add p_<CLASS>."""
    per_class = [f"p_{n}" for n in class_names] if len(class_names) > 2 else []
    return ["p_pneumonia", "label", "threshold", *per_class, "error", "warnings", "assumed_prevalence",
            "prevalence_source", "ood_score", "ood_threshold", "outside_training"]


def _number(value: float | None, spec: str = "{:.6f}") -> str:
    return "" if value is None else spec.format(value)


def result_cells(r: ImageResult, class_names: Sequence[str]) -> dict[str, str]:
    """The record as CSV cells keyed by `result_columns`: probabilities to 6 decimals, an unreadable image's
    result cells empty, an infinite out-of-distribution score written as inf."""
    scored = r.p_pneumonia is not None
    cells = {"p_pneumonia": _number(r.p_pneumonia), "label": r.label or "",
             "threshold": _number(r.threshold) if scored else "", "error": r.error or "",
             "warnings": "; ".join(r.warnings),
             "assumed_prevalence": _number(r.assumed_prevalence) if scored else "",
             "prevalence_source": r.prevalence_source if scored else "",
             "ood_score": "", "ood_threshold": "", "outside_training": ""}
    if len(class_names) > 2:
        cells.update({f"p_{n}": _number((r.probabilities or {}).get(n)) for n in class_names})
    if r.outside_training is not None:
        cells.update(ood_score="inf" if r.ood_score is None else f"{r.ood_score:.4f}",
                     ood_threshold=_number(r.ood_threshold, "{:.4f}"), outside_training="yes" if r.outside_training else "no")
    return cells


def result_json(r: ImageResult) -> dict[str, Any]:
    """The record as the API's JSON fields (numbers as numbers; an infinite score as null, flagged)."""
    score = r.ood_score if r.ood_score is None or math.isfinite(r.ood_score) else None
    return {"p_pneumonia": r.p_pneumonia, "label": r.label, "threshold": r.threshold,
            "probabilities": r.probabilities, "error": r.error, "warnings": list(r.warnings),
            "assumed_prevalence": r.assumed_prevalence, "prevalence_source": r.prevalence_source,
            "ood_score": score, "ood_threshold": r.ood_threshold, "outside_training": r.outside_training}


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula
_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a number, which may start with "-"


def spreadsheet_safe(cell: str) -> str:
    """`cell` as a spreadsheet shows it without running it: a leading quote when it starts with a formula
    character (after any quotes of its own, so that `original_cell` gives back exactly what was written).
    A number such as -0.5 is left as it is: it is a value, not a formula."""
    if cell.lstrip("'")[:1] in FORMULA_STARTS and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def original_cell(cell: str) -> str:
    """The text `spreadsheet_safe` was given: a cell that starts with quotes followed by a formula character
    loses its first quote; any other cell is as written."""
    return cell[1:] if cell.startswith("'") and cell.lstrip("'")[:1] in FORMULA_STARTS else cell


def write_results_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, str]]) -> None:
    """Every per-image CSV pneumoscan writes: a header of `columns`, one row per image, written atomically as
    valid UTF-8 (bytes of a file name that are not UTF-8 become backslash escapes, `fileio.printable`), every
    text cell `spreadsheet_safe` (a file called `=1+2.png` is not a formula)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows)
    atomic_write_text(path, buf.getvalue())
