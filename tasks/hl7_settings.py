"""Settings of the HL7 v2 "study available" notification: where to send it, what it looks like.

One section (``hl7:``) of the site configuration. Pure data: no Prefect, no sockets. The message builder
(:mod:`tasks.hl7_messages`) and the MLLP sender (:mod:`tasks.mllp`) take an :class:`Hl7Settings` as an argument.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MessageType = Literal["ORU^R01", "ORM^O01", "OMG^O19", "OMI^O23"]
Charset = Literal["UNICODE UTF-8", "8859/1", "ASCII"]
Unrepresentable = Literal["transliterate", "replace", "reject"]

# Segments each message type carries, in order; a field_map path must name one of them.
MESSAGE_SEGMENTS: dict[str, tuple[str, ...]] = {
    "ORU^R01": ("MSH", "PID", "PV1", "OBR", "OBX"),
    "ORM^O01": ("MSH", "PID", "PV1", "ORC", "OBR", "OBX"),
    "OMG^O19": ("MSH", "PID", "PV1", "ORC", "OBR", "OBX"),
    "OMI^O23": ("MSH", "PID", "PV1", "ORC", "OBR", "OBX", "IPC"),
}

# The HL7 version that introduced each message type: an older MSH-12 would announce a message the
# receiver's version does not define.
_INTRODUCED_IN = {"ORU^R01": (2, 1), "ORM^O01": (2, 1), "OMG^O19": (2, 4), "OMI^O23": (2, 5)}

# "PID-11" (a whole field) or "OBR-4.1" (one component). MSH is built from these settings and is not mappable.
FIELD_PATH = re.compile(
    r"(?P<segment>PID|PV1|ORC|OBR|OBX|IPC)-(?P<field>[1-9][0-9]{0,2})(?:\.(?P<component>[1-9][0-9]?))?"
)
_VERSION = re.compile(r"2\.[0-9](?:\.[0-9])?")
_HD = re.compile(r"[^|~\\&\r\n]*")  # HD components may be given with ^; the other delimiters are not allowed


class Hl7Settings(BaseModel):
    """Where and how the "study available" HL7 v2 message is sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="Send an HL7 message when a study is stable and reported.")
    host: str = Field("127.0.0.1", description="Host name or address of the receiving HL7 system (MLLP).")
    port: int = Field(2575, ge=1, le=65535, description="TCP port of the receiver's MLLP listener.")
    tls: bool = Field(False, description="Wrap the MLLP connection in TLS (the receiver's name is verified).")
    tls_ca_file: Path | None = Field(
        None, description="PEM file of the CA that signed the receiver's certificate. Default: the system CAs."
    )
    connect_timeout_seconds: float = Field(5.0, gt=0, le=300, description="Give up connecting after this long.")
    ack_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Give up waiting for the complete ACK after this long (one attempt)."
    )
    retries: int = Field(
        3,
        ge=0,
        le=20,
        description="Extra attempts after the first when the receiver does not answer, answers AR/CR, answers "
        "something that is not a valid ACK for our message, or breaks the connection. Safe because every attempt "
        "carries the same message control id (MSH-10), so the receiver can recognise a repeat. AE/CE "
        "(the receiver read the message and refused its content) is never resent.",
    )
    retry_backoff_seconds: float = Field(
        2.0, ge=0, le=3600, description="Pause before the first retry; doubled before each further retry."
    )
    message_type: MessageType = Field(
        "ORU^R01",
        description="ORU^R01: result with an OBX carrying the Study Instance UID (IHE results distribution). "
        "ORM^O01 / OMG^O19: order status update (ORC-1=SC, ORC-5=CM). OMI^O23: imaging order with IPC "
        "(accession, Study Instance UID, modality).",
    )
    version: str = Field("2.5", description="HL7 version written to MSH-12, e.g. 2.3.1, 2.5, 2.5.1.")
    sending_application: str = Field(
        "ORTHANC-WF", description="MSH-3 (HD). Components may be given with ^, e.g. ORTHANC-WF^1.2.3^ISO."
    )
    sending_facility: str = Field("", description="MSH-4 (HD).")
    receiving_application: str = Field("", description="MSH-5 (HD).")
    receiving_facility: str = Field("", description="MSH-6 (HD).")
    charset: Charset = Field(
        "UNICODE UTF-8",
        description="Character set of the bytes on the wire, written to MSH-18. 'ASCII' leaves MSH-18 empty "
        "(the HL7 default) and sends ASCII only.",
    )
    unrepresentable: Unrepresentable = Field(
        "transliterate",
        description="Characters the charset cannot carry: 'transliterate' (Ł->L, ś->s, ß->ss; '?' when there is "
        "no sensible letter), 'replace' (always '?'), or 'reject' (the message is not built). Each affected "
        "field is reported once as a warning, without its content.",
    )
    processing_id: str = Field("P", description="MSH-11: P production, T training, D debugging.")
    patient_id_authority: str = Field(
        "",
        description="Assigning authority (PID-3, CX.4) used when the study carries no IssuerOfPatientID: a "
        "namespace, or namespace&universal id&type (e.g. HOSP&1.2.3.4&ISO).",
    )
    show_phi_in_ui: bool = Field(
        False,
        description="Show the sent message with patient fields in the Prefect UI. Off: PID and the referring "
        "physician are masked in the run's HL7 artifact (every UI user can read artifacts).",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Extra placements, applied after the built-in ones: HL7 field path -> report column, e.g. "
        "{'PV1-3': 'station_names', 'OBR-4.1': 'requested_procedure_code'}. A path is SEG-n (the whole field) or "
        "SEG-n.c (one component) of the first segment of that name (PID, PV1, ORC, OBR, OBX, IPC). The column's "
        "value replaces what was there; a missing or empty value empties it.",
    )

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION.fullmatch(v):
            raise ValueError("version must look like 2.3, 2.3.1, 2.5 or 2.5.1")
        return v

    @field_validator("processing_id")
    @classmethod
    def _processing_id(cls, v: str) -> str:
        if v not in ("P", "T", "D"):
            raise ValueError("processing_id must be P (production), T (training) or D (debugging)")
        return v

    @field_validator("sending_application", "sending_facility", "receiving_application", "receiving_facility")
    @classmethod
    def _hd(cls, v: str) -> str:
        if not _HD.fullmatch(v):
            raise ValueError("may contain ^ between components but not | ~ \\ & or line breaks")
        return v

    @field_validator("patient_id_authority")
    @classmethod
    def _authority(cls, v: str) -> str:
        if re.search(r"[|^~\\\r\n]", v):
            raise ValueError("may contain & between HD components but not | ^ ~ \\ or line breaks")
        return v

    @field_validator("field_map")
    @classmethod
    def _field_map(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [path for path in v if not FIELD_PATH.fullmatch(path)]
        if bad:
            raise ValueError(
                f"field_map paths must look like PV1-3 or OBR-4.1 (segments PID, PV1, ORC, OBR, OBX, IPC): {bad}"
            )
        empty = [path for path, column in v.items() if not column.strip()]
        if empty:
            raise ValueError(f"field_map entries need a report column name: {empty}")
        return v

    @model_validator(mode="after")
    def _fits_message_type(self) -> Hl7Settings:
        version = tuple(int(part) for part in self.version.split(".")[:2])
        introduced = _INTRODUCED_IN[self.message_type]
        if version < introduced:
            raise ValueError(
                f"{self.message_type} is defined from HL7 {introduced[0]}.{introduced[1]} on; version is {self.version}"
            )
        segments = MESSAGE_SEGMENTS[self.message_type]
        foreign = [path for path in self.field_map if path.split("-")[0] not in segments]
        if foreign:
            raise ValueError(f"field_map names segments that {self.message_type} does not carry: {foreign}")
        return self
