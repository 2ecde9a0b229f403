"""The ingest flow on a real Prefect server, against a real Orthanc: sweeping, a file still being written,
Orthanc going down, and two runs of one share never sweeping at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from stack.synthetic import write_ct_series
from tests.conftest import orthanc_instances

pytestmark = pytest.mark.integration


def site_config(tmp_path: Path, orthanc_url: str, inbox: Path, **ingest) -> Path:
    cfg = {
        "data_dir": str(tmp_path / "data"),
        "orthanc": {"url": orthanc_url, "timeout_seconds": 5},
        "ingest": {"interval_seconds": 0.5, "window_seconds": 10, "handover_seconds": 0, **ingest},
        "shares": [{"name": "inbox", "source": "INBOX", "kind": "local", "path": str(inbox)}],
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_flow_uploads_a_file_only_once_it_is_complete(prefect_server, orthanc, tmp_path):
    from flows.ingest import ingest_share

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (src,) = write_ct_series(tmp_path / "src", 1, side=256)
    payload = src.read_bytes()
    target = inbox / "slow" / "IMG_SLOW.dcm"

    def slow_writer() -> None:
        time.sleep(1.0)
        target.parent.mkdir()
        with open(target, "wb") as f:
            for i in range(0, len(payload), len(payload) // 12):
                f.write(payload[i : i + len(payload) // 12])
                f.flush()
                time.sleep(0.3)  # several scans see it growing

    writer = threading.Thread(target=slow_writer)
    writer.start()
    cfg = site_config(tmp_path, orthanc.url, inbox, window_seconds=10)
    result = ingest_share(share="inbox", config_path=str(cfg))
    writer.join()

    assert result["uploaded"] == 1
    (instance,) = orthanc_instances(orthanc)
    stored = httpx.get(f"{orthanc.url}/instances/{instance}/file", timeout=10).content
    assert stored == payload, "byte-identical: never a partial upload"
    assert not target.exists()


def test_flow_fails_with_a_clear_reason_when_orthanc_is_down_and_keeps_files(prefect_server, tmp_path):
    from flows.ingest import ingest_share
    from stack.services import free_port

    inbox = tmp_path / "inbox"
    files = write_ct_series(inbox, 3)
    cfg = site_config(tmp_path, f"http://127.0.0.1:{free_port()}", inbox, window_seconds=10)
    state = ingest_share(share="inbox", config_path=str(cfg), return_state=True)
    assert state.is_failed()
    message = state.message or ""
    assert "unreachable" in message and "nothing was deleted" in message, message
    assert all(f.exists() for f in files)
    assert not (inbox / ".quarantine").exists()


def test_two_runs_of_one_share_never_sweep_at_once(prefect_server, orthanc, tmp_path):
    from flows.ingest import ingest_share

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    cfg = site_config(tmp_path, orthanc.url, inbox, window_seconds=10)
    results: list[dict] = []

    def run() -> None:
        results.append(ingest_share(share="inbox", config_path=str(cfg)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    swept = sorted((r["swept_from"], r["swept_until"]) for r in results if "skipped" not in r)
    assert swept, results
    if len(swept) == 2:  # the second run got the share only after the first let go of it
        assert swept[0][1] <= swept[1][0], swept
    else:
        assert [r["skipped"] for r in results if "skipped" in r] == ["busy"]
