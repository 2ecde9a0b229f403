"""Prefect tasks of the study flow: each does one piece of I/O (Orthanc, the reports folder, the partner).

The decisions are pure and live elsewhere: the report row in ``tasks.study_report``, the message in
``tasks.hl7_messages``, what to send in ``tasks.notify_state``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.errors import OrthancUnavailable
from tasks.hl7_messages import OutgoingMessage
from tasks.hl7_settings import Hl7Settings
from tasks.mllp import DeliveryResult, deliver
from tasks.notify_state import Notified, Pending, dump, load_notified, load_pending
from tasks.orthanc import OrthancClient
from tasks.orthanc_study import fetch_study_documents, resolve_study
from tasks.study_report import ReportRow, StudyDocuments, table_for_artifact, write_report_files


def _orthanc_unavailable(task, task_run, state) -> bool:
    """Retry only when Orthanc could not be reached; a missing study stays missing."""
    try:
        state.result()
    except OrthancUnavailable:
        return True
    except Exception:
        return False
    return False


# Task inputs include live clients, which cannot be hashed: no result caching (every task here does I/O that must
# happen each time anyway).
NO_CACHING = {"cache_policy": NO_CACHE}

# Reading Orthanc is safe to repeat; a short retry rides over a busy moment.
ORTHANC_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _orthanc_unavailable,
                   **NO_CACHING}  # fmt: skip


@task(name="find-study", **ORTHANC_RETRIES)
def find_study(orthanc: OrthancClient, text: str) -> list[str]:
    return resolve_study(orthanc, text)


@task(name="read-study", **ORTHANC_RETRIES)
def read_study(orthanc: OrthancClient, study_id: str) -> StudyDocuments:
    return fetch_study_documents(orthanc, study_id)


@task(name="same-uid-studies", **ORTHANC_RETRIES)
def same_uid_studies(orthanc: OrthancClient, study_id: str, study_uid: str | None) -> list[str]:
    """Other Orthanc studies with this Study Instance UID (C10: same UID, another Patient ID)."""
    if not study_uid:
        return []
    return [s for s in resolve_study(orthanc, study_uid) if s != study_id]


@task(name="write-report", **NO_CACHING)
def write_report(row: ReportRow, folder: Path, stem: str, title: str, show_patient: bool = False) -> tuple[Path, Path]:
    """The report as CSV and JSON files (complete) and as a table artifact on the run (patient fields masked
    unless ``show_patient``)."""
    csv_path, json_path = write_report_files(row, folder, stem)
    create_table_artifact(table_for_artifact(row, show_patient), key=None, description=title)
    return csv_path, json_path


@task(name="read-notification-state", **ORTHANC_RETRIES)
def read_state(orthanc: OrthancClient, study_id: str, notified_name: str, pending_name: str):
    return (
        load_notified(orthanc.study_metadata(study_id, notified_name)),
        load_pending(orthanc.study_metadata(study_id, pending_name)),
    )


@task(name="keep-pending-message", **ORTHANC_RETRIES)
def keep_pending(orthanc: OrthancClient, study_id: str, name: str, pending: Pending) -> None:
    orthanc.set_study_metadata(study_id, name, dump(pending))


@task(name="send-hl7", **NO_CACHING)
def send_hl7(message: OutgoingMessage, settings: Hl7Settings) -> DeliveryResult:
    """Deliver over MLLP with the bounded retry policy of ``tasks.mllp.deliver`` (the same control id on
    every attempt, so a partner that got it twice can tell). Prefect does not retry this task on top."""
    return deliver(message, settings)


@task(name="record-notification", **ORTHANC_RETRIES)
def record_notified(orthanc: OrthancClient, study_id: str, notified_name: str, pending_name: str,
                    notified: Notified) -> None:  # fmt: skip
    orthanc.set_study_metadata(study_id, notified_name, dump(notified))
    orthanc.delete_study_metadata(study_id, pending_name)
