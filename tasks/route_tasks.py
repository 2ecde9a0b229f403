"""Prefect tasks of a route: each one piece of I/O with Orthanc (see ``tasks.routing`` for the calls).

Retries: reading, registering and recording are safe to repeat. A delivery is retried with backoff
(``routing.retries``) because a C-STORE of the same instances again is accepted by archives (same SOP
Instance UIDs); a destination Orthanc does not know, or a copy Orthanc refused to make, is not retried.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.errors import DeliveryFailed
from tasks.notify import NO_CACHING, ORTHANC_RETRIES
from tasks.orthanc import OrthancClient
from tasks.prefect_limits import destination_limit_name, ensure_limit, hold_slot
from tasks.routing import (
    Copy,
    count_at_destination,
    delete_study,
    make_copy,
    register_destination,
    retryable,
    send_study,
    stream_instances,
    study_instances,
)
from tasks.routing_config import Destination, RoutingSettings
from tasks.rules import Delivery, DeliveryRecord


@task(name="list-instances", **ORTHANC_RETRIES)
def list_instances(orthanc: OrthancClient, study_id: str) -> list[str]:
    return study_instances(orthanc, study_id)


@task(name="register-destination", task_run_name="register-{dest.name}", **ORTHANC_RETRIES)
def register(orthanc: OrthancClient, dest: Destination, password: str | None) -> None:
    register_destination(orthanc, dest, password)
    ensure_limit(destination_limit_name(dest.name), dest.max_concurrent)


@task(name="read-deliveries", **ORTHANC_RETRIES)
def read_deliveries(orthanc: OrthancClient, study_id: str, name: str) -> DeliveryRecord:
    return DeliveryRecord.load(orthanc.study_metadata(study_id, name))


@task(name="record-delivery", **ORTHANC_RETRIES)
def record_delivery(orthanc: OrthancClient, study_id: str, name: str, route: str, dest: str,
                    delivery: Delivery) -> None:  # fmt: skip
    """Add one delivery to the study's record (read again first: the per-study lock of the study flow makes
    this read-modify-write safe)."""
    record = DeliveryRecord.load(orthanc.study_metadata(study_id, name))
    record.add(route, dest, delivery)
    orthanc.set_study_metadata(study_id, name, record.dump())


@task(name="make-copy", task_run_name="{kind} study", **NO_CACHING)
def copy_study(orthanc: OrthancClient, study_id: str, kind: str, body: dict[str, Any], timeout: float) -> Copy:
    return make_copy(orthanc, study_id, kind, body, timeout)


@task(name="delete-copy", **ORTHANC_RETRIES)
def delete_copy(orthanc: OrthancClient, copy_id: str) -> None:
    delete_study(orthanc, copy_id)


def _retry_delivery(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:
        return retryable(e)
    return False


@task(name="deliver", task_run_name="send to {dest.name}", retry_condition_fn=_retry_delivery, **NO_CACHING)
def deliver(
    orthanc: OrthancClient,
    dest: Destination,
    settings: RoutingSettings,
    *,
    study_id: str,
    instance_ids: list[str],
    modify: dict[str, Any] | None,
    study_uid: str | None,
) -> int:
    """Send the study (Orthanc's store job) or, with ``modify``, each instance modified on the way out, and
    verify; holds one slot of the destination's concurrency limit while sending. Returns the instances
    confirmed; raises DeliveryFailed otherwise."""
    expected = len(instance_ids)
    with hold_slot(destination_limit_name(dest.name), settings.job_timeout_seconds) as got:
        if not got:
            raise DeliveryFailed(f"{dest.name}: no free slot (max_concurrent {dest.max_concurrent}) within "
                                 f"{settings.job_timeout_seconds:g} s: other studies are still sending")  # fmt: skip
        if modify is None:
            sent = send_study(orthanc, dest, study_id, expected, settings.job_timeout_seconds)
        else:
            sent = stream_instances(orthanc, dest, instance_ids, modify, settings.parallel_instances)
    if dest.verify == "cfind" and study_uid:
        held = count_at_destination(orthanc, dest, study_uid)
        if held is not None and held < expected:
            raise DeliveryFailed(f"{dest.name} confirmed the C-STOREs but holds only {held} of {expected} instances")
    return sent


def delivery_options(settings: RoutingSettings) -> dict[str, Any]:
    """``deliver.with_options(**...)``: the configured retries, the pause doubling each time."""
    delays = [settings.retry_backoff_seconds * 2**i for i in range(settings.retries)]
    return {"retries": settings.retries, "retry_delay_seconds": delays or 0}
