"""The stable-study watcher against a real Orthanc (StableAge 2 s) and a real Prefect server: exactly one
study run per stable study, across watcher restarts, an Orthanc restart while a study settles, a cleared
change log, and our own routing's copies. Studies arrive by C-STORE from dcmtk's storescu."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from stack.services import OrthancServer, free_port, wait_until
from stack.synthetic import write_ct_series
from tasks.config import WatchSettings
from tasks.orthanc import OrthancClient
from tasks.watch_logic import parse_orthanc_time
from tasks.watcher import StudyWatcher

pytestmark = pytest.mark.integration
log = logging.getLogger("test.watch")


def storescu(orthanc, files: list[Path], aet: str = "MODALITY1") -> None:
    exe = shutil.which("storescu")
    assert exe, "dcmtk's storescu is missing: scripts/setup installs the Debian package dcmtk"
    subprocess.run([exe, "-aet", aet, "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                   check=True, capture_output=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=60)  # fmt: skip


@pytest.fixture
def study_deployment(prefect_server):
    """A study-notify deployment of the test's own (no worker: runs stay scheduled, we count them)."""
    from prefect.client.orchestration import get_client

    from flows.study import study_notify

    name = f"t-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(study_notify.name)
        dep_id = client.create_deployment(flow_id=flow_id, name=name, entrypoint="flows/study.py:study_notify")
    yield f"{study_notify.name}/{name}", dep_id


def runs_of(dep_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))


def make_watcher(orthanc_url: str, deployment: str, store_name: str, **settings) -> StudyWatcher:
    from flows.watch import VariableCursorStore, make_run_creator

    ws = WatchSettings(deployment=deployment, **{"settle_seconds": 30, **settings})
    client = OrthancClient(orthanc_url, timeout=10)
    return StudyWatcher(client, make_run_creator(ws), VariableCursorStore(store_name), ws, log)


def poll_until(watchers, predicate, timeout: float = 30.0) -> list[str]:
    """Poll until ``predicate()``; return the warnings the polls reported."""
    warnings: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in watchers:
            warnings += w.poll().warnings
        if predicate():
            return warnings
        time.sleep(0.5)
    raise AssertionError("condition not reached in time")


def store_name() -> str:
    return f"cursor-{uuid.uuid4().hex[:8]}"


def test_one_run_per_stable_study_named_after_it_and_a_restarted_watcher_adds_none(orthanc, study_deployment, tmp_path):
    deployment, dep_id = study_deployment
    cursor = store_name()
    w1 = make_watcher(orthanc.url, deployment, cursor)
    w1.poll()  # first start: sets the horizon
    time.sleep(1.1)
    storescu(orthanc, write_ct_series(tmp_path / "a", 3))
    poll_until([w1], lambda: len(runs_of(dep_id)) >= 1)
    [run] = runs_of(dep_id)
    assert run.name == "study-ACC0001"  # the accession number, never the patient's name
    study_id = httpx.get(orthanc.url + "/studies").json()[0]
    assert run.parameters["study"] == study_id
    time.sleep(3)  # Orthanc also reports StableSeries/StablePatient; nothing of that makes another run
    w1.poll()
    w2 = make_watcher(orthanc.url, deployment, cursor)  # a restarted watcher reads from the saved cursor
    w2.poll()
    assert len(runs_of(dep_id)) == 1


def test_watcher_restarted_while_the_study_settles(orthanc, study_deployment, tmp_path):
    deployment, dep_id = study_deployment
    cursor = store_name()
    make_watcher(orthanc.url, deployment, cursor).poll()
    time.sleep(1.1)
    storescu(orthanc, write_ct_series(tmp_path / "a", 2))
    w1 = make_watcher(orthanc.url, deployment, cursor)
    w1.poll()  # sees the study arriving, not yet stable; then this watcher "dies"
    assert runs_of(dep_id) == []
    w2 = make_watcher(orthanc.url, deployment, cursor)
    poll_until([w2], lambda: len(runs_of(dep_id)) >= 1)
    time.sleep(1)
    w2.poll()
    assert len(runs_of(dep_id)) == 1


@pytest.fixture
def slow_orthanc(tmp_path):
    """An Orthanc of the test's own with StableAge 30 s, so a restart surely comes before stability; in a time
    zone 10 hours behind UTC (POSIX TZ: no tzdata needed), as in Hawaii; LastUpdate is UTC whatever the zone."""
    server = OrthancServer(tmp_path / "orthanc", free_port(), free_port(), stable_age=30,
                           env={"TZ": "HST10"}).start()  # fmt: skip
    yield server
    server.stop()


def test_orthanc_restarted_while_the_study_settles_is_still_processed_once(slow_orthanc, study_deployment, tmp_path):
    """Orthanc keeps its not-yet-stable set in memory: after a restart the study never gets a StableStudy
    change. The watcher notices it settled (no images for settle_seconds) and processes it once."""
    own_orthanc = slow_orthanc
    deployment, dep_id = study_deployment
    cursor = store_name()
    w = make_watcher(own_orthanc.url, deployment, cursor, settle_seconds=4)
    w.poll()
    time.sleep(1.1)
    storescu(own_orthanc, write_ct_series(tmp_path / "a", 2))
    w.poll()
    own_orthanc.stop()  # long before StableAge ran out
    own_orthanc.start()
    changes = httpx.get(own_orthanc.url + "/changes?limit=1000").json()["Changes"]
    w2 = make_watcher(own_orthanc.url, deployment, cursor, settle_seconds=4)
    poll_until([w2], lambda: len(runs_of(dep_id)) >= 1)
    assert not any(c["ChangeType"] == "StableStudy" for c in changes), "the restart should have lost stability"
    time.sleep(1)
    w2.poll()
    assert len(runs_of(dep_id)) == 1


@pytest.fixture
def orthanc_stable_4s(tmp_path):
    """An Orthanc of the test's own with StableAge 4 s: long enough that a study is still settling a second
    after it arrived, short enough to wait for. In a time zone 14 hours ahead of UTC: the watcher must compare
    Orthanc's UTC LastUpdate with Orthanc's UTC clock, not its local one."""
    server = OrthancServer(tmp_path / "orthanc", free_port(), free_port(), stable_age=4,
                           env={"TZ": "LINT-14"}).start()  # fmt: skip
    yield server
    server.stop()


def all_stable(server: OrthancServer) -> bool:
    return all(
        httpx.get(f"{server.url}/studies/{s}").json()["IsStable"] for s in httpx.get(f"{server.url}/studies").json()
    )


def test_first_start_notifies_a_study_still_arriving_not_the_backlog(orthanc_stable_4s, study_deployment, tmp_path):
    """The soak found it: a study sent a few seconds before the watcher's very first run (``owf up`` and a
    modality sending at once) was last updated before the horizon and was dropped without a word."""
    server = orthanc_stable_4s
    deployment, dep_id = study_deployment
    local, utc = (
        parse_orthanc_time(httpx.get(f"{server.url}/tools/{what}").text.strip('"')) for what in ("now-local", "now")
    )
    assert round((local - utc).total_seconds() / 3600) == 14, f"Orthanc should run 14 h ahead of UTC: {local} {utc}"
    storescu(server, write_ct_series(tmp_path / "old", 2, accession="BACKLOG1"))
    wait_until(lambda: all_stable(server), 20, "the backlog study (stable)")
    storescu(server, write_ct_series(tmp_path / "new", 2, accession="ARRIVING1"))
    time.sleep(1.1)  # its LastUpdate is now strictly before the horizon the first start sets
    w = make_watcher(server.url, deployment, store_name(), settle_seconds=30)
    w.poll()  # first start
    assert runs_of(dep_id) == []
    poll_until([w], lambda: len(runs_of(dep_id)) >= 1)
    time.sleep(1)
    w.poll()
    assert [run.name for run in runs_of(dep_id)] == ["study-ARRIVING1"]


def test_a_cleared_change_log_is_reported_and_the_study_still_processed(orthanc, study_deployment, tmp_path):
    deployment, dep_id = study_deployment
    cursor = store_name()
    w = make_watcher(orthanc.url, deployment, cursor, settle_seconds=3)
    w.poll()
    time.sleep(1.1)
    storescu(orthanc, write_ct_series(tmp_path / "a", 2))
    time.sleep(0.5)
    httpx.delete(orthanc.url + "/changes").raise_for_status()  # before the watcher read them
    warnings = poll_until([w], lambda: len(runs_of(dep_id)) >= 1)
    assert any("deleted before we read them" in text for text in warnings), warnings
    w.poll()
    assert len(runs_of(dep_id)) == 1


def test_copies_made_by_routing_are_not_processed(orthanc, study_deployment, tmp_path):
    deployment, dep_id = study_deployment
    cursor = store_name()
    w = make_watcher(orthanc.url, deployment, cursor)
    w.poll()
    time.sleep(1.1)
    storescu(orthanc, write_ct_series(tmp_path / "a", 2))
    poll_until([w], lambda: len(runs_of(dep_id)) >= 1)
    original = httpx.get(orthanc.url + "/studies").json()[0]
    r = httpx.post(f"{orthanc.url}/studies/{original}/modify", json={"Replace": {"InstitutionName": "Other"}},
                   timeout=30)  # fmt: skip
    r.raise_for_status()
    time.sleep(3.5)  # the copy becomes stable too
    for _ in range(3):
        w.poll()
        time.sleep(0.5)
    assert [run.parameters["study"] for run in runs_of(dep_id)] == [original]


def test_run_creation_failing_keeps_the_study_for_the_next_poll(orthanc, study_deployment, tmp_path):
    """The Prefect API failing at the moment of creation (server restarting): nothing is skipped."""
    deployment, dep_id = study_deployment
    cursor = store_name()
    w = make_watcher(orthanc.url, deployment, cursor)
    w.poll()
    time.sleep(1.1)
    storescu(orthanc, write_ct_series(tmp_path / "a", 2))
    real = w.create_run
    calls = []

    def failing_once(run):
        calls.append(run)
        if len(calls) == 1:
            raise httpx.ConnectError("Prefect API unreachable")
        return real(run)

    w.create_run = failing_once
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:
        try:
            w.poll()
        except httpx.ConnectError:
            break
        time.sleep(0.5)
    saved = w.store.load()
    assert calls and saved is not None and saved.seq < w.read_to  # cursor held behind the study
    poll_until([w], lambda: len(runs_of(dep_id)) >= 1)
    assert len(runs_of(dep_id)) == 1
