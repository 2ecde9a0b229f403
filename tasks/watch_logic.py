"""Decisions of the stable-study watcher that need no network and no clock: pure, tested with tables.

The watcher follows Orthanc's change log (``GET /changes``) from a cursor. Facts it stands on (design notes):
stability is a timer kept in Orthanc's memory, so a study still settling when Orthanc restarts may never get
a StableStudy change; a study can become stable twice when it arrives in parts; the log can be cleared
(``DELETE /changes``, sequence numbers go on) or replaced with the whole database (numbers start again).

How it stays exactly-once:

- every stable state of a study gets one key, ``<orthanc study id>@<LastUpdate>``, used as the Prefect
  idempotency key of its run: creating the run twice returns the same run;
- the cursor is saved only after the runs up to it exist, and it never passes a study that is still
  settling (seen in a NewStudy/NewSeries change but not yet handled), so a restart re-reads what matters;
- a study that looks settled (unchanged for ``settle_seconds``) but never got its StableStudy change is
  handled as stable;
- a log that went backwards or has a hole is reported and rebuilt from the studies themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any


class LogState(Enum):
    OK = "ok"
    RESET = "reset"  # Orthanc's last sequence number is below our cursor: a new or restored database
    GAP = "gap"  # changes after our cursor were deleted before we read them


@dataclass(frozen=True)
class Change:
    seq: int
    change_type: str
    resource_type: str
    resource_id: str

    @classmethod
    def from_orthanc(cls, doc: dict[str, Any]) -> Change:
        return cls(int(doc["Seq"]), str(doc["ChangeType"]), str(doc["ResourceType"]), str(doc["ID"]))


def log_state(cursor: int, last: int, first_seq: int | None) -> LogState:
    """Judge one read of ``/changes?since=cursor``: ``last`` is Orthanc's ``Last``, ``first_seq`` the
    sequence number of the first change returned (None when none was)."""
    if cursor > 0 and last < cursor:
        return LogState.RESET
    if last > cursor and (first_seq is None or first_seq > cursor + 1):
        return LogState.GAP  # (from 0 too: a log cleared before the first read has lost its start)
    return LogState.OK


def next_cursor(read_up_to: int, unsettled: dict[str, int]) -> int:
    """Where the saved cursor may go: up to what was read, but never past a study still unsettled
    (study id -> sequence number of the first change that made it unsettled)."""
    if not unsettled:
        return read_up_to
    return min(read_up_to, min(unsettled.values()) - 1)


def run_key(study_id: str, last_update: str) -> str:
    """The idempotency key of the run for one stable state of a study."""
    return f"stable:{study_id}@{last_update}"


_NAME_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def run_name(accession: str | None, study_uid: str | None, study_id: str) -> str:
    """``study-<accession>``, else ``study-<Study Instance UID>``, else the Orthanc ID. Never a patient
    name: run names are visible to every UI user."""
    for value in (accession, study_uid):
        cleaned = _NAME_SAFE.sub("-", (value or "").strip()).strip("-")
        if cleaned:
            return f"study-{cleaned[:64]}"
    return f"study-{study_id}"


_TYPED_ID = re.compile(r"(?=.*[0-9])[A-Za-z0-9._-]{1,64}")


def manual_run_name(current: str, typed: str) -> str:
    """The name of a study run as it starts: the one the watcher gave it (``study-...``), else
    ``study-<what the operator typed>`` when that looks like an identifier (a UID, an Orthanc ID, an accession
    number: no spaces, at least one digit), else ``study-manual``. Letters alone could be a patient's name,
    which never goes into a run name."""
    if current.startswith("study-"):
        return current
    typed = typed.strip()
    return f"study-{typed}" if _TYPED_ID.fullmatch(typed) else "study-manual"


def derived_from(study: dict[str, Any]) -> str | None:
    """The Orthanc ID a study was modified or anonymized from (our own routing made it), else None."""
    for key in ("ModifiedFrom", "AnonymizedFrom"):
        value = study.get(key)
        if value:
            return str(value)
    return None


def parse_orthanc_time(value: str) -> datetime | None:
    """Orthanc's ``20261203T213912`` (UTC, no zone: LastUpdate, change dates, ``/tools/now``)."""
    try:
        return datetime.strptime(value.strip()[:15], "%Y%m%dT%H%M%S")
    except (ValueError, AttributeError):
        return None


def looks_settled(last_update: str, orthanc_now: str, settle_seconds: float) -> bool:
    """Has the study received nothing for ``settle_seconds``, by Orthanc's own clock?"""
    updated, now = parse_orthanc_time(last_update), parse_orthanc_time(orthanc_now)
    if updated is None or now is None:
        return False
    return (now - updated).total_seconds() >= settle_seconds


def after_horizon(last_update: str, horizon: str) -> bool:
    """Is the study newer than the horizon (both Orthanc times)? An empty or unreadable horizon admits all."""
    h = parse_orthanc_time(horizon) if horizon else None
    u = parse_orthanc_time(last_update)
    return h is None or u is None or u >= h


def within_horizon(last_update: str, horizon: str, stable_change_after_horizon: bool) -> bool:
    """Is a study the watcher's to notify? Yes when it was updated after the horizon, and also when it was
    updated before but became stable after it (Orthanc reported its StableStudy change after the horizon): a
    study still arriving when the watcher first starts is not part of the backlog the horizon leaves out."""
    return stable_change_after_horizon or after_horizon(last_update, horizon)


@dataclass(frozen=True)
class CrashedRun:
    """A study run Prefect marked Crashed: its process was lost (worker killed, host down)."""

    id: str
    name: str
    run_count: int  # times its flow body started


def is_lost(state_type: str, seconds_in_state: float, pending_lost_seconds: float) -> bool:
    """Is a study run lost with its process? Crashed: yes. Pending (claimed by a worker, process starting) for
    longer than ``pending_lost_seconds``: its worker died before the run began. Anything else: no."""
    if state_type == "CRASHED":
        return True
    return state_type == "PENDING" and seconds_in_state > pending_lost_seconds


def crashed_run_plan(runs: list[CrashedRun], max_restarts: int) -> tuple[list[CrashedRun], list[CrashedRun]]:
    """Which crashed study runs to start again (the same run: its name, key and history stay), and which to
    hand to an operator because they crashed too often (a study that kills its process every time)."""
    again = [r for r in runs if r.run_count <= max_restarts]
    give_up = [r for r in runs if r.run_count > max_restarts]
    return again, give_up


def gave_up_message(run: CrashedRun) -> str:
    return (
        f"study run {run.name} crashed {run.run_count} times (its process was lost each time); not started again "
        "automatically. Check the worker's log and memory, then rerun the study (owf rerun, or Run in the UI)."
    )
