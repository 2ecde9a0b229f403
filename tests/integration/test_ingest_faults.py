"""Faults on the way: SMB writers holding files (C24), SMB sessions dying (C26), bad credentials, unreachable
servers, and Orthanc killed in the middle of a batch. Real Samba and real Orthanc, on loopback."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from stack.services import OrthancServer, SambaServer, free_port
from stack.synthetic import write_ct_series
from tasks.errors import ShareAuthError, ShareConfigError, ShareUnavailable
from tasks.shares import SmbShare
from tests.conftest import orthanc_instances
from tests.integration.helpers import (
    CountingTransport,
    drain,
    engine_for,
    local_share,
    smb_share,
    smb_share_config,
)

pytestmark = pytest.mark.integration


def test_c24_file_held_open_by_its_writer_is_not_ready_until_closed(samba, orthanc, cases, caplog):
    import smbclient

    sut = smb_share(samba)
    counter = CountingTransport()
    engine = engine_for(sut, orthanc.url, transport=counter)
    payload = (cases / "C04_folder" / "IMG0001").read_bytes()
    path = rf"\\127.0.0.1\{samba.share_name}\IMG_C24.dcm"
    writer_kw = {"port": samba.port, "username": samba.username, "password": samba.password,
                 "connection_cache": {}}  # fmt: skip
    # The writer (its own SMB session) opens without share access and keeps the file while scans run.
    writer = smbclient.open_file(path, mode="wb", share_access=None, **writer_kw)
    try:
        writer.write(payload)
        writer.flush()
        with caplog.at_level(logging.DEBUG):
            held = drain(sut, engine, sweeps=5)
        assert held.not_ready >= 3 and held.uploaded == 0 and held.quarantined == 0
        assert counter.count("POST", "/instances") == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        writer.close()
        smbclient.reset_connection_cache(connection_cache=writer_kw["connection_cache"])
    done = drain(sut, engine, sweeps=3)
    assert done.uploaded == 1
    assert sut.files() == set() and sut.quarantined() == {}


def test_c26_connection_lost_is_recovered_on_the_next_scan(tmp_path, orthanc, cases):
    samba = SambaServer(tmp_path / "samba", free_port()).start()
    try:
        sut = smb_share(samba)
        sut.place(cases / "C04_folder" / "IMG0001", "a/IMG0001")
        assert [e.path for e in sut.share.scan(".quarantine")] == ["a/IMG0001"]
        # The server drops every session (as after an idle timeout or a restart).
        samba.stop()
        samba.start()
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append([e.path for e in sut.share.scan(".quarantine")])
            except ShareUnavailable as e:
                assert samba.password not in str(e)
                outcomes.append("unavailable")
        assert outcomes[-1] == ["a/IMG0001"], outcomes
        assert drain(sut, engine_for(sut, orthanc.url)).uploaded == 1
    finally:
        samba.stop()


def test_bad_credentials_give_a_clear_error_without_the_password(samba):
    share = SmbShare(smb_share_config(samba), "wrong-password-xyz")
    with pytest.raises(ShareAuthError) as err:
        share.scan(".quarantine")
    message = str(err.value)
    assert samba.username in message and "wrong-password-xyz" not in message


def test_unreachable_server_is_unavailable_not_empty():
    cfg = smb_share_config(SambaServer(Path("/nonexistent"), free_port()), connection_timeout_seconds=2)
    share = SmbShare(cfg, "x")
    started = time.monotonic()
    with pytest.raises(ShareUnavailable) as err:
        share.scan(".quarantine")
    assert "unreachable" in str(err.value)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "overrides, words",
    [({"share": "nosuchshare"}, "no share named"), ({"folder": "no/such/folder"}, "does not exist")],
    ids=["unknown-share", "missing-folder"],
)
def test_misconfigured_share_is_a_config_error_naming_it(samba, overrides, words):
    cfg = smb_share_config(samba).model_copy(update=overrides)
    with pytest.raises(ShareConfigError) as err:
        SmbShare(cfg, samba.password).scan(".quarantine")
    assert words in str(err.value)


def test_local_folder_missing_is_a_config_error(tmp_path):
    sut = local_share(tmp_path / "inbox")
    sut.root.rmdir()
    with pytest.raises(ShareConfigError):
        sut.share.scan(".quarantine")


@pytest.mark.parametrize("kind", ["local", "smb"])
def test_orthanc_killed_mid_batch_loses_nothing(tmp_path, kind, request):
    """Orthanc dies after the 10th upload of 40: each file is in Orthanc or still in the share; after a
    restart, the next sweeps deliver the rest and the share ends empty."""
    server = OrthancServer(tmp_path / "orthanc", free_port(), free_port()).start()
    try:
        sut = local_share(tmp_path / "inbox") if kind == "local" else smb_share(request.getfixturevalue("samba"))
        paths = write_ct_series(sut.root / "batch", 40)
        uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}

        def kill_after_ten(req: httpx.Request, resp: httpx.Response) -> None:
            if req.method == "POST" and counter.count("POST", "/instances") == 10 and server.service:
                os.kill(server.service.pid, signal.SIGKILL)

        counter = CountingTransport(after=kill_after_ten)
        report = drain(sut, engine_for(sut, server.url, transport=counter, parallel_uploads=4), sweeps=2)
        assert report.stop_reason and "unreachable" in report.stop_reason
        assert report.quarantined == 0 and not (sut.root / ".quarantine").exists()

        server.service.stop()
        server.start()
        stored = {httpx.get(f"{server.url}/instances/{i}/simplified-tags", timeout=5).json()["SOPInstanceUID"]
                  for i in orthanc_instances(server)}  # fmt: skip
        still_there = {pydicom.dcmread(sut.root / f, stop_before_pixels=True).SOPInstanceUID for f in sut.files()}
        assert stored | still_there == uids, "no file lost"
        assert len(stored) >= 10

        drain(sut, engine_for(sut, server.url), sweeps=3)
        assert sut.files() == set()
        assert len(orthanc_instances(server)) == 40
    finally:
        server.stop()


def test_share_that_refuses_deletes_keeps_the_file_and_says_why(samba, orthanc, tmp_path):
    """A user who may read but not delete: the file is read and stored, stays in the share (nothing is
    lost), and the batch stops with a message that points at the share rights."""
    for child in samba.readonly_dir.iterdir():
        child.unlink()
    [slice_] = write_ct_series(tmp_path / "series", 1)
    (samba.readonly_dir / "ro.dcm").write_bytes(slice_.read_bytes())
    sut = smb_share(samba, name="ro", share=samba.readonly_share_name)
    sut.root = samba.readonly_dir
    engine = engine_for(sut, orthanc.url)
    report = drain(sut, engine, sweeps=2)
    assert (samba.readonly_dir / "ro.dcm").exists()
    assert len(orthanc_instances(orthanc)) == 1
    assert report.uploaded == 0
    assert "share rights" in report.stop_reason
    assert samba.password not in report.stop_reason


def test_parallel_reads_of_large_files_over_smb_all_succeed(samba, orthanc, tmp_path):
    """Four parallel reads of 5 MB files on one SMB session: one read request per file would ask for
    more credits than the session has ("requires 1 credits but only 0 are available") and stop the batch."""
    sut = smb_share(samba)
    for p in write_ct_series(tmp_path / "large", 8, side=1600):
        sut.place(p)
    report = drain(sut, engine_for(sut, orthanc.url, parallel_uploads=4), sweeps=2)
    assert report.stop_reason is None
    assert report.uploaded == 8
    assert sut.files() == set()
