"""Stable-study flow: one run per stable study. It builds the study's report and notifies the HL7 partner.

Runs are created by the watcher (flows/watch.py), named after the study (accession number or Study Instance
UID, never the patient), and can be started by hand from the Prefect UI with a study's Orthanc ID or Study
Instance UID. What was sent is recorded on the study in Orthanc, so the same content is never sent twice
by accident: a run for a study already notified with the same content sends nothing (unless ``force``),
one with more images sends an update, and a message that was built but not acknowledged is resent
byte for byte.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.config import SiteConfig, load_config
from tasks.errors import StudyNotFound, WorkflowError
from tasks.hl7_messages import OutgoingMessage, build_message
from tasks.notify import find_study, keep_pending, read_state, read_study, record_notified, same_uid_studies, send_hl7
from tasks.notify import write_report as write_report_task
from tasks.notify_state import Decision, Notified, Pending, content_digest, decide
from tasks.orthanc import client_from_config
from tasks.study_report import build_row
from tasks.watch_logic import derived_from, run_name

_IDENTIFIER = re.compile(r"[0-9.]{1,64}|[0-9a-f-]{1,64}")


class NotificationFailed(WorkflowError):
    """The partner did not acknowledge the message; it is kept on the study and resent by a rerun."""


def _run_name() -> str:
    study = str((flow_run.parameters or {}).get("study", "study"))
    return f"study-{study[:64]}"


@flow(name="study-notify", flow_run_name=_run_name, persist_result=False)
def study_notify(
    study: str, force: bool = False, stable_at: str | None = None, config_path: str | None = None
) -> dict[str, Any]:
    """Report a stable study and notify the HL7 partner.

    Args:
        study: The study, as Orthanc's study ID or its Study Instance UID (as an operator would type it).
        force: Send the notification even if the partner already acknowledged the same content.
        stable_at: Set by the watcher: Orthanc's LastUpdate of the study when it was found stable.
        config_path: Site config file on the worker. Empty: $OWF_CONFIG, else the embedded default.
    """
    logger = get_run_logger()
    cfg = load_config(config_path)
    outcomes: dict[str, Any] = {}
    with client_from_config(cfg) as orthanc:
        try:
            study_ids = find_study(orthanc, study)
        except StudyNotFound as e:
            if _IDENTIFIER.fullmatch(study.strip()):  # a UID or an Orthanc ID, never a name: safe to repeat
                raise StudyNotFound(f"{e}: {study.strip()}") from None
            raise
        if len(study_ids) > 1:
            logger.warning(
                "Study Instance UID %s belongs to %d Orthanc studies (different Patient IDs): each is reported "
                "with a warning; check the patient identity",
                study,
                len(study_ids),
            )
        for study_id in study_ids:
            outcomes[study_id] = _one_study(cfg, orthanc, study_id, force, logger)
    failed = {k: v for k, v in outcomes.items() if v.get("error")}
    if failed:
        raise NotificationFailed("; ".join(v["error"] for v in failed.values()))
    return outcomes


def _one_study(cfg: SiteConfig, orthanc, study_id: str, force: bool, logger) -> dict[str, Any]:
    docs = read_study(orthanc, study_id)
    origin = derived_from(docs.study)
    if origin and not force:
        logger.info("study %s is a copy of %s made by routing: not notified (force=true to notify it)",
                    study_id, origin)  # fmt: skip
        return {"decision": "copy-not-notified"}
    tags = docs.study.get("MainDicomTags", {})
    others = same_uid_studies(orthanc, study_id, tags.get("StudyInstanceUID"))
    row = build_row(docs, cfg.report.extra_tags, same_uid_studies=others,
                    source_metadata=cfg.orthanc.source_metadata)  # fmt: skip
    name = run_name(tags.get("AccessionNumber"), tags.get("StudyInstanceUID"), study_id)
    now = datetime.now(UTC)
    write_report_task(row, cfg.report_folder, f"{name}-{now:%Y%m%dT%H%M%S}", f"Report of {name}")
    for w in row.warnings:
        logger.warning("study %s: %s", study_id, w)
    result: dict[str, Any] = {"instances": row.values.get("number_of_instances")}
    if not cfg.hl7.enabled:
        logger.info("HL7 notification is off (hl7.enabled: false): report only")
        return {**result, "decision": "hl7-off"}

    notified, pending = read_state(orthanc, study_id, cfg.orthanc.notified_metadata, cfg.orthanc.pending_metadata)
    digest = content_digest(row.values)
    decision, why = decide(notified, pending, digest, force)
    logger.info("study %s: %s", study_id, why)
    if decision is Decision.NOTHING:
        return {**result, "decision": decision.value}
    if decision is Decision.RESEND_PENDING:
        assert pending is not None
        wire = pending.wire
        message = OutgoingMessage(wire, wire.decode(pending.charset, "replace"), pending.control_id,
                                  pending.message_type, pending.charset, [])  # fmt: skip
        update = pending.update
    else:
        update = decision is Decision.UPDATE
        message = build_message(row.values, cfg.hl7, control_id=_control_id(), now=now, update=update)
        for w in message.warnings:
            logger.warning("study %s: %s", study_id, w)
        keep_pending(orthanc, study_id, cfg.orthanc.pending_metadata,
                     Pending(digest, message.control_id, update, now.isoformat(), _b64(message.wire),
                             message.message_type, message.charset))  # fmt: skip
    state = send_hl7(message, cfg.hl7, return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        reason = str(error) if isinstance(error, BaseException) else "delivery failed"
        logger.error("study %s: HL7 %s not delivered: %s. The message is kept; a rerun sends it again.",
                     study_id, "update" if update else "notification", reason)  # fmt: skip
        return {**result, "decision": decision.value, "error": f"study {study_id}: {reason}"}
    delivery = state.result()
    record_notified(orthanc, study_id, cfg.orthanc.notified_metadata, cfg.orthanc.pending_metadata,
                    Notified(digest, row.values.get("number_of_instances"), message.control_id,
                             datetime.now(UTC).isoformat(), "update" if update else "new"))  # fmt: skip
    logger.info("study %s: HL7 %s %s acknowledged (%s) after %d attempt(s)", study_id, message.message_type,
                "update" if update else "notification", delivery.ack.code, delivery.attempts)  # fmt: skip
    return {**result, "decision": decision.value, "control_id": message.control_id, "ack": delivery.ack.code}


def _control_id() -> str:
    return uuid.uuid4().hex[:20].upper()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")
