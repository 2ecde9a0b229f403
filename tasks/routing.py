"""The Orthanc side of morph-and-route: register destinations, make copies, send, verify, clean up.

No Prefect here (the tasks in ``tasks.route_tasks`` wrap these calls); decisions are in ``tasks.rules``.
Calls used (Orthanc 1.10.1, measured here)::

    PUT  /modalities/{name}, /peers/{name}        register a destination given in the site config
    POST /studies/{id}/modify|anonymize            Asynchronous: a job whose Content names the new study (ID)
    POST /modalities/{name}/store, /peers/.../store  Synchronous false: a job; Content has InstancesCount
    POST /instances/{id}/modify                    answers the modified file without storing it
    POST /modalities/{name}/store-straight         C-STORE of the body (Orthanc transcodes if the peer
                                                   refuses the transfer syntax); 500 with Orthanc's reason
    POST /modalities/{name}/query                  C-FIND (verify: cfind)
    GET  /jobs/{id}                                State Success/Failure, ErrorDescription, ErrorDetails

A store job can end Failure with ``InstancesCount`` equal to the study's: only ``State`` says whether it
was delivered. Orthanc answers 500 for a destination it cannot reach, so these calls go through
``OrthancClient.call`` and are judged here, not taken for "Orthanc is down".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tasks.errors import CopyFailed, DeliveryFailed, DestinationUnknown, OrthancError, OrthancUnavailable
from tasks.orthanc import OrthancClient, orthanc_error
from tasks.routing_config import Destination

JOB_POLL_SECONDS = 0.1
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def _collection(dest: Destination) -> str:
    return "modalities" if dest.kind == "modality" else "peers"


def register_destination(client: OrthancClient, dest: Destination, password: str | None = None) -> None:
    """Declare a destination given in the site config in Orthanc (idempotent). Destinations without an
    address must already be declared in Orthanc; this checks that they are."""
    if dest.kind == "modality" and dest.host is not None:
        body: dict[str, Any] = {"AET": dest.aet, "Host": dest.host, "Port": dest.port, "AllowTranscoding": True}
    elif dest.kind == "peer" and dest.url is not None:
        body = {"Url": dest.url}
        if dest.username:
            body.update(Username=dest.username, Password=password or "")
    else:
        known = client.call("GET", f"/{_collection(dest)}").json()
        if dest.name not in known:
            raise DestinationUnknown(
                f"destination {dest.name}: Orthanc declares no {dest.kind} of that name (known: "
                f"{', '.join(known) or 'none'}); add it to Orthanc's configuration or give its address in the "
                "site config"
            )
        return
    r = client.call("PUT", f"/{_collection(dest)}/{dest.name}", json_body=body)
    if r.status_code != 200:
        raise DestinationUnknown(f"destination {dest.name}: Orthanc refused to register it: {orthanc_error(r)}")


def echo(client: OrthancClient, dest: Destination) -> str | None:
    """C-ECHO a modality (or GET /system of a peer) through Orthanc; None when it answers, else the reason."""
    path = f"/modalities/{dest.name}/echo" if dest.kind == "modality" else f"/peers/{dest.name}/system"
    r = client.call(
        "POST" if dest.kind == "modality" else "GET", path, json_body={} if dest.kind == "modality" else None
    )
    return None if r.status_code == 200 else orthanc_error(r)


def wait_job(client: OrthancClient, job_id: str, timeout: float, what: str,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:  # fmt: skip
    """Poll one Orthanc job until it ends. Returns the job document on Success; raises ``DeliveryFailed``
    (``what`` names the step) on Failure or when ``timeout`` passes (the job is then cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.call("GET", f"/jobs/{job_id}")
        if r.status_code != 200:
            raise DeliveryFailed(f"{what}: Orthanc lost job {job_id} ({orthanc_error(r)})")
        job = r.json()
        state = job.get("State")
        if state == "Success":
            return job
        if state == "Failure":
            details = str(job.get("ErrorDetails") or "").strip()
            reason = str(job.get("ErrorDescription") or "failed")
            raise DeliveryFailed(f"{what}: {reason}" + (f" ({details})" if details else ""))
        if time.monotonic() > deadline:
            client.call("POST", f"/jobs/{job_id}/cancel")
            raise DeliveryFailed(f"{what}: not finished after {timeout:g} s; the job was cancelled")
        sleep(JOB_POLL_SECONDS)


@dataclass(frozen=True)
class Copy:
    """A modified or anonymized copy Orthanc stored: its Orthanc study ID, Study Instance UID, instances."""

    study_id: str
    study_uid: str | None
    instances: int


def make_copy(client: OrthancClient, study_id: str, kind: str, body: dict[str, Any], timeout: float) -> Copy:
    """``POST /studies/{id}/modify`` or ``/anonymize`` as a job; the new study's ID is taken from the job's
    answer (never recomputed). The original is not changed (``KeepSource``)."""
    assert kind in ("modify", "anonymize")
    r = client.call("POST", f"/studies/{study_id}/{kind}", json_body={**body, "Asynchronous": True, "KeepSource": True})
    if r.status_code != 200:
        raise CopyFailed(f"Orthanc refused to {kind} study {study_id}: {orthanc_error(r)}")
    try:
        job = wait_job(client, r.json()["ID"], timeout, f"{kind} of study {study_id}")
    except DeliveryFailed as e:
        raise CopyFailed(str(e)) from None
    content = job.get("Content") or {}
    copy_id = content.get("ID")
    if not copy_id:
        raise CopyFailed(f"Orthanc's {kind} job for study {study_id} named no new study")
    study = client.find_json(f"/studies/{copy_id}") or {}
    failed = int(content.get("FailedInstancesCount") or 0)
    if failed:
        raise CopyFailed(f"Orthanc could not {kind} {failed} instance(s) of study {study_id}")
    uid = (study.get("MainDicomTags") or {}).get("StudyInstanceUID")
    return Copy(copy_id, uid, int(content.get("InstancesCount") or 0))


def send_study(client: OrthancClient, dest: Destination, study_id: str, expected: int, timeout: float) -> int:
    """Send a whole study with Orthanc's store job; returns the instances sent. Raises ``DeliveryFailed``
    unless the job succeeded for exactly ``expected`` instances."""
    r = client.call(
        "POST", f"/{_collection(dest)}/{dest.name}/store", json_body={"Resources": [study_id], "Synchronous": False}
    )
    if r.status_code == 404:
        raise DestinationUnknown(f"destination {dest.name}: {orthanc_error(r)}")
    if r.status_code != 200:
        raise DeliveryFailed(f"sending study {study_id} to {dest.name}: {orthanc_error(r)}")
    job = wait_job(client, r.json()["ID"], timeout, f"sending study {study_id} to {dest.name}")
    content = job.get("Content") or {}
    sent = int(content.get("InstancesCount") or 0) - int(content.get("FailedInstancesCount") or 0)
    if sent != expected:
        raise DeliveryFailed(f"sending study {study_id} to {dest.name}: {sent} of {expected} instances confirmed")
    return sent


def stream_instances(
    client: OrthancClient,
    dest: Destination,
    instance_ids: Sequence[str],
    body: dict[str, Any],
    parallel: int,
) -> int:
    """Modify each instance on the way out (``/instances/{id}/modify`` answers the file without storing it)
    and send it with ``store-straight``; ``parallel`` at a time. Returns the instances confirmed; raises
    ``DeliveryFailed`` naming how many failed and the first reasons (Orthanc's, per instance)."""
    target = f"/{_collection(dest)}/{dest.name}/store-straight"

    def send(instance_id: str, request: dict[str, Any]) -> str | None:
        r = client.call("POST", f"/instances/{instance_id}/modify", json_body=request)
        if r.status_code != 200:
            return f"instance {instance_id}: modify refused: {orthanc_error(r)}"
        sent = client.call("POST", target, content=r.content)
        if sent.status_code == 404:
            raise DestinationUnknown(f"destination {dest.name}: {orthanc_error(sent)}")
        return None if sent.status_code == 200 else f"instance {instance_id}: {orthanc_error(sent)}"

    def one(instance_id: str) -> str | None:
        problem = send(instance_id, body)
        if problem and "presentation context" in problem:
            # store-straight sends the bytes as they are (Orthanc's store job would transcode by itself): an
            # archive that refuses the transfer syntax (C21) gets the instance in Explicit VR Little Endian.
            problem = send(instance_id, {**body, "Transcode": EXPLICIT_VR_LITTLE_ENDIAN})
        return problem

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        problems = [p for p in pool.map(one, instance_ids) if p]
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise DeliveryFailed(
            f"sending to {dest.name}: {len(problems)} of {len(instance_ids)} instance(s) not delivered: {shown}"
        )
    return len(instance_ids)


def count_at_destination(client: OrthancClient, dest: Destination, study_uid: str) -> int | None:
    """How many instances of the study the destination says it holds (C-FIND at study level), or None when
    it does not answer the question. Raises ``DeliveryFailed`` when the query itself fails."""
    r = client.call(
        "POST",
        f"/modalities/{dest.name}/query",
        json_body={"Level": "Study", "Query": {"StudyInstanceUID": study_uid, "NumberOfStudyRelatedInstances": ""}},
    )
    if r.status_code != 200:
        raise DeliveryFailed(f"verifying at {dest.name} (C-FIND): {orthanc_error(r)}")
    query = r.json()["ID"]
    answers = client.call("GET", f"/queries/{query}/answers?expand&simplify").json()
    client.call("DELETE", f"/queries/{query}")
    if not answers:
        return 0
    value = answers[0].get("NumberOfStudyRelatedInstances")
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def delete_study(client: OrthancClient, study_id: str) -> None:
    """Delete a copy we made. A copy already gone is fine."""
    r = client.call("DELETE", f"/studies/{study_id}")
    if r.status_code not in (200, 404):
        raise OrthancError(f"Orthanc did not delete copy {study_id}: {orthanc_error(r)}")


def study_instances(client: OrthancClient, study_id: str) -> list[str]:
    """The Orthanc IDs of a study's instances, sorted."""
    found = client.find_json(f"/studies/{study_id}/instances")
    if found is None:
        raise OrthancError(f"Orthanc has no study {study_id}")
    return sorted(str(i["ID"]) for i in found)


def retryable(error: BaseException) -> bool:
    """Worth another attempt after a pause: the destination or Orthanc may be back. A destination Orthanc
    does not know, or a copy Orthanc refused to make, stays so."""
    return isinstance(error, (DeliveryFailed, OrthancUnavailable))
