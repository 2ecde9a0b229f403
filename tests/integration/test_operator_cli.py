"""The operator's command line against a deployed pipeline: `owf runs` lists recent study runs with their
outcome, `owf rerun` starts the study flow again for a study (by accession number here) and waits for it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stack.synthetic import write_ct_series
from tests.integration.deployed import cursor_exists, make_stack, start_watcher, storescu, study_runs, wait_for

pytestmark = pytest.mark.integration


def owf(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # only what the config says
    return subprocess.run([sys.executable, "-m", "stack.cli", "--config", str(tmp_path / "site.yaml"), *args],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_runs_lists_study_runs_and_rerun_resends_or_explains_what_is_wrong(prefect_server, orthanc, tmp_path):
    _cfg, partner, start_worker = make_stack(orthanc, tmp_path)
    worker = start_worker("w-cli")
    try:
        start_watcher()
        wait_for(cursor_exists, 90, "the watcher to start following the change log")
        storescu(orthanc, write_ct_series(tmp_path / "cli", 2, accession="CLI-1"))
        wait_for(lambda: any(r.state.is_completed() for r in study_runs()), 120, "the study run")

        listed = owf(tmp_path, "runs")
        assert listed.returncode == 0, listed.stderr
        assert "Completed\tstudy-CLI-1\tsource:MODALITY1" in listed.stdout
        assert "1 study run(s)" in listed.stderr

        again = owf(tmp_path, "rerun", "CLI-1", "--resend-hl7", "--wait")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "study-CLI-1" in again.stdout and "Completed" in again.stdout
        assert len(partner.received) == 2  # the notification and the resend

        unknown = owf(tmp_path, "rerun", "1.2.3.4.404", "--wait")
        assert unknown.returncode == 1 and "Failed" in unknown.stdout
        failed = owf(tmp_path, "runs", "--state", "failed")
        assert failed.returncode == 0, failed.stderr
        lines = failed.stdout.strip().splitlines()
        assert len(lines) == 1 and "study-1.2.3.4.404" in lines[0] and "1.2.3.4.404" in lines[0].split("\t")[-1]
        assert len(partner.received) == 2  # an unknown study sends nothing
    finally:
        worker.stop()
        partner.stop()
