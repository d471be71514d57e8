"""A scored radiograph as DICOM objects a PACS keeps and a viewer shows, built with highdicom.

`structured_report` makes a Comprehensive SR in the source image's study (same patient, same study, a
series of its own): the finding as a coded concept (SNOMED CT 233604007 "Pneumonia" or 17621005
"Normal"), the probability and the decision threshold as numeric measurements, the model (TID 4019
algorithm identification: name, pneumoscan version, recipe and checkpoint), the research-use statement,
each warning about the image as text, and a reference to the source image. `secondary_capture` makes a
Secondary Capture image of a Grad-CAM overlay in the same study. (`pip install 'pneumoscan[dicom-node]'`)

Both copy the source's patient and study attributes; `source_header` makes every Type 2 one that highdicom
reads present, empty where the source lacks it or holds a value highdicom cannot read, as de-identified
files often do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fileio import optional_import

RESEARCH_USE = "Research use only; not for diagnosis"
MANUFACTURER = "pneumoscan"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
# codes of this node's own (DICOM PS3.16 8.2: a private coding scheme designator starts with 99)
SCHEME = "99PNEUMOSCAN"


@dataclass(frozen=True)
class Score:
    """What the node found for one image."""

    probability: float  # P(pneumonia), at the predictor's prior
    pneumonia: bool  # the decision at `threshold`
    label: str  # the class name the model gave
    threshold: float
    warnings: list[str] = field(default_factory=list)
    ood_score: float | None = None
    outside_training: bool | None = None

    @classmethod
    def of(cls, result: Any, class_names: list[str]) -> "Score":
        """The score of a scored `records.ImageResult` (pneumonia: any class but the first, the normal one)."""
        return cls(result.p_pneumonia, result.label != class_names[0], result.label, result.threshold,
                   list(result.warnings), result.ood_score, result.outside_training)


@dataclass(frozen=True)
class ModelInfo:
    """The model that scored: its architecture, the pneumoscan version, recipe and checkpoint file name."""

    name: str
    version: str
    recipe: str
    checkpoint: str


def _hd() -> Any:
    return optional_import("highdicom", "dicom-node", "DICOM Structured Reports")


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that highdicom copies
# from the source: a report must hold each, empty when unknown
TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "AccessionNumber", "StudyID")
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # Float, Double Float and Pixel Data


def _readable(header: Any, keyword: str) -> bool:
    """Whether `keyword` is in `header` with a value highdicom accepts: empty, or one it can parse."""
    from pydicom.valuerep import DA, TM

    parsers = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM, "PatientSex": _hd().PatientSexValues}
    if keyword not in header:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's complaint about a value: the parser decides
            value = header.get(keyword)
            if value is not None and value != "" and keyword in parsers:
                parsers[keyword](value)
    except Exception:  # a value highdicom would refuse, whatever pydicom raises for it
        return False
    return True


def source_header(source: Any) -> Any:
    """A copy of the `source` dataset's header (no pixel data) with every TYPE2_ATTRIBUTES present: empty
    where the source lacks it or holds a value highdicom cannot read (a date not YYYYMMDD, a sex not M, F
    or O). The source is not changed."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset

    # a new dict of the same elements: setting one here replaces it in this copy only
    header = Dataset({tag: source.get_item(tag) for tag in source.keys() if tag not in _PIXEL_TAGS})
    for keyword in TYPE2_ATTRIBUTES:
        if not _readable(header, keyword):
            header.add_new(tag_for_keyword(keyword), dictionary_VR(keyword), None)
    return header


def codes() -> dict[str, Any]:
    """The coded concepts the report uses, by role."""
    from pydicom.sr.codedict import codes as std

    code = _hd().sr.CodedConcept
    return {
        "title": std.LN.DiagnosticImagingReport,
        "finding": std.DCM.Finding,
        "pneumonia": code("233604007", "SCT", "Pneumonia"),
        "normal": std.SCT.Normal,  # 17621005
        "probability": code("PNEUMONIA-P", SCHEME, "Probability of pneumonia"),
        "threshold": code("THRESHOLD", SCHEME, "Decision threshold"),
        "ood_score": code("OOD-SCORE", SCHEME, "Out-of-distribution score"),
        "ood_flag": code("OOD-FLAG", SCHEME, "Outside the training distribution"),
        "warning": code("WARNING", SCHEME, "Warning about the image"),
        "comment": std.DCM.Comment,
        "source": std.SCT.Source,
        "unit": std.UCUM.NoUnits,
    }


def structured_report(source: Any, score: Score, model: ModelInfo, sop_instance_uid: str | None = None,
                      series_instance_uid: str | None = None) -> Any:
    """A Comprehensive SR of `score` for the `source` dataset (a pydicom Dataset, pixel data not needed)."""
    hd = _hd()
    from pydicom.uid import generate_uid

    c = codes()
    sr = hd.sr
    root = sr.ContainerContentItem(name=c["title"])
    items = [
        sr.CodeContentItem(name=c["finding"], value=c["pneumonia"] if score.pneumonia else c["normal"],
                           relationship_type="CONTAINS"),
        sr.NumContentItem(name=c["probability"], value=float(score.probability), unit=c["unit"],
                          relationship_type="CONTAINS"),
        sr.NumContentItem(name=c["threshold"], value=float(score.threshold), unit=c["unit"],
                          relationship_type="CONTAINS"),
    ]
    if score.ood_score is not None and np.isfinite(score.ood_score):
        items.append(sr.NumContentItem(name=c["ood_score"], value=float(score.ood_score), unit=c["unit"],
                                       relationship_type="CONTAINS"))
    if score.outside_training is not None:
        items.append(sr.TextContentItem(name=c["ood_flag"], value="yes" if score.outside_training else "no",
                                        relationship_type="CONTAINS"))
    items += [sr.TextContentItem(name=c["warning"], value=w[:1024], relationship_type="CONTAINS")
              for w in score.warnings]
    items.append(sr.TextContentItem(name=c["comment"], value=RESEARCH_USE, relationship_type="CONTAINS"))
    items.extend(sr.AlgorithmIdentification(name=f"pneumoscan {model.name}", version=model.version,
                                            parameters=[f"recipe {model.recipe}", f"checkpoint {model.checkpoint}",
                                                        f"class {score.label}"]))
    items.append(sr.ImageContentItem(name=c["source"], referenced_sop_class_uid=source.SOPClassUID,
                                     referenced_sop_instance_uid=source.SOPInstanceUID, relationship_type="CONTAINS"))
    root.ContentSequence = items
    return sr.ComprehensiveSR(
        evidence=[source_header(source)], content=root, series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, series_description=f"pneumoscan {model.name}: {RESEARCH_USE}"[:64])


def secondary_capture(source: Any, rgb: np.ndarray, sop_instance_uid: str | None = None,
                      series_instance_uid: str | None = None) -> Any:
    """A Secondary Capture image of an RGB uint8 overlay, in the `source` dataset's study."""
    hd = _hd()
    from pydicom.uid import generate_uid

    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_header(source), pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=tuple(orientation) if orientation and len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    from pydicom.dataset import Dataset

    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = "Grad-CAM evidence for pneumonia drawn over the source image by pneumoscan"
    sc.SeriesDescription = f"pneumoscan Grad-CAM: {RESEARCH_USE}"[:64]
    sc.ImageComments = RESEARCH_USE
    return sc


def read_report(ds: Any) -> dict[str, Any]:
    """The finding, probability, threshold, texts and source reference of a report made by `structured_report`."""
    c = codes()
    out: dict[str, Any] = {"warnings": [], "texts": []}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "CODE" and name == c["finding"].value:
            out["finding"] = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "NUM":
            key = {c["probability"].value: "probability", c["threshold"].value: "threshold",
                   c["ood_score"].value: "ood_score"}.get(name)
            if key:
                value = item.MeasuredValueSequence[0]
                out[key] = float(value.get("FloatingPointValue", value.NumericValue))  # FD when given: full precision
        elif item.ValueType == "TEXT":
            (out["warnings"] if name == c["warning"].value else out["texts"]).append(item.TextValue)
        elif item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            out["source"] = (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
    return out
