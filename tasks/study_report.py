"""The per-study report: one row of facts about an Orthanc study ("study is stable" notification).

Pure logic: no Prefect, no network, no clock. ``build_row`` turns documents already fetched from Orthanc
(``StudyDocuments``, see ``tasks.orthanc_study``) into a ``ReportRow``; ``report_frame``,
``table_for_artifact`` and ``write_report_files`` present it (pandas is imported inside those only, so
building a row stays cheap). Other code (the HL7 builder, the CSV reader of a site) reads the row by column
name: ``REPORT_COLUMNS`` never changes order, and site-configured extra tags come after it.

Values are ``str``, ``int``, ``float`` or ``None``. ``None`` means "not available" and is never replaced by
0 or an empty string; an empty DICOM value is ``None`` too, so no value is ever ``""``.

Definitions
-----------
- Text: as stored in DICOM, stripped; a multi-valued element is joined with "," (no backslashes). Person
  names stay DICOM PN strings (family^given^middle^prefix^suffix). Dates are YYYYMMDD ("YYYY.MM.DD" and
  "YYYY-MM-DD" are normalised; anything else is None with a warning); times are as stored.
- Study and patient fields come from Orthanc's study document (its main DICOM tags), else from the first
  instance that has them. ``modalities`` and ``station_names`` are the distinct values over all series and
  instances, sorted. ``institution_name`` is the distinct values in the order first seen.
- ``number_of_instances``: the instances Orthanc holds for the study (every SOP instance: images, dose SRs,
  presentation states...). ``number_of_frames``: the sum over those instances of Number of Frames
  (0028,0008); an instance without it, or with an unreadable value (warned), counts 1. So a 3-frame
  multi-frame image is 1 instance and 3 frames (C18), and a dose SR counts 1 frame.
- ``sources``: the distinct per-instance sources, sorted and joined with ",": the user metadata that the
  share ingest writes (``source_metadata``, default ``IngestSource``), else Orthanc's ``RemoteAET`` (set for
  C-STORE only; Orthanc 1.10 stores it empty for REST uploads), else none, which gives one warning (C09).
- ``same_uid_studies``: Orthanc study IDs hash PatientID and StudyInstanceUID, so one UID under two Patient
  IDs is two Orthanc studies, each holding part of the images (C10). The caller finds them; the row is
  still built and carries a warning that names the other Orthanc study IDs.

Dose
----
From the image headers (every instance):

- ``ctdivol_mgy``: max of CTDIvol (0018,9345), mGy.
- ``kvp``: max of KVP (0018,0060), kV.
- ``exposure_mas``: sum of Exposure in uAs (0018,1153) / 1000 when present (it is the more precise of the
  two), else Exposure (0018,1152), mAs.
- ``dap_gycm2``: sum of Image and Fluoroscopy Area Dose Product (0018,115E). PS3.3 gives it in dGy*cm*cm,
  so it is divided by 10 to give Gy·cm². The standard says every image reconstructed from one irradiation
  event carries that event's value, so instances sharing an Irradiation Event UID (0008,3010) count once.
  Like the standard notes, a sum over images may still miss unrecorded fluoroscopy.

From a radiation dose SR in the study: X-Ray Radiation Dose SR (1.2.840.10008.5.1.4.1.1.88.67), or an
Enhanced/Comprehensive SR (88.22/88.33) whose template is TID 10001/10011 or whose title is
(113701, DCM) "X-Ray Radiation Dose Report". Its content tree is read from Orthanc's simplified tags
(nested ``ContentSequence`` lists):

- ``dlp_mgycm``: CT Dose Length Product Total (113813, DCM), mGy·cm.
- ``ctdivol_mgy``: max Mean CTDIvol (113830, DCM) over the CT acquisitions, mGy.
- ``dap_gycm2``: Dose Area Product Total (113722, DCM; Gy·m² in TID 10002), summed over acquisition planes.

Units are read from each value's UCUM code and converted (unknown unit: value ignored, warned). Several dose
SRs in one study are usually re-sends of a growing cumulative report, so the largest total is kept (warned).
SR values win over header values for CTDIvol and DAP. ``dose_source`` is ``"sr"`` when a dose SR gave at
least one of DLP/CTDIvol/DAP, else ``"headers"`` when any dose column came from image headers, else
``None``. kVp and mAs always come from the headers.

Numbers are parsed leniently: surrounding spaces are stripped, an over-long DS (more than 16 characters,
C16a) is accepted, a decimal comma is read as a point with a warning (C16b "12,5" -> 12.5), an IS written as
an integral decimal ("1.0") is accepted; anything else unparseable is ignored with a warning naming the tag
(never the patient or the value). Dose values are computed in decimal arithmetic and rounded half-up to
2 decimals after aggregation (12.3456789012345678 -> 12.35, 12.345 -> 12.35). When an X-ray modality (or no
modality at all) has none of DLP, CTDIvol or DAP, the warning "no dose information in the image headers or
a dose SR" is added; the row is still produced (C16c). Studies of non-X-ray modalities only (MR, US...)
carry no such warning.

Warnings are joined with "; " in the ``warnings`` column. They name tags, counts and Orthanc IDs, never
patient names, IDs or values.

Files
-----
``write_report_files`` writes ``<stem>.csv`` (UTF-8, RFC 4180, one header line and one row) and
``<stem>.json`` (records orient: a list with one object), each atomically. Convention for "not available":
an empty CSV cell and a JSON ``null`` (no value is ever ``""``, so the empty cell is unambiguous).
``read_report_csv`` and ``read_report_json`` read them back with ``REPORT_DTYPES`` (pandas ``string``,
``Int64`` and ``Float64``; extra columns ``string``); a reader of its own must pass the same dtypes and
``keep_default_na=False, na_values=[""]``, or a patient ID such as "NA" would become missing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import pandas

REPORT_COLUMNS: tuple[str, ...] = (
    "orthanc_study_id",
    "study_instance_uid",
    "accession_number",
    "patient_id",
    "issuer_of_patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "study_date",
    "study_time",
    "study_description",
    "modalities",
    "institution_name",
    "station_names",
    "referring_physician",
    "number_of_series",
    "number_of_instances",
    "number_of_frames",
    "sources",
    "ctdivol_mgy",
    "dlp_mgycm",
    "dap_gycm2",
    "kvp",
    "exposure_mas",
    "dose_source",
    "warnings",
    "routes",
    "routed_study_uids",
)

INT_COLUMNS = frozenset({"number_of_series", "number_of_instances", "number_of_frames"})
FLOAT_COLUMNS = frozenset({"ctdivol_mgy", "dlp_mgycm", "dap_gycm2", "kvp", "exposure_mas"})

# pandas dtypes of the report's columns; every other (extra) column is "string".
REPORT_DTYPES: dict[str, str] = {
    c: "Int64" if c in INT_COLUMNS else "Float64" if c in FLOAT_COLUMNS else "string" for c in REPORT_COLUMNS
}

NOT_AVAILABLE = "not available"
NO_DOSE_WARNING = "no dose information in the image headers or a dose SR"

DOSE_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.67"
GENERIC_SR_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"})
DOSE_TEMPLATES = frozenset({"10001", "10011"})  # Projection X-Ray / CT Radiation Dose
DOSE_REPORT_TITLE = ("113701", "DCM")

# Modalities that expose the patient to X-rays: a study of these without any dose value is worth a warning.
XRAY_MODALITIES = frozenset({"CT", "CR", "DX", "MG", "XA", "RF", "PX", "IO", "RG", "DR"})

_TWO_PLACES = Decimal("0.01")
_MAX_NUMBER = Decimal("1e15")
_DS = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_DS_COMMA = re.compile(r"[+-]?\d+,\d+")
_IS = re.compile(r"[+-]?\d+")
_DATE = re.compile(r"(\d{4})[.-]?(\d{2})[.-]?(\d{2})")
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_TAG = re.compile(r"[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}")
_STRIP = " \t\r\n\x00"


# -- input -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceDocuments:
    """One instance as Orthanc describes it.

    ``tags``: its simplified tags (``GET /instances/{id}/tags?simplify``, or one entry of
    ``/studies/{id}/instances-tags?simplify``): keyword -> string, ``None`` (binary or too long) or a list of
    such mappings for a sequence; an SR's content tree is in its nested ``ContentSequence``.
    ``metadata``: ``GET /instances/{id}/metadata?expand`` (name -> string; missing names are simply absent).
    """

    orthanc_id: str
    tags: Mapping[str, Any]
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyDocuments:
    """Everything ``build_row`` reads, already fetched: ``study`` is ``GET /studies/{id}``, ``series`` is
    ``GET /studies/{id}/series?expand``, ``instances`` one entry per instance, in the order "first instance
    that has it" should follow (series, then instance number)."""

    study: Mapping[str, Any]
    series: Sequence[Mapping[str, Any]] = ()
    instances: Sequence[InstanceDocuments] = ()

    @property
    def study_id(self) -> str:
        return str(self.study.get("ID", ""))


class ExtraTag(BaseModel):
    """A site-configured DICOM attribute appended to the report as a column named by its keyword.

    In configuration either a keyword (``BodyPartExamined``) or a mapping with the keyword and, for an
    attribute Orthanc has no keyword for (private tags), its tag: ``{keyword: ScannerMode, tag: "0019,10a0"}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keyword: str = Field(description="DICOM keyword; also the column name.")
    tag: str | None = Field(
        None, description='Group and element in hex, "gggg,eeee"; used when Orthanc has no keyword for it.'
    )

    @model_validator(mode="before")
    @classmethod
    def _from_keyword(cls, data: Any) -> Any:
        return {"keyword": data} if isinstance(data, str) else data

    @field_validator("keyword")
    @classmethod
    def _keyword(cls, v: str) -> str:
        v = v.strip()
        if not _KEYWORD.fullmatch(v):
            raise ValueError("an extra tag's keyword is letters and digits, e.g. BodyPartExamined")
        if v in REPORT_COLUMNS:
            raise ValueError(f"{v!r} is already a report column")
        return v

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip().strip("()")
        if not _TAG.fullmatch(v):
            raise ValueError('a tag is written "gggg,eeee" in hex, e.g. "0018,0015"')
        return v


# -- output ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportRow:
    """One study's facts: ``values`` holds every column of ``REPORT_COLUMNS`` then the extra tags, in that
    order; ``warnings`` the same warnings the ``warnings`` column joins with "; "."""

    values: dict[str, Any]
    warnings: list[str]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.values)


# -- number parsing -----------------------------------------------------------------------------------------
def parse_ds(value: Any) -> tuple[Decimal | None, str | None]:
    """Read a Decimal String leniently. Returns (number, problem): ``(None, None)`` when the value is absent
    or empty; a problem text (for a warning, without the value) when the value was repaired or unusable."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, "not a single number"
    text = value.strip(_STRIP)
    if not text:
        return None, None
    if "\\" in text:
        return None, "more than one value where one is expected"
    problem = None
    if _DS_COMMA.fullmatch(text):
        text, problem = text.replace(",", "."), "decimal comma read as a decimal point"
    if not _DS.fullmatch(text):
        return None, "not a number"
    number = Decimal(text)
    if abs(number) >= _MAX_NUMBER:
        return None, "out of range"
    return number, problem


def parse_is(value: Any) -> tuple[int | None, str | None]:
    """Read an Integer String leniently (an integral decimal such as "1.0" is accepted). Same contract as
    ``parse_ds``."""
    number, problem = parse_ds(value)
    if number is None:
        return None, problem
    if number != number.to_integral_value():
        return None, "not a whole number"
    return int(number), problem


def round_dose(number: Decimal | None) -> float | None:
    """The documented rounding of dose values: half-up to 2 decimals."""
    return None if number is None else float(number.quantize(_TWO_PLACES, rounding=ROUND_HALF_UP))


class _Problems:
    """Counts repaired or unusable values per tag, so a 500-slice series gives one warning, not 500."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, label: str, problem: str | None) -> None:
        if problem:
            self._counts[(label, problem)] = self._counts.get((label, problem), 0) + 1

    def messages(self) -> list[str]:
        return [f"{label}: {problem} in {n} instance(s)" for (label, problem), n in self._counts.items()]


# -- text ---------------------------------------------------------------------------------------------------
def _text(value: Any) -> str | None:
    """A DICOM value as report text: stripped, multi-values joined with ",", empty -> None."""
    if value is None or isinstance(value, (list, dict, bool)):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    parts = [p.strip(_STRIP) for p in str(value).split("\\")]
    joined = ",".join(p for p in parts if p)
    return joined or None


def _main_tags(doc: Mapping[str, Any], key: str = "MainDicomTags") -> Mapping[str, Any]:
    tags = doc.get(key)
    return tags if isinstance(tags, Mapping) else {}


def _tag_sources(docs: StudyDocuments, level: str) -> Iterator[Mapping[str, Any]]:
    """Study-level (or patient-level) main tags first, then each instance's tags."""
    yield _main_tags(docs.study, "PatientMainDicomTags" if level == "patient" else "MainDicomTags")
    for inst in docs.instances:
        yield inst.tags


def _first_text(keyword: str, sources: Iterable[Mapping[str, Any]]) -> str | None:
    for tags in sources:
        text = _text(tags.get(keyword))
        if text is not None:
            return text
    return None


def _distinct(values: Iterable[str | None], *, sort: bool) -> str | None:
    seen: dict[str, None] = {}
    for v in values:
        for part in (v or "").split(","):
            if part:
                seen.setdefault(part, None)
    out = sorted(seen) if sort else list(seen)
    return ",".join(out) or None


def _date(text: str | None, label: str, warnings: list[str]) -> str | None:
    if text is None:
        return None
    m = _DATE.fullmatch(text)
    if m:
        return "".join(m.groups())
    warnings.append(f"{label} is not a date (YYYYMMDD): not reported")
    return None


# -- dose ---------------------------------------------------------------------------------------------------
@dataclass
class _Dose:
    ctdivol: Decimal | None = None
    dlp: Decimal | None = None
    dap: Decimal | None = None
    kvp: Decimal | None = None
    exposure: Decimal | None = None


def _max(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    return b if a is None else a if b is None else max(a, b)


def _add(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    return b if a is None else a if b is None else a + b


def _header_dose(instances: Sequence[InstanceDocuments], problems: _Problems) -> _Dose:
    dose = _Dose()
    events_seen: set[str] = set()
    for inst in instances:
        tags = inst.tags
        value, problem = parse_ds(tags.get("CTDIvol"))
        problems.add("CTDIvol (0018,9345)", problem)
        dose.ctdivol = _max(dose.ctdivol, value)

        value, problem = parse_ds(tags.get("KVP"))
        problems.add("KVP (0018,0060)", problem)
        dose.kvp = _max(dose.kvp, value)

        micro, problem = parse_is(tags.get("ExposureInuAs"))
        problems.add("ExposureInuAs (0018,1153)", problem)
        if micro is not None:
            dose.exposure = _add(dose.exposure, Decimal(micro) / 1000)
        else:
            milli, problem = parse_is(tags.get("Exposure"))
            problems.add("Exposure (0018,1152)", problem)
            dose.exposure = _add(dose.exposure, None if milli is None else Decimal(milli))

        value, problem = parse_ds(tags.get("ImageAndFluoroscopyAreaDoseProduct"))
        problems.add("ImageAndFluoroscopyAreaDoseProduct (0018,115E)", problem)
        if value is not None:
            event = _text(tags.get("IrradiationEventUID"))
            if event is None or event not in events_seen:
                dose.dap = _add(dose.dap, value / 10)  # dGy·cm² -> Gy·cm²
            if event is not None:
                events_seen.add(event)
    return dose


# concept (code value, DCM) -> (column, how values combine inside one SR, unit -> factor to the column's unit)
_SR_CONCEPTS: dict[str, tuple[str, str, dict[str, Decimal]]] = {
    "113813": ("dlp", "sum", {"mGy.cm": Decimal(1), "cGy.cm": Decimal(10), "Gy.cm": Decimal(1000)}),
    "113830": ("ctdivol", "max", {"mGy": Decimal(1), "cGy": Decimal(10), "Gy": Decimal(1000)}),
    "113722": (
        "dap",
        "sum",
        {
            "Gy.m2": Decimal(10000),
            "dGy.cm2": Decimal("0.1"),
            "cGy.cm2": Decimal("0.01"),
            "mGy.cm2": Decimal("0.001"),
            "Gy.cm2": Decimal(1),
            "uGy.m2": Decimal("0.01"),
        },
    ),
}
_CONCEPT_NAMES = {
    "113813": "CT Dose Length Product Total",
    "113830": "Mean CTDIvol",
    "113722": "Dose Area Product Total",
}


def _first_item(tags: Mapping[str, Any], keyword: str) -> Mapping[str, Any]:
    seq = tags.get(keyword)
    if isinstance(seq, list) and seq and isinstance(seq[0], Mapping):
        return seq[0]
    return {}


def is_dose_sr(tags: Mapping[str, Any]) -> bool:
    """An X-Ray Radiation Dose SR, or an Enhanced/Comprehensive SR built on a dose template."""
    sop_class = _text(tags.get("SOPClassUID"))
    if sop_class == DOSE_SR_CLASS:
        return True
    if sop_class not in GENERIC_SR_CLASSES:
        return False
    template = _text(_first_item(tags, "ContentTemplateSequence").get("TemplateIdentifier"))
    title = _first_item(tags, "ConceptNameCodeSequence")
    return (
        template in DOSE_TEMPLATES
        or (
            _text(title.get("CodeValue")),
            _text(title.get("CodingSchemeDesignator")),
        )
        == DOSE_REPORT_TITLE
    )


def _content_items(tags: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every content item of an SR tree, in no particular order (iterative: a deep tree cannot exhaust the
    Python stack)."""
    stack: list[Mapping[str, Any]] = [tags]
    while stack:
        seq = stack.pop().get("ContentSequence")
        for item in seq if isinstance(seq, list) else ():
            if isinstance(item, Mapping):
                yield item
                stack.append(item)


def _sr_dose(tags: Mapping[str, Any], problems: _Problems, warnings: list[str]) -> _Dose:
    dose = _Dose()
    for item in _content_items(tags):
        if _text(item.get("ValueType")) != "NUM":
            continue
        concept = _first_item(item, "ConceptNameCodeSequence")
        code = _text(concept.get("CodeValue"))
        if code not in _SR_CONCEPTS or _text(concept.get("CodingSchemeDesignator")) != "DCM":
            continue
        column, combine, units = _SR_CONCEPTS[code]
        measured = _first_item(item, "MeasuredValueSequence")
        label = f"dose SR {_CONCEPT_NAMES[code]} ({code}, DCM)"
        number, problem = parse_ds(measured.get("NumericValue"))
        problems.add(label, problem)
        if number is None:
            continue
        unit = _text(_first_item(measured, "MeasurementUnitsCodeSequence").get("CodeValue"))
        factor = units.get(unit or "")
        if factor is None:
            warnings.append(f"{label}: unit {unit!r} not understood, value ignored")
            continue
        current = getattr(dose, column)
        value = number * factor
        setattr(dose, column, _add(current, value) if combine == "sum" else _max(current, value))
    return dose


def _study_sr_dose(instances: Sequence[InstanceDocuments], problems: _Problems, warnings: list[str]) -> _Dose:
    dose = _Dose()
    srs = [inst for inst in instances if is_dose_sr(inst.tags)]
    for inst in srs:
        one = _sr_dose(inst.tags, problems, warnings)
        dose.ctdivol = _max(dose.ctdivol, one.ctdivol)
        dose.dlp = _max(dose.dlp, one.dlp)
        dose.dap = _max(dose.dap, one.dap)
    if len(srs) > 1:
        warnings.append(
            f"{len(srs)} dose SRs in the study: the largest totals are reported (a re-sent cumulative report "
            "would otherwise be counted twice); check they are not separate examinations"
        )
    return dose


# -- the row ------------------------------------------------------------------------------------------------
def _sources(instances: Sequence[InstanceDocuments], source_metadata: str, warnings: list[str]) -> str | None:
    found: set[str] = set()
    missing = 0
    for inst in instances:
        source = _text(inst.metadata.get(source_metadata)) or _text(inst.metadata.get("RemoteAET"))
        if source is None:
            missing += 1
        else:
            found.add(source)
    if missing:
        warnings.append(
            f"{missing} of {len(instances)} instance(s) have no source: no {source_metadata} metadata and no "
            "calling AE title (RemoteAET)"
        )
    return ",".join(sorted(found)) or None


def _frames(instances: Sequence[InstanceDocuments], problems: _Problems) -> int:
    total = 0
    for inst in instances:
        frames, problem = parse_is(inst.tags.get("NumberOfFrames"))
        if frames is not None and frames < 1:
            frames, problem = None, "less than 1"
        if frames is None and problem:
            problem += ", counted as 1 frame"
        problems.add("NumberOfFrames (0028,0008)", problem)
        total += frames if frames is not None else 1
    return total


def _same_uid_warning(study_id: str, others: Sequence[str]) -> str | None:
    others = list(dict.fromkeys(o for o in others if o and o != study_id))
    if not others:
        return None
    if len(others) == 1:
        where = f"Orthanc study {others[0]} with another Patient ID"
    else:
        where = f"Orthanc studies {', '.join(others)} with other Patient IDs"
    return (
        f"Study Instance UID also belongs to {where}: the images are split between {len(others) + 1} studies; "
        "check the patient identity"
    )


def _extra_value(extra: ExtraTag, instances: Sequence[InstanceDocuments], warnings: list[str]) -> str | None:
    keys = [extra.keyword] + ([extra.tag.lower(), extra.tag.upper()] if extra.tag else [])
    withheld = False
    for inst in instances:
        for key in keys:
            if key not in inst.tags:
                continue
            raw = inst.tags[key]
            if isinstance(raw, list):
                warnings.append(f"extra tag {extra.keyword} is a sequence: not reported")
                return None
            text = _text(raw)
            if text is not None:
                return text
            withheld = withheld or raw is None
    if withheld:
        warnings.append(f"extra tag {extra.keyword}: Orthanc gave no value (binary or too long)")
    return None


def build_row(
    docs: StudyDocuments,
    extra_tags: Sequence[ExtraTag] = (),
    *,
    same_uid_studies: Sequence[str] = (),
    source_metadata: str = "IngestSource",
) -> ReportRow:
    """The report row of one study. Never raises for missing or malformed DICOM values: they become
    ``None`` plus a warning. ``same_uid_studies`` are the other Orthanc study IDs with this study's
    StudyInstanceUID (found by the caller; this study's own ID is ignored if present)."""
    warnings: list[str] = []
    problems = _Problems()
    same_uid = _same_uid_warning(docs.study_id, same_uid_studies)
    if same_uid:
        warnings.append(same_uid)

    study_level = list(_tag_sources(docs, "study"))
    patient_level = list(_tag_sources(docs, "patient"))
    series_tags = [_main_tags(s) for s in docs.series]
    instance_tags = [inst.tags for inst in docs.instances]
    n_series = len(docs.series) or len({t for t in (_text(x.get("SeriesInstanceUID")) for x in instance_tags) if t})

    values: dict[str, Any] = {
        "orthanc_study_id": docs.study_id or None,
        "study_instance_uid": _first_text("StudyInstanceUID", study_level),
        "accession_number": _first_text("AccessionNumber", study_level),
        "patient_id": _first_text("PatientID", patient_level),
        "issuer_of_patient_id": _first_text("IssuerOfPatientID", patient_level),
        "patient_name": _first_text("PatientName", patient_level),
        "patient_birth_date": _date(
            _first_text("PatientBirthDate", patient_level), "PatientBirthDate (0010,0030)", warnings
        ),
        "patient_sex": _first_text("PatientSex", patient_level),
        "study_date": _date(_first_text("StudyDate", study_level), "StudyDate (0008,0020)", warnings),
        "study_time": _first_text("StudyTime", study_level),
        "study_description": _first_text("StudyDescription", study_level),
        "modalities": _distinct((_text(t.get("Modality")) for t in series_tags + instance_tags), sort=True),
        "institution_name": _distinct((_text(t.get("InstitutionName")) for t in study_level), sort=False),
        "station_names": _distinct((_text(t.get("StationName")) for t in series_tags + instance_tags), sort=True),
        "referring_physician": _first_text("ReferringPhysicianName", study_level),
        "number_of_series": n_series,
        "number_of_instances": len(docs.instances),
        "number_of_frames": _frames(docs.instances, problems),
        "sources": _sources(docs.instances, source_metadata, warnings),
    }

    headers = _header_dose(docs.instances, problems)
    sr = _study_sr_dose(docs.instances, problems, warnings)
    from_sr = any(v is not None for v in (sr.ctdivol, sr.dlp, sr.dap))
    dose = _Dose(
        ctdivol=sr.ctdivol if sr.ctdivol is not None else headers.ctdivol,
        dlp=sr.dlp,
        dap=sr.dap if sr.dap is not None else headers.dap,
        kvp=headers.kvp,
        exposure=headers.exposure,
    )
    from_headers = any(v is not None for v in (headers.ctdivol, headers.dap, headers.kvp, headers.exposure))
    values.update(
        ctdivol_mgy=round_dose(dose.ctdivol),
        dlp_mgycm=round_dose(dose.dlp),
        dap_gycm2=round_dose(dose.dap),
        kvp=round_dose(dose.kvp),
        exposure_mas=round_dose(dose.exposure),
        dose_source="sr" if from_sr else "headers" if from_headers else None,
    )
    warnings.extend(problems.messages())
    modalities = set((values["modalities"] or "").split(",")) - {""}
    if (not modalities or modalities & XRAY_MODALITIES) and (dose.ctdivol, dose.dlp, dose.dap) == (None,) * 3:
        warnings.append(NO_DOSE_WARNING)

    extras: dict[str, Any] = {}
    for extra in extra_tags:
        if extra.keyword not in extras:
            extras[extra.keyword] = _extra_value(extra, docs.instances, warnings)

    values["warnings"] = "; ".join(warnings) or None
    values["routes"] = values["routed_study_uids"] = None  # filled in by the study flow once routes ran
    ordered = {c: values[c] for c in REPORT_COLUMNS}
    ordered.update(extras)
    return ReportRow(values=ordered, warnings=warnings)


def with_routes(row: ReportRow, routes: str | None, routed_study_uids: str | None) -> ReportRow:
    """The row with the routing columns set: ``routes`` says which routes delivered where
    ("name: delivered to archive; ..."), ``routed_study_uids`` which Study Instance UID went where when a route
    changed it ("archive=2.25..."). None: nothing routed / no UID changed."""
    values = dict(row.values)
    values["routes"], values["routed_study_uids"] = routes, routed_study_uids
    return ReportRow(values=values, warnings=list(row.warnings))


# -- presentation ---------------------------------------------------------------------------------------------
def _display(value: Any) -> str:
    return NOT_AVAILABLE if value is None else str(value)


# Columns that identify the patient (or a person close to them). Every Prefect UI user can read a run's
# artifacts, so the table artifact shows them masked unless the site opts in; the report files keep them.
PATIENT_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "issuer_of_patient_id",
    "patient_name",
    "patient_birth_date",
    "patient_sex",
    "referring_physician",
)
MASKED = "(hidden)"  # the UI renders table cells as Markdown: "***" would show as a rule


def table_for_artifact(row: ReportRow, show_patient: bool = False) -> list[dict[str, str]]:
    """The row as a two-column table (column, value) for a Prefect table artifact; None shows as
    "not available". Unless ``show_patient``, a present value of a ``PATIENT_COLUMNS`` column shows as
    ``(hidden)`` (a missing one still says "not available", so the operator can tell the two apart)."""
    return [
        {"column": c, "value": MASKED if c in PATIENT_COLUMNS and v is not None and not show_patient else _display(v)}
        for c, v in row.values.items()
    ]


def _columns(rows: Sequence[ReportRow]) -> list[str]:
    cols = dict.fromkeys(REPORT_COLUMNS)
    for row in rows:
        cols.update(dict.fromkeys(row.values))
    return list(cols)


def _dtypes(columns: Iterable[str]) -> dict[str, str]:
    return {c: REPORT_DTYPES.get(c, "string") for c in columns}


def report_frame(rows: Sequence[ReportRow]) -> pandas.DataFrame:
    """The rows as a DataFrame: ``REPORT_COLUMNS`` then every extra column (in first-seen order), typed with
    ``REPORT_DTYPES``; a row without some extra column has it missing (<NA>)."""
    import pandas as pd

    columns = _columns(rows)
    records = [[row.values.get(c) for c in columns] for row in rows]
    return pd.DataFrame.from_records(records, columns=columns).astype(_dtypes(columns))


def _csv_cell(value: Any) -> str:
    return "" if value is None else str(value)


def write_report_files(row: ReportRow, folder: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<folder>/<stem>.csv`` and ``<folder>/<stem>.json`` (see the module docstring for the format)
    and return their paths. Each file is written to a temporary name and renamed, so a reader never sees a
    partial file; ``folder`` is created if needed. ``stem`` must be a plain file name."""
    if not stem or stem != Path(stem).name or stem in (".", ".."):
        raise ValueError("stem must be a plain file name without folders")
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # RFC 4180: CRLF, minimal quoting
    writer.writerow(row.values.keys())
    writer.writerow(_csv_cell(v) for v in row.values.values())
    csv_path = _atomic_write(folder / f"{stem}.csv", buffer.getvalue().encode("utf-8"))
    text = json.dumps([row.values], ensure_ascii=False, allow_nan=False, indent=1)
    json_path = _atomic_write(folder / f"{stem}.json", (text + "\n").encode("utf-8"))
    return csv_path, json_path


def _atomic_write(path: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_report_csv(path: Path) -> pandas.DataFrame:
    """Read a report CSV back with the report's dtypes (empty cell = <NA>; "NA" stays text)."""
    import pandas as pd

    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f))
    return pd.read_csv(
        path, dtype=_dtypes(header), keep_default_na=False, na_values=[""], encoding="utf-8"
    )  # fmt: skip


def read_report_json(path: Path) -> pandas.DataFrame:
    """Read a report JSON (records orient) back with the report's dtypes (null = <NA>)."""
    import pandas as pd

    records = json.loads(Path(path).read_text(encoding="utf-8"))
    columns = list(dict.fromkeys(c for record in records for c in record)) or list(REPORT_COLUMNS)
    frame = pd.DataFrame.from_records([[r.get(c) for c in columns] for r in records], columns=columns)
    return frame.astype(_dtypes(columns))


__all__ = [
    "FLOAT_COLUMNS",
    "INT_COLUMNS",
    "NOT_AVAILABLE",
    "NO_DOSE_WARNING",
    "PATIENT_COLUMNS",
    "REPORT_COLUMNS",
    "REPORT_DTYPES",
    "ExtraTag",
    "InstanceDocuments",
    "ReportRow",
    "StudyDocuments",
    "build_row",
    "is_dose_sr",
    "parse_ds",
    "parse_is",
    "read_report_csv",
    "read_report_json",
    "report_frame",
    "round_dose",
    "table_for_artifact",
    "with_routes",
    "write_report_files",
]
