"""Morph and route against real servers: studies sent by dcmtk's storescu as MODALITY1 and MODALITY2 into a real
Orthanc, routed by the study flow to a real archive (a second Orthanc) or to a pynetdicom SCP that only takes
Little Endian (C21). The HL7 partner is python-hl7's MLLP server. Cases C19 and C21."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from stack.services import OrthancServer, free_port
from stack.synthetic import ct_dataset, write_ct_series
from tests.integration.partner import Partner
from tests.integration.scp import StorageScp

pytestmark = pytest.mark.integration


def storescu(orthanc, files, aet: str) -> None:
    subprocess.run([shutil.which("storescu") or "storescu", "-aet", aet, "-aec", "ORTHANC", "127.0.0.1",
                    str(orthanc.dicom_port), *map(str, files)], check=True, capture_output=True,
                   env={**os.environ, "TCP_NODELAY": "1"}, timeout=60)  # fmt: skip


def archive_server(workdir: Path) -> OrthancServer:
    return OrthancServer(workdir, free_port(), free_port(), aet="ARCHIVE", extra_config={"DicomAlwaysAllowFind": True})


@pytest.fixture(scope="session")
def archive_session(tmp_path_factory):
    server = archive_server(tmp_path_factory.mktemp("archive")).start()
    yield server
    server.stop()


@pytest.fixture
def archive(archive_session):
    """A second Orthanc as the archive (AET ARCHIVE), emptied before the test."""
    for patient in httpx.get(archive_session.url + "/patients", timeout=10).json():
        httpx.delete(f"{archive_session.url}/patients/{patient}", timeout=30).raise_for_status()
    return archive_session


@pytest.fixture
def partner():
    p = Partner(free_port()).start()
    yield p
    p.stop()


M1 = {"name": "modality1", "when": {"source": "MODALITY1"},
      "modify": {"replace": {"InstitutionName": "Imaging Center West"}}, "to": ["archive"]}  # fmt: skip
M2 = {"name": "modality2", "when": {"source": "MODALITY2"},
      "anonymize": {"profile": "2021b", "keep": ["StudyDescription"]}, "to": ["archive"]}  # fmt: skip


def site(tmp_path: Path, orthanc, destinations: list[dict], routes: list[dict], partner=None, **routing) -> str:
    cfg = {
        "data_dir": str(tmp_path / "data"),
        "orthanc": {"url": orthanc.url, "timeout_seconds": 30},
        "destinations": destinations,
        "routes": routes,
        "routing": {"retries": 1, "retry_backoff_seconds": 0.2, "job_timeout_seconds": 60, **routing},
        "hl7": {
            "enabled": partner is not None,
            "port": partner.port if partner else 2575,
            "retries": 0,
            "ack_timeout_seconds": 3,
        },
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def to_archive(archive: OrthancServer, **extra) -> dict:
    return {"name": "archive", "aet": "ARCHIVE", "host": "127.0.0.1", "port": archive.dicom_port, **extra}


def studies(server: OrthancServer) -> list[dict]:
    return httpx.get(server.url + "/studies?expand", timeout=10).json()


def files_of(server: OrthancServer) -> list[bytes]:
    return [httpx.get(f"{server.url}/instances/{i}/file", timeout=10).content
            for i in httpx.get(server.url + "/instances", timeout=10).json()]  # fmt: skip


def obx(message) -> dict[str, str]:
    return {str(s[3]).split("^")[0]: str(s[5]) for s in message.segments("OBX")}


def test_modality1_arrives_with_the_new_institution_and_everything_else_unchanged(
    prefect_server, orthanc, archive, partner, tmp_path, request
):
    from flows.study import study_notify

    files = write_ct_series(tmp_path / "m1", 3, accession="R-M1")
    storescu(orthanc, files, "MODALITY1")
    scp = StorageScp(free_port()).start()  # a second destination, to count what arrives
    request.addfinalizer(scp.stop)
    counter = {"name": "counter", "aet": "LEGACY", "host": "127.0.0.1", "port": scp.port}
    route = {**M1, "to": ["archive", "counter"]}
    cfg = site(tmp_path, orthanc, [to_archive(archive, verify="cfind"), counter], [route, M2], partner)
    [(study_id, result)] = study_notify(study="R-M1", config_path=cfg).items()  # by accession number
    assert result["routes"] == "modality1: delivered to archive,counter"
    assert len(scp.received) == 3

    archived = {pydicom.dcmread(pydicom.filebase.DicomBytesIO(b)).SOPInstanceUID: b for b in files_of(archive)}
    assert len(archived) == 3
    for path in files:
        original = pydicom.dcmread(path)
        copy = pydicom.dcmread(pydicom.filebase.DicomBytesIO(archived[original.SOPInstanceUID]))
        assert copy.InstitutionName == "Imaging Center West"
        for element in original:  # every other element, pixels included, as the modality sent it
            if element.keyword != "InstitutionName":
                assert copy[element.tag].value == element.value, element.keyword
    # the original in our Orthanc is untouched, and no copy was left behind
    [ours] = studies(orthanc)
    assert ours["ID"] == study_id and ours["MainDicomTags"]["InstitutionName"] == "Synthetic Hospital"
    # the HL7 report says where the study went
    [msg] = partner.received
    assert obx(msg)["routes"] == "modality1: delivered to archive,counter"
    assert "routed_study_uids" not in obx(msg)  # the UIDs did not change

    # a rerun delivers nothing again: the same content already went to the same place
    again = study_notify(study=study_id, config_path=cfg)[study_id]
    assert again["decision"] == "nothing" and again["routes"] == "modality1: delivered to archive,counter"
    assert len(scp.received) == 3 and len(partner.received) == 1
    # ... unless asked to
    study_notify(study=study_id, only_route="modality1", config_path=cfg)
    assert len(scp.received) == 6 and len(partner.received) == 1  # same outcome: no HL7 update


def phi_dataset(study_uid: str, series_uid: str, index: int) -> Dataset:
    """A CT slice whose patient name and ID also hide in a private tag and inside a nested sequence."""
    ds = ct_dataset(study_uid, series_uid, index, side=32, patient_id="PID-ZQ-4711", patient_name="Zyxwv^Quentin",
                    accession="R-M2")  # fmt: skip
    ds.StudyDescription = "CT HEAD"
    block = ds.private_block(0x0011, "OWF TEST", create=True)
    block.add_new(0x01, "LO", "Zyxwv^Quentin PID-ZQ-4711")
    inner = Dataset()
    inner.PatientName = "Zyxwv^Quentin"
    inner.PatientID = "PID-ZQ-4711"
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Brain"
    item.ReferencedPatientSequence = Sequence([inner])
    ds.AnatomicRegionSequence = Sequence([item])
    return ds


def test_modality2_arrives_anonymized_with_no_trace_of_the_patient(prefect_server, orthanc, archive, partner,
                                                                    tmp_path):  # fmt: skip
    from flows.study import study_notify

    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for i in range(2):
        path = tmp_path / f"m2_{i}.dcm"
        phi_dataset(study_uid, series_uid, i).save_as(path, enforce_file_format=True)
        paths.append(path)
    assert b"Zyxwv" in paths[0].read_bytes()
    storescu(orthanc, paths, "MODALITY2")
    cfg = site(tmp_path, orthanc, [to_archive(archive)], [M1, M2], partner)
    [(study_id, result)] = study_notify(study=study_uid, config_path=cfg).items()
    assert result["routes"] == "modality2: delivered to archive"

    stored = files_of(archive)
    assert len(stored) == 2
    for blob in stored:
        for secret in ("Zyxwv", "Quentin", "PID-ZQ-4711", "ZQ-4711"):
            assert secret.encode() not in blob and secret.encode("utf-16-le") not in blob, secret
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(blob))
        assert ds.StudyInstanceUID != study_uid and ds.SeriesInstanceUID != series_uid
        assert ds.SOPInstanceUID not in {pydicom.dcmread(p).SOPInstanceUID for p in paths}
        assert ds.StudyDescription == "CT HEAD"  # kept as the route says
    [anon] = studies(archive)
    anon_uid = anon["MainDicomTags"]["StudyInstanceUID"]
    # the copy made for the route is gone; the original is still there and unchanged
    [ours] = studies(orthanc)
    assert ours["ID"] == study_id and ours["PatientMainDicomTags"]["PatientID"] == "PID-ZQ-4711"
    # the report and the HL7 message say which UID went where
    assert obx(partner.received[0])["routed_study_uids"] == f"archive={anon_uid}"


def test_an_unmatched_source_follows_the_default_route_or_none(prefect_server, orthanc, archive, tmp_path):
    from flows.study import study_notify

    storescu(orthanc, write_ct_series(tmp_path / "x", 2, accession="R-X"), "CT_OTHER")
    study_id = studies(orthanc)[0]["ID"]
    dests = [to_archive(archive)]
    none = study_notify(study=study_id, config_path=site(tmp_path, orthanc, dests, [M1, M2]))[study_id]
    assert none["routes"] is None and studies(archive) == []
    default = {"name": "as-is", "to": ["archive"]}
    cfg = site(tmp_path, orthanc, dests, [M1, M2, default], default_route="as-is")
    out = study_notify(study=study_id, config_path=cfg)[study_id]
    assert out["routes"] == "as-is: delivered to archive"
    assert len(files_of(archive)) == 2


def test_archive_down_is_retried_then_fails_clearly_and_a_rerun_delivers_once(prefect_server, orthanc, tmp_path):
    from flows.study import StudyRunFailed, study_notify

    archive = archive_server(tmp_path / "own-archive")  # not started: the archive is down
    storescu(orthanc, write_ct_series(tmp_path / "m1", 2, accession="R-DOWN"), "MODALITY1")
    study_id = studies(orthanc)[0]["ID"]
    cfg = site(tmp_path, orthanc, [to_archive(archive)], [M1, {**M1, "name": "other", "to": ["archive"]}])
    with pytest.raises(StudyRunFailed, match=r"route modality1: archive: .*Connection refused"):
        study_notify(study=study_id, config_path=cfg)
    archive.start()
    try:
        out = study_notify(study=study_id, config_path=cfg)[study_id]
        assert out["routes"] == "modality1: delivered to archive; other: delivered to archive"
        again = study_notify(study=study_id, config_path=cfg)[study_id]
        assert again["routes"] == out["routes"]
        assert len(files_of(archive)) == 2
        # both routes send the same two instances: the archive received each once per route, never a third time
        received = [c for c in httpx.get(archive.url + "/changes?limit=1000").json()["Changes"]
                    if c["ChangeType"] == "NewInstance"]  # fmt: skip
        assert len(received) == 2
    finally:
        archive.stop()


def test_c21_archive_refusing_the_transfer_syntax_gets_a_transcoded_copy(prefect_server, orthanc, cases, tmp_path):
    from flows.study import study_notify

    scp = StorageScp(free_port()).start()
    try:
        source = cases / "C21_rle_lossless.dcm"
        r = httpx.post(orthanc.url + "/instances", content=source.read_bytes(), timeout=30)
        r.raise_for_status()
        study_id = r.json()["ParentStudy"]
        legacy = {"name": "legacy", "aet": "LEGACY", "host": "127.0.0.1", "port": scp.port}
        cfg = site(tmp_path, orthanc, [legacy], [{"name": "legacy", "to": ["legacy"]}])
        out = study_notify(study=study_id, config_path=cfg)[study_id]
        assert out["routes"] == "legacy: delivered to legacy"
        [(syntax, ds)] = scp.received
        assert syntax in (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian)
        original = pydicom.dcmread(source)
        assert (ds.pixel_array == original.pixel_array).all()  # lossless: the same pixels
    finally:
        scp.stop()


def test_c21_modified_on_the_way_out_is_transcoded_too(prefect_server, orthanc, cases, tmp_path):
    from flows.study import study_notify

    scp = StorageScp(free_port()).start()
    try:
        source = cases / "C21_rle_lossless.dcm"
        study_id = httpx.post(orthanc.url + "/instances", content=source.read_bytes(), timeout=30).json()["ParentStudy"]
        legacy = {"name": "legacy", "aet": "LEGACY", "host": "127.0.0.1", "port": scp.port}
        route = {"name": "fix", "modify": {"replace": {"InstitutionName": "West"}}, "to": ["legacy"]}
        out = study_notify(study=study_id, config_path=site(tmp_path, orthanc, [legacy], [route]))[study_id]
        assert out["routes"] == "fix: delivered to legacy"
        [(_syntax, ds)] = scp.received
        assert ds.InstitutionName == "West"
        assert (ds.pixel_array == pydicom.dcmread(source).pixel_array).all()
    finally:
        scp.stop()


def test_c19_patient_id_changed_with_force_and_the_report_names_the_archived_uid(
    prefect_server, orthanc, archive, partner, cases, tmp_path
):
    import json

    from flows.study import study_notify

    rule = json.loads((cases / "C19_rule.json").read_text())
    storescu(orthanc, [cases / "C19_mr_local_pid.dcm"], rule["source_aet"])
    study_id = studies(orthanc)[0]["ID"]
    route = {"name": "mr-room2", "when": {"source": rule["source_aet"]},
             "modify": {"replace": rule["rule"]["Replace"]}, "to": ["archive"]}  # fmt: skip
    out = study_notify(study=study_id, config_path=site(tmp_path, orthanc, [to_archive(archive)], [route], partner))
    assert out[study_id]["routes"] == "mr-room2: delivered to archive"
    [archived] = studies(archive)
    assert archived["PatientMainDicomTags"]["PatientID"] == "EXT-777"
    original_uid = pydicom.dcmread(cases / "C19_mr_local_pid.dcm").StudyInstanceUID
    assert archived["MainDicomTags"]["StudyInstanceUID"] == original_uid
    assert obx(partner.received[0])["113014"] == original_uid  # the UID the partner learns is the archived one
    [ours] = studies(orthanc)  # no copy was stored, the original keeps LOCAL-777
    assert ours["PatientMainDicomTags"]["PatientID"] == "LOCAL-777"


def test_a_study_from_two_sources_is_held_not_routed_by_accident(prefect_server, orthanc, archive, tmp_path):
    from flows.study import StudyRunFailed, study_notify

    files = write_ct_series(tmp_path / "mix", 2, accession="R-MIX")
    storescu(orthanc, files[:1], "MODALITY1")
    storescu(orthanc, files[1:], "MODALITY2")
    cfg = site(tmp_path, orthanc, [to_archive(archive)], [M1, M2])
    with pytest.raises(StudyRunFailed, match=r"2 sources \(MODALITY1: 1, MODALITY2: 1\); routing is held"):
        study_notify(study="R-MIX", config_path=cfg)
    assert studies(archive) == []
    study_notify(study="R-MIX", only_route="modality1", config_path=cfg)  # the operator decides
    assert len(files_of(archive)) == 2


def test_check_validates_routes_and_tries_every_destination(orthanc, archive, tmp_path, capsys):
    from stack.cli import main

    dests = [to_archive(archive), {"name": "ghost"}, {"name": "down", "aet": "DOWN", "host": "127.0.0.1",
                                                         "port": free_port()}]  # fmt: skip
    routes = [{"name": "r", "to": ["archive", "ghost", "down"]}]
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        yaml.safe_dump({"orthanc": {"url": orthanc.url}, "shares": [], "destinations": dests, "routes": routes})
    )
    declared = httpx.get(orthanc.url + "/modalities").json()
    assert main(["--config", str(cfg), "check"]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out
    assert "destination 'archive' (modality) answers" in out
    assert "destination 'ghost': destination ghost: Orthanc declares no modality of that name" in out
    assert "destination 'down'" in out and "cannot be reached" in out
    assert httpx.get(orthanc.url + "/modalities").json() == declared  # check wrote nothing

    cfg.write_text(yaml.safe_dump({"orthanc": {"url": orthanc.url}, "shares": [], "destinations": dests[:1],
                                   "routes": [{"name": "r", "to": ["archive", "tape"]}]}))  # fmt: skip
    assert main(["--config", str(cfg), "check"]) == 1
    assert "route r: unknown destination 'tape'" in capsys.readouterr().out
