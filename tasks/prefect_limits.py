"""Prefect global concurrency limits used as locks (they hold across workers and hosts)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectAlreadyExists

from tasks.errors import WorkflowError


class PrefectUnavailable(WorkflowError):
    """The Prefect server did not answer while a lock or slot was being taken."""


def share_limit_name(share: str) -> str:
    return f"ingest-{share}"


STUDY_LOCKS = 16


def study_lock_name(study_id: str) -> str:
    """One of ``STUDY_LOCKS`` locks, chosen by the study: two runs of one study always meet on the same lock,
    two different studies rarely do (and then only wait for each other). A fixed set keeps the number of
    concurrency limits in the Prefect server bounded, however many studies pass."""
    digest = hashlib.sha256(study_id.encode()).digest()
    return f"study-{int.from_bytes(digest[:4], 'big') % STUDY_LOCKS:02d}"


def ensure_limit(name: str, limit: int = 1) -> str:
    """Create the limit ``name`` with ``limit`` slots if it does not exist yet (or set its size if the
    configuration changed); return its name. Create first, read only if it exists: with several workers, two
    runs often ask for the same new limit at once (reading first, both saw none and the second create failed
    with a conflict, failing a study run)."""
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:
            existing = client.read_global_concurrency_limit_by_name(name)
            if existing.limit != limit:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit))
    return name


def destination_limit_name(destination: str) -> str:
    return f"destination-{destination}"


def ensure_share_limit(share: str) -> str:
    return ensure_limit(share_limit_name(share))


@contextmanager
def exclusive(name: str, wait_seconds: float) -> Iterator[bool]:
    """Hold the 1-slot limit ``name`` for the block; yields False if it did not free up within
    ``wait_seconds`` (the previous run is still at work)."""
    ensure_limit(name)
    with hold_slot(name, wait_seconds, lease_seconds=60) as got:
        yield got


@contextmanager
def hold_slot(name: str, wait_seconds: float, lease_seconds: float = 300) -> Iterator[bool]:
    """Hold one slot of the existing global concurrency limit ``name`` for the block, its lease renewed by
    Prefect while held (a brief server outage does not end the block); yields False if no slot freed up within
    ``wait_seconds``.

    Why not ``prefect.concurrency.sync.concurrency``: with the server on SQLite, taking a slot while the server
    records the run's task states often fails at once with 503 ("database is locked"), and Prefect's client then
    waits 2 s before trying again. Measured here, that was most of a route's overhead and most of the study
    lock's waits. Here a 503 is tried again after 50-400 ms; a full limit (423) is asked again every 2 s at
    most (the server's Retry-After, up to 30 s, would let a sweep's 15 s handover lapse), until the wait ends.
    """
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import release_concurrency_slots_with_lease

    lease_id = _take_slot(name, wait_seconds, lease_seconds)
    if lease_id is None:
        yield False
        return
    try:
        with maintain_concurrency_lease(lease_id, lease_seconds, raise_on_lease_renewal_failure=False):
            yield True
    finally:
        release_concurrency_slots_with_lease(lease_id)


def _take_slot(name: str, wait_seconds: float, lease_seconds: float) -> UUID | None:
    body = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": lease_seconds}
    deadline = time.monotonic() + wait_seconds
    busy = 0
    with get_client(sync_client=True) as client:
        http = client._client  # Prefect's own connection (address, auth, TLS); its send() would wait 2 s on 503
        while True:
            try:
                request = http.build_request("POST", "/v2/concurrency_limits/increment-with-lease", json=body)
                response = httpx.Client.send(http, request)
            except httpx.TransportError:
                response = None  # the server is restarting: try again within the wait
            if response is not None and response.status_code == 200:
                answer = response.json()
                if not answer.get("limits"):
                    raise RuntimeError(f"the Prefect concurrency limit {name!r} does not exist")
                return UUID(answer["lease_id"])
            if response is None:
                pause = 1.0
            elif response.status_code == 503:
                pause, busy = min(0.05 * 2**busy, 0.4), busy + 1
            elif response.status_code == 423:  # every slot is taken
                # the server's Retry-After can be 30 s: longer than a sweep's handover, so ask every 2 s at most
                pause = min(float(response.headers.get("Retry-After") or 1), 2.0)
            else:
                response.raise_for_status()
                raise RuntimeError(f"unexpected answer {response.status_code} taking a slot of {name!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                if response is None:  # not "someone else holds it": nobody could be asked
                    raise PrefectUnavailable(f"the Prefect server at {http.base_url} could not be reached for "
                                             f"{wait_seconds:g} s to take a slot of {name!r}")  # fmt: skip
                return None
            time.sleep(min(pause, left))
