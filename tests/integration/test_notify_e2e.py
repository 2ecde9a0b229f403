"""From C-STORE to ACK through the deployed flows: the watcher deployment and the study-notify deployment run
on a real Prefect worker; the partner is python-hl7's MLLP server. A worker restarted between a study
arriving and its notification still gives exactly one notification per study."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
import yaml

from stack.services import OrthancServer, PrefectWorker, free_port
from stack.synthetic import write_ct_series
from tasks.config import PROJECT_ROOT, load_config
from tests.integration.partner import Partner

pytestmark = pytest.mark.integration


def storescu(orthanc, files, aet="MODALITY1") -> None:
    subprocess.run([shutil.which("storescu") or "storescu", "-aet", aet, "-aec", "ORTHANC", "127.0.0.1",
                    str(orthanc.dicom_port), *map(str, files)], check=True, capture_output=True,
                   env={**os.environ, "TCP_NODELAY": "1"}, timeout=60)  # fmt: skip


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def make_stack(orthanc, tmp_path, **watch):
    """Deployments of this project on the test's Prefect server, a partner, and a way to start workers on a pool
    of the test's own. The watcher starts afresh: no cursor, no lock left by an earlier test's killed run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.variables import Variable

    from deployments.deploy import deploy_all
    from flows.watch import CURSOR_VARIABLE, LOCK

    Variable.unset(CURSOR_VARIABLE)
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(LOCK)
    partner = Partner(free_port()).start()
    cfg_path = tmp_path / "site.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "orthanc": {"url": orthanc.url, "timeout_seconds": 10},
                "prefect": {"work_pool": f"pool-{uuid.uuid4().hex[:6]}"},
                "watch": {"interval_seconds": 0.5, "window_seconds": 30, "handover_seconds": 2, "settle_seconds": 30}
                | watch,
                "hl7": {"enabled": True, "port": partner.port, "ack_timeout_seconds": 3, "retries": 1},
                "shares": [],
            }
        )
    )
    cfg = load_config(cfg_path)
    names = deploy_all(cfg)
    assert {"watch-orthanc", "study-notify"} <= set(names)
    env = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}
    env.update(
        {
            "OWF_CONFIG": str(cfg_path),
            "OWF_PROJECT_DIR": str(PROJECT_ROOT),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        }
    )

    def worker(name: str) -> PrefectWorker:
        return PrefectWorker(tmp_path / name, env, cfg.prefect.work_pool, name=name).start()

    return cfg, partner, worker


@pytest.fixture
def stack(prefect_server, orthanc, tmp_path):
    cfg, partner, worker = make_stack(orthanc, tmp_path)
    yield cfg, partner, worker
    partner.stop()


def test_stored_study_is_notified_once_and_a_worker_restart_loses_nothing(stack, orthanc, tmp_path):
    from prefect.deployments import run_deployment

    cfg, partner, start_worker = stack
    w1 = start_worker("w1")
    try:
        run_deployment("watch-orthanc/watch-orthanc", timeout=0)  # the schedule would start one within a minute
        # the watcher's first start sets its horizon: wait until it runs
        wait_for(lambda: _cursor_exists(), 60, "the watcher to start")
        storescu(orthanc, write_ct_series(tmp_path / "a", 2, accession="E2E-1"))
        wait_for(lambda: len(partner.received) >= 1, 90, "the first notification")
    finally:
        w1.stop()
    # a study arrives while no worker runs: its notification waits, it is not lost
    storescu(orthanc, write_ct_series(tmp_path / "b", 2, accession="E2E-2"))
    time.sleep(3)
    w2 = start_worker("w2")
    try:
        run_deployment("watch-orthanc/watch-orthanc", timeout=0)
        wait_for(lambda: len(partner.received) >= 2, 150, "the second notification")
        time.sleep(5)  # nothing else may arrive
    finally:
        w2.stop()
    accessions = sorted(str(m.segment("OBR")[18]) for m in partner.received)
    assert accessions == ["E2E-1", "E2E-2"]
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
    from prefect.deployments import run_deployment

    own = OrthancServer(tmp_path / "orthanc", free_port(), free_port(), stable_age=30).start()
    _cfg, partner, start_worker = make_stack(own, tmp_path, settle_seconds=6)
    worker = start_worker("w-restart")
    try:
        run_deployment("watch-orthanc/watch-orthanc", timeout=0)
        wait_for(lambda: _cursor_exists(), 60, "the watcher to start")
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


def _cursor_exists() -> bool:
    from prefect.variables import Variable

    from flows.watch import CURSOR_VARIABLE

    return Variable.get(CURSOR_VARIABLE, default=None) is not None
