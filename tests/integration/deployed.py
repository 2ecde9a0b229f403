"""The project's deployments on the test session's Prefect server, with workers, a partner and Orthanc: shared by
the end-to-end tests (notification, browser)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid

import yaml

from stack.services import PrefectWorker, free_port
from tasks.config import PROJECT_ROOT, load_config
from tests.integration.partner import Partner


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
    of the test's own. The watcher starts afresh: no cursor, no lock left by an earlier test's killed run, and
    no flow runs of earlier tests."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.variables import Variable

    from deployments.deploy import deploy_all
    from flows.watch import CURSOR_VARIABLE, LOCK

    Variable.unset(CURSOR_VARIABLE)
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectNotFound):
            client.delete_global_concurrency_limit_by_name(LOCK)
        # an empty run history: the session's server also holds earlier tests' runs of the same deployments
        while runs := client.read_flow_runs(limit=200):
            for run in runs:
                client.delete_flow_run(run.id)
    partner = Partner(free_port()).start()
    cfg_path = tmp_path / "site.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "orthanc": {"url": orthanc.url, "timeout_seconds": 10},
                # the test session's Prefect server, so that `owf` commands given this file find it
                "prefect": {
                    "work_pool": f"pool-{uuid.uuid4().hex[:6]}",
                    "port": int(os.environ["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0]),
                },
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


def deployment_runs(deployment: str) -> list:
    """Every flow run of one of our deployments (by deployment name), newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        )


def study_runs() -> list:
    return deployment_runs("study-notify")


def cursor_exists() -> bool:
    """Has a watcher run started following Orthanc's change log (it stores its cursor first thing)?"""
    from prefect.variables import Variable

    from flows.watch import CURSOR_VARIABLE

    return Variable.get(CURSOR_VARIABLE, default=None, _sync=True) is not None


def start_watcher() -> None:
    """What the schedule does within a minute, now."""
    from prefect.deployments import run_deployment

    run_deployment("watch-orthanc/watch-orthanc", timeout=0, _sync=True)
