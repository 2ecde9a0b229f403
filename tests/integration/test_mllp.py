"""MLLP delivery against real listeners on loopback: python-hl7's asyncio MLLP server (a receiver we did not
write, in plain TCP and in TLS) and a scripted partner of our own that misbehaves the ways C22 lists: ACK in
1-byte pieces, AE, AR then AA, silence, an HTTP page, a dropped connection, a wrong control id."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pytest

from stack.services import free_port
from tasks.errors import Hl7DeliveryError, Hl7PartnerUnavailable, Hl7ProtocolError, Hl7Rejected
from tasks.hl7_messages import OutgoingMessage, build_message
from tasks.hl7_settings import Hl7Settings
from tasks.mllp import MllpClient, deliver, frame
from tests.conftest import CASES

pytestmark = pytest.mark.integration

NOW = dt.datetime(2024, 3, 15, 10, 16)
C22 = {a["id"]: a["raw"] for a in json.loads((CASES / "C22_acks.json").read_text())["acks"]}
ROW = {
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
    "accession_number": "ACC0001",
    "patient_id": "PID0001",
    "patient_name": "Müller^Jürgen",
    "study_date": "20240315",
    "modalities": "CT",
    "institution_name": "Klinikum Süd",
    "ctdivol_mgy": 12.35,
}


def settings_for(port: int, **overrides: Any) -> Hl7Settings:
    values: dict[str, Any] = {"enabled": True, "host": "127.0.0.1", "port": port, "connect_timeout_seconds": 1,
                              "ack_timeout_seconds": 0.3, "retries": 2, "retry_backoff_seconds": 0.5}  # fmt: skip
    return Hl7Settings(**(values | overrides))


def message_for(settings: Hl7Settings, control_id: str = "MSG0001") -> OutgoingMessage:
    return build_message(ROW, settings, control_id=control_id, now=NOW, update=False)


# --- python-hl7's MLLP server ------------------------------------------------------------------------------------


@dataclass
class PythonHl7Listener:
    """python-hl7's asyncio MLLP server in a background thread; answers every message with its create_ack()."""

    port: int
    encoding: str
    ssl_context: ssl.SSLContext | None = None
    ack_code: str = "AA"
    received: list[hl7.Message] = field(default_factory=list)

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(5), "python-hl7 MLLP server did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            hl7.mllp.start_hl7_server(
                self._handle, "127.0.0.1", self.port, encoding=self.encoding, ssl=self.ssl_context
            )
        )
        ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _handle(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.received.append(message)
                writer.writemessage(message.create_ack(self.ack_code, message_id="ACK1"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # our client closes after one answer
        finally:
            writer.close()


@pytest.fixture
def python_hl7_listener() -> Iterator[Callable[..., PythonHl7Listener]]:
    started: list[PythonHl7Listener] = []

    def start(encoding: str = "utf-8", **kwargs: Any) -> PythonHl7Listener:
        listener = PythonHl7Listener(free_port(), encoding, **kwargs)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


@pytest.mark.parametrize(("charset", "codec"), [("UNICODE UTF-8", "utf-8"), ("8859/1", "latin-1")])
def test_python_hl7_listener_receives_our_message_and_its_ack_is_accepted(
    python_hl7_listener: Callable[..., PythonHl7Listener], charset: str, codec: str
) -> None:
    listener = python_hl7_listener(codec)
    settings = settings_for(listener.port, charset=charset)
    result = deliver(message_for(settings), settings, sleep=pytest.fail)
    assert result.ack.accepted and result.ack.code == "AA" and result.ack.control_id == "MSG0001"
    assert result.attempts == 1 and result.seconds < 5
    [received] = listener.received
    assert received["MSH.F9"] == "ORU" and received["MSH.F9.R1.C2"] == "R01"
    assert received["MSH.F10"] == "MSG0001" and received["MSH.F18"] == charset
    assert str(received.segment("PID")(5)) == "Müller^Jürgen"
    assert received["PID.F3"] == "PID0001"
    assert received["OBR.F18"] == "ACC0001"
    [uid_obx, *values] = received.segments("OBX")
    assert str(uid_obx(3)) == "113014^DICOM Study^DCM" and str(uid_obx(5)) == ROW["study_instance_uid"]
    assert {str(obx(3)(1)(1)): str(obx(5)) for obx in values} == {"institution_name": "Klinikum Süd",
                                                                   "ctdivol_mgy": "12.35"}  # fmt: skip


@pytest.mark.parametrize("message_type", ["ORM^O01", "OMG^O19", "OMI^O23"])
def test_python_hl7_listener_receives_order_messages(
    python_hl7_listener: Callable[..., PythonHl7Listener], message_type: str
) -> None:
    listener = python_hl7_listener()
    settings = settings_for(listener.port, message_type=message_type)
    assert deliver(message_for(settings), settings, sleep=pytest.fail).ack.accepted
    [received] = listener.received
    assert received["ORC.F1"] == "SC" and received["ORC.F5"] == "CM" and received["ORC.F2"] == "ACC0001"
    if message_type == "OMI^O23":
        assert received["IPC.F1"] == "ACC0001" and received["IPC.F3"] == ROW["study_instance_uid"]
        assert received["IPC.F5"] == "CT"


def test_python_hl7_listener_error_ack_is_not_resent(python_hl7_listener: Callable[..., PythonHl7Listener]) -> None:
    listener = python_hl7_listener(ack_code="AE")
    settings = settings_for(listener.port)
    with pytest.raises(Hl7Rejected) as caught:
        deliver(message_for(settings), settings, sleep=pytest.fail)
    assert caught.value.code == "AE" and caught.value.attempts == 1 and len(listener.received) == 1


@dataclass
class Pki:
    ca_file: Path
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA and a server certificate for 127.0.0.1."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)

    def certificate(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("Test HL7 CA", ca_key, "Test HL7 CA", ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, "Test HL7 CA", ca_key, ca=False)
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return Pki(ca_file, context)


def test_tls_delivery_to_python_hl7_listener(python_hl7_listener: Callable[..., PythonHl7Listener], pki: Pki) -> None:
    listener = python_hl7_listener(ssl_context=pki.server_context)
    settings = settings_for(listener.port, tls=True, tls_ca_file=pki.ca_file)
    assert deliver(message_for(settings), settings, sleep=pytest.fail).ack.accepted
    assert listener.received[0]["MSH.F10"] == "MSG0001"


def test_tls_certificate_not_trusted_is_not_retried(
    python_hl7_listener: Callable[..., PythonHl7Listener], pki: Pki
) -> None:
    listener = python_hl7_listener(ssl_context=pki.server_context)
    settings = settings_for(listener.port, tls=True)  # system CAs do not know the test CA
    with pytest.raises(Hl7DeliveryError) as caught:
        deliver(message_for(settings), settings, sleep=pytest.fail)
    assert type(caught.value) is Hl7DeliveryError and "tls_ca_file" in str(caught.value)
    assert listener.received == []


# --- a partner of our own that misbehaves ------------------------------------------------------------------------

Behaviour = Callable[[socket.socket, str], None]


def ack(case: str) -> Behaviour:
    """Answer with the C22 ACK ``case``, addressed to the control id we received (except wrong_control_id)."""

    def answer(conn: socket.socket, control_id: str) -> None:
        conn.sendall(C22[case].replace("MSG0001", control_id).encode())

    return answer


def in_pieces(conn: socket.socket, control_id: str) -> None:
    for byte in C22["framed_ok"].replace("MSG0001", control_id).encode():
        conn.sendall(bytes([byte]))
        time.sleep(0.0005)


def silence(conn: socket.socket, control_id: str) -> None:
    conn.settimeout(5)
    while conn.recv(1024):  # until the client gives up and closes
        pass


def drop(conn: socket.socket, control_id: str) -> None:
    pass  # close without a word


def half_answer(conn: socket.socket, control_id: str) -> None:
    conn.sendall(C22["framed_ok"].encode()[:30])


def http_page(conn: socket.socket, control_id: str) -> None:
    conn.sendall(C22["http_error_page"].encode())


def flood(conn: socket.socket, control_id: str) -> None:
    with contextlib.suppress(OSError):  # the client stops reading at its limit
        conn.sendall(b"\x0b" + b"X" * 200_000)


class ScriptedPartner:
    """A plain TCP server: the n-th connection gets the n-th behaviour (the last one repeats)."""

    def __init__(self, behaviours: list[Behaviour]) -> None:
        self.behaviours = behaviours
        self.port = free_port()
        self.received: list[bytes] = []
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                data = self._read_message(conn)
                self.received.append(data)
                if not data:  # a connection closed without a message (owf check's probe)
                    continue
                control_id = data.split(b"\r")[0].split(b"|")[9].decode()
                behaviour = self.behaviours[min(len(self.received), len(self.behaviours)) - 1]
                behaviour(conn, control_id)

    @staticmethod
    def _read_message(conn: socket.socket) -> bytes:
        conn.settimeout(5)
        data = b""
        while not data.endswith(b"\x1c\r"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        return data[1:-2]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


@pytest.fixture
def partner() -> Iterator[Callable[[list[Behaviour]], ScriptedPartner]]:
    started: list[ScriptedPartner] = []

    def start(behaviours: list[Behaviour]) -> ScriptedPartner:
        started.append(ScriptedPartner(behaviours))
        return started[-1]

    yield start
    for p in started:
        p.stop()


# behaviours, expected exception (None: accepted), attempts, words in the operator's message
SCRIPTS = [
    pytest.param([in_pieces], None, 1, [], id="ack-in-1-byte-pieces"),
    pytest.param([ack("lf_segments")], None, 1, [], id="lf-ack"),
    pytest.param([ack("no_cr_before_fs")], None, 1, [], id="no-cr-before-fs"),
    pytest.param([ack("version_not_in_hl7apy")], None, 1, [], id="ack-version-2.9.1"),
    pytest.param([ack("commit_accept")], None, 1, [], id="commit-accept"),
    pytest.param([ack("app_reject"), ack("framed_ok")], None, 2, [], id="ar-then-aa-is-retried"),
    pytest.param([silence, ack("framed_ok")], None, 2, [], id="silence-then-aa"),
    pytest.param([ack("app_error")], Hl7Rejected, 1, ["AE", "Unknown patient", "not resent"], id="ae-not-resent"),
    pytest.param([ack("app_reject")], Hl7Rejected, 3, ["AR", "(3 attempts)"], id="ar-until-retries-spent"),
    pytest.param([silence], Hl7PartnerUnavailable, 3, ["did not answer within 0.3 s (3 attempts)"], id="silence"),
    pytest.param([drop], Hl7PartnerUnavailable, 3, ["closed the connection without answering"], id="dropped"),
    pytest.param([half_answer], Hl7PartnerUnavailable, 3, ["before its answer was complete"], id="half-answer"),
    pytest.param([http_page], Hl7ProtocolError, 3, ["not MLLP", "HTTP/1.1 400"], id="http-page"),
    pytest.param([ack("wrong_control_id")], Hl7ProtocolError, 3, ["MSG0999", "not for MSG0001"], id="wrong-msa2"),
]


@pytest.mark.parametrize(("behaviours", "error", "attempts", "words"), SCRIPTS)
def test_misbehaving_partner(
    partner: Callable[[list[Behaviour]], ScriptedPartner],
    behaviours: list[Behaviour],
    error: type[Exception] | None,
    attempts: int,
    words: list[str],
) -> None:
    p = partner(behaviours)
    settings = settings_for(p.port)
    message = message_for(settings)
    sleeps: list[float] = []
    if error is None:
        result = deliver(message, settings, sleep=sleeps.append)
        assert result.ack.accepted and result.attempts == attempts
    else:
        with pytest.raises(error) as caught:
            deliver(message, settings, sleep=sleeps.append)
        assert type(caught.value) is error and caught.value.attempts == attempts
        text = str(caught.value)
        assert f"127.0.0.1:{p.port}" in text and all(word in text for word in words), text
        assert "Müller" not in text and "PID0001" not in text  # no patient data
    assert sleeps == [0.5, 1.0][: attempts - 1]  # backoff doubles
    assert p.received == [message.wire] * attempts  # every attempt sends the very same bytes (same MSH-10)


def test_refused_connection_is_unavailable_after_retries() -> None:
    settings = settings_for(free_port(), retries=1)
    with pytest.raises(Hl7PartnerUnavailable, match=r"refused the connection \(2 attempts\)"):
        deliver(message_for(settings), settings, sleep=lambda s: None)


def test_answer_longer_than_the_limit_is_a_protocol_error(partner: Callable[..., ScriptedPartner]) -> None:
    p = partner([flood])
    client = MllpClient("127.0.0.1", p.port, connect_timeout=1, read_timeout=2, max_answer_bytes=64 * 1024)
    with pytest.raises(Hl7ProtocolError, match="more than 65536 bytes"):
        client.exchange(b"MSH|^~\\&|A|B|C|D|20240315||ORU^R01|MSG0001|P|2.5\r")


def test_exchange_returns_the_unframed_answer(partner: Callable[..., ScriptedPartner]) -> None:
    p = partner([ack("framed_ok")])
    client = MllpClient("127.0.0.1", p.port, connect_timeout=1, read_timeout=2)
    answer = client.exchange(b"MSH|^~\\&|A|B|C|D|20240315||ORU^R01|MSG0001|P|2.5\r")
    assert answer == C22["framed_ok"].encode()[1:-2]


def test_frame_refuses_payloads_with_mllp_bytes() -> None:
    assert frame(b"MSH|x\r") == b"\x0bMSH|x\r\x1c\r"
    with pytest.raises(ValueError):
        frame(b"MSH|\x1c")


def test_probe_connects_and_sends_nothing(partner: Callable[..., ScriptedPartner]) -> None:
    """What `owf check` asks of the partner: a connection, no message (a partner must not see test traffic)."""
    p = partner([ack("framed_ok")])
    MllpClient("127.0.0.1", p.port, connect_timeout=1, read_timeout=1).probe()
    time.sleep(0.3)
    assert p.received == [b""]  # one connection, closed without a byte
    with pytest.raises(Hl7PartnerUnavailable, match="refused the connection"):
        MllpClient("127.0.0.1", free_port(), connect_timeout=1, read_timeout=1).probe()
