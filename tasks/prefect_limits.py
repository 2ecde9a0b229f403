"""Prefect global concurrency limits used as locks (they hold across workers and hosts)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound


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
    configuration changed); return its name."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        else:
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
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    try:
        ctx = concurrency(
            name,
            occupy=1,
            timeout_seconds=wait_seconds,
            strict=True,
            lease_duration=60,
            # a brief Prefect server outage must not kill a run in the middle of its work
            raise_on_lease_renewal_failure=False,
        )
        ctx.__enter__()
    except TimeoutError:
        yield False
        return
    try:
        yield True
    finally:
        ctx.__exit__(None, None, None)
