"""Quarantine layout and reason documents. Pure logic: the share client does the moving.

A quarantined file keeps its path relative to the share root, below the quarantine folder, with a small
JSON reason file beside it::

    <share>/.quarantine/ct/2024/IMG0042.dcm
    <share>/.quarantine/ct/2024/IMG0042.dcm.reason.json

Requeueing moves the file back to its original path, where the next scan picks it up again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

REASON_SUFFIX = ".reason.json"

# kinds of quarantined file; only "dicomdir" is not an error
REJECTED = "rejected"  # Orthanc refused the file
ZIP_FAILED = "zip"  # a ZIP archive with entries that could not be stored
CONFLICT = "conflict"  # same SOP Instance UID as a stored instance, other content
DICOMDIR = "dicomdir"  # a media index, set aside: it holds no image


def quarantine_target(folder: str, path: str, taken: set[str] | None = None) -> str:
    """Where ``path`` goes in quarantine; ``.1``, ``.2``... are appended when the name is taken."""
    base = f"{folder}/{path}"
    taken = taken or set()
    if base not in taken:
        return base
    n = 1
    while f"{base}.{n}" in taken:
        n += 1
    return f"{base}.{n}"


def reason_document(
    *,
    share: str,
    source: str,
    original_path: str,
    kind: str,
    reason: str,
    when: datetime,
    size: int,
    orthanc_status: int | None = None,
    details: list[str] | None = None,
) -> bytes:
    doc: dict[str, Any] = {
        "share": share,
        "source": source,
        "original_path": original_path,
        "kind": kind,
        "error": kind != DICOMDIR,
        "reason": reason,
        "quarantined_at": when.isoformat(timespec="seconds"),
        "size": size,
    }
    if orthanc_status is not None:
        doc["orthanc_status"] = orthanc_status
    if details:
        doc["details"] = details
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class QuarantinedFile:
    path: str  # where it lies now, relative to the share root
    original_path: str
    kind: str
    reason: str
    quarantined_at: str
    size: int


def parse_reason(path: str, folder: str, raw: bytes | None, size: int) -> QuarantinedFile:
    """Read a reason document; a missing or broken one still yields a listable entry."""
    fallback = path[len(folder) + 1 :] if path.startswith(folder + "/") else path
    try:
        doc = json.loads(raw) if raw is not None else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return QuarantinedFile(path, fallback, "unknown", "reason file missing or unreadable", "", size)
    return QuarantinedFile(
        path=path,
        original_path=str(doc.get("original_path") or fallback),
        kind=str(doc.get("kind", "unknown")),
        reason=str(doc.get("reason", "")),
        quarantined_at=str(doc.get("quarantined_at", "")),
        size=size,
    )
