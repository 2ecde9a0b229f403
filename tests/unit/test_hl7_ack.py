"""parse_ack: every answer of C22 and a table of further ACK shapes. No server: bytes in, verdict out."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from tasks.errors import Hl7PartnerUnavailable, Hl7Rejected
from tasks.hl7_ack import AckResult, decode_lenient, parse_ack, segments, strip_framing
from tests.conftest import CASES

C22 = json.loads((CASES / "C22_acks.json").read_text())
SENT = C22["sent_MSH-10"]

# C22 id -> (accepted, MSA-1, MSA-2, text, words the operator's problem sentence must contain)
C22_EXPECTED: dict[str, tuple[bool, str | None, str | None, str | None, list[str]]] = {
    "framed_ok": (True, "AA", SENT, None, []),
    "crlf_segments": (True, "AA", SENT, None, []),
    "lf_segments": (True, "AA", SENT, None, []),
    "no_cr_before_fs": (True, "AA", SENT, None, []),
    "commit_accept": (True, "CA", SENT, None, []),
    "app_error": (
        False,
        "AE",
        SENT,
        "Unknown patient; 204 Unknown key identifier",
        ["AE", "application error", "Unknown patient"],
    ),
    "app_reject": (False, "AR", SENT, None, ["AR", "application reject", "no reason given"]),
    "wrong_control_id": (False, "AA", "MSG0999", None, ["MSG0999", SENT]),
    "version_not_in_hl7apy": (True, "AA", SENT, None, []),
    "http_error_page": (False, None, None, None, ["not an HL7 message", "HTTP/1.1 400 Bad Request"]),
}


@pytest.mark.parametrize("case", [a for a in C22["acks"] if a["raw"] is not None], ids=lambda a: a["id"])
def test_c22_acks(case: dict[str, str]) -> None:
    accepted, code, control_id, text, words = C22_EXPECTED[case["id"]]
    result = parse_ack(case["raw"].encode("utf-8"), SENT)
    assert (result.accepted, result.code, result.control_id, result.text) == (accepted, code, control_id, text)
    if accepted:
        assert result.problem is None
    else:
        assert result.problem and all(word in result.problem for word in words), result.problem


def test_every_c22_answer_has_an_expectation() -> None:
    # "no_answer" (raw null) is silence on the socket: tests/integration/test_mllp.py covers it.
    assert {a["id"] for a in C22["acks"] if a["raw"] is not None} == set(C22_EXPECTED)


def test_c22_acks_also_parse_without_framing_or_with_latin1_bytes() -> None:
    for case in C22["acks"]:
        if case["raw"] is None or case["id"] == "http_error_page":
            continue
        raw = case["raw"].encode("latin-1")
        assert parse_ack(strip_framing(raw), SENT) == parse_ack(raw, SENT)


MSH = "MSH|^~\\&|RIS|HOSP|WF|HOSP|20240315101600||ACK^O01^ACK|A1|P|2.5"

MORE = [
    pytest.param(f"{MSH}\rMSA|aa|MSG0001", True, "AA", None, id="lower-case-code"),
    pytest.param(f"{MSH}\rMSA| AA | MSG0001 ", True, "AA", None, id="padded-fields"),
    pytest.param(f"{MSH}\rMSA|AA|MSG0001|Message accepted", True, "AA", "Message accepted", id="aa-with-text"),
    pytest.param(f"{MSH}\rMSA|CE|MSG0001", False, "CE", None, id="commit-error"),
    pytest.param(f"{MSH}\rMSA|CR|MSG0001", False, "CR", None, id="commit-reject"),
    pytest.param(f"{MSH}\rMSA|XX|MSG0001", False, "XX", None, id="unknown-code"),
    pytest.param(f"{MSH}\rMSA||MSG0001", False, None, None, id="empty-code"),
    pytest.param(f"{MSH}\rMSA|AA", False, "AA", None, id="no-control-id"),
    pytest.param(f"{MSH}\rMSA|AA|MSG00011", False, "AA", None, id="control-id-prefix-is-not-ours"),
    pytest.param(MSH, False, None, None, id="msh-without-msa"),
    pytest.param("", False, None, None, id="empty"),
    pytest.param("\x0b\x1c\r", False, None, None, id="empty-frame"),
    pytest.param("<html><body>502 Bad Gateway</body></html>", False, None, None, id="html"),
    pytest.param("MSA|AA|MSG0001", False, None, None, id="msa-without-msh"),
    pytest.param(
        f"{MSH}\rMSA|AE|MSG0001\rERR||PID^1^3|103^Table value not found^HL70357|E||||Unknown \\T\\ ID",
        False,
        "AE",
        "Unknown & ID; 103 Table value not found",
        id="err-v25-with-escapes",
    ),
    pytest.param(
        f"{MSH}\rMSA|AE|MSG0001|Bad \\F\\ value\\X0D\\ here\\.br\\",
        False,
        "AE",
        "Bad | value\r here",
        id="msa3-escapes-unescaped",
    ),
    pytest.param(
        "MSH#@!$%#RIS#HOSP#WF#HOSP#20240315##ACK#A1#P#2.9.1\rMSA#AE#MSG0001#Wrong @ thing $F$",
        False,
        "AE",
        "Wrong @ thing #",
        id="own-delimiters",
    ),
]


@pytest.mark.parametrize(("raw", "accepted", "code", "text"), MORE)
def test_more_ack_shapes(raw: str, accepted: bool, code: str | None, text: str | None) -> None:
    result = parse_ack(raw.encode("utf-8"), "MSG0001")
    assert (result.accepted, result.code, result.text) == (accepted, code, text)
    assert (result.problem is None) == accepted


def test_partner_text_in_latin1_is_decoded() -> None:
    result = parse_ack(f"{MSH}\rMSA|AE|MSG0001|Patient unbekannt: Größe".encode("latin-1"), "MSG0001")
    assert result.text == "Patient unbekannt: Größe"


def test_binary_garbage_never_raises() -> None:
    result = parse_ack(bytes(range(256)) * 4, "MSG0001")
    assert result == AckResult(False, None, None, None, result.problem)
    assert result.problem and result.problem.startswith("the answer is not an HL7 message")


@pytest.mark.parametrize(
    ("raw", "text"),
    [(b"abc", "abc"), ("Müller".encode(), "Müller"), ("Müller".encode("latin-1"), "Müller"), (b"\xff\xfe", "ÿþ")],
)
def test_decode_lenient(raw: bytes, text: str) -> None:
    assert decode_lenient(raw) == text


@pytest.mark.parametrize(
    ("raw", "lines"),
    [
        (b"\x0bA|1\rB|2\r\x1c\r", ["A|1", "B|2"]),
        (b"A|1\r\nB|2\r\n", ["A|1", "B|2"]),
        (b"A|1\nB|2", ["A|1", "B|2"]),
        (b"\x0bA|1\x1c\r", ["A|1"]),
        (b"\r\n\x0bA|1\r\r\x1c", ["A|1"]),
    ],
)
def test_segments_strip_framing_and_any_line_end(raw: bytes, lines: list[str]) -> None:
    assert segments(raw) == lines


@pytest.mark.parametrize("module", ["hl7_messages", "hl7_ack", "hl7_settings"])
def test_pure_modules_import_no_network_or_prefect(module: str) -> None:
    tree = ast.parse((Path(__file__).parents[2] / "tasks" / f"{module}.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}  # fmt: skip
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"prefect", "socket", "ssl", "httpx", "time", "asyncio"}


def test_delivery_errors_survive_pickling_with_their_attributes() -> None:
    for error in (Hl7Rejected("HL7 partner h:1 refused", code="AE", text="Unknown patient", attempts=1),
                  Hl7PartnerUnavailable("HL7 partner h:1 did not answer", attempts=4)):  # fmt: skip
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__
