"""MLLP, the network layer of HL7 v2: framing, one exchange per connection, and delivery with retries.

Framing is ``0x0B`` + message + ``0x1C 0x0D``. :class:`MllpClient` opens a connection, sends one framed message,
reads until the end block however many pieces the answer arrives in (bounded in size and time) and closes.
Socket and TLS errors become :mod:`tasks.errors` exceptions here, at the boundary; their messages name the
partner (host:port), never the message content.

:func:`deliver` adds the retry policy on top of one exchange and :func:`tasks.hl7_ack.parse_ack`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from tasks.errors import Hl7DeliveryError, Hl7PartnerUnavailable, Hl7ProtocolError, Hl7Rejected
from tasks.hl7_ack import ERROR_CODES, REJECT_CODES, AckResult, parse_ack
from tasks.hl7_messages import OutgoingMessage
from tasks.hl7_settings import Hl7Settings

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_ANSWER_BYTES = 1024 * 1024

_log = logging.getLogger(__name__)


def frame(message: bytes) -> bytes:
    """``message`` wrapped in the MLLP start and end blocks. It must not contain those bytes itself."""
    if START_BLOCK in message or b"\x1c" in message:
        raise ValueError("an MLLP payload may not contain 0x0B or 0x1C")
    return START_BLOCK + message + END_BLOCK


def ssl_context_for(settings: Hl7Settings) -> ssl.SSLContext | None:
    """A verifying TLS client context when ``settings.tls`` (trusting ``tls_ca_file`` if given), else None."""
    if not settings.tls:
        return None
    cafile = str(settings.tls_ca_file) if settings.tls_ca_file else None
    return ssl.create_default_context(cafile=cafile)


class MllpClient:
    """Sends one message per connection to an MLLP listener and returns its answer.

    ``connect_timeout`` bounds the TCP (and TLS) connect; ``read_timeout`` bounds the whole wait for the
    answer after the message is sent, so a partner that drips bytes cannot hold us longer.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.max_answer_bytes = max_answer_bytes

    @classmethod
    def from_settings(cls, settings: Hl7Settings) -> MllpClient:
        """The client for the partner the site configured (address, timeouts, TLS)."""
        return cls(settings.host, settings.port, connect_timeout=settings.connect_timeout_seconds,
                   read_timeout=settings.ack_timeout_seconds, ssl_context=ssl_context_for(settings))  # fmt: skip

    @property
    def partner(self) -> str:
        return f"{self.host}:{self.port}"

    def exchange(self, message: bytes) -> bytes:
        """Send ``message`` (unframed) and return the answer's payload (without its MLLP framing).

        Raises :class:`Hl7PartnerUnavailable` when the partner cannot be reached, resets or closes the connection
        before a complete answer, or does not answer within ``read_timeout``; :class:`Hl7ProtocolError` when the
        answer is not MLLP-framed or exceeds ``max_answer_bytes``; :class:`Hl7DeliveryError` when the TLS
        certificate cannot be verified (a configuration problem, not worth retrying).
        """
        payload = frame(message)
        sock = self._open()
        with sock:
            try:
                sock.settimeout(self.read_timeout)
                sock.sendall(payload)
            except TimeoutError:
                raise Hl7PartnerUnavailable(
                    f"HL7 partner {self.partner} did not take the message within {self.read_timeout:g} s"
                ) from None
            except OSError as exc:
                raise Hl7PartnerUnavailable(
                    f"HL7 partner {self.partner} broke the connection while we sent ({_reason(exc)})"
                ) from None
            return self._read_answer(sock)

    def probe(self) -> None:
        """Connect (and complete the TLS handshake) without sending anything, then close: what ``owf check``
        asks of the partner. Raises as :meth:`exchange` does when connecting fails."""
        self._open().close()

    def _open(self) -> socket.socket:
        """The connection, with connect and TLS failures translated into the domain's errors."""
        try:
            return self._connect()
        except ssl.SSLCertVerificationError as exc:
            raise Hl7DeliveryError(
                f"TLS certificate of HL7 partner {self.partner} could not be verified ({exc.verify_message}); "
                "check hl7.tls_ca_file"
            ) from None
        except ssl.SSLError as exc:
            raise Hl7ProtocolError(f"TLS handshake with HL7 partner {self.partner} failed ({exc.reason})") from None
        except TimeoutError:
            raise Hl7PartnerUnavailable(
                f"HL7 partner {self.partner} could not be reached within {self.connect_timeout:g} s"
            ) from None
        except ConnectionRefusedError:
            raise Hl7PartnerUnavailable(f"HL7 partner {self.partner} refused the connection") from None
        except OSError as exc:
            raise Hl7PartnerUnavailable(f"HL7 partner {self.partner} could not be reached ({_reason(exc)})") from None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        if self.ssl_context is None:
            return sock
        try:
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def _read_answer(self, sock: socket.socket) -> bytes:
        deadline = time.monotonic() + self.read_timeout
        buffer = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_answer(buffer)
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise self._no_answer(buffer) from None
            except OSError as exc:
                raise Hl7PartnerUnavailable(
                    f"HL7 partner {self.partner} broke the connection before answering completely ({_reason(exc)})"
                ) from None
            buffer += chunk
            # Stray CR/LF before the start block are tolerated; anything else means this is not MLLP.
            # (bytes.lstrip() without arguments would also strip 0x0B, the start block itself.)
            head = buffer.lstrip(b"\r\n")
            if head and not head.startswith(START_BLOCK):
                raise Hl7ProtocolError(
                    f"HL7 partner {self.partner} answered with something that is not MLLP ({_describe(head)})"
                )
            end = head.find(END_BLOCK)
            if end != -1:
                return bytes(head[1:end])
            if not chunk:
                if b"\x1c" in head:  # end block without its CR, then the partner closed: complete anyway
                    return bytes(head[1 : head.index(b"\x1c")])
                what = "without answering" if not head else "before its answer was complete"
                raise Hl7PartnerUnavailable(f"HL7 partner {self.partner} closed the connection {what}")
            if len(buffer) > self.max_answer_bytes:
                raise Hl7ProtocolError(
                    f"HL7 partner {self.partner} sent more than {self.max_answer_bytes} bytes without an MLLP end block"
                )

    def _no_answer(self, buffer: bytearray) -> Hl7PartnerUnavailable:
        partial = " (only part of an answer arrived)" if buffer else ""
        return Hl7PartnerUnavailable(
            f"HL7 partner {self.partner} did not answer within {self.read_timeout:g} s{partial}"
        )


@dataclass(frozen=True)
class DeliveryResult:
    """A message the partner acknowledged: its ACK, how many sends it took, and the seconds spent in all."""

    ack: AckResult
    attempts: int
    seconds: float
    answer: bytes = b""  # the ACK as received, framing removed


def deliver(
    message: OutgoingMessage,
    settings: Hl7Settings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    client: MllpClient | None = None,
) -> DeliveryResult:
    """Send ``message`` until the partner accepts it (AA/CA for our MSH-10), within ``settings.retries``.

    Resent (after ``retry_backoff_seconds``, doubling): no connection or no answer in time, an answer that is not
    an ACK for our message, AR/CR. Resending is safe because every attempt carries the same control id, so the
    partner can recognise a repeat. Not resent: AE/CE, the partner read the message and refused its content, so
    the same bytes would be refused again; this raises :class:`Hl7Rejected` at once.

    When the retries are spent, the last failure is raised (:class:`Hl7PartnerUnavailable`,
    :class:`Hl7ProtocolError` or :class:`Hl7Rejected`) with the number of attempts in its message and in
    ``attempts``. ``client`` replaces the MLLP client built from ``settings`` (tests).
    """
    log = log or _log
    client = client or MllpClient.from_settings(settings)
    partner = f"{settings.host}:{settings.port}"
    started = time.monotonic()
    total = settings.retries + 1
    for attempt in range(1, total + 1):
        failure: Hl7DeliveryError
        try:
            answer = client.exchange(message.wire)
        except (Hl7PartnerUnavailable, Hl7ProtocolError) as exc:
            failure = exc
        else:
            ack = parse_ack(answer, message.control_id)
            if ack.accepted:
                return DeliveryResult(ack=ack, attempts=attempt, seconds=time.monotonic() - started, answer=answer)
            ours = ack.control_id == message.control_id
            if ours and ack.code in ERROR_CODES:
                raise Hl7Rejected(
                    f"HL7 partner {partner} refused message {message.control_id}: {ack.problem}; it is not resent "
                    "because the same content would be refused again",
                    code=ack.code or "",
                    text=ack.text,
                    attempts=attempt,
                )
            if ours and ack.code in REJECT_CODES:
                failure = Hl7Rejected(
                    f"HL7 partner {partner} rejected message {message.control_id}: {ack.problem}",
                    code=ack.code or "",
                    text=ack.text,
                )
            else:
                failure = Hl7ProtocolError(
                    f"HL7 partner {partner} answered message {message.control_id}: {ack.problem}"
                )
        if attempt == total:
            raise _with_attempts(failure, attempt)
        pause = settings.retry_backoff_seconds * 2 ** (attempt - 1)
        log.warning(
            "HL7 message %s, attempt %d of %d failed: %s; retrying in %g s",
            message.control_id,
            attempt,
            total,
            failure,
            pause,
        )
        sleep(pause)
    raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


def _with_attempts(failure: Hl7DeliveryError, attempts: int) -> Hl7DeliveryError:
    """The same failure, its message ending with how many attempts were made."""
    text = f"{failure} ({attempts} attempt{'s' if attempts != 1 else ''})"
    if isinstance(failure, Hl7Rejected):
        error: Hl7DeliveryError = Hl7Rejected(text, code=failure.code, text=failure.text, attempts=attempts)
    else:
        error = type(failure)(text, attempts=attempts)
    error.__cause__ = failure.__cause__
    return error


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _describe(head: bytes) -> str:
    first = head[:40].split(b"\r")[0].split(b"\n")[0]
    return "it begins with " + repr("".join(chr(b) if 32 <= b < 127 else "." for b in first))
