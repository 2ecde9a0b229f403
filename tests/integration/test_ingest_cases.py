"""The shared hard cases C02-C07 against a real Orthanc, from a local folder and from a real SMB share."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import orthanc_instances
from tests.integration.helpers import CountingTransport, drain, engine_for, local_share, smb_share

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "smb"])
def sut(request, tmp_path):
    if request.param == "local":
        return local_share(tmp_path / "inbox")
    return smb_share(request.getfixturevalue("samba"))


def tags(orthanc, instance_id: str) -> dict:
    return httpx.get(f"{orthanc.url}/instances/{instance_id}/simplified-tags", timeout=10).json()


@pytest.mark.parametrize("case", ["C02_no_preamble_explicit.dcm", "C03_implicit_no_meta.dcm"])
def test_files_without_preamble_or_meta_are_uploaded_and_read_back_equal(sut, orthanc, cases, case):
    sut.place(cases / case, "incoming/" + case)
    report = drain(sut, engine_for(sut, orthanc.url))
    assert report.uploaded == 1 and report.quarantined == 0
    assert sut.files() == set(), "the confirmed file is deleted"
    (instance,) = orthanc_instances(orthanc)
    stored = tags(orthanc, instance)
    original = pydicom.dcmread(cases / case, force=True)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert stored[keyword] == str(original.get(keyword)), keyword
    meta = httpx.get(f"{orthanc.url}/instances/{instance}/metadata/IngestSource", timeout=5)
    assert meta.text == "INBOX" if sut.kind == "local" else meta.text == "CT_ROOM1"


def test_c04_junk_and_odd_names(sut, orthanc, cases):
    sut.place(cases / "C04_folder", "drop")
    counter = CountingTransport()
    engine = engine_for(sut, orthanc.url, transport=counter)
    report = drain(sut, engine, sweeps=6)

    assert len(orthanc_instances(orthanc)) == 2, "exactly IMG0001 and sub/IMG0002.DCM are stored"
    assert report.uploaded == 2
    remaining = sut.files()
    # OS and office junk stays where it is, untouched; the 0-byte file is "not ready", not broken.
    assert remaining == {
        "drop/Thumbs.db", "drop/desktop.ini", "drop/.DS_Store", "drop/~$lock.tmp", "drop/empty.dcm"
    }  # fmt: skip
    quarantined = sut.quarantined()
    assert set(quarantined) == {"drop/corrupt.dcm", "drop/report.pdf", "drop/scan_notes.txt"}
    assert "not a DICOM file" in quarantined["drop/report.pdf"]["reason"]
    assert "corrupt" in quarantined["drop/corrupt.dcm"]["reason"]
    for doc in quarantined.values():
        assert doc["error"] is True and doc["kind"] == "rejected"
        assert (sut.root / ".quarantine" / doc["original_path"]).exists()
    # Six sweeps, yet every file was offered to Orthanc at most once: junk is never POSTed in a loop.
    assert counter.count("POST", "/instances") == 5


def test_c04_ignored_files_are_logged_once(tmp_path, orthanc, cases, caplog):
    sut = local_share(tmp_path / "inbox")
    sut.place(cases / "C04_folder" / "Thumbs.db")
    with caplog.at_level("INFO", logger="test.sweep"):
        drain(sut, engine_for(sut, orthanc.url), sweeps=5)
    assert sum("Thumbs.db" in r.getMessage() for r in caplog.records) == 1


def test_c05_dicomdir_set_aside_images_uploaded(sut, orthanc, cases):
    sut.place(cases / "C05_dicomdir_set", "cd")
    report = drain(sut, engine_for(sut, orthanc.url))
    assert report.uploaded == 2 and report.set_aside == 1 and report.quarantined == 0
    (study,) = httpx.get(orthanc.url + "/studies", timeout=5).json()
    assert len(httpx.get(f"{orthanc.url}/studies/{study}/instances", timeout=5).json()) == 2
    doc = sut.quarantined()["cd/DICOMDIR"]
    assert doc["kind"] == "dicomdir" and doc["error"] is False
    assert sut.files() == set()


def test_c06_zip_uploaded_per_entry_and_deleted(sut, orthanc, cases):
    sut.place(cases / "C06_study.zip")
    report = drain(sut, engine_for(sut, orthanc.url))
    assert report.uploaded == 2 and report.quarantined == 0
    assert len(orthanc_instances(orthanc)) == 2
    assert sut.files() == set()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_zip_with_a_broken_dicom_entry_is_quarantined_not_deleted(tmp_path, orthanc, cases):
    sut = local_share(tmp_path / "inbox")
    good = (cases / "C04_folder" / "IMG0001").read_bytes()
    bad = (cases / "C04_folder" / "corrupt.dcm").read_bytes()
    (sut.root / "mixed.zip").write_bytes(_zip({"a/IMG1": good, "a/BROKEN.dcm": bad, "README.txt": b"hello"}))
    report = drain(sut, engine_for(sut, orthanc.url))
    assert report.quarantined == 1
    doc = sut.quarantined()["mixed.zip"]
    assert doc["kind"] == "zip" and any("BROKEN.dcm" in d for d in doc["details"])
    assert len(orthanc_instances(orthanc)) == 1, "the good entry is stored; the archive is kept for review"


@pytest.mark.parametrize(
    "content, reason",
    [
        (_zip({"README.txt": b"just text", "notes.pdf": b"%PDF-1.4"}), "holds no DICOM image"),
        (_zip({"a.dcm": b"x" * 100})[:60], "damaged ZIP"),
    ],
    ids=["no-dicom-inside", "truncated"],
)
def test_zips_without_images_or_damaged_are_quarantined(tmp_path, orthanc, content, reason):
    sut = local_share(tmp_path / "inbox")
    (sut.root / "x.zip").write_bytes(content)
    drain(sut, engine_for(sut, orthanc.url))
    doc = sut.quarantined()["x.zip"]
    assert reason in doc["reason"] + " ".join(doc.get("details", []))
    assert orthanc_instances(orthanc) == []


def test_c07_resent_instance_with_other_content_warns_and_keeps_first(sut, orthanc, cases):
    sut.place(cases / "C07a_original.dcm")
    first = drain(sut, engine_for(sut, orthanc.url))
    assert first.uploaded == 1 and not first.warnings
    sut.place(cases / "C07b_resend_same_uid.dcm")
    second = drain(sut, engine_for(sut, orthanc.url))
    assert second.already_stored == 1 and second.uploaded == 0
    assert len(second.warnings) == 1 and "different content" in second.warnings[0]
    assert "Berg" not in second.warnings[0], "no patient name in the warning"
    assert sut.files() == set(), "handled: deleted"
    (instance,) = orthanc_instances(orthanc)
    assert tags(orthanc, instance)["PatientName"] == "Berg^Lena"


def test_c07_identical_resend_is_quiet(tmp_path, orthanc, cases):
    sut = local_share(tmp_path / "inbox")
    for _ in range(2):
        sut.place(cases / "C07a_original.dcm")
        report = drain(sut, engine_for(sut, orthanc.url))
    assert report.already_stored == 1 and report.warnings == []


def test_c07_conflict_policy_quarantine_keeps_the_differing_file(tmp_path, orthanc, cases):
    sut = local_share(tmp_path / "inbox")
    sut.place(cases / "C07a_original.dcm")
    drain(sut, engine_for(sut, orthanc.url))
    sut.place(cases / "C07b_resend_same_uid.dcm")
    report = drain(sut, engine_for(sut, orthanc.url, conflict_policy="quarantine"))
    assert report.quarantined == 1
    assert sut.quarantined()["C07b_resend_same_uid.dcm"]["kind"] == "conflict"


def test_every_pydicom_test_file_ends_in_orthanc_or_quarantine(tmp_path, orthanc):
    """The real input: every file pydicom ships as test data, dropped into the inbox."""
    src = Path(pydicom.__file__).parent / "data" / "test_files"
    sut = local_share(tmp_path / "inbox")
    sut.place(src, "pydicom")
    placed = sut.files()
    report = drain(sut, engine_for(sut, orthanc.url), sweeps=4)
    remaining = sut.files()
    quarantined = sut.quarantined()
    # Nothing stays behind, except what the ignore list names or 0-byte files (none ship).
    assert remaining == set(), sorted(remaining)
    assert report.uploaded + report.already_stored + report.quarantined + report.set_aside == len(placed)
    assert all(doc["reason"] for doc in quarantined.values())
    assert report.uploaded >= 50
    assert len(orthanc_instances(orthanc)) == report.uploaded


def _split_before_pixel_data(tmp_path) -> tuple[bytes, bytes]:
    from stack.synthetic import write_ct_series

    (path,) = write_ct_series(tmp_path / "src", 1)
    data = path.read_bytes()
    cut = data.index(b"\xe0\x7f\x10\x00")
    return data[:cut], data[cut:]


@pytest.mark.parametrize("kind", ["local", "smb"])
def test_writer_pausing_before_pixel_data_never_stores_a_header_only_image(tmp_path, orthanc, kind, request):
    sut = local_share(tmp_path / "inbox") if kind == "local" else smb_share(request.getfixturevalue("samba"))
    head, rest = _split_before_pixel_data(tmp_path)
    target = sut.root / "paused.dcm"
    target.write_bytes(head)  # the writer pauses here, longer than two scans
    engine = engine_for(sut, orthanc.url, incomplete_grace_seconds=60)
    first = drain(sut, engine, sweeps=3, now=time.time())
    assert first.uploaded == 0 and first.quarantined == 0 and first.not_ready == 1
    assert orthanc_instances(orthanc) == [] and target.exists()
    with open(target, "ab") as f:  # the writer resumes and finishes
        f.write(rest)
    second = drain(sut, engine, sweeps=3, now=time.time() + 5)
    assert second.uploaded == 1
    (instance,) = orthanc_instances(orthanc)
    assert httpx.get(f"{orthanc.url}/instances/{instance}/file", timeout=10).content == head + rest


def test_header_only_image_left_beyond_the_grace_period_is_quarantined(tmp_path, orthanc):
    sut = local_share(tmp_path / "inbox")
    head, _ = _split_before_pixel_data(tmp_path)
    (sut.root / "cut.dcm").write_bytes(head)
    report = drain(sut, engine_for(sut, orthanc.url, incomplete_grace_seconds=0))
    assert report.quarantined == 1 and orthanc_instances(orthanc) == []
    assert "without pixel data" in sut.quarantined()["cut.dcm"]["reason"]


def test_young_dicom_orthanc_cannot_parse_is_waited_for_once_not_posted_in_a_loop(tmp_path, orthanc, cases):
    sut = local_share(tmp_path / "inbox")
    sut.place(cases / "C04_folder" / "corrupt.dcm")
    counter = CountingTransport()
    report = drain(sut, engine_for(sut, orthanc.url, transport=counter, incomplete_grace_seconds=60), sweeps=6,
                   now=time.time())  # fmt: skip
    assert report.quarantined == 0 and sut.files() == {"corrupt.dcm"}
    assert counter.count("POST", "/instances") == 1, "offered once, then held back while unchanged"
