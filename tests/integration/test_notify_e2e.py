"""From C-STORE to ACK through the deployed flows: the watcher deployment and the study-notify deployment run
on a real Prefect worker; the partner is python-hl7's MLLP server. A worker restarted between a study
arriving and its notification still gives exactly one notification per study."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from stack.services import OrthancServer, free_port
from stack.synthetic import write_ct_series
from tests.integration.deployed import cursor_exists, make_stack, start_watcher, storescu, study_runs, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(prefect_server, orthanc, tmp_path):
    cfg, partner, worker = make_stack(orthanc, tmp_path)
    yield cfg, partner, worker
    partner.stop()


def test_stored_study_is_notified_once_and_a_worker_restart_loses_nothing(stack, orthanc, tmp_path):
    cfg, partner, start_worker = stack
    w1 = start_worker("w1")
    try:
        start_watcher()
        # the watcher's first start sets its horizon: wait until it runs
        wait_for(lambda: cursor_exists(), 60, "the watcher to start")
        storescu(orthanc, write_ct_series(tmp_path / "a", 2, accession="E2E-1"))
        wait_for(lambda: len(partner.received) >= 1, 90, "the first notification")
        wait_for(lambda: any(r.state.is_completed() for r in study_runs()), 60, "the first study run to end")
    finally:
        w1.stop()
    # a study arrives while no worker runs: its notification waits, it is not lost
    storescu(orthanc, write_ct_series(tmp_path / "b", 2, accession="E2E-2"))
    time.sleep(3)
    w2 = start_worker("w2")
    try:
        start_watcher()
        wait_for(lambda: len(partner.received) >= 2, 150, "the second notification")
        time.sleep(5)  # nothing else may arrive
    finally:
        w2.stop()
    accessions = sorted(str(m.segment("OBR")[18]) for m in partner.received)
    assert accessions == ["E2E-1", "E2E-2"]
    # the runs keep the names the watcher gave them (the accession number), also after they ran
    assert sorted(r.name for r in study_runs() if r.state.is_completed()) == ["study-E2E-1", "study-E2E-2"]
    studies = httpx.get(orthanc.url + "/studies").json()
    assert len(studies) == 2
    reports = list((cfg.report_folder).glob("*.csv"))
    assert len(reports) == 2
    # every stable study was also published as a Prefect event, for users' own automations
    published = stable_events()
    assert {e["payload"]["study"] for e in published} >= set(studies)


def stable_events() -> list[dict]:
    from flows.watch import EVENT

    r = httpx.post(os.environ["PREFECT_API_URL"] + "/events/filter", json={"filter": {"event": {"name": [EVENT]}},
                                                                          "limit": 50}, timeout=10)  # fmt: skip
    r.raise_for_status()
    return r.json()["events"]


def test_orthanc_restarted_while_a_study_settles_still_gives_one_notification(prefect_server, tmp_path):
    """Orthanc forgets its not-yet-stable studies when it restarts: the study never gets a StableStudy change.
    The deployed watcher notices the study settled and it is notified exactly once."""
    own = OrthancServer(tmp_path / "orthanc", free_port(), free_port(), stable_age=30).start()
    _cfg, partner, start_worker = make_stack(own, tmp_path, settle_seconds=6)
    worker = start_worker("w-restart")
    try:
        start_watcher()
        wait_for(lambda: cursor_exists(), 60, "the watcher to start")
        storescu(own, write_ct_series(tmp_path / "a", 2, accession="E2E-RESTART"))
        time.sleep(1.5)  # the watcher has seen the study arrive
        own.stop()
        own.start()  # long before StableAge (30 s) ran out
        wait_for(lambda: len(partner.received) >= 1, 90, "the notification")
        time.sleep(5)  # nothing else may arrive
        changes = httpx.get(own.url + "/changes?limit=1000", timeout=10).json()["Changes"]
    finally:
        worker.stop()
        partner.stop()
        own.stop()
    assert not any(c["ChangeType"] == "StableStudy" for c in changes), "the restart should have lost stability"
    assert [str(m.segment("OBR")[18]) for m in partner.received] == ["E2E-RESTART"]
