"""What Orthanc's answer to ``POST /instances`` means for the source file. Pure logic.

The table, measured against Orthanc 1.10.1 (see tests/unit/test_orthanc_answers.py):

=====================================  ===================  =====================================
Orthanc answered                       verdict              what happens to the source file
=====================================  ===================  =====================================
200, Status Success                    STORED               deleted
200, Status AlreadyStored              ALREADY_STORED       deleted (content compared, warned)
200, Status FilteredOut                REJECTED             quarantined: a filter refused it
400 OrthancStatus 15 Bad file format   REJECTED             quarantined: not DICOM (JSON body only)
400 other OrthancStatus (3, ...)       REJECTED             quarantined: corrupt DICOM
404 Inexistent tag, 415, 422           REJECTED             quarantined: required tag missing
401, 403                               AUTH                 kept; run fails: credentials
other 4xx (405, 408, 409, 413, 429)    UNAVAILABLE          kept; retried later
5xx, no answer, not JSON               UNAVAILABLE          kept; retried later
=====================================  ===================  =====================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Verdict(Enum):
    STORED = "stored"
    ALREADY_STORED = "already stored"
    REJECTED = "rejected"
    AUTH = "auth"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class UploadAnswer:
    verdict: Verdict
    instance_id: str | None = None
    study_id: str | None = None
    reason: str = ""
    orthanc_status: int | None = None

    @property
    def confirmed(self) -> bool:
        """Orthanc holds the instance: the only case in which a source file may be deleted."""
        return self.verdict in (Verdict.STORED, Verdict.ALREADY_STORED)


_CONTENT_REJECTED = {400, 404, 415, 422}


def _body_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _error_reason(http_status: int, doc: Any, looks_like_dicom: bool = False) -> tuple[str, int | None]:
    if not isinstance(doc, dict):
        return f"HTTP {http_status}", None
    status = doc.get("OrthancStatus")
    message = str(doc.get("OrthancError") or doc.get("Message") or f"HTTP {http_status}")
    details = str(doc.get("Details") or "").strip()
    if status == 15 and not looks_like_dicom:
        what = "not a DICOM file"
    elif status == 15:
        what = "damaged DICOM file (truncated, or an encoding Orthanc cannot parse)"
    elif http_status == 404:
        what = "DICOM file lacks a tag Orthanc requires"
    else:
        what = "corrupt or unsupported DICOM file"
    text = f"{what} (Orthanc: {message}{'; ' + details if details else ''})"
    return text[:500], status if isinstance(status, int) else None


def judge_single(http_status: int, doc: Any, looks_like_dicom: bool = False) -> UploadAnswer:
    """Judge one entry of an answer: a JSON object as Orthanc returns it for one file. ``looks_like_dicom``
    (the file has a DICM marker or a DICOM header) only sharpens the wording of a rejection."""
    if 200 <= http_status < 300:
        if not isinstance(doc, dict):
            return UploadAnswer(Verdict.UNAVAILABLE, reason="Orthanc answered 2xx without a JSON object")
        status = doc.get("Status")
        ids = {"instance_id": doc.get("ID"), "study_id": doc.get("ParentStudy")}
        if status == "Success":
            return UploadAnswer(Verdict.STORED, **ids)
        if status == "AlreadyStored":
            return UploadAnswer(Verdict.ALREADY_STORED, **ids)
        if status == "FilteredOut":
            return UploadAnswer(Verdict.REJECTED, reason="refused by a filter configured in Orthanc", **ids)
        return UploadAnswer(Verdict.UNAVAILABLE, reason=f"Orthanc answered an unknown status {status!r}")
    if http_status in (401, 403):
        return UploadAnswer(Verdict.AUTH, reason=f"Orthanc refused our credentials (HTTP {http_status})")
    if http_status in _CONTENT_REJECTED:
        if not isinstance(doc, dict):
            # Not Orthanc's JSON error: a proxy or another server answered. The file is not to blame.
            return UploadAnswer(
                Verdict.UNAVAILABLE, reason=f"HTTP {http_status} without an Orthanc error body (a proxy in between?)"
            )
        reason, orthanc_status = _error_reason(http_status, doc, looks_like_dicom)
        return UploadAnswer(Verdict.REJECTED, reason=reason, orthanc_status=orthanc_status)
    if http_status >= 500:
        message = doc.get("Message") or doc.get("OrthancError") if isinstance(doc, dict) else None
        status = doc.get("OrthancStatus") if isinstance(doc, dict) else None
        return UploadAnswer(
            Verdict.UNAVAILABLE,
            reason=f"Orthanc error HTTP {http_status}" + (f": {message}" if message else ""),
            orthanc_status=status if isinstance(status, int) else None,
        )
    return UploadAnswer(Verdict.UNAVAILABLE, reason=f"Orthanc answered HTTP {http_status}")


def judge_upload(http_status: int, body: bytes, looks_like_dicom: bool = False) -> UploadAnswer:
    """Judge Orthanc's answer to uploading one DICOM file."""
    doc = _body_json(body)
    if isinstance(doc, list):
        # A ZIP body answers a list; a single file never should. One entry: take it, else it is not ours.
        if len(doc) == 1:
            return judge_single(http_status, doc[0], looks_like_dicom)
        return UploadAnswer(Verdict.REJECTED, reason=f"Orthanc read {len(doc)} instances from one file")
    return judge_single(http_status, doc, looks_like_dicom)
