"""Locks and destination slots on a real Prefect server: what the flows rely on when they take one."""

from __future__ import annotations

import threading
import uuid

import pytest

pytestmark = pytest.mark.integration


def active_slots(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_a_held_slot_keeps_others_out_until_released_and_is_given_back(prefect_server):
    from tasks.prefect_limits import ensure_limit, hold_slot

    name = ensure_limit(f"test-{uuid.uuid4().hex[:8]}", 1)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with hold_slot(name, 10) as got:
            assert got
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    assert active_slots(name) == 1
    with hold_slot(name, 1.5) as got:
        assert got is False  # the holder still has it: not acquired, no slot taken
    assert active_slots(name) == 1
    release.set()
    t.join(30)
    with hold_slot(name, 30) as got:
        assert got is True
        assert active_slots(name) == 1
    assert active_slots(name) == 0


def test_several_slots_are_shared_and_an_unknown_limit_is_an_error(prefect_server):
    from tasks.prefect_limits import ensure_limit, hold_slot

    name = ensure_limit(f"test-{uuid.uuid4().hex[:8]}", 2)
    with hold_slot(name, 10) as a, hold_slot(name, 10) as b:
        assert a and b and active_slots(name) == 2
        with hold_slot(name, 1) as c:
            assert c is False
    assert active_slots(name) == 0
    with pytest.raises(RuntimeError, match="does not exist"), hold_slot(f"missing-{uuid.uuid4().hex[:8]}", 5):
        pass


def test_an_unreachable_server_is_said_so_not_taken_for_a_busy_lock(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stack.services import free_port
    from tasks.prefect_limits import PrefectUnavailable, hold_slot

    nowhere = f"http://127.0.0.1:{free_port()}/api"
    with (
        temporary_settings({PREFECT_API_URL: nowhere}),
        pytest.raises(PrefectUnavailable, match="could not be reached"),
        hold_slot("any", 1.5),
    ):
        pass


def test_a_limit_asked_for_by_many_runs_at_once_is_made_once_and_fails_none(prefect_server):
    """Several workers start study runs of the same lock at the same moment: each makes sure the limit exists.
    None fails, and asking again for another size resizes it."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect.client.orchestration import get_client

    from tasks.prefect_limits import ensure_limit

    name = f"test-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: ensure_limit(name, 1), range(16))) == [name] * 16
    assert ensure_limit(name, 3) == name
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 3
