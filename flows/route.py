"""One morph-and-route branch for one study: modify or anonymize as the route says, send to each destination,
verify, clean up. Runs as a subflow of the study run (``route-<name>`` in the UI), once per matched route.

What it guarantees:

- The original study in Orthanc is never changed. A route keeping UIDs modifies each instance on the way out
  (nothing is stored); anonymizing, or modifying with new UIDs, stores a temporary copy that is deleted once
  the route is done (``routing.keep_copies`` keeps it). Copies carry ModifiedFrom/AnonymizedFrom, so the
  watcher never takes them for new studies.
- A destination counts as delivered only when Orthanc's job succeeded for every instance (and, with
  ``verify: cfind``, the destination says it holds them). Failures are retried with backoff, then the route
  fails naming the destination and Orthanc's reason; the other destinations and routes still run.
- What was delivered is recorded on the study, so a rerun does not send the same content to the same place
  again unless forced.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger

from tasks.config import SiteConfig, load_config
from tasks.errors import RouteError
from tasks.orthanc import client_from_config
from tasks.route_tasks import (
    copy_study,
    delete_copy,
    deliver,
    delivery_options,
    list_instances,
    read_deliveries,
    record_delivery,
    register,
)
from tasks.rules import Delivery, anonymize_body, modify_body, needs_copy, route_digest
from tasks.secrets import resolve_password


class RouteFailed(RouteError):
    """At least one destination of the route did not confirm the study; the message says which and why."""


def _route(cfg: SiteConfig, name: str):
    for route in cfg.routes:
        if route.name == name:
            return route
    raise RouteError(f"no route named {name!r} in the configuration")


@flow(name="route", flow_run_name="route-{route_name}", persist_result=False)
def route_study(study_id: str, route_name: str, force: bool = False, config_path: str = "") -> dict[str, Any]:
    """Apply one route to one study and deliver it to the route's destinations.

    Args:
        study_id: Orthanc ID of the original study.
        route_name: The route, as named in the site config.
        force: Deliver again even where the same content was already delivered.
        config_path: Site config file on the worker. Empty: $OWF_CONFIG, else the embedded default.
    """
    logger = get_run_logger()
    cfg = load_config(config_path)
    route = _route(cfg, route_name)
    settings = cfg.routing
    metadata = cfg.orthanc.routes_metadata
    with client_from_config(cfg, logger=logger) as orthanc:
        instances = list_instances(orthanc, study_id)
        original_uid = ((orthanc.find_json(f"/studies/{study_id}") or {}).get("MainDicomTags") or {}).get(
            "StudyInstanceUID"
        )
        record = read_deliveries(orthanc, study_id, metadata)
        dests = [cfg.destination(name) for name in route.to]
        digests = {d.name: route_digest(route, d, instances) for d in dests}
        todo = [d for d in dests if force or record.delivered(route.name, d.name, digests[d.name]) is None]
        for d in dests:
            if d not in todo:
                done = record.delivered(route.name, d.name, digests[d.name])
                assert done is not None
                logger.info("route %s: already delivered to %s at %s (%d instances); not sent again",
                            route.name, d.name, done.delivered_at, done.instances)  # fmt: skip
        if not todo:
            return {"route": route.name, "delivered": [], "already": route.to}

        for d in todo:
            register(orthanc, d, resolve_password(d, f"destination {d.name}"))
        copy = None
        failures: list[str] = []
        delivered: list[str] = []
        try:
            if needs_copy(route):
                kind = "anonymize" if route.anonymize is not None else "modify"
                assert route.modify is not None or route.anonymize is not None
                body = anonymize_body(route, original_uid) if route.anonymize else modify_body(route.modify)
                copy = copy_study(orthanc, study_id, kind, body, settings.job_timeout_seconds)
                logger.info("route %s: %s copy %s made (%d instances)", route.name, kind, copy.study_id,
                            copy.instances)  # fmt: skip
                send_id, send_instances, stream, sent_uid = (
                    copy.study_id,
                    list_instances(orthanc, copy.study_id),
                    None,
                    copy.study_uid,
                )
            elif route.modify is not None:
                stream = modify_body(route.modify)
                sent_uid = route.modify.replace.get("StudyInstanceUID", original_uid)
                send_id, send_instances = study_id, instances
            else:
                send_id, send_instances, stream, sent_uid = study_id, instances, None, original_uid
            for d in todo:
                state = deliver.with_options(**delivery_options(settings))(
                    orthanc, d, settings, study_id=send_id, instance_ids=send_instances, modify=stream,
                    study_uid=sent_uid, return_state=True,
                )  # fmt: skip
                if state.is_completed():
                    count = state.result()
                    record_delivery(orthanc, study_id, metadata, route.name, d.name,
                                    Delivery(digests[d.name], count, sent_uid, datetime.now(UTC).isoformat(),
                                             copy.study_id if copy and settings.keep_copies else None))  # fmt: skip
                    delivered.append(d.name)
                    logger.info("route %s: %d instance(s) delivered to %s", route.name, count, d.name)
                else:
                    error = state.result(raise_on_failure=False)
                    failures.append(f"{d.name}: {error}")
                    logger.error("route %s: not delivered to %s: %s", route.name, d.name, error)
        finally:
            if copy is not None and not settings.keep_copies:
                delete_copy(orthanc, copy.study_id)
    if failures:
        raise RouteFailed(f"route {route.name}: " + "; ".join(failures))
    return {"route": route.name, "delivered": delivered, "already": [d for d in route.to if d not in delivered]}


def run_route(study_id: str, route_name: str, force: bool, config_path: str):
    """The route as the study run runs it (a subflow), returning its final state. The subflow has no heartbeat
    of its own: the study run's heartbeat already covers this process, and Prefect 3.9 stops a heartbeat thread
    in 1-second steps, which added up to a second to every route (measured here: 0.77 s vs 0.11 s per subflow)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return route_study(study_id, route_name, force=force, config_path=config_path, return_state=True)
