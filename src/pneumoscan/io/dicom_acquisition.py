"""What a DICOM header says about the acquisition, against what the model was trained on.

`acquisition_warnings` reads the view, body part, modality, age, colour, bits and field of view of a
pydicom dataset and says in plain sentences what the model was not trained for. `dicom` owns reading and
decoding the file; this module only reads header attributes.
"""

from __future__ import annotations

import warnings
from typing import Any

# What the model was trained on: frontal chest radiographs (CR/DX) of children aged one to five.
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")
RADIOGRAPH_MODALITIES = ("CR", "DX")
ADULT_AGE_YEARS = 18  # an age in completed years at or over this is an adult's
CHEST_FIELD_OF_VIEW_MM = (50.0, 500.0)  # narrower or wider than this is not a whole chest
_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _text(ds: Any, keyword: str) -> str:
    """An attribute as upper-case text on one line, at most 64 characters ('' when absent or empty); the first value
    of a multi-valued one."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element
        return ""
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__"):
        value = value[0] if len(value) else ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return " ".join(str(value).split())[:64].upper()


def _raw(ds: Any, keyword: str) -> str:
    """The attribute's value as written, on one line and at most 64 characters, for quoting in a warning."""
    try:
        element = ds.get_item(keyword)
        value = element.value if element is not None else ""
    except Exception:
        return "?"
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    return " ".join(str(value).split())[:64]


def _age_years(ds: Any) -> tuple[float | None, str]:
    """(age in years or None, where it was read from) from PatientAge, else PatientBirthDate and the study's date.

    ValueError quoting the attribute when one is given but cannot be read.
    """
    import datetime as dt

    age = _text(ds, "PatientAge")
    if age:
        if len(age) != 4 or not age[:3].isdigit() or age[3] not in _AGE_UNITS:
            raise ValueError(f"PatientAge {_raw(ds, 'PatientAge')!r} cannot be read as an age (expected e.g. 004Y)")
        return int(age[:3]) * _AGE_UNITS[age[3]], f"PatientAge {age}"
    birth = _text(ds, "PatientBirthDate")
    on = next(((k, _text(ds, k)) for k in ("StudyDate", "AcquisitionDate", "ContentDate") if _text(ds, k)), None)
    if not birth or on is None:
        return None, ""
    try:
        born = dt.datetime.strptime(birth[:8], "%Y%m%d").date()
        seen = dt.datetime.strptime(on[1][:8], "%Y%m%d").date()
    except ValueError:
        raise ValueError(f"PatientBirthDate {_raw(ds, 'PatientBirthDate')!r} and {on[0]} {_raw(ds, on[0])!r} "
                         "cannot be read as dates (expected YYYYMMDD)") from None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return float(years), f"PatientBirthDate {birth[:8]} and {on[0]} {on[1][:8]}"


def _spacing_warning(ds: Any) -> str | None:
    """A warning when PixelSpacing (or ImagerPixelSpacing) x Rows/Columns is not a chest's field of view."""
    keyword = next((k for k in ("PixelSpacing", "ImagerPixelSpacing") if _text(ds, k)), None)
    if keyword is None:
        return None
    try:
        value = ds.get(keyword)
        row_mm, col_mm = (float(value[0]), float(value[1])) if len(value) >= 2 else (float(value[0]),) * 2
        height, width = row_mm * int(ds.Rows), col_mm * int(ds.Columns)
    except Exception:
        return f"{keyword} {_raw(ds, keyword)!r} cannot be read, so the field of view was not checked"
    lo, hi = CHEST_FIELD_OF_VIEW_MM
    if not (lo <= width <= hi and lo <= height <= hi):
        return (f"{keyword} {row_mm:g}\\{col_mm:g} mm over {ds.Columns}x{ds.Rows} pixels gives a field of view of "
                f"{width / 10:.1f} x {height / 10:.1f} cm, outside the {lo / 10:g}-{hi / 10:g} cm of a chest radiograph")
    return None


def acquisition_warnings(ds: Any) -> list[str]:
    """Plain sentences about what in a DICOM header the model was not trained for; [] when nothing is.

    Reads ViewPosition, BodyPartExamined, Modality, PatientAge (or PatientBirthDate with the study's date),
    PhotometricInterpretation, BitsStored and PixelSpacing/ImagerPixelSpacing. An absent attribute gives no
    warning; one that is present but cannot be read does. No sentence holds a ';', so a list of them can be
    joined with '; ' and split again. Never raises.
    """
    found: list[str] = []
    checks = (_view_warning, _body_part_warning, _modality_warning, _age_warning, _colour_warning,
              _bits_warning, _spacing_warning)
    for check in checks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's complaints about a value; the check says what it found
                message = check(ds)
        except Exception as e:  # a header too malformed to check this one thing
            message = f"{check.__name__.strip('_').replace('_warning', '')} could not be checked ({type(e).__name__})"
        if message:
            found.append(message.replace(";", ","))
    return found


def _view_warning(ds: Any) -> str | None:
    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        return f"ViewPosition {view}: a lateral view, but the model was trained on frontal (PA/AP) chest radiographs"
    return None


def _body_part_warning(ds: Any) -> str | None:
    part = _text(ds, "BodyPartExamined")
    if part and part not in CHEST_BODY_PARTS:
        return f"BodyPartExamined {part}: not a chest, but the model was trained on chest radiographs"
    return None


def _modality_warning(ds: Any) -> str | None:
    modality = _text(ds, "Modality")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"Modality {modality}: not a radiograph (CR or DX), but the model was trained on chest radiographs"
    return None


def _age_warning(ds: Any) -> str | None:
    try:
        years, source = _age_years(ds)
    except ValueError as e:
        return f"{e}, and the model was trained on children aged 1 to 5"
    if years is not None and years >= ADULT_AGE_YEARS:
        return f"{source}: an adult of {years:.0f} years, but the model was trained on children aged 1 to 5"
    return None


def _colour_warning(ds: Any) -> str | None:
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric and not photometric.startswith("MONOCHROME"):
        return (f"PhotometricInterpretation {photometric}: a colour image, converted to grey, but "
                "the model was trained on greyscale radiographs")
    return None


def _bits_warning(ds: Any) -> str | None:
    if not _text(ds, "BitsStored"):
        return None
    bits = int(ds.BitsStored)
    if not 8 <= bits <= 16:
        return f"BitsStored {bits}: a radiograph stores 8 to 16 bits a pixel"
    return None
