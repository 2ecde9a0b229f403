"""The per-study report row (tasks.study_report), from hand-written Orthanc documents: no server."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from tasks.study_report import (
    NO_DOSE_WARNING,
    REPORT_COLUMNS,
    ExtraTag,
    InstanceDocuments,
    ReportRow,
    StudyDocuments,
    build_row,
    parse_ds,
    parse_is,
    read_report_csv,
    read_report_json,
    report_frame,
    round_dose,
    table_for_artifact,
    write_report_files,
)

PATIENT = {"PatientID": "PAT-0042", "PatientName": "Rivera^Ana^Maria^Dr.^III", "PatientBirthDate": "19700101"}
PATIENT_WORDS = ("PAT-0042", "Rivera", "Ana", "19700101")
CT = "1.2.840.10008.5.1.4.1.1.2"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


# -- builders of Orthanc documents ---------------------------------------------------------------------------
def inst(iid: str = "i1", source: str | None = "CT_ROOM1", metadata: dict | None = None, **tags: Any):
    md = {"IngestSource": source} if source and metadata is None else metadata or {}
    return InstanceDocuments(iid, {"SOPClassUID": CT, "Modality": "CT", **PATIENT, **tags}, md)


def docs(*instances: InstanceDocuments, study_tags: dict | None = None, series: list | None = None, sid="s1"):
    study = {
        "ID": sid,
        "MainDicomTags": {"StudyInstanceUID": "1.2.3", "AccessionNumber": "ACC1", **(study_tags or {})},
        "PatientMainDicomTags": dict(PATIENT),
    }
    if series is None:
        series = [{"ID": "se1", "MainDicomTags": {"Modality": "CT", "StationName": "ST01"}}]
    return StudyDocuments(study=study, series=series, instances=instances or (inst(),))


def code(value: str, scheme: str = "DCM", meaning: str = "") -> dict:
    return {"CodeValue": value, "CodingSchemeDesignator": scheme, "CodeMeaning": meaning or value}


def num(concept: str, value: str, unit: str) -> dict:
    return {
        "RelationshipType": "CONTAINS",
        "ValueType": "NUM",
        "ConceptNameCodeSequence": [code(concept)],
        "MeasuredValueSequence": [{"NumericValue": value, "MeasurementUnitsCodeSequence": [code(unit, "UCUM")]}],
    }


def container(concept: str, *items: dict) -> dict:
    return {
        "RelationshipType": "CONTAINS",
        "ValueType": "CONTAINER",
        "ConceptNameCodeSequence": [code(concept)],
        "ContentSequence": list(items),
    }


def ct_dose_tree(dlp: str = "456.7", *ctdivols: str, dlp_unit: str = "mGy.cm", ctdi_unit: str = "mGy") -> list:
    acquisitions = [container("113819", container("113829", num("113830", c, ctdi_unit))) for c in ctdivols]
    return [container("113811", num("113813", dlp, dlp_unit)), *acquisitions]


def sr(iid: str = "sr1", content: list | None = None, sop_class: str = DOSE_SR, **tags: Any) -> InstanceDocuments:
    base = {
        "SOPClassUID": sop_class,
        "Modality": "SR",
        "ValueType": "CONTAINER",
        "ConceptNameCodeSequence": [code("113701")],
        "ContentSequence": content if content is not None else ct_dose_tree("456.7", "15.25"),
    }
    return inst(iid, **{**base, **tags})


def warning_text(row: ReportRow) -> str:
    return "; ".join(row.warnings)


# -- the columns ---------------------------------------------------------------------------------------------
def test_report_columns_are_pinned():
    """Sites load months of CSVs into one frame: this order may only ever grow at the end (extras)."""
    assert REPORT_COLUMNS == (
        "orthanc_study_id", "study_instance_uid", "accession_number", "patient_id", "issuer_of_patient_id",
        "patient_name", "patient_birth_date", "patient_sex", "study_date", "study_time", "study_description",
        "modalities", "institution_name", "station_names", "referring_physician", "number_of_series",
        "number_of_instances", "number_of_frames", "sources", "ctdivol_mgy", "dlp_mgycm", "dap_gycm2", "kvp",
        "exposure_mas", "dose_source", "warnings", "routes", "routed_study_uids",
    )  # fmt: skip


def test_every_column_is_present_even_for_an_empty_study_document():
    row = build_row(StudyDocuments(study={}))
    assert row.columns == REPORT_COLUMNS
    assert row.values["number_of_instances"] == 0 and row.values["number_of_frames"] == 0
    assert all(row.values[c] is None for c in ("patient_id", "patient_name", "ctdivol_mgy", "sources"))
    assert NO_DOSE_WARNING in row.warnings  # no modality known: the dose gap is still worth saying


# -- number parsing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "number", "problem"),
    [
        ("12.5", "12.5", None),
        ("  12.5 ", "12.5", None),
        ("12.5\x00", "12.5", None),
        ("12.3456789012345678", "12.3456789012345678", None),  # C16a: over-long DS accepted
        ("12,5", "12.5", "decimal comma"),  # C16b
        ("-0.5", "-0.5", None),
        (".5", "0.5", None),
        ("5.", "5", None),
        ("1e3", "1000", None),
        ("1.5E-1", "0.15", None),
        ("", None, None),
        ("   ", None, None),
        (None, None, None),
        ("abc", None, "not a number"),
        ("12.5 mGy", None, "not a number"),
        ("nan", None, "not a number"),
        ("Infinity", None, "not a number"),
        ("1,2,3", None, "not a number"),
        ("1\\2", None, "more than one value"),
        ("1e400", None, "out of range"),
        ([{"a": "1"}], None, "not a single number"),
    ],
)
def test_parse_ds(raw, number, problem):
    got, issue = parse_ds(raw)
    assert got == (None if number is None else Decimal(number))
    assert (issue is None) if problem is None else (problem in issue)


@pytest.mark.parametrize(
    ("raw", "number", "problem"),
    [("3", 3, None), (" 3 ", 3, None), ("1.0", 1, None), ("+2", 2, None), ("1.5", None, "not a whole number"),
     ("x", None, "not a number"), ("", None, None), (None, None, None)],
)  # fmt: skip
def test_parse_is(raw, number, problem):
    got, issue = parse_is(raw)
    assert got == number
    assert (issue is None) if problem is None else (problem in issue)


@pytest.mark.parametrize(
    ("value", "rounded"),
    [("12.3456789012345678", 12.35), ("12.345", 12.35), ("12.344999", 12.34), ("2.675", 2.68), ("7", 7.0)],
)
def test_dose_rounding_is_half_up_to_two_decimals(value, rounded):
    assert round_dose(Decimal(value)) == rounded
    assert round_dose(None) is None


# -- dose from image headers ---------------------------------------------------------------------------------
DOSE_COLUMNS = ("ctdivol_mgy", "dlp_mgycm", "dap_gycm2", "kvp", "exposure_mas", "dose_source")


@pytest.mark.parametrize(
    ("case", "instances", "expected", "warning"),
    [
        ("C16a over-long DS", [{"CTDIvol": "12.3456789012345678", "ExposureTime": "1.0"}],
         (12.35, None, None, None, None, "headers"), None),
        ("C16b decimal comma", [{"CTDIvol": "12,5"}], (12.5, None, None, None, None, "headers"),
         "CTDIvol (0018,9345): decimal comma read as a decimal point in 1 instance(s)"),
        ("C16c no dose tags", [{}], (None, None, None, None, None, None), NO_DOSE_WARNING),
        ("unparseable CTDIvol", [{"CTDIvol": "n/a"}], (None, None, None, None, None, None),
         "CTDIvol (0018,9345): not a number in 1 instance(s)"),
        ("CTDIvol max, kVp max", [{"CTDIvol": "10", "KVP": "100"}, {"CTDIvol": "12.5", "KVP": "120"}, {}],
         (12.5, None, None, 120.0, None, "headers"), None),
        ("mAs summed", [{"Exposure": "100"}, {"Exposure": " 150 "}, {"Exposure": "1.0"}],
         (None, None, None, None, 251.0, "headers"), NO_DOSE_WARNING),
        ("uAs preferred and divided", [{"Exposure": "3", "ExposureInuAs": "2500"}, {"ExposureInuAs": "1250"}],
         (None, None, None, None, 3.75, "headers"), NO_DOSE_WARNING),
        ("DAP dGy·cm² to Gy·cm², summed", [{"ImageAndFluoroscopyAreaDoseProduct": "25"},
                                           {"ImageAndFluoroscopyAreaDoseProduct": "5.55"}],
         (None, None, 3.06, None, None, "headers"), None),
        ("DAP once per irradiation event",
         [{"ImageAndFluoroscopyAreaDoseProduct": "30", "IrradiationEventUID": "9.1"},
          {"ImageAndFluoroscopyAreaDoseProduct": "30", "IrradiationEventUID": "9.1"},
          {"ImageAndFluoroscopyAreaDoseProduct": "10", "IrradiationEventUID": "9.2"}],
         (None, None, 4.0, None, None, "headers"), None),
        ("multi-valued CTDIvol", [{"CTDIvol": "1\\2"}], (None, None, None, None, None, None),
         "CTDIvol (0018,9345): more than one value where one is expected in 1 instance(s)"),
    ],
)  # fmt: skip
def test_dose_from_image_headers(case, instances, expected, warning):
    row = build_row(docs(*(inst(f"i{n}", **tags) for n, tags in enumerate(instances))))
    assert tuple(row.values[c] for c in DOSE_COLUMNS) == expected, case
    if warning:
        assert warning in row.warnings, case
    else:
        assert row.warnings == [], case


def test_the_invalid_value_is_counted_once_per_tag_not_once_per_instance():
    row = build_row(docs(*(inst(f"i{n}", CTDIvol="7,5") for n in range(300))))
    assert row.values["ctdivol_mgy"] == 7.5
    assert row.warnings == ["CTDIvol (0018,9345): decimal comma read as a decimal point in 300 instance(s)"]


@pytest.mark.parametrize(("modality", "warned"), [("CT", True), ("DX", True), ("XA", True), ("MR", False),
                                                  ("US", False), ("OT", False)])  # fmt: skip
def test_no_dose_warning_only_where_x_rays_were_used(modality, warned):
    series = [{"ID": "se1", "MainDicomTags": {"Modality": modality}}]
    row = build_row(docs(inst(Modality=modality), series=series))
    assert (NO_DOSE_WARNING in row.warnings) is warned
    assert row.values["dose_source"] is None and row.values["ctdivol_mgy"] is None


# -- dose from a radiation dose SR ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "srs", "expected", "warning"),
    [
        ("SR wins over headers", [sr()], (15.25, 456.7, None, "sr"), None),
        ("max Mean CTDIvol over acquisitions", [sr(content=ct_dose_tree("900", "10.1", "22.449", "3"))],
         (22.45, 900.0, None, "sr"), None),
        ("units converted", [sr(content=ct_dose_tree("0.4567", "0.01525", dlp_unit="Gy.cm", ctdi_unit="Gy"))],
         (15.25, 456.7, None, "sr"), None),
        ("unknown unit ignored", [sr(content=ct_dose_tree("456.7", "15", dlp_unit="mGy*cm"))],
         (15.0, None, None, "sr"), "unit 'mGy*cm' not understood"),
        ("decimal comma inside the SR", [sr(content=ct_dose_tree("456,7", "15"))], (15.0, 456.7, None, "sr"),
         "decimal comma read as a decimal point"),
        ("comprehensive SR with the CT dose template",
         [sr(sop_class=COMPREHENSIVE_SR, ContentTemplateSequence=[{"MappingResource": "DCMR",
                                                                   "TemplateIdentifier": "10011"}])],
         (15.25, 456.7, None, "sr"), None),
        ("comprehensive SR titled X-Ray Radiation Dose Report", [sr(sop_class=COMPREHENSIVE_SR)],
         (15.25, 456.7, None, "sr"), None),
        ("comprehensive SR that is not a dose report",
         [sr(sop_class=COMPREHENSIVE_SR, ConceptNameCodeSequence=[code("18748-4", "LN")])],
         (12.0, None, None, "headers"), None),
        ("projection X-ray SR: DAP per plane, Gy·m²",
         [sr(content=[container("113702", num("113722", "0.0025", "Gy.m2")),
                      container("113702", num("113722", "0.0005", "Gy.m2"))])],
         (12.0, None, 30.0, "sr"), None),
        ("two dose SRs: the largest totals", [sr("sr1", content=ct_dose_tree("400", "15")),
                                              sr("sr2", content=ct_dose_tree("456.7", "14"))],
         (15.0, 456.7, None, "sr"), "2 dose SRs in the study"),
        ("dose SR without numbers", [sr(content=[])], (12.0, None, None, "headers"), None),
    ],
)  # fmt: skip
def test_dose_from_a_dose_sr(case, srs, expected, warning):
    row = build_row(docs(inst("ct1", CTDIvol="12"), *srs))
    assert tuple(row.values[c] for c in ("ctdivol_mgy", "dlp_mgycm", "dap_gycm2", "dose_source")) == expected, case
    if warning:
        assert warning in warning_text(row), case
    else:
        assert row.warnings == [], case


def test_kvp_and_mas_still_come_from_headers_when_a_dose_sr_is_present():
    row = build_row(docs(inst("ct1", KVP="120", Exposure="200"), sr()))
    assert (row.values["kvp"], row.values["exposure_mas"], row.values["dose_source"]) == (120.0, 200.0, "sr")


def test_a_dose_sr_alone_is_enough_for_a_ct_study():
    row = build_row(docs(inst("ct1"), sr()))
    assert NO_DOSE_WARNING not in row.warnings and row.values["dlp_mgycm"] == 456.7


# -- counts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("frames", "instances", "total", "warning"),
    [
        (["3"], 1, 3, None),  # C18: one multi-frame instance
        ([None], 1, 1, None),  # no NumberOfFrames: 1
        (["3", None, "2"], 3, 6, None),
        (["1.0"], 1, 1, None),
        (["abc"], 1, 1, "NumberOfFrames (0028,0008): not a number, counted as 1 frame in 1 instance(s)"),
        (["0"], 1, 1, "NumberOfFrames (0028,0008): less than 1, counted as 1 frame in 1 instance(s)"),
        (["3,0"], 1, 3, "NumberOfFrames (0028,0008): decimal comma read as a decimal point in 1 instance(s)"),
    ],
)
def test_instances_and_frames(frames, instances, total, warning):
    items = [inst(f"i{n}", **({} if f is None else {"NumberOfFrames": f})) for n, f in enumerate(frames)]
    row = build_row(docs(*items))
    assert (row.values["number_of_instances"], row.values["number_of_frames"]) == (instances, total)
    assert ([warning] if warning else []) == [w for w in row.warnings if "NumberOfFrames" in w]


def test_a_dose_sr_counts_as_one_instance_and_one_frame():
    row = build_row(docs(inst("i1", NumberOfFrames="3"), sr()))
    assert (row.values["number_of_instances"], row.values["number_of_frames"]) == (2, 4)


def test_series_are_counted_from_orthanc_series_or_else_from_instance_tags():
    two = [{"ID": "a", "MainDicomTags": {"Modality": "CT"}}, {"ID": "b", "MainDicomTags": {"Modality": "SR"}}]
    assert build_row(docs(inst(), series=two)).values["number_of_series"] == 2
    by_tags = docs(inst("i1", SeriesInstanceUID="1.1"), inst("i2", SeriesInstanceUID="1.2"), series=[])
    assert build_row(by_tags).values["number_of_series"] == 2


# -- sources (C09) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metadatas", "sources", "warning"),
    [
        ([{"IngestSource": "CT_ROOM1"}], "CT_ROOM1", None),
        ([{"RemoteAET": "MODALITY1", "Origin": "DicomProtocol"}], "MODALITY1", None),
        ([{"IngestSource": "CT_ROOM1", "RemoteAET": "MODALITY1"}], "CT_ROOM1", None),
        # C09: a REST upload without the ingest metadata: Orthanc 1.10 stores RemoteAET empty (or not at all)
        ([{"Origin": "RestApi", "RemoteAET": ""}], None, "1 of 1 instance(s) have no source"),
        ([{}], None, "1 of 1 instance(s) have no source"),
        ([{"IngestSource": "B"}, {"RemoteAET": "A"}, {"IngestSource": "B"}], "A,B", None),
        ([{"IngestSource": "A"}, {}, {"IngestSource": "  "}], "A", "2 of 3 instance(s) have no source"),
    ],
)
def test_sources(metadatas, sources, warning):
    row = build_row(docs(*(inst(f"i{n}", metadata=md) for n, md in enumerate(metadatas))))
    assert row.values["sources"] == sources
    about_sources = [w for w in row.warnings if "no source" in w]
    assert len(about_sources) == (1 if warning else 0)
    assert not warning or about_sources[0].startswith(warning)


def test_the_source_metadata_name_is_the_configured_one():
    row = build_row(docs(inst(metadata={"ShareSource": "CT_ROOM2"})), source_metadata="ShareSource")
    assert row.values["sources"] == "CT_ROOM2"
    assert "no ShareSource metadata" in warning_text(build_row(docs(inst(metadata={})), source_metadata="ShareSource"))


# -- text ----------------------------------------------------------------------------------------------------
def test_study_and_patient_fields_come_from_orthanc_main_tags():
    d = docs(
        inst(InstitutionName="North Clinic", IssuerOfPatientID="HOSP_A"),
        study_tags={"StudyDate": "20240315", "StudyTime": "101500.123", "StudyDescription": "CT Thorax",
                    "ReferringPhysicianName": "Who^Doctor^^Dr.", "InstitutionName": "North Clinic"},
    )  # fmt: skip
    v = build_row(d).values
    assert v["orthanc_study_id"] == "s1" and v["study_instance_uid"] == "1.2.3" and v["accession_number"] == "ACC1"
    assert v["patient_id"] == "PAT-0042" and v["issuer_of_patient_id"] == "HOSP_A"
    assert v["patient_name"] == "Rivera^Ana^Maria^Dr.^III", "PN stays DICOM family^given^middle^prefix^suffix"
    assert v["referring_physician"] == "Who^Doctor^^Dr."
    assert (v["study_date"], v["study_time"], v["study_description"]) == ("20240315", "101500.123", "CT Thorax")
    assert (v["institution_name"], v["station_names"], v["modalities"]) == ("North Clinic", "ST01", "CT")


def test_fields_missing_from_orthanc_main_tags_come_from_the_first_instance_that_has_them():
    d = StudyDocuments(
        study={"ID": "s1"},
        instances=[
            InstanceDocuments("i1", {"Modality": "CT"}, {"IngestSource": "A"}),
            InstanceDocuments("i2", {"PatientName": "Doe^Jane", "StudyDate": "20240101"}, {"IngestSource": "A"}),
            InstanceDocuments("i3", {"PatientName": "Other^Name"}, {"IngestSource": "A"}),
        ],
    )
    v = build_row(d).values
    assert (v["patient_name"], v["study_date"], v["number_of_series"]) == ("Doe^Jane", "20240101", 0)


@pytest.mark.parametrize(
    ("keyword", "stored", "column", "expected"),
    [
        ("InstitutionName", "A Clinic\\B Clinic", "institution_name", "A Clinic,B Clinic"),
        ("ReferringPhysicianName", "Smith^John\\Jones^Ann", "referring_physician", "Smith^John,Jones^Ann"),
        ("StudyDescription", "  spaced  ", "study_description", "spaced"),
        ("StudyDescription", "", "study_description", None),
        ("StudyDescription", None, "study_description", None),  # Orthanc: too long or binary
        ("AccessionNumber", "\\", "accession_number", None),
        ("StudyDate", "2024.03.15", "study_date", "20240315"),  # ACR-NEMA style
        ("StudyDate", "2024-03-15", "study_date", "20240315"),
    ],
)
def test_text_values(keyword, stored, column, expected):
    d = StudyDocuments(study={"ID": "s1", "MainDicomTags": {keyword: stored}}, instances=[inst()])
    assert build_row(d).values[column] == expected


def test_an_unreadable_date_is_not_reported_and_the_warning_names_the_tag_not_the_value():
    d = StudyDocuments(study={"ID": "s1", "PatientMainDicomTags": {"PatientBirthDate": "1.1.1970"}})
    row = build_row(d)
    assert row.values["patient_birth_date"] is None
    assert "PatientBirthDate (0010,0030) is not a date (YYYYMMDD): not reported" in row.warnings
    assert "1.1.1970" not in warning_text(row)


def test_modalities_and_stations_are_distinct_and_sorted():
    series = [{"ID": "a", "MainDicomTags": {"Modality": "SR", "StationName": "ST02"}},
              {"ID": "b", "MainDicomTags": {"Modality": "CT", "StationName": "ST01"}},
              {"ID": "c", "MainDicomTags": {"Modality": "CT", "StationName": "ST01"}}]  # fmt: skip
    v = build_row(docs(inst(), series=series)).values
    assert (v["modalities"], v["station_names"], v["number_of_series"]) == ("CT,SR", "ST01,ST02", 3)


def test_values_are_plain_types_without_empty_strings_or_backslashes():
    d = docs(inst("i1", NumberOfFrames="2", CTDIvol="3", InstitutionName="A\\B"), sr(), inst("i3", metadata={}))
    row = build_row(d, [ExtraTag(keyword="ImageType")], same_uid_studies=["s2"])
    for column, value in row.values.items():
        assert value is None or type(value) in (str, int, float), column
        if isinstance(value, str):
            assert value and "\\" not in value, column


# -- extra tags ----------------------------------------------------------------------------------------------
def test_extra_tags_follow_the_report_columns_in_configured_order():
    extras = [ExtraTag.model_validate(k) for k in ("ProtocolName", "BodyPartExamined", "Manufacturer")]
    d = docs(inst("i1", Manufacturer="ACME"), inst("i2", BodyPartExamined="CHEST", ProtocolName="Thorax\\Low"))
    row = build_row(d, extras)
    assert row.columns == (*REPORT_COLUMNS, "ProtocolName", "BodyPartExamined", "Manufacturer")
    assert (row.values["ProtocolName"], row.values["BodyPartExamined"], row.values["Manufacturer"]) == (
        "Thorax,Low",
        "CHEST",
        "ACME",
    )


@pytest.mark.parametrize(
    ("extra", "tags", "expected", "warning"),
    [
        (ExtraTag(keyword="BodyPartExamined"), [{}, {"BodyPartExamined": "HEAD"}], "HEAD", None),
        (ExtraTag(keyword="BodyPartExamined"), [{"BodyPartExamined": ""}, {"BodyPartExamined": "HEAD"}], "HEAD",
         None),
        (ExtraTag(keyword="BodyPartExamined"), [{}], None, None),
        (ExtraTag(keyword="ScanMode", tag="0019,10A0"), [{"0019,10a0": "HELICAL"}], "HELICAL", None),
        (ExtraTag(keyword="ScanMode", tag="0019,10a0"), [{"0019,10A0": "HELICAL"}], "HELICAL", None),
        (ExtraTag(keyword="ReferencedImageSequence"), [{"ReferencedImageSequence": [{"A": "1"}]}], None,
         "extra tag ReferencedImageSequence is a sequence: not reported"),
        (ExtraTag(keyword="ImageComments"), [{"ImageComments": None}], None,
         "extra tag ImageComments: Orthanc gave no value (binary or too long)"),
    ],
)  # fmt: skip
def test_extra_tag_values(extra, tags, expected, warning):
    row = build_row(docs(*(inst(f"i{n}", **t) for n, t in enumerate(tags))), [extra])
    assert row.values[extra.keyword] == expected
    assert [w for w in row.warnings if "extra tag" in w] == ([warning] if warning else [])


def test_a_repeated_extra_tag_gives_one_column():
    row = build_row(docs(inst(Manufacturer="ACME")), [ExtraTag(keyword="Manufacturer")] * 2)
    assert row.columns == (*REPORT_COLUMNS, "Manufacturer")


@pytest.mark.parametrize(
    "config",
    ["Body Part", "0018,0015", "warnings", "", {"keyword": "X", "tag": "18,15"}, {"keyword": "X", "vr": "CS"}],
)
def test_bad_extra_tag_configuration_is_refused(config):
    with pytest.raises(ValidationError):
        ExtraTag.model_validate(config)


def test_extra_tag_configuration_forms():
    assert ExtraTag.model_validate("BodyPartExamined") == ExtraTag(keyword="BodyPartExamined")
    assert ExtraTag.model_validate({"keyword": "ScanMode", "tag": "(0019,10a0)"}).tag == "0019,10a0"


# -- one Study Instance UID, several Orthanc studies (C10) ---------------------------------------------------
def test_a_study_instance_uid_shared_with_another_patient_id_is_warned_and_the_row_still_built():
    row = build_row(docs(inst(), sid="aaaa"), same_uid_studies=["aaaa", "bbbb"])
    assert row.warnings[0] == (
        "Study Instance UID also belongs to Orthanc study bbbb with another Patient ID: the images are split "
        "between 2 studies; check the patient identity"
    )
    assert row.values["warnings"].startswith("Study Instance UID also belongs to Orthanc study bbbb")
    assert row.values["number_of_instances"] == 1 and row.values["patient_id"] == "PAT-0042"


def test_three_studies_with_one_uid():
    row = build_row(docs(inst(), sid="aaaa"), same_uid_studies=["bbbb", "cccc", "bbbb"])
    assert (
        "Orthanc studies bbbb, cccc with other Patient IDs: the images are split between 3 studies" in (row.warnings[0])
    )


def test_no_same_uid_warning_for_the_study_itself():
    row = build_row(docs(inst(), sid="aaaa"), same_uid_studies=["aaaa"])
    assert not any("Study Instance UID" in w for w in row.warnings)


# -- warnings never carry patient data -----------------------------------------------------------------------
def test_warnings_never_contain_patient_data():
    d = docs(
        inst("i1", metadata={}, CTDIvol="Rivera", NumberOfFrames="PAT-0042", StudyDate="Ana",
             ImageAndFluoroscopyAreaDoseProduct="19700101,5x"),
        sr(content=ct_dose_tree("Rivera", "Ana", dlp_unit="PAT-0042")),
        sr("sr2"),
        study_tags={"StudyDate": "Rivera^Ana"},
    )  # fmt: skip
    row = build_row(d, [ExtraTag(keyword="PatientName"), ExtraTag(keyword="OtherPatientIDsSequence")],
                    same_uid_studies=["other"])  # fmt: skip
    assert len(row.warnings) >= 5
    for word in PATIENT_WORDS:
        assert word not in warning_text(row), word
    assert row.values["warnings"] == warning_text(row)


# -- presentation: table, frame, files -----------------------------------------------------------------------
def sample_row(**extra_values: Any) -> ReportRow:
    d = docs(inst("i1", NumberOfFrames="3", CTDIvol="12,5", Manufacturer="ACME"), sr())
    row = build_row(d, [ExtraTag(keyword="Manufacturer"), ExtraTag(keyword="BodyPartExamined")])
    row.values.update(extra_values)
    return row


def test_table_for_artifact():
    table = table_for_artifact(sample_row())
    assert [r["column"] for r in table] == [*REPORT_COLUMNS, "Manufacturer", "BodyPartExamined"]
    shown = {r["column"]: r["value"] for r in table}
    assert shown["dap_gycm2"] == "not available" and shown["BodyPartExamined"] == "not available"
    assert (shown["ctdivol_mgy"], shown["number_of_frames"], shown["dose_source"]) == ("15.25", "4", "sr")
    assert all(isinstance(r["value"], str) for r in table)


@pytest.mark.parametrize(
    ("column", "value", "show_patient", "shown"),
    [
        ("patient_name", "Berg^Lena", False, "(hidden)"),
        ("patient_name", "Berg^Lena", True, "Berg^Lena"),
        ("patient_id", "PAT-0042", False, "(hidden)"),
        ("patient_birth_date", "19700101", False, "(hidden)"),
        ("patient_sex", "F", False, "(hidden)"),
        ("issuer_of_patient_id", "HOSP", False, "(hidden)"),
        ("referring_physician", "Doe^John", False, "(hidden)"),
        ("patient_name", None, False, "not available"),  # missing stays distinguishable from hidden
        ("accession_number", "ACC1", False, "ACC1"),
        ("study_instance_uid", "1.2.3", False, "1.2.3"),
        ("institution_name", "North Clinic", False, "North Clinic"),
    ],
)
def test_table_for_artifact_masks_patient_fields_unless_shown(column, value, show_patient, shown):
    table = table_for_artifact(sample_row(**{column: value}), show_patient=show_patient)
    assert {r["column"]: r["value"] for r in table}[column] == shown


def test_report_frame_columns_and_dtypes():
    plain = build_row(docs(inst()))
    frame = report_frame([sample_row(), plain])
    assert list(frame.columns) == [*REPORT_COLUMNS, "Manufacturer", "BodyPartExamined"]
    assert str(frame["number_of_frames"].dtype) == "Int64" and str(frame["ctdivol_mgy"].dtype) == "Float64"
    assert str(frame["patient_id"].dtype) == "string" and str(frame["Manufacturer"].dtype) == "string"
    assert frame["dlp_mgycm"].isna().tolist() == [False, True]
    assert frame["Manufacturer"].isna().tolist() == [False, True], "a row without the extra has <NA>"
    empty = report_frame([])
    assert list(empty.columns) == list(REPORT_COLUMNS) and len(empty) == 0


TRICKY = {
    "patient_id": "NA",  # pandas' default reader would turn this into a missing value
    "accession_number": "00123",  # leading zeros
    "patient_name": 'Müller, "Jr"^Jürgen',
    "study_description": "null",
    "study_time": "101500.000",
}


@pytest.mark.parametrize("values", [{}, TRICKY], ids=["sample", "tricky-text"])
def test_csv_and_json_round_trip_with_the_same_columns_and_dtypes(tmp_path: Path, values):
    row = sample_row(**values)
    csv_path, json_path = write_report_files(row, tmp_path / "reports", "study-s1")
    assert (csv_path.name, json_path.name) == ("study-s1.csv", "study-s1.json")
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["study-s1.csv", "study-s1.json"], "no temp left"
    assert len(csv_path.read_bytes().splitlines()) == 2, "one header line and one row"
    expected = report_frame([row])
    pd.testing.assert_frame_equal(read_report_csv(csv_path), expected)
    pd.testing.assert_frame_equal(read_report_json(json_path), expected)


def test_none_is_an_empty_csv_cell_and_a_json_null(tmp_path: Path):
    row = sample_row()
    csv_path, json_path = write_report_files(row, tmp_path, "r")
    with open(csv_path, encoding="utf-8", newline="") as f:
        (cells,) = list(csv.DictReader(f))
    assert cells["dap_gycm2"] == "" and cells["BodyPartExamined"] == ""
    (record,) = json.loads(json_path.read_text(encoding="utf-8"))
    assert record["dap_gycm2"] is None and record["number_of_frames"] == 4 and record["ctdivol_mgy"] == 15.25


def test_a_month_of_reports_loads_into_one_frame(tmp_path: Path):
    rows = [sample_row(), build_row(docs(inst(), sid="s2")), sample_row(**TRICKY)]
    paths = [write_report_files(r, tmp_path, f"day{i}")[0] for i, r in enumerate(rows)]
    month = pd.concat([read_report_csv(p) for p in paths], ignore_index=True)
    assert list(month.columns)[: len(REPORT_COLUMNS)] == list(REPORT_COLUMNS)
    assert str(month["number_of_frames"].dtype) == "Int64" and str(month["patient_id"].dtype) == "string"
    assert month["patient_id"].tolist()[2] == "NA"


def test_rewriting_replaces_the_files(tmp_path: Path):
    write_report_files(sample_row(), tmp_path, "r")
    csv_path, _ = write_report_files(sample_row(patient_id="NEW"), tmp_path, "r")
    assert read_report_csv(csv_path)["patient_id"].tolist() == ["NEW"]


@pytest.mark.parametrize("stem", ["", "../x", "a/b", "..", "."])
def test_the_stem_must_be_a_plain_name(tmp_path: Path, stem):
    with pytest.raises(ValueError):
        write_report_files(sample_row(), tmp_path, stem)
