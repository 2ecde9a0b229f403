"""Study and route runs wait out an Orthanc restart (``orthanc.outage_wait_seconds``) instead of failing the
study; the ingest and the watcher, with their own backoff, are told at once. Real Orthanc, stopped and started."""

from __future__ import annotations

import threading

import pytest

from tasks.errors import OrthancUnavailable
from tasks.orthanc import OrthancClient

pytestmark = pytest.mark.integration


def test_a_request_waits_for_orthanc_to_come_back_and_says_so_once(own_orthanc):
    own_orthanc.stop()
    told: list[str] = []
    restarter = threading.Timer(3.0, own_orthanc.start)
    restarter.start()
    try:
        with OrthancClient(own_orthanc.url, timeout=5, outage_wait=60, on_wait=told.append) as client:
            assert client.get_json("/system")["DicomAet"] == own_orthanc.aet
    finally:
        restarter.join()
    assert len(told) == 1 and "unreachable" in told[0] and "60 s" in told[0]


def test_without_a_wait_or_past_it_the_outage_is_reported(own_orthanc):
    own_orthanc.stop()
    with OrthancClient(own_orthanc.url, timeout=5) as client, pytest.raises(OrthancUnavailable, match="unreachable"):
        client.get_json("/system")
    waiting = OrthancClient(own_orthanc.url, timeout=5, outage_wait=2)
    with waiting, pytest.raises(OrthancUnavailable, match="unreachable"):
        waiting.call("POST", "/tools/lookup", content=b"1.2.3")
