"""What to send for a study, given what was sent before: pure, tested with tables.

The record lives with the study, as two Orthanc study metadata (names in the site config):

- ``HL7Notified``: what the partner last acknowledged (digest of the report's content, instance count,
  control id, time, new/update);
- ``HL7Pending``: a message built but not yet acknowledged, kept as its exact bytes, so a rerun after a
  failed delivery sends the same content with the same control id (the partner can recognise a repeat).

Rules: nothing sent before -> send "new"; the same content as acknowledged -> send nothing (unless forced);
other content (more images, corrected values) -> send an "update"; a pending message for the same content
-> resend those bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

# Columns that describe how the report was made rather than the study: they do not make a new message.
NOT_CONTENT = frozenset({"warnings"})


class Decision(Enum):
    NEW = "new"
    UPDATE = "update"
    NOTHING = "nothing"
    RESEND_PENDING = "resend-pending"


@dataclass(frozen=True)
class Notified:
    digest: str
    instances: int | None
    control_id: str
    sent_at: str
    kind: str  # "new" or "update"


@dataclass(frozen=True)
class Pending:
    digest: str
    control_id: str
    update: bool
    built_at: str
    wire_b64: str
    message_type: str
    charset: str  # the Python codec of the wire bytes

    @property
    def wire(self) -> bytes:
        return base64.b64decode(self.wire_b64)


def content_digest(row: Mapping[str, Any]) -> str:
    """A digest of the report's content: equal digests mean the partner would learn nothing new."""
    content = {k: row[k] for k in sorted(row) if k not in NOT_CONTENT}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]


def decide(notified: Notified | None, pending: Pending | None, digest: str, force: bool) -> tuple[Decision, str]:
    """The decision and a sentence for the log."""
    if pending is not None and pending.digest == digest:
        return Decision.RESEND_PENDING, (
            f"a message built at {pending.built_at} (control id {pending.control_id}) was never acknowledged: "
            "sending exactly the same bytes again"
        )
    if notified is None:
        return Decision.NEW, "not notified before: sending a new notification"
    if notified.digest == digest:
        if force:
            return Decision.UPDATE, "already notified with this content; sent again because the run was forced"
        return Decision.NOTHING, (
            f"already notified with this content at {notified.sent_at} (control id {notified.control_id}): "
            "nothing sent; run with resend_hl7=true to send again"
        )
    return Decision.UPDATE, (
        f"notified before at {notified.sent_at} with other content (then {notified.instances} instances): "
        "sending an update"
    )


def dump(record: Notified | Pending) -> str:
    return json.dumps(asdict(record), sort_keys=True)


def load_notified(text: str | None) -> Notified | None:
    doc = _load(text)
    try:
        return Notified(**doc) if doc else None
    except TypeError:
        return None


def load_pending(text: str | None) -> Pending | None:
    doc = _load(text)
    try:
        return Pending(**doc) if doc else None
    except TypeError:
        return None


def _load(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
