"""Prefect global concurrency limits used as locks (they hold across workers and hosts)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound


def share_limit_name(share: str) -> str:
    return f"ingest-{share}"


def ensure_limit(name: str) -> str:
    """Create the limit ``name`` (1 slot) if it does not exist yet; return its name."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


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
