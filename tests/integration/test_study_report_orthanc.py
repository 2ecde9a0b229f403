"""The study report against a real Orthanc: the shared hard cases C09, C10, C16, C18 and a dose SR, uploaded
over REST (and one by C-STORE), fetched with tasks.orthanc_study and built with tasks.study_report."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tasks.errors import StudyNotFound
from tasks.orthanc import OrthancClient
from tasks.orthanc_study import fetch_report_row, fetch_study_documents, resolve_study
from tasks.study_report import NO_DOSE_WARNING, ExtraTag, read_report_csv, report_frame, write_report_files
from tests.integration.helpers import CountingTransport

pytestmark = pytest.mark.integration


@pytest.fixture
def client(orthanc):
    with OrthancClient(orthanc.url, timeout=10) as c:
        yield c


def upload(orthanc, content: bytes | Path, source: str | None = None) -> dict:
    """POST one file to Orthanc; with ``source``, set the share ingest's IngestSource metadata like it does."""
    body = content.read_bytes() if isinstance(content, Path) else content
    answer = httpx.post(f"{orthanc.url}/instances", content=body, timeout=10)
    answer.raise_for_status()
    doc = answer.json()
    if source:
        httpx.put(f"{orthanc.url}/instances/{doc['ID']}/metadata/IngestSource", content=source, timeout=5)
    return doc


# -- C16: dose attributes invalid or missing -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "ctdivol", "dose_source", "warning"),
    [
        ("C16a_ctdivol_too_long.dcm", 12.35, "headers", None),
        ("C16b_ctdivol_comma.dcm", 12.5, "headers", "CTDIvol (0018,9345): decimal comma read as a decimal point"),
        ("C16c_no_dose_tags.dcm", None, None, NO_DOSE_WARNING),
    ],
)
def test_c16_dose_values(orthanc, client, cases, case, ctdivol, dose_source, warning):
    study = upload(orthanc, cases / case, source="CT_ROOM1")["ParentStudy"]
    row = fetch_report_row(client, study)
    assert (row.values["ctdivol_mgy"], row.values["dose_source"]) == (ctdivol, dose_source)
    assert all(row.values[c] is None for c in ("dlp_mgycm", "dap_gycm2", "kvp", "exposure_mas"))
    assert row.values["number_of_instances"] == 1, "the study is still reported"
    if warning:
        assert any(w.startswith(warning) for w in row.warnings), row.warnings
    else:
        assert row.warnings == []


# -- C18: instances and frames -------------------------------------------------------------------------------
def test_c18_multiframe_counts_one_instance_and_three_frames(orthanc, client, cases):
    study = upload(orthanc, cases / "C18_multiframe_3frames.dcm", source="CT_ROOM1")["ParentStudy"]
    row = fetch_report_row(client, study)
    assert (row.values["number_of_instances"], row.values["number_of_frames"]) == (1, 3)
    assert (row.values["number_of_series"], row.values["modalities"]) == (1, "OT")


# -- C09: the source of files that came through a share ------------------------------------------------------
def test_c09_share_upload_takes_its_source_from_ingest_metadata(orthanc, client, cases):
    study = upload(orthanc, cases / "C09_from_share.dcm", source="CT_ROOM1")["ParentStudy"]
    row = fetch_report_row(client, study, [ExtraTag(keyword="Manufacturer"), ExtraTag(keyword="BodyPartExamined")])
    v = row.values
    assert (v["institution_name"], v["station_names"], v["sources"]) == ("North Clinic", "ST01", "CT_ROOM1")
    assert (v["patient_name"], v["patient_id"], v["accession_number"]) == ("Kim^Jisoo", "PAT-C09", "ACCC09")
    assert (v["study_date"], v["study_time"], v["patient_birth_date"]) == ("20240315", "101500", "19700101")
    assert (v["Manufacturer"], v["BodyPartExamined"]) == ("ACME Medical", None)
    assert row.warnings == [NO_DOSE_WARNING]


def test_c09_rest_upload_without_metadata_has_no_source_and_does_not_crash(orthanc, client, cases):
    study = upload(orthanc, cases / "C09_from_share.dcm")["ParentStudy"]
    row = fetch_report_row(client, study)
    assert row.values["sources"] is None
    assert "1 of 1 instance(s) have no source: no IngestSource metadata and no calling AE title (RemoteAET)" in (
        row.warnings
    )


def test_c_store_source_is_the_calling_ae_title(orthanc, client, cases):
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is not installed")
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = [storescu, "-aet", "MODALITY1", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port),
           str(cases / "C18_multiframe_3frames.dcm")]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, timeout=30, capture_output=True)
    (study,) = httpx.get(f"{orthanc.url}/studies", timeout=5).json()
    row = fetch_report_row(client, study)
    assert row.values["sources"] == "MODALITY1"
    assert not any("no source" in w for w in row.warnings)


# -- C10: one Study Instance UID, two Patient IDs ------------------------------------------------------------
def test_c10_two_orthanc_studies_with_one_uid_are_both_reported_with_a_warning(orthanc, client, cases):
    a = upload(orthanc, cases / "C10a_pid_dash.dcm", source="CT_ROOM1")["ParentStudy"]
    b = upload(orthanc, cases / "C10b_pid_nodash.dcm", source="CT_ROOM1")["ParentStudy"]
    assert a != b
    uid = pydicom.dcmread(cases / "C10a_pid_dash.dcm", stop_before_pixels=True).StudyInstanceUID
    assert sorted(resolve_study(client, uid)) == sorted([a, b])
    for this, other in ((a, b), (b, a)):
        row = fetch_report_row(client, this)
        assert row.warnings[0] == (
            f"Study Instance UID also belongs to Orthanc study {other} with another Patient ID: the images are "
            "split between 2 studies; check the patient identity"
        )
        assert row.values["number_of_instances"] == 1 and row.values["study_instance_uid"] == uid
        assert "PAT-0042" not in row.values["warnings"] and "PAT0042" not in row.values["warnings"]


# -- a radiation dose SR -------------------------------------------------------------------------------------
def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _num(value: str, meaning: str, number: str, unit: str) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "NUM"
    item.ConceptNameCodeSequence = [_code(value, "DCM", meaning)]
    measured = Dataset()
    measured.NumericValue = number
    measured.MeasurementUnitsCodeSequence = [_code(unit, "UCUM", unit)]
    item.MeasuredValueSequence = [measured]
    return item


def _container(value: str, meaning: str, *items: Dataset) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType, item.ContinuityOfContent = "CONTAINS", "CONTAINER", "SEPARATE"
    item.ConceptNameCodeSequence = [_code(value, "DCM", meaning)]
    item.ContentSequence = list(items)
    return item


def dose_sr_for(image: Path, dlp_total: str, ctdivol: str) -> bytes:
    """A small X-Ray Radiation Dose SR (TID 10011) in the image's study: CT Accumulated Dose Data with the
    DLP total, and one CT Acquisition whose CT Dose holds the Mean CTDIvol."""
    src = pydicom.dcmread(image, stop_before_pixels=True)
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "SpecificCharacterSet"):  # fmt: skip
        setattr(ds, keyword, getattr(src, keyword))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 999, 1
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("113701", "DCM", "X-Ray Radiation Dose Report")]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "10011"
    ds.ContentTemplateSequence = [template]
    ds.ContentSequence = [
        _container("113811", "CT Accumulated Dose Data", _num("113813", "CT Dose Length Product Total", dlp_total,
                                                              "mGy.cm")),
        _container("113819", "CT Acquisition", _container("113829", "CT Dose", _num("113830", "Mean CTDIvol",
                                                                                    ctdivol, "mGy"))),
    ]  # fmt: skip
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_dose_sr_values_win_over_image_headers(orthanc, client, cases, tmp_path):
    image = cases / "C16a_ctdivol_too_long.dcm"  # CTDIvol 12.35 in its header
    study = upload(orthanc, image, source="CT_ROOM1")["ParentStudy"]
    assert upload(orthanc, dose_sr_for(image, "456.78", "15.25"), source="CT_ROOM1")["ParentStudy"] == study
    row = fetch_report_row(client, study)
    v = row.values
    assert (v["dose_source"], v["dlp_mgycm"], v["ctdivol_mgy"], v["dap_gycm2"]) == ("sr", 456.78, 15.25, None)
    assert (v["modalities"], v["number_of_series"], v["number_of_instances"], v["number_of_frames"]) == (
        "CT,SR",
        2,
        2,
        2,
    )
    assert row.warnings == []
    csv_path, _ = write_report_files(row, tmp_path, "study")
    assert read_report_csv(csv_path).equals(report_frame([row]))


# -- fetching: requests and resolution -----------------------------------------------------------------------
def test_documents_take_three_requests_plus_one_per_instance(orthanc, cases):
    image = cases / "C16c_no_dose_tags.dcm"
    study = upload(orthanc, image, source="CT_ROOM1")["ParentStudy"]
    upload(orthanc, dose_sr_for(image, "100", "10"), source="CT_ROOM1")
    counter = CountingTransport()
    with OrthancClient(orthanc.url, timeout=10, transport=counter) as c:
        docs = fetch_study_documents(c, study)
        assert len(counter.calls) == 3 + 2
        fetch_report_row(c, study)
    assert len(counter.calls) == 5 + 5 + 1, "the report adds one /tools/lookup for the Study Instance UID"
    assert [i.tags["Modality"] for i in docs.instances] == ["CT", "SR"], "instances ordered by series number"
    assert docs.instances[0].metadata["IngestSource"] == "CT_ROOM1"


def test_resolve_study_by_orthanc_id_or_study_instance_uid(orthanc, client, cases):
    doc = upload(orthanc, cases / "C18_multiframe_3frames.dcm")
    study = doc["ParentStudy"]
    uid = pydicom.dcmread(cases / "C18_multiframe_3frames.dcm", stop_before_pixels=True).StudyInstanceUID
    assert resolve_study(client, study) == [study]
    assert resolve_study(client, f"  {study.upper()}\n") == [study]
    assert resolve_study(client, f" {uid} ") == [study]
    accession = pydicom.dcmread(cases / "C18_multiframe_3frames.dcm", stop_before_pixels=True).AccessionNumber
    assert resolve_study(client, accession) == [study]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("00000000-00000000-00000000-00000000-00000000", "Orthanc has no study with ID"),
        ("1.2.3.4.5.6.7.8.9", "Orthanc has no study with the Study Instance UID or accession number given"),
        ("Kim^Jisoo", "Orthanc has no study with the Study Instance UID or accession number given"),
        ("ACC*", "Orthanc has no study with the Study Instance UID or accession number given"),  # no wildcards
        ("", "is not an Orthanc study ID"),
        ("x" * 65, "is not an Orthanc study ID"),
        ("series-uid", "names a series in Orthanc, not a study"),
        ("patient-id", "names a patient in Orthanc, not a study"),
    ],
)
def test_resolve_study_refuses_what_is_not_a_study(orthanc, client, cases, text, message):
    upload(orthanc, cases / "C18_multiframe_3frames.dcm")
    if text == "series-uid":
        text = pydicom.dcmread(cases / "C18_multiframe_3frames.dcm", stop_before_pixels=True).SeriesInstanceUID
    elif text == "patient-id":
        # Orthanc's lookup also matches Patient IDs: one made of digits looks like a UID to an operator
        ds = pydicom.dcmread(cases / "C18_multiframe_3frames.dcm")
        ds.PatientID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID = "12345", "1.2.3.4", "1.2.3.4"
        out = io.BytesIO()
        ds.save_as(out)
        upload(orthanc, out.getvalue())
        text = "12345"
    with pytest.raises(StudyNotFound, match=message) as err:
        resolve_study(client, text)
    if "." in text or "^" in text or text == "12345":
        assert text not in str(err.value), "what the operator typed (a UID, a name, a Patient ID) is not echoed"


def test_fetching_a_study_that_does_not_exist(orthanc, client):
    with pytest.raises(StudyNotFound, match="Orthanc has no study with ID 00000000-"):
        fetch_study_documents(client, "00000000-00000000-00000000-00000000-00000000")
    with pytest.raises(StudyNotFound, match="not an Orthanc study ID"):
        fetch_study_documents(client, "../system")
