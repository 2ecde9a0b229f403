"""Stable-study flow: one run per stable study. It builds the study's report, runs the routes that match the
study (one ``route-<name>`` subflow each), and notifies the HL7 partner of the result.

Runs are created by the watcher (flows/watch.py), named after the study (accession number or Study Instance
UID, never the patient), and can be started by hand from the Prefect UI with a study's Orthanc ID or Study
Instance UID. What was delivered and sent is recorded on the study in Orthanc, so nothing is sent twice by
accident: a run for a study already notified with the same content sends nothing (unless ``resend_hl7``),
one with more images sends an update, a message built but not acknowledged is resent byte for byte, and a
route already delivered with the same content is not delivered again (unless ``rerun_routes``).

Two runs of one study never work at once: they share one of a fixed set of Prefect locks, chosen by the
study (``tasks.prefect_limits.study_lock_name``).
"""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.route import run_route
from tasks.config import SiteConfig, load_config
from tasks.errors import StudyNotFound, WorkflowError
from tasks.hl7_messages import OutgoingMessage, build_message, masked
from tasks.notify import find_study, keep_pending, read_state, read_study, record_notified, same_uid_studies, send_hl7
from tasks.notify import write_report as write_report_task
from tasks.notify_state import Decision, Notified, Pending, content_digest, decide
from tasks.orthanc import client_from_config
from tasks.prefect_limits import exclusive, study_lock_name
from tasks.route_tasks import list_instances, read_deliveries
from tasks.rules import RoutingPlan, forced_plan, plan_routes, route_outcomes, routes_summary, study_facts
from tasks.study_report import build_row, with_routes
from tasks.watch_logic import derived_from, manual_run_name, run_name

_IDENTIFIER = re.compile(r"[0-9.]{1,64}|[0-9a-f-]{1,64}")


class StudyRunFailed(WorkflowError):
    """Something the study needed did not happen (HL7 not acknowledged, a route not delivered, routing held);
    the message says what, and a rerun picks up where this one stopped."""


# The name the tests and older callers know.
NotificationFailed = StudyRunFailed


def _run_name() -> str:
    return manual_run_name(flow_run.name or "", str((flow_run.parameters or {}).get("study", "")))


@flow(name="study-notify", flow_run_name=_run_name, persist_result=False)
def study_notify(
    study: str,
    resend_hl7: bool = False,
    rerun_routes: bool = False,
    only_route: str = "",
    stable_at: str = "",
    config_path: str = "",
) -> dict[str, Any]:
    """Report a stable study, route it, and notify the HL7 partner.

    Args:
        study: The study: its Study Instance UID, accession number or Orthanc study ID, as an operator would type it.
        resend_hl7: Send the HL7 notification even if the partner already acknowledged the same content.
        rerun_routes: Deliver every matching route again, even where the same content was already delivered.
        only_route: Run just this route (by name), delivered again even if it was already, whatever it
            matches; no other route runs. Empty: every matching route. The HL7 partner gets an update only
            if the outcome changed.
        stable_at: Set by the watcher: Orthanc's LastUpdate of the study when it was found stable.
        config_path: Site config file on the worker. Empty: $OWF_CONFIG, else the embedded default.
    """
    logger = get_run_logger()
    cfg = load_config(config_path)
    if only_route and only_route not in [r.name for r in cfg.routes]:
        known = ", ".join(r.name for r in cfg.routes) or "none"
        raise StudyRunFailed(f"only_route: no route named {only_route!r} in the configuration (routes: {known})")
    outcomes: dict[str, Any] = {}
    with client_from_config(cfg, logger=logger) as orthanc:
        try:
            study_ids = find_study(orthanc, study)
        except StudyNotFound as e:
            if _IDENTIFIER.fullmatch(study.strip()):  # a UID or an Orthanc ID, never a name: safe to repeat
                raise StudyNotFound(f"{e}: {study.strip()}") from None
            raise
        if len(study_ids) > 1:
            logger.warning(
                "%s names %d Orthanc studies (one Study Instance UID under different Patient IDs, or one "
                "accession number for several studies): each is handled with a warning; check the patient identity",
                study,
                len(study_ids),
            )
        for study_id in study_ids:
            wait = cfg.routing.job_timeout_seconds + 120
            with exclusive(study_lock_name(study_id), wait_seconds=wait) as got:
                if not got:
                    outcomes[study_id] = {"error": f"study {study_id}: another run of this study is still at work"}
                    continue
                outcomes[study_id] = _one_study(cfg, orthanc, study_id, resend_hl7, rerun_routes, only_route, logger)
    errors = [v["error"] for v in outcomes.values() if v.get("error")]
    if errors:
        raise StudyRunFailed("; ".join(errors))
    return outcomes


def _one_study(cfg: SiteConfig, orthanc, study_id: str, resend_hl7: bool, rerun_routes: bool,
               only_route: str | None, logger) -> dict[str, Any]:  # fmt: skip
    docs = read_study(orthanc, study_id)
    origin = derived_from(docs.study)
    if origin and not (resend_hl7 or only_route):
        logger.info("study %s is a copy of %s made by routing: not processed", study_id, origin)
        return {"decision": "copy-not-processed"}
    tags = docs.study.get("MainDicomTags", {})
    others = same_uid_studies(orthanc, study_id, tags.get("StudyInstanceUID"))
    row = build_row(docs, cfg.report.extra_tags, same_uid_studies=others,
                    source_metadata=cfg.orthanc.source_metadata)  # fmt: skip
    for w in row.warnings:
        logger.warning("study %s: %s", study_id, w)
    errors: list[str] = []

    # -- routes ---------------------------------------------------------------------------------------------
    facts = study_facts(docs, cfg.orthanc.source_metadata)
    plan = forced_plan(cfg.routes, only_route) if only_route else plan_routes(facts, cfg.routes, cfg.routing)
    uid_tag = [f"study-uid:{tags['StudyInstanceUID']}"] if tags.get("StudyInstanceUID") else []
    _tag_run(uid_tag + [f"source:{s}" for s in facts.sources] + [f"route:{r.name}" for r in plan.to_run]
             + [f"destination:{d}" for r in plan.to_run for d in r.to])  # fmt: skip
    failures: dict[str, str] = {}
    for route in plan.to_run:
        state = run_route(study_id, route.name, rerun_routes or only_route == route.name, cfg_path())
        if not state.is_completed():
            error = state.result(raise_on_failure=False)
            failures[route.name] = str(error) if isinstance(error, BaseException) else "the route did not finish"
    if plan.held:
        logger.error("study %s: %s", study_id, plan.held)
        errors.append(f"study {study_id}: {plan.held}")
    errors += [f"study {study_id}: {reason}" for reason in failures.values()]
    if cfg.routes:
        instance_ids = list_instances(orthanc, study_id)
        record = read_deliveries(orthanc, study_id, cfg.orthanc.routes_metadata)
        dests = {d.name: d for d in cfg.destinations}
        outcomes = route_outcomes(plan, record, dests, instance_ids, tags.get("StudyInstanceUID"), failures)
        row = with_routes(row, *routes_summary(outcomes))
        _routes_artifact(cfg, study_id, plan, outcomes)

    name = run_name(tags.get("AccessionNumber"), tags.get("StudyInstanceUID"), study_id)
    now = datetime.now(UTC)
    write_report_task(row, cfg.report_folder, f"{name}-{now:%Y%m%dT%H%M%S}", f"Report of {name}",
                      cfg.report.show_phi_in_ui)  # fmt: skip
    result: dict[str, Any] = {"instances": row.values.get("number_of_instances"),
                              "routes": row.values.get("routes")}  # fmt: skip

    # -- HL7 ------------------------------------------------------------------------------------------------
    if not cfg.hl7.enabled:
        logger.info("HL7 notification is off (hl7.enabled: false)")
        result["decision"] = "hl7-off"
    else:
        result.update(_notify(cfg, orthanc, study_id, row.values, resend_hl7, now, logger))
        if result.get("error"):
            errors.append(result.pop("error"))
    if errors:
        result["error"] = "; ".join(errors)
    return result


def _notify(cfg: SiteConfig, orthanc, study_id: str, values: dict[str, Any], force: bool, now: datetime,
            logger) -> dict[str, Any]:  # fmt: skip
    notified, pending = read_state(orthanc, study_id, cfg.orthanc.notified_metadata, cfg.orthanc.pending_metadata)
    digest = content_digest(values)
    decision, why = decide(notified, pending, digest, force)
    logger.info("study %s: %s", study_id, why)
    if decision is Decision.NOTHING:
        return {"decision": decision.value}
    if decision is Decision.RESEND_PENDING:
        assert pending is not None
        wire = pending.wire
        message = OutgoingMessage(wire, wire.decode(pending.charset, "replace"), pending.control_id,
                                  pending.message_type, pending.charset, [])  # fmt: skip
        update = pending.update
    else:
        update = decision is Decision.UPDATE
        message = build_message(values, cfg.hl7, control_id=_control_id(), now=now, update=update)
        for w in message.warnings:
            logger.warning("study %s: %s", study_id, w)
        keep_pending(orthanc, study_id, cfg.orthanc.pending_metadata,
                     Pending(digest, message.control_id, update, now.isoformat(),
                             base64.b64encode(message.wire).decode("ascii"), message.message_type,
                             message.charset))  # fmt: skip
    state = send_hl7(message, cfg.hl7, return_state=True)
    kind = "update" if update else "notification"
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        reason = str(error) if isinstance(error, BaseException) else "delivery failed"
        _hl7_artifact(cfg, message, None, reason)
        logger.error("study %s: HL7 %s not delivered: %s. The message is kept; a rerun sends it again.",
                     study_id, kind, reason)  # fmt: skip
        return {"decision": decision.value, "error": f"study {study_id}: HL7 {kind} not delivered: {reason}"}
    delivery = state.result()
    _hl7_artifact(cfg, message, delivery.answer, None)
    record_notified(orthanc, study_id, cfg.orthanc.notified_metadata, cfg.orthanc.pending_metadata,
                    Notified(digest, values.get("number_of_instances"), message.control_id,
                             datetime.now(UTC).isoformat(), "update" if update else "new"))  # fmt: skip
    logger.info("study %s: HL7 %s %s acknowledged (%s) after %d attempt(s)", study_id, message.message_type,
                kind, delivery.ack.code, delivery.attempts)  # fmt: skip
    return {"decision": decision.value, "control_id": message.control_id, "ack": delivery.ack.code}


# -- presentation in the UI ----------------------------------------------------------------------------------------
def cfg_path() -> str:
    """The config file this run was given (subflows read the same one)."""
    return str((flow_run.parameters or {}).get("config_path") or "")


def _tag_run(tags: list[str]) -> None:
    """Add tags to this run, so the UI's tag filter finds every run of a source, route or destination."""
    run_id = flow_run.id
    if not run_id or not tags:
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags or []
        client.update_flow_run(run_id, tags=list(dict.fromkeys([*current, *tags])))


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _routes_artifact(cfg: SiteConfig, study_id: str, plan: RoutingPlan, outcomes) -> None:
    link = f"{cfg.orthanc_url}/app/explorer.html#study?uuid={study_id}"
    lines = [f"Study in Orthanc: [{study_id}]({link})", "", "| route | outcome | destinations | why |",
             "|---|---|---|---|"]  # fmt: skip
    for o in outcomes:
        where = ", ".join(f"{d} ({uid})" if o.changed_uid else d for d, uid in o.destinations.items()) or "-"
        lines.append(f"| {o.route} | {o.status} | {_md(where)} | {_md(o.reason)} |")
    if plan.held:
        lines += ["", f"**Routing held:** {_md(plan.held)}"]
    create_markdown_artifact("\n".join(lines), key=None, description=f"Routes of study {study_id}")


def _hl7_artifact(cfg: SiteConfig, message: OutgoingMessage, answer: bytes | None, failure: str | None) -> None:
    shown = message.text.replace("\r", "\n").strip() if cfg.hl7.show_phi_in_ui else masked(message.text)
    note = "" if cfg.hl7.show_phi_in_ui else " (patient fields masked; hl7.show_phi_in_ui shows them)"
    parts = [f"**HL7 {message.message_type}**, control id `{message.control_id}`, charset {message.charset}{note}",
             "", "```", shown, "```", ""]  # fmt: skip
    if answer is not None:
        ack = answer.decode("utf-8", "replace").replace("\r", "\n").strip()
        parts += ["**ACK received**", "", "```", ack, "```"]
    else:
        parts += [f"**Not acknowledged:** {_md(failure or '')}"]
    create_markdown_artifact("\n".join(parts), key=None, description=f"HL7 message {message.control_id}")


def _control_id() -> str:
    return uuid.uuid4().hex[:20].upper()
