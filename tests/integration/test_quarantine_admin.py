"""`owf quarantine list/requeue` and `owf check`, on a local folder and a real SMB share."""

from __future__ import annotations

import pytest
import yaml

from stack.cli import main
from tests.integration.helpers import drain, engine_for, local_share, smb_share

pytestmark = pytest.mark.integration


def _config(tmp_path, orthanc_url, share: dict) -> str:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"orthanc": {"url": orthanc_url, "timeout_seconds": 5}, "shares": [share]}))
    return str(path)


@pytest.mark.parametrize("kind", ["local", "smb"])
def test_list_and_requeue_round_trip(kind, tmp_path, orthanc, cases, capsys, request, monkeypatch):
    if kind == "local":
        sut = local_share(tmp_path / "inbox")
        share = {"name": "inbox", "source": "INBOX", "path": str(sut.root)}
    else:
        samba = request.getfixturevalue("samba")
        sut = smb_share(samba)
        monkeypatch.setenv("OWF_TEST_SMB_PASSWORD", samba.password)
        share = {"name": "ct-room1", "source": "CT_ROOM1", "server": "127.0.0.1", "port": samba.port,
                 "share": samba.share_name, "username": samba.username,
                 "password_env": "OWF_TEST_SMB_PASSWORD"}  # fmt: skip
    sut.place(cases / "C04_folder" / "report.pdf", "a/report.pdf")
    sut.place(cases / "C04_folder" / "corrupt.dcm", "corrupt.dcm")
    drain(sut, engine_for(sut, orthanc.url))
    cfg = _config(tmp_path, orthanc.url, share)

    assert main(["--config", cfg, "quarantine", "list"]) == 0
    listed = capsys.readouterr().out
    assert "a/report.pdf" in listed and "corrupt.dcm" in listed and "not a DICOM file" in listed

    assert main(["--config", cfg, "quarantine", "requeue", share["name"], "a/report.pdf"]) == 0
    assert sut.files() == {"a/report.pdf"}
    assert set(sut.quarantined()) == {"corrupt.dcm"}

    assert main(["--config", cfg, "quarantine", "requeue", share["name"], "nothing/here"]) == 1
    assert "not in quarantine" in capsys.readouterr().err

    assert main(["--config", cfg, "quarantine", "requeue", share["name"], "--all"]) == 0
    assert sut.files() == {"a/report.pdf", "corrupt.dcm"}
    assert sut.quarantined() == {}


def test_check_names_every_problem(tmp_path, capsys, samba, monkeypatch):
    from stack.services import free_port

    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({
        "orthanc": {"url": f"http://127.0.0.1:{free_port()}", "timeout_seconds": 2},
        "shares": [
            {"name": "gone", "source": "GONE", "path": str(tmp_path / "missing")},
            {"name": "smb", "source": "SMB", "server": "127.0.0.1", "port": samba.port, "share": samba.share_name,
             "username": samba.username, "password_env": "OWF_CHECK_PW"},
        ],
        "hl7": {"enabled": True, "port": (hl7_port := free_port()), "connect_timeout_seconds": 2},
    }))  # fmt: skip
    monkeypatch.setenv("OWF_CHECK_PW", "definitely-wrong-pw")
    assert main(["--config", str(cfg), "check"]) == 1
    out = capsys.readouterr().out
    assert "4 problem(s)" in out
    assert "unreachable" in out and "does not exist" in out and "refused" in out
    assert f"HL7 partner 127.0.0.1:{hl7_port}: HL7 partner 127.0.0.1:{hl7_port} refused the connection" in out
    assert "definitely-wrong-pw" not in out


def test_check_reports_unknown_keys_and_inline_passwords(tmp_path, capsys):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("orthanc:\n  urll: http://x\nshares:\n  - {name: a, source: A, path: /x, password: hunter2}\n")
    assert main(["--config", str(cfg), "check"]) == 1
    out = capsys.readouterr().out
    assert "orthanc.urll: unknown key" in out and "password_env" in out and "hunter2" not in out
