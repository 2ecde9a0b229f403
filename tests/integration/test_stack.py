"""The one-command stack, as an operator runs it: `owf up` starts Orthanc, the Prefect server, the
deployments and a worker; a file dropped into the inbox reaches Orthanc through a scheduled deployment run;
`owf down` stops every process it started."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from stack.services import free_port

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_instances(port: int, n: int, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    instances: list = []
    while time.monotonic() < deadline and len(instances) < n:
        instances = httpx.get(f"http://127.0.0.1:{port}/instances", timeout=5).json()
        time.sleep(1)
    return instances


def test_down_never_kills_a_process_that_reused_a_stale_pid(tmp_path):
    from stack.services import process_start_time, stop_pid_file

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stale = tmp_path / "orthanc.pid"
        stale.write_text(f"{sleeper.pid} 1\n")  # same PID, another start time: not our process
        assert "another process" in stop_pid_file(stale)
        assert sleeper.poll() is None and not stale.exists()
        ours = tmp_path / "worker.pid"
        ours.write_text(f"{sleeper.pid} {process_start_time(sleeper.pid)}\n")
        assert "stopped" in stop_pid_file(ours, grace=2)
        assert sleeper.wait(timeout=5) is not None
    finally:
        sleeper.kill()


def test_up_sweeps_the_inbox_through_a_deployment_and_down_stops_everything(tmp_path, cases):
    http_port, prefect_port = free_port(), free_port()
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "local_orthanc": {"http_port": http_port, "dicom_port": free_port(), "stable_age_seconds": 5},
        "prefect": {"port": prefect_port},
        "ingest": {"window_seconds": 60, "interval_seconds": 1},
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    owf = [sys.executable, "-m", "stack.cli", "--config", str(cfg)]
    up = subprocess.run([*owf, "up", "--detach"], env=env, capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "ingest-inbox" in up.stdout
        pids = [int(p.read_text().split()[0]) for p in (tmp_path / "data" / "run").glob("*.pid")]
        assert len(pids) == 3 and all(_alive(p) for p in pids)

        (tmp_path / "data" / "inbox" / "IMG0001").write_bytes((cases / "C04_folder" / "IMG0001").read_bytes())
        instances = _wait_for_instances(http_port, 1, 120)
        assert len(instances) == 1, "the inbox file reached Orthanc through the ingest deployment"
        meta = httpx.get(f"http://127.0.0.1:{http_port}/instances/{instances[0]}/metadata/IngestSource", timeout=5)
        assert meta.text == "INBOX"
        runs = httpx.post(f"http://127.0.0.1:{prefect_port}/api/flow_runs/filter", json={}, timeout=10).json()
        assert any(r["name"].startswith("ingest-inbox-") for r in runs)

        # Stop everything while a sweep holds the share's lock, start again: the share must not stay
        # locked by the dead sweep (its lease expires; the lock is kept on disk across the restart).
        assert subprocess.run([*owf, "down"], env=env, capture_output=True, timeout=120).returncode == 0
        up = subprocess.run([*owf, "up", "--detach"], env=env, capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        pids = [int(p.read_text().split()[0]) for p in (tmp_path / "data" / "run").glob("*.pid")]
        (tmp_path / "data" / "inbox" / "IMG0002.DCM").write_bytes(
            (cases / "C04_folder" / "sub" / "IMG0002.DCM").read_bytes()
        )
        assert len(_wait_for_instances(http_port, 2, 180)) == 2, "swept again after a restart"
    finally:
        down = subprocess.run([*owf, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    time.sleep(0.5)
    assert not [p for p in pids if _alive(p)], "every process the stack started is stopped"
    assert not list((tmp_path / "data" / "run").glob("*.pid"))
