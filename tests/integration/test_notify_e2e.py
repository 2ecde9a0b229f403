"""From C-STORE to ACK through the deployed flows: the watcher deployment and the study-notify deployment run
on a real Prefect worker; the partner is python-hl7's MLLP server. A worker restarted between a study
arriving and its notification still gives exactly one notification per study."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
import yaml

from stack.services import PrefectWorker, free_port
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


@pytest.fixture
def stack(prefect_server, orthanc, tmp_path):
    """Deployments of this project on the test's Prefect server, with a worker on a pool of the test's own."""
    partner = Partner(free_port()).start()
    cfg_path = tmp_path / "site.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "orthanc": {"url": orthanc.url, "timeout_seconds": 10},
        "prefect": {"work_pool": f"pool-{uuid.uuid4().hex[:6]}"},
        "watch": {"interval_seconds": 0.5, "window_seconds": 30, "handover_seconds": 2, "settle_seconds": 30},
        "hl7": {"enabled": True, "port": partner.port, "ack_timeout_seconds": 3, "retries": 1},
        "shares": [],
    }))  # fmt: skip
    from deployments.deploy import deploy_all

    cfg = load_config(cfg_path)
    names = deploy_all(cfg)
    assert {"watch-orthanc", "study-notify"} <= set(names)
    env = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}
    env.update({"OWF_CONFIG": str(cfg_path), "OWF_PROJECT_DIR": str(PROJECT_ROOT),
                "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"})  # fmt: skip

    def worker(name: str) -> PrefectWorker:
        return PrefectWorker(tmp_path / name, env, cfg.prefect.work_pool, name=name).start()

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


def _cursor_exists() -> bool:
    from prefect.variables import Variable

    from flows.watch import CURSOR_VARIABLE

    return Variable.get(CURSOR_VARIABLE, default=None) is not None
