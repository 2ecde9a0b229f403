"""Prefect global concurrency limits used as per-share locks (they hold across workers and hosts)."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound


def share_limit_name(share: str) -> str:
    return f"ingest-{share}"


def ensure_share_limit(share: str) -> str:
    """Create the share's limit (1 slot) if it does not exist yet; return its name."""
    name = share_limit_name(share)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name
