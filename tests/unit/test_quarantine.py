"""Quarantine layout, reason documents and reading them back."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tasks.quarantine import (
    CONFLICT,
    DICOMDIR,
    REASON_SUFFIX,
    REJECTED,
    ZIP_FAILED,
    QuarantinedFile,
    parse_reason,
    quarantine_target,
    reason_document,
)

Q = ".quarantine"
WHEN = datetime(2024, 5, 17, 9, 30, 12, 987654, tzinfo=UTC)
BASE_KEYS = {"share", "source", "original_path", "kind", "error", "reason", "quarantined_at", "size"}


@pytest.mark.parametrize(
    ("folder", "path", "taken", "expected"),
    [
        (Q, "IMG0042.dcm", None, ".quarantine/IMG0042.dcm"),
        (Q, "ct/2024/IMG0042.dcm", None, ".quarantine/ct/2024/IMG0042.dcm"),
        (Q, "ct/2024/IMG0042.dcm", set(), ".quarantine/ct/2024/IMG0042.dcm"),
        (Q, "a.dcm", {".quarantine/b.dcm"}, ".quarantine/a.dcm"),
        (Q, "a.dcm", {".quarantine/a.dcm"}, ".quarantine/a.dcm.1"),
        (Q, "a.dcm", {".quarantine/a.dcm", ".quarantine/a.dcm.1"}, ".quarantine/a.dcm.2"),
        (Q, "a.dcm", {".quarantine/a.dcm", ".quarantine/a.dcm.1", ".quarantine/a.dcm.2"}, ".quarantine/a.dcm.3"),
        (Q, "a.dcm", {".quarantine/a.dcm", ".quarantine/a.dcm.2"}, ".quarantine/a.dcm.1"),
        (Q, "a.dcm", {".quarantine/a.dcm.1"}, ".quarantine/a.dcm"),
        (Q, "sub/a.dcm", {".quarantine/a.dcm"}, ".quarantine/sub/a.dcm"),
        ("rejected/2024", "DICOMDIR", {"rejected/2024/DICOMDIR"}, "rejected/2024/DICOMDIR.1"),
    ],
)
def test_quarantine_target(folder, path, taken, expected):
    assert quarantine_target(folder, path, taken) == expected


def test_quarantine_target_does_not_change_taken():
    taken = {".quarantine/a.dcm"}
    quarantine_target(Q, "a.dcm", taken)
    assert taken == {".quarantine/a.dcm"}


def test_quarantine_targets_of_many_collisions_are_unique():
    taken: set[str] = set()
    for _ in range(25):
        taken.add(quarantine_target(Q, "a.dcm", taken))
    assert taken == {".quarantine/a.dcm"} | {f".quarantine/a.dcm.{n}" for n in range(1, 25)}


def document(**overrides) -> dict:
    args = {
        "share": "ct-room1",
        "source": "CT1",
        "original_path": "ct/2024/IMG0042.dcm",
        "kind": REJECTED,
        "reason": "not a DICOM file (Orthanc: Bad file format)",
        "when": WHEN,
        "size": 512,
        **overrides,
    }
    raw = reason_document(**args)
    assert isinstance(raw, bytes)
    return json.loads(raw.decode("utf-8"))


@pytest.mark.parametrize(
    ("kind", "error"),
    [(REJECTED, True), (ZIP_FAILED, True), (CONFLICT, True), (DICOMDIR, False), ("something-else", True)],
)
def test_reason_document_error_is_false_only_for_dicomdir(kind, error):
    assert document(kind=kind)["error"] is error


def test_kind_constants():
    assert (REJECTED, ZIP_FAILED, CONFLICT, DICOMDIR) == ("rejected", "zip", "conflict", "dicomdir")
    assert REASON_SUFFIX == ".reason.json"


@pytest.mark.parametrize(
    ("overrides", "expected_keys"),
    [
        pytest.param({}, BASE_KEYS, id="minimal"),
        pytest.param({"orthanc_status": 15}, BASE_KEYS | {"orthanc_status"}, id="orthanc-status"),
        pytest.param({"orthanc_status": 0}, BASE_KEYS | {"orthanc_status"}, id="orthanc-status-zero"),
        pytest.param({"orthanc_status": None}, BASE_KEYS, id="orthanc-status-none"),
        pytest.param({"details": ["a.dcm: Bad file format"]}, BASE_KEYS | {"details"}, id="details"),
        pytest.param({"details": []}, BASE_KEYS, id="details-empty"),
        pytest.param({"details": None}, BASE_KEYS, id="details-none"),
        pytest.param({"orthanc_status": 3, "details": ["x"]}, BASE_KEYS | {"orthanc_status", "details"}, id="both"),
    ],
)
def test_reason_document_has_no_extra_keys(overrides, expected_keys):
    assert set(document(**overrides)) == expected_keys


def test_reason_document_values():
    doc = document(orthanc_status=15, details=["IMG1: Bad file format", "IMG2: Inexistent tag"])
    assert doc == {
        "share": "ct-room1",
        "source": "CT1",
        "original_path": "ct/2024/IMG0042.dcm",
        "kind": "rejected",
        "error": True,
        "reason": "not a DICOM file (Orthanc: Bad file format)",
        "quarantined_at": "2024-05-17T09:30:12+00:00",
        "size": 512,
        "orthanc_status": 15,
        "details": ["IMG1: Bad file format", "IMG2: Inexistent tag"],
    }


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (WHEN, "2024-05-17T09:30:12+00:00"),
        (datetime(2024, 5, 17, 11, 30, 12, tzinfo=timezone(timedelta(hours=2))), "2024-05-17T11:30:12+02:00"),
        (datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05"),
    ],
)
def test_quarantined_at_has_second_precision(when, expected):
    assert document(when=when)["quarantined_at"] == expected


def test_reason_document_keeps_non_ascii_text_as_utf8():
    raw = reason_document(
        share="ct-room1",
        source="CT1",
        original_path="Müller/Überweisung.dcm",
        kind=REJECTED,
        reason="Präfix",
        when=WHEN,
        size=1,
    )
    assert "Müller/Überweisung.dcm".encode() in raw
    assert json.loads(raw)["reason"] == "Präfix"


FOLDER = ".quarantine"
FILE = ".quarantine/ct/2024/IMG0042.dcm"


@pytest.mark.parametrize(
    ("path", "raw", "size", "expected"),
    [
        pytest.param(
            FILE,
            None,
            512,
            QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "unknown", "reason file missing or unreadable", "", 512),
            id="missing",
        ),
        pytest.param(
            FILE,
            b"{not json",
            7,
            QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "unknown", "reason file missing or unreadable", "", 7),
            id="broken-json",
        ),
        pytest.param(
            FILE,
            b"",
            7,
            QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "unknown", "reason file missing or unreadable", "", 7),
            id="empty",
        ),
        pytest.param(
            FILE,
            b"\xff\xfe\xfa",
            7,
            QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "unknown", "reason file missing or unreadable", "", 7),
            id="binary",
        ),
        pytest.param(
            FILE,
            b"[1, 2]",
            7,
            QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "unknown", "reason file missing or unreadable", "", 7),
            id="json-list",
        ),
        pytest.param(
            FILE,
            b'"text"',
            7,
            QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "unknown", "reason file missing or unreadable", "", 7),
            id="json-string",
        ),
        pytest.param(
            "elsewhere/a.dcm",
            None,
            1,
            QuarantinedFile(
                "elsewhere/a.dcm", "elsewhere/a.dcm", "unknown", "reason file missing or unreadable", "", 1
            ),
            id="outside-folder",
        ),
        pytest.param(
            ".quarantinex/a.dcm",
            None,
            1,
            QuarantinedFile(
                ".quarantinex/a.dcm", ".quarantinex/a.dcm", "unknown", "reason file missing or unreadable", "", 1
            ),
            id="folder-prefix-only",
        ),
        pytest.param(
            FILE, b"{}", 9, QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "unknown", "", "", 9), id="empty-object"
        ),
        pytest.param(
            FILE,
            b'{"kind": "zip", "reason": "r", "original_path": ""}',
            9,
            QuarantinedFile(FILE, "ct/2024/IMG0042.dcm", "zip", "r", "", 9),
            id="blank-original-path",
        ),
        pytest.param(
            FILE,
            b'{"original_path": "in/x.dcm", "kind": "conflict", "reason": "same UID", '
            b'"quarantined_at": "2024-05-17T09:30:12+00:00", "size": 1}',
            9,
            QuarantinedFile(FILE, "in/x.dcm", "conflict", "same UID", "2024-05-17T09:30:12+00:00", 9),
            id="size-comes-from-the-caller",
        ),
    ],
)
def test_parse_reason(path, raw, size, expected):
    assert parse_reason(path, FOLDER, raw, size) == expected


@pytest.mark.parametrize("kind", [REJECTED, ZIP_FAILED, CONFLICT, DICOMDIR])
def test_reason_document_round_trips_through_parse_reason(kind):
    target = quarantine_target(FOLDER, "ct/2024/IMG0042.dcm", {FILE})
    raw = reason_document(
        share="ct-room1",
        source="CT1",
        original_path="ct/2024/IMG0042.dcm",
        kind=kind,
        reason="why",
        when=WHEN,
        size=512,
        orthanc_status=15,
    )
    entry = parse_reason(target, FOLDER, raw, 512)
    assert entry == QuarantinedFile(
        path=".quarantine/ct/2024/IMG0042.dcm.1",
        original_path="ct/2024/IMG0042.dcm",
        kind=kind,
        reason="why",
        quarantined_at="2024-05-17T09:30:12+00:00",
        size=512,
    )
