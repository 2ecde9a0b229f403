"""The domain's exceptions, one small tree.

Expected outcomes (a file not ready yet, a file Orthanc rejects) are values, not exceptions. These are
raised when something an operator must fix or wait for stands in the way::

    WorkflowError
    ├── ConfigError            the site configuration is wrong (unknown key, missing secret, bad value)
    ├── OrthancError
    │   ├── OrthancUnavailable  connection refused, timeout, 5xx: retry later, touch nothing
    │   ├── OrthancAuthError    401/403: credentials wrong, retrying will not help
    │   └── StudyNotFound       no Orthanc study matches what was asked for (ID or Study Instance UID)
    ├── ShareError
    │   ├── ShareUnavailable    network error, session expired, connection reset: reconnect and retry
    │   ├── ShareAuthError      logon failure: credentials wrong
    │   └── ShareConfigError    the configured path does not exist or is a DFS link we cannot follow
    ├── Hl7EncodingError       a value cannot be written in the configured HL7 charset (unrepresentable=reject)
    ├── Hl7DeliveryError       not acknowledged (carries .attempts); itself: TLS certificate not trusted
    │   ├── Hl7PartnerUnavailable  refused, reset, closed before answering, timeout: safe to retry (same MSH-10)
    │   ├── Hl7ProtocolError       the answer is not MLLP/HL7, too long, or acknowledges another message
    │   └── Hl7Rejected            the partner answered AE/CE (content refused) or, after retries, AR/CR
    └── RouteError             a route could not do its work
        ├── DestinationUnknown  Orthanc has no modality/peer of that name: fix the configuration
        ├── CopyFailed          Orthanc could not make the modified/anonymized copy
        └── DeliveryFailed      the destination did not confirm every instance: retried with backoff

Clients translate httpx, socket and SMB errors into these at the boundary. Messages are written for an
operator and never contain patient data or credentials.
"""

from __future__ import annotations


class WorkflowError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(WorkflowError):
    """The site configuration is invalid; the message lists every problem found."""


class OrthancError(WorkflowError):
    """Orthanc did not do what was asked."""


class OrthancUnavailable(OrthancError):
    """Orthanc could not be reached or answered 5xx. Safe to retry later; nothing was changed."""


class OrthancAuthError(OrthancError):
    """Orthanc refused our credentials (401/403)."""


class ShareError(WorkflowError):
    """A share (local folder or SMB) could not be used."""


class ShareUnavailable(ShareError):
    """The share could not be reached right now (network, session expired). Retry later."""


class ShareAuthError(ShareError):
    """The SMB server refused the configured credentials."""


class ShareConfigError(ShareError):
    """The configured share or folder does not exist, or is a DFS link that cannot be followed."""


class Hl7EncodingError(WorkflowError):
    """A value cannot be written in the configured HL7 charset and the settings say to reject it.

    The message names the fields and the charset, never their content.
    """


class Hl7DeliveryError(WorkflowError):
    """An HL7 message was not acknowledged by the partner. ``attempts`` counts the sends made."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only attributes must survive pickling: Prefect persists the exception of a failed task.
        return (_rebuild_hl7_error, (type(self), self.args, self.__dict__))


def _rebuild_hl7_error(cls: type[Hl7DeliveryError], args: tuple[object, ...], state: dict[str, object]) -> Exception:
    error = Exception.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class Hl7PartnerUnavailable(Hl7DeliveryError):
    """Connection refused, reset or closed before a complete answer, or no answer in time.

    Safe to resend: the message keeps its control id (MSH-10), so the partner can recognise a repeat.
    """


class Hl7ProtocolError(Hl7DeliveryError):
    """The answer is not an MLLP-framed HL7 ACK for our message (e.g. an HTTP error page, too long, wrong MSA-2)."""


class Hl7Rejected(Hl7DeliveryError):
    """The partner answered with a negative acknowledgement: ``code`` is AE/CE/AR/CR, ``text`` its MSA-3/ERR text."""

    def __init__(self, message: str, *, code: str, text: str | None = None, attempts: int = 1) -> None:
        super().__init__(message, attempts=attempts)
        self.code = code
        self.text = text


class StudyNotFound(OrthancError):
    """No Orthanc study matches the ID or Study Instance UID asked for (or it was deleted meanwhile)."""


class RouteError(WorkflowError):
    """A route could not do its work. Messages name the route, the destination and Orthanc's reason."""


class DestinationUnknown(RouteError):
    """Orthanc knows no modality or peer of that name, and the config does not say how to reach it."""


class CopyFailed(RouteError):
    """Orthanc's modify or anonymize job failed; the original study is untouched."""


class DeliveryFailed(RouteError):
    """The destination did not confirm every instance (unreachable, refused, fewer instances than sent).

    Safe to retry: a C-STORE of the same instances again is accepted by archives (same SOP Instance UIDs)."""
