"""The study flow on a real Prefect server, against a real Orthanc and python-hl7's MLLP server as the
partner: the message carries the DICOM values, the same content is never sent twice, more images send an
update, a forced rerun resends, and a failed delivery is resent byte for byte by the next run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml

from stack.services import free_port
from stack.synthetic import ct_dataset, write_ct_series
from tests.integration.partner import Partner

pytestmark = pytest.mark.integration


@pytest.fixture
def partner():
    p = Partner(free_port()).start()
    yield p
    p.stop()


def site_config(tmp_path: Path, orthanc_url: str, partner_port: int, **hl7) -> str:
    cfg = {
        "data_dir": str(tmp_path / "data"),
        "orthanc": {"url": orthanc_url, "timeout_seconds": 10},
        "report": {"extra_tags": ["BodyPartExamined"]},
        "hl7": {
            "enabled": True,
            "port": partner_port,
            "ack_timeout_seconds": 2,
            "connect_timeout_seconds": 2,
            "retries": 1,
            "retry_backoff_seconds": 0.1,
            "sending_facility": "HOSP",
            **hl7,
        },
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def storescu(orthanc, files, aet="MODALITY1") -> None:
    subprocess.run([shutil.which("storescu") or "storescu", "-aet", aet, "-aec", "ORTHANC", "127.0.0.1",
                    str(orthanc.dicom_port), *map(str, files)], check=True, capture_output=True,
                   env={**os.environ, "TCP_NODELAY": "1"}, timeout=60)  # fmt: skip


def field(message, path: str) -> str:
    """``PID-5`` -> the field as text (python-hl7 parsed)."""
    seg, num = path.split("-")
    return str(message.segment(seg)[int(num)])


def test_stable_study_is_reported_and_notified_once_with_its_values(prefect_server, orthanc, partner, tmp_path):
    from flows.study import study_notify

    files = write_ct_series(tmp_path / "ct", 3)
    storescu(orthanc, files)
    ds = pydicom.dcmread(files[0])
    cfg = site_config(tmp_path, orthanc.url, partner.port)

    out = study_notify(study=ds.StudyInstanceUID, config_path=cfg)  # as an operator would type it
    [(study_id, result)] = out.items()
    assert result["decision"] == "new" and result["ack"] == "AA"
    [msg] = partner.received
    assert field(msg, "MSH-9") == "ORU^R01^ORU_R01"
    assert field(msg, "MSH-10") == result["control_id"]
    assert field(msg, "MSH-18") == "UNICODE UTF-8"
    assert field(msg, "PID-3").split("^")[0] == ds.PatientID
    family, given = str(ds.PatientName).split("^")[:2]
    assert field(msg, "PID-5") == f"{family}^{given}"
    assert field(msg, "OBR-18") == ds.AccessionNumber
    obx = {str(s[3]).split("^")[0]: str(s[5]) for s in msg.segments("OBX")}
    assert obx["113014"] == ds.StudyInstanceUID
    assert obx["number_of_instances"] == "3"

    reports = list((tmp_path / "data" / "reports").glob("*.csv"))
    assert len(reports) == 1
    doc = json.loads(reports[0].with_suffix(".json").read_text())
    assert doc[0]["study_instance_uid"] == ds.StudyInstanceUID and doc[0]["number_of_instances"] == 3
    assert "BodyPartExamined" in doc[0]

    # stable again with nothing changed: nothing is sent
    again = study_notify(study=study_id, config_path=cfg)
    assert again[study_id]["decision"] == "nothing"
    assert len(partner.received) == 1

    # more images: an update (result status C), not a second "new"
    extra = tmp_path / "IMG_MORE.dcm"
    ct_dataset(ds.StudyInstanceUID, ds.SeriesInstanceUID, 3).save_as(extra, enforce_file_format=True)
    storescu(orthanc, [extra])
    updated = study_notify(study=study_id, config_path=cfg)
    assert updated[study_id]["decision"] == "update"
    assert len(partner.received) == 2
    assert field(partner.received[1], "OBR-25") == "C"

    # a forced rerun resends
    forced = study_notify(study=study_id, resend_hl7=True, config_path=cfg)
    assert forced[study_id]["decision"] == "update"
    assert len(partner.received) == 3


def test_failed_delivery_fails_the_run_and_the_rerun_sends_the_same_bytes(prefect_server, orthanc, partner, tmp_path):
    from flows.study import NotificationFailed, study_notify

    storescu(orthanc, write_ct_series(tmp_path / "ct", 2))
    study_id = httpx.get(orthanc.url + "/studies").json()[0]
    cfg = site_config(tmp_path, orthanc.url, partner.port)
    partner.accept = False  # takes the message, drops the connection without an ACK
    with pytest.raises(NotificationFailed, match=r"127\.0\.0\.1"):
        study_notify(study=study_id, config_path=cfg)
    assert len(partner.raw) == 2  # first attempt and one retry, same bytes
    assert partner.raw[0] == partner.raw[1]
    pending = httpx.get(f"{orthanc.url}/studies/{study_id}/metadata/HL7Pending")
    assert pending.status_code == 200

    partner.accept = True
    out = study_notify(study=study_id, config_path=cfg)
    assert out[study_id]["decision"] == "resend-pending"
    assert partner.raw[-1] == partner.raw[0]  # byte for byte, same control id
    assert httpx.get(f"{orthanc.url}/studies/{study_id}/metadata/HL7Pending").status_code == 404
    assert json.loads(httpx.get(f"{orthanc.url}/studies/{study_id}/metadata/HL7Notified").text)["kind"] == "new"


def test_unknown_study_fails_with_a_clear_message(prefect_server, orthanc, partner, tmp_path):
    from flows.study import study_notify
    from tasks.errors import StudyNotFound

    with pytest.raises(StudyNotFound, match=r"1\.2\.3\.4\.5"):
        study_notify(study="1.2.3.4.5", config_path=site_config(tmp_path, orthanc.url, partner.port))
    assert partner.received == []


@pytest.mark.parametrize(
    ("file", "charset", "codec", "name", "warned"),
    [
        ("C12_latin1_umlauts.dcm", "UNICODE UTF-8", "utf-8", "Müller^Jürgen", False),
        ("C12_latin1_umlauts.dcm", "8859/1", "latin-1", "Müller^Jürgen", False),
        ("C12b_utf8_iso_ir_192.dcm", "UNICODE UTF-8", "utf-8", "Łukasiewicz^Zoë", False),
        ("C12b_utf8_iso_ir_192.dcm", "8859/1", "latin-1", "Lukasiewicz^Zoë", True),  # Ł has no 8859/1 byte
        ("C12b_utf8_iso_ir_192.dcm", "ASCII", "ascii", "Lukasiewicz^Zoe", True),
        ("C14_pn_prefix_suffix.dcm", "UNICODE UTF-8", "utf-8", "Rivera^Ana^Maria^III^Dr.", False),
    ],
)
def test_c12_c14_names_reach_the_partner_exactly_in_the_charset_msh18_names(
    prefect_server, orthanc, tmp_path, cases, caplog, file, charset, codec, name, warned
):
    """Through Orthanc (which stores the file's own charset) and the flow to a partner decoding with the codec
    MSH-18 names: the name decodes back exactly, or transliterated with a warning that does not show it."""
    from flows.study import study_notify

    partner = Partner(free_port(), encoding=codec).start()
    try:
        r = httpx.post(orthanc.url + "/instances", content=(cases / file).read_bytes(), timeout=30)
        study_id = r.json()["ParentStudy"]
        study_notify(study=study_id, config_path=site_config(tmp_path, orthanc.url, partner.port, charset=charset))
        [raw] = partner.raw
        [msg] = partner.received
    finally:
        partner.stop()
    msh18 = field(msg, "MSH-18") if charset != "ASCII" else raw.split(b"\r")[0].split(b"|")[17:18]
    assert msh18 == (charset if charset != "ASCII" else [])  # ASCII: MSH-18 left out (the HL7 default)
    assert field(msg, "PID-5") == name
    assert name.encode(codec) in raw  # the bytes on the wire are in that charset, not mixed
    if codec != "utf-8":
        assert "Ã" not in raw.decode("latin-1")  # no UTF-8 bytes read as Latin-1 (mojibake)
    warnings = [r.getMessage() for r in caplog.records if "not representable" in r.getMessage()]
    assert bool(warnings) is warned
    assert not any("Łukasiewicz" in w or "ukasiewicz" in w for w in warnings)
