"""Build the HL7 v2 "study available" message from one report row. Pure: no network, no disk, no clock.

Contract of :func:`build_message`:

* The same row, settings, control id, ``now`` and ``update`` give the same bytes.
* Every value is escaped (``| ^ ~ \\ &`` become ``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\``; control characters become
  ``\\Xhh\\``), so no value can change the message's structure or break its MLLP framing.
* A value that is not available (``None``, empty, NaN) leaves its field empty: never ``None``, never ``0``.
* The bytes are encoded in exactly the charset MSH-18 names (nothing for ASCII). Characters the charset cannot
  carry follow ``settings.unrepresentable``; each affected field is reported once in ``warnings`` by its HL7
  position, never with its content. ``reject`` raises :class:`~tasks.errors.Hl7EncodingError`.
* Segments are each terminated by CR (the HL7 segment terminator); there is no MLLP framing.

What goes where (all message types carry MSH, PID, PV1, OBR and the OBX observations):

* PID-3 patient ID as CX with CX.4 = IssuerOfPatientID or ``patient_id_authority``; PID-5 the DICOM PN
  (family^given^middle^prefix^suffix) reordered into XPN (family^given^middle^suffix^prefix), trailing empty
  components trimmed; PID-7 birth date; PID-8 sex.
* PV1-2 "U" (patient class unknown to an image archive).
* ORC (ORM^O01, OMG^O19, OMI^O23): ORC-1 "SC", ORC-2/3 accession, ORC-5 "CM", ORC-9 ``now``.
* OBR: OBR-2/3 and OBR-18 accession, OBR-4.2 study description, OBR-7 study date and time, OBR-16 referring
  physician as XCN (empty ID, then the name ordered like XPN), OBR-22 ``now``, OBR-24 modality, OBR-25 "F"
  (or "C" when ``update``).
* OBX 1: OBX-3 ``113014^DICOM Study^DCM``, OBX-5 the Study Instance UID (ST). Then one OBX per available report
  value that has no place above: numbers as NM with UCUM units in OBX-6 for the dose columns, text as ST;
  OBX-3 = column^label^L. OBX-11 "F" (or "C").
* IPC (OMI^O23): IPC-1 accession, IPC-2 requested procedure ID (accession), IPC-3 Study Instance UID,
  IPC-4 scheduled procedure step ID (accession), IPC-5 modality.
* Finally ``settings.field_map`` puts any report column into any field (or component) of the first segment
  of that name.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from tasks.errors import Hl7EncodingError
from tasks.hl7_settings import FIELD_PATH, MESSAGE_SEGMENTS, Hl7Settings

FIELD_SEPARATOR = "|"
ENCODING_CHARACTERS = "^~\\&"
SEGMENT_TERMINATOR = "\r"
STUDY_UID_OBSERVATION = "113014^DICOM Study^DCM"

# HL7 charset name (MSH-18, as configured) -> Python codec that produces exactly those bytes.
CODECS: dict[str, str] = {"UNICODE UTF-8": "utf-8", "8859/1": "latin-1", "ASCII": "ascii"}

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\"}

# Letters NFKD does not decompose into a base letter plus accents.
_TRANSLITERATIONS = {
    "Ł": "L", "ł": "l", "ß": "ss", "ẞ": "SS", "Æ": "AE", "æ": "ae", "Ø": "O", "ø": "o", "Œ": "OE", "œ": "oe",
    "Đ": "D", "đ": "d", "Ð": "D", "ð": "d", "Þ": "Th", "þ": "th", "Ħ": "H", "ħ": "h", "Ŧ": "T", "ŧ": "t",
    "\u0131": "i",  # dotless i
    "\u2018": "'", "\u2019": "'", "\u201a": ",", "\u201c": '"', "\u201d": '"', "\u201e": '"',  # quotes
    "\u2013": "-", "\u2014": "-", "\u20ac": "EUR",  # dashes, euro sign
}  # fmt: skip

# Report columns that have a place of their own; every other available column becomes an OBX.
_PLACED_COLUMNS = frozenset(
    {
        "study_instance_uid", "accession_number", "patient_id", "issuer_of_patient_id", "patient_name",
        "patient_birth_date", "patient_sex", "study_date", "study_time", "study_description", "modalities",
        "referring_physician",
    }
)  # fmt: skip

# column -> (OBX-3 text, OBX-6 units as CE in UCUM); other columns use their name and no units.
_OBSERVATIONS: dict[str, tuple[str, str]] = {
    "orthanc_study_id": ("Orthanc study ID", ""),
    "institution_name": ("Institution", ""),
    "station_names": ("Station names", ""),
    "number_of_series": ("Number of series", ""),
    "number_of_instances": ("Number of instances", ""),
    "number_of_frames": ("Number of frames", ""),
    "sources": ("Sources", ""),
    "ctdivol_mgy": ("CTDIvol", "mGy^mGy^UCUM"),
    "dlp_mgycm": ("DLP", "mGy.cm^mGy.cm^UCUM"),
    "dap_gycm2": ("DAP", "Gy.cm2^Gy.cm2^UCUM"),
    "kvp": ("kVp", "kV^kV^UCUM"),
    "exposure_mas": ("Exposure", "mA.s^mAs^UCUM"),
    "dose_source": ("Dose source", ""),
    "warnings": ("Report warnings", ""),
    "routes": ("Routes", ""),
    "routed_study_uids": ("Study Instance UID per destination", ""),
}

# Modalities that describe documents rather than the acquisition; OBR-24/IPC-5 prefer an imaging one.
_NON_IMAGING = frozenset({"SR", "PR", "KO", "DOC", "REG", "SEG", "OT"})
_SEX = {"M": "M", "F": "F", "O": "O"}
_CONTROL_ID = re.compile(r"[A-Za-z0-9._:+\-]{1,20}")  # MSH-10 is ST(20) up to HL7 2.6
_DATE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")


@dataclass(frozen=True)
class OutgoingMessage:
    """One HL7 message ready to be framed and sent.

    ``wire`` is ``text`` encoded with ``charset`` (the Python codec matching MSH-18), without MLLP framing.
    ``warnings`` say which fields lost characters to the charset or were left empty for a reason; they never
    contain the values themselves.
    """

    wire: bytes
    text: str
    control_id: str
    message_type: str
    charset: str
    warnings: list[str]


def escape(value: str) -> str:
    """Escape the five HL7 delimiters and control characters of one value (default encoding characters)."""
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or char == "\x7f":
            out.append(f"\\X{ord(char):02X}\\")  # a raw CR would end the segment, VT/FS the MLLP block
        else:
            out.append(char)
    return "".join(out)


def transliterate(char: str) -> str | None:
    """An ASCII stand-in for one character (Ł -> L, ś -> s, ß -> ss), or None when there is no sensible one."""
    if char in _TRANSLITERATIONS:
        return _TRANSLITERATIONS[char]
    base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    return base if base and base.isascii() else None


def xpn_components(pn: str | None) -> list[str]:
    """DICOM PN (family^given^middle^prefix^suffix) -> XPN order (family^given^middle^suffix^prefix), unescaped.

    The alphabetic component group is used (the first non-empty one if it is empty); components are stripped
    of the padding DICOM allows and trailing empty ones are dropped.
    """
    if not pn:
        return []
    groups = pn.split("=")
    group = next((g for g in groups if g.replace("^", "").strip()), "")
    parts = [p.strip() for p in group.split("^")][:5]
    parts += [""] * (5 - len(parts))
    family, given, middle, prefix, suffix = parts
    return _trim([family, given, middle, suffix, prefix])


def build_message(
    row: Mapping[str, Any], settings: Hl7Settings, *, control_id: str, now: datetime, update: bool
) -> OutgoingMessage:
    """Build the message configured in ``settings.message_type`` for one report row.

    ``control_id`` becomes MSH-10 and must be reused unchanged when the same message is resent; it must be 1-20
    characters of ``A-Z a-z 0-9 . _ : + -`` (ValueError otherwise: a caller bug). ``now`` is the message time
    (MSH-7, ORC-9, OBR-22); with a timezone it is written with its UTC offset. ``update`` marks a correction of
    a study already notified (result status "C" instead of "F").

    Raises :class:`~tasks.errors.Hl7EncodingError` when ``settings.unrepresentable`` is "reject" and a value
    cannot be written in ``settings.charset``.
    """
    if not _CONTROL_ID.fullmatch(control_id):
        raise ValueError("control_id must be 1-20 characters of A-Z a-z 0-9 . _ : + -")
    w = _Writer(settings)
    status = "C" if update else "F"
    timestamp = _timestamp(now)
    accession = w.text(row.get("accession_number"), "OBR-18")
    modality = w.text(_main_modality(row.get("modalities")), "OBR-24")
    study_uid = w.text(row.get("study_instance_uid"), "OBX-5")

    segments = [_msh(w, settings, control_id, timestamp), _pid(w, row), _pv1()]
    if settings.message_type != "ORU^R01":
        segments.append(_orc(accession, timestamp))
    segments.append(_obr(w, row, accession, modality, timestamp, status))
    segments.extend(_observations(w, row, study_uid, status))
    if settings.message_type == "OMI^O23":
        segments.append(_ipc(accession, study_uid, modality))
    _apply_field_map(w, row, settings.field_map, segments)

    warnings = w.finish()
    text = "".join(segment.render() + SEGMENT_TERMINATOR for segment in segments)
    return OutgoingMessage(
        wire=text.encode(w.codec),  # cannot fail: every value went through _Writer.fit
        text=text,
        control_id=control_id,
        message_type=settings.message_type,
        charset=w.codec,
        warnings=warnings,
    )


class _Segment:
    """One segment as a sparse list of already-escaped fields (index = HL7 field number)."""

    def __init__(self, name: str, fields: Mapping[int, str] | None = None) -> None:
        self.name = name
        self.fields: dict[int, str] = dict(fields or {})

    def set_component(self, field: int, component: int, value: str) -> None:
        # Safe to split: every value in a field is escaped, so a raw ^ only ever separates components.
        parts = self.fields.get(field, "").split("^")
        parts += [""] * (component - len(parts))
        parts[component - 1] = value
        self.fields[field] = "^".join(_trim(parts))

    def render(self) -> str:
        used = [n for n, value in self.fields.items() if value]
        last = max(used, default=0)
        if self.name == "MSH":  # MSH-1 is the field separator itself, MSH-2 the encoding characters
            return "MSH" + FIELD_SEPARATOR + FIELD_SEPARATOR.join(self.fields.get(n, "") for n in range(2, last + 1))
        return FIELD_SEPARATOR.join([self.name, *(self.fields.get(n, "") for n in range(1, last + 1))])


class _Writer:
    """Turns report values into escaped field text in the configured charset and remembers what it changed."""

    def __init__(self, settings: Hl7Settings) -> None:
        self.settings = settings
        self.codec = CODECS[settings.charset]
        self.notes: list[str] = []
        self._changed: dict[str, list[int]] = {}  # field label -> [characters changed, of which '?']

    def fit(self, value: str, label: str) -> str:
        """``value`` with every character the codec cannot carry replaced per the policy."""
        value = unicodedata.normalize("NFC", value)  # "e" + combining diaeresis is "ë", which 8859/1 has
        if _encodable(value, self.codec):
            return value
        out = []
        for char in value:
            if _encodable(char, self.codec):
                out.append(char)
                continue
            counts = self._changed.setdefault(label, [0, 0])
            counts[0] += 1
            stand_in = transliterate(char) if self.settings.unrepresentable == "transliterate" else None
            if stand_in is None:
                stand_in = "?"
                counts[1] += 1
            out.append(stand_in)
        return "".join(out)

    def text(self, value: Any, label: str) -> str:
        """One value as escaped field text; "" when not available."""
        cleaned = _clean(value)
        return "" if cleaned is None else escape(self.fit(cleaned, label))

    def components(self, parts: list[str], label: str) -> str:
        """Unescaped components -> one escaped field, trailing empty components trimmed."""
        return "^".join(_trim([escape(self.fit(part, label)) for part in parts]))

    def hd(self, value: str, label: str) -> str:
        """A configured HD (application/facility): ^ separates components, the rest is escaped."""
        return self.components(value.split("^"), label) if value else ""

    def finish(self) -> list[str]:
        """The warnings, or Hl7EncodingError when the policy is reject and a character did not fit."""
        charset = self.settings.charset
        if self._changed and self.settings.unrepresentable == "reject":
            fields = ", ".join(f"{label} ({counts[0]})" for label, counts in self._changed.items())
            raise Hl7EncodingError(
                f"characters not representable in {charset} in {fields}; the HL7 settings say "
                "unrepresentable=reject, so no message was built"
            )
        warnings = []
        for label, (changed, questioned) in self._changed.items():
            subject = (
                f"1 character not representable in {charset} was"
                if changed == 1
                else (f"{changed} characters not representable in {charset} were")
            )
            if self.settings.unrepresentable == "replace":
                how = "replaced by '?'"
            elif questioned:
                how = f"transliterated ({questioned} without an equivalent became '?')"
            else:
                how = "transliterated"
            warnings.append(f"{label}: {subject} {how}")
        return warnings + self.notes


def _encodable(value: str, codec: str) -> bool:
    try:
        value.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _trim(parts: list[str]) -> list[str]:
    parts = list(parts)
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _clean(value: Any) -> str | None:
    """A report value as text, or None when it is not available. Numbers are written in HL7 NM form."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return format(Decimal(repr(value)), "f")  # shortest exact digits, never 1e-05 (not valid NM)
    text = str(value).strip()
    return text or None


def _timestamp(now: datetime) -> str:
    return now.strftime("%Y%m%d%H%M%S%z")  # %z is empty for a naive datetime


def _hl7_date(value: Any) -> str | None:
    """DICOM DA (YYYYMMDD, or the old YYYY.MM.DD) -> HL7 date; None when not available or not a date."""
    text = _clean(value)
    match = _DATE.fullmatch(text) if text else None
    return "".join(match.groups()) if match else None


def _hl7_time(value: Any) -> str | None:
    """DICOM TM (HH[MM[SS[.ffffff]]]) -> HL7 time with at most four fractional digits; None when invalid."""
    text = _clean(value)
    match = _TIME.fullmatch(text) if text else None
    if not match:
        return None
    hours, minutes, seconds, fraction = match.groups()
    out = hours + (minutes or "") + (seconds or "")
    return out + f".{fraction[:4]}" if fraction else out


def _main_modality(value: Any) -> str | None:
    text = _clean(value)
    if text is None:
        return None
    modalities = [m.strip() for m in re.split(r"[,\\]", text) if m.strip()]
    imaging = [m for m in modalities if m.upper() not in _NON_IMAGING]
    return (imaging or modalities or [None])[0]


def _msh(w: _Writer, settings: Hl7Settings, control_id: str, timestamp: str) -> _Segment:
    code, trigger = settings.message_type.split("^")
    version = tuple(int(part) for part in settings.version.split("."))
    # MSH-9.3 (message structure) exists from 2.3.1 on.
    message_type = f"{code}^{trigger}^{code}_{trigger}" if version >= (2, 3, 1) else f"{code}^{trigger}"
    return _Segment(
        "MSH",
        {
            2: ENCODING_CHARACTERS,
            3: w.hd(settings.sending_application, "MSH-3"),
            4: w.hd(settings.sending_facility, "MSH-4"),
            5: w.hd(settings.receiving_application, "MSH-5"),
            6: w.hd(settings.receiving_facility, "MSH-6"),
            7: timestamp,
            9: message_type,
            10: control_id,
            11: settings.processing_id,
            12: settings.version,
            18: "" if settings.charset == "ASCII" else settings.charset,
        },
    )


def _pid(w: _Writer, row: Mapping[str, Any]) -> _Segment:
    patient_id = w.text(row.get("patient_id"), "PID-3")
    authority = w.text(row.get("issuer_of_patient_id"), "PID-3")  # IssuerOfPatientID is one HD namespace
    if not authority and w.settings.patient_id_authority:  # configured as namespace[&universal id&type]
        authority = "&".join(_trim([escape(w.fit(p, "PID-3")) for p in w.settings.patient_id_authority.split("&")]))
    birth_date = _hl7_date(row.get("patient_birth_date"))
    if birth_date is None and _clean(row.get("patient_birth_date")) is not None:
        w.notes.append("PID-7: the birth date is not a DICOM date (YYYYMMDD) and was left empty")
    sex = _clean(row.get("patient_sex"))
    return _Segment(
        "PID",
        {
            1: "1",
            3: "^".join(_trim([patient_id, "", "", authority])) if patient_id else "",
            5: w.components(xpn_components(_clean(row.get("patient_name"))), "PID-5"),
            7: birth_date or "",
            8: _SEX.get(sex.upper(), "U") if sex else "",
        },
    )


def _pv1() -> _Segment:
    return _Segment("PV1", {1: "1", 2: "U"})


def _orc(accession: str, timestamp: str) -> _Segment:
    return _Segment("ORC", {1: "SC", 2: accession, 3: accession, 5: "CM", 9: timestamp})


def _obr(w: _Writer, row: Mapping[str, Any], accession: str, modality: str, timestamp: str, status: str) -> _Segment:
    study_date = _hl7_date(row.get("study_date"))
    study_time = _hl7_time(row.get("study_time"))
    if study_time is None and _clean(row.get("study_time")) is not None:
        w.notes.append("OBR-7: the study time is not a DICOM time (HHMMSS) and was left out")
    description = w.text(row.get("study_description"), "OBR-4")
    physician = xpn_components(_clean(row.get("referring_physician")))
    return _Segment(
        "OBR",
        {
            1: "1",
            2: accession,
            3: accession,
            4: f"^{description}" if description else "",
            7: (study_date + (study_time or "")) if study_date else "",
            16: w.components(["", *physician], "OBR-16") if physician else "",
            18: accession,
            22: timestamp,
            24: modality,
            25: status,
        },
    )


def _observations(w: _Writer, row: Mapping[str, Any], study_uid: str, status: str) -> list[_Segment]:
    if not study_uid:
        w.notes.append("OBX-5: the study has no Study Instance UID; the DICOM Study observation is empty")
    segments = [_Segment("OBX", {1: "1", 2: "ST", 3: STUDY_UID_OBSERVATION, 5: study_uid, 11: status})]
    for column, value in row.items():
        if column in _PLACED_COLUMNS or _clean(value) is None:
            continue
        label, units = _OBSERVATIONS.get(column, (column, ""))
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        segments.append(
            _Segment(
                "OBX",
                {
                    1: str(len(segments) + 1),
                    2: "NM" if numeric else "ST",
                    3: "^".join([w.text(column, f"OBX-3 ({column})"), w.text(label, f"OBX-3 ({column})"), "L"]),
                    5: w.text(value, f"OBX-5 ({column})"),
                    6: units if numeric else "",
                    11: status,
                },
            )
        )
    return segments


def _ipc(accession: str, study_uid: str, modality: str) -> _Segment:
    return _Segment(
        "IPC", {1: accession, 2: accession, 3: study_uid, 4: accession, 5: f"{modality}^^DCM" if modality else ""}
    )


def _apply_field_map(
    w: _Writer, row: Mapping[str, Any], field_map: Mapping[str, str], segments: list[_Segment]
) -> None:
    for path, column in field_map.items():
        match = FIELD_PATH.fullmatch(path)
        if match is None:  # Hl7Settings validates paths; this guards hand-built settings
            raise ValueError(f"field_map path {path!r} is not like PV1-3 or OBR-4.1")
        segment = next((s for s in segments if s.name == match["segment"]), None)
        if segment is None:
            raise ValueError(
                f"field_map path {path!r}: {MESSAGE_SEGMENTS[w.settings.message_type]} has no such segment"
            )
        if column not in row:
            w.notes.append(f"field_map: the report has no column {column!r}; {path} was left empty")
        value = w.text(row.get(column), path)
        if match["component"]:
            segment.set_component(int(match["field"]), int(match["component"]), value)
        else:
            segment.fields[int(match["field"])] = value


MASK = "***"


def masked(text: str) -> str:
    """The message as text for people who may not see patient data (the Prefect UI): every PID field after
    PID-1 and the referring physician (OBR-16) become ``***``; segments end in newlines for display."""
    lines = []
    for segment in text.split(SEGMENT_TERMINATOR):
        if not segment:
            continue
        fields = segment.split(FIELD_SEPARATOR)
        if fields[0] == "PID":
            fields = fields[:2] + [MASK if f else "" for f in fields[2:]]
        elif fields[0] == "OBR" and len(fields) > 16 and fields[16]:
            fields[16] = MASK
        lines.append(FIELD_SEPARATOR.join(fields))
    return "\n".join(lines)
