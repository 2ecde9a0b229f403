"""Read an HL7 v2 acknowledgement. Pure: bytes in, a verdict out.

The ACK is read by splitting, not with a full HL7 parser, so that it works whatever version the partner writes
in MSH-12 (2.9.1 included), whatever line ends it uses (CR, CRLF, LF) and whether or not it kept the MLLP
framing bytes. Only MSH (for the delimiters), MSA and ERR are looked at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VT, FS = b"\x0b", b"\x1c"  # MLLP start and end block
ACCEPT_CODES = frozenset({"AA", "CA"})
ERROR_CODES = frozenset({"AE", "CE"})  # the partner read the message and refused its content
REJECT_CODES = frozenset({"AR", "CR"})  # the partner could not take the message now (or at all)
_MEANING = {
    "AA": "application accept",
    "CA": "commit accept",
    "AE": "application error",
    "CE": "commit error",
    "AR": "application reject",
    "CR": "commit reject",
}


@dataclass(frozen=True)
class AckResult:
    """What an answer says about our message.

    ``accepted`` is True only for AA/CA whose MSA-2 equals the control id we sent. ``code`` is MSA-1 (None when
    there is no MSA), ``control_id`` MSA-2, ``text`` the partner's explanation (MSA-3 and ERR texts joined by
    "; "). ``problem`` is one sentence for an operator when not accepted, else None.
    """

    accepted: bool
    code: str | None
    control_id: str | None
    text: str | None
    problem: str | None


def decode_lenient(raw: bytes) -> str:
    """Bytes from a partner as text: UTF-8 when valid, else Latin-1 (which decodes any byte)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def strip_framing(raw: bytes) -> bytes:
    """Drop the MLLP start block and everything from the end block on, if present."""
    start = raw.find(VT)
    if start != -1:
        raw = raw[start + 1 :]
    end = raw.find(FS)
    return raw if end == -1 else raw[:end]


def segments(raw: bytes) -> list[str]:
    """The segments of a message, framing removed and CR, CRLF or LF all taken as segment ends."""
    text = decode_lenient(strip_framing(raw))
    return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


def parse_ack(raw: bytes, expected_control_id: str) -> AckResult:
    """Judge ``raw`` (one answer, framed or not) as the acknowledgement of message ``expected_control_id``.

    Never raises on malformed input: anything that is not an HL7 message with an MSA segment comes back as not
    accepted, with the reason in ``problem``.
    """
    lines = segments(raw)
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        return _refused(None, None, None, f"the answer is not an HL7 message ({_describe(raw)})")
    d = _Delimiters.of(lines[0])
    found = next((line.split(d.field) for line in lines if line.startswith("MSA" + d.field)), None)
    if found is None:
        return _refused(None, None, None, "the answer is an HL7 message without an MSA segment (not an ACK)")
    msa: list[str] = found

    def msa_field(n: int) -> str | None:
        value = msa[n].split(d.component)[0].strip() if len(msa) > n else ""
        return value or None

    code = (msa_field(1) or "").upper() or None
    control_id = msa_field(2)
    texts = [d.unescape(msa[3]).strip()] if len(msa) > 3 else []
    for line in lines:
        if line.startswith("ERR" + d.field):
            texts.extend(_err_texts(line.split(d.field), d))
    text = "; ".join(dict.fromkeys(t for t in texts if t)) or None

    if code not in _MEANING:
        return _refused(code, control_id, text, f"the ACK has an unknown acknowledgement code {code!r} in MSA-1")
    if control_id != expected_control_id:
        return _refused(
            code,
            control_id,
            text,
            f"the ACK is for message {control_id or '(none)'}, not for {expected_control_id} (MSA-2)",
        )
    if code in ACCEPT_CODES:
        return AckResult(True, code, control_id, text, None)
    because = f": {text}" if text else " (no reason given)"
    return _refused(code, control_id, text, f"the partner answered {code} ({_MEANING[code]}){because}")


def _refused(code: str | None, control_id: str | None, text: str | None, problem: str) -> AckResult:
    return AckResult(False, code, control_id, text, problem)


def _describe(raw: bytes) -> str:
    """A short, printable description of a non-HL7 answer (e.g. the status line of an HTTP page)."""
    body = raw.strip(b"\x0b\x1c\r\n\t ")
    if not body:
        return "it is empty"
    first = decode_lenient(body).splitlines()[0][:40]
    return "it begins with " + repr("".join(c if c.isprintable() else "." for c in first))


@dataclass(frozen=True)
class _Delimiters:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str

    @classmethod
    def of(cls, msh: str) -> _Delimiters:
        """The delimiters an MSH segment declares (MSH-1 and MSH-2), defaults for any it leaves out."""
        field = msh[3]
        declared = msh[4:].split(field, 1)[0]
        chars = [declared[i] if len(declared) > i else default for i, default in enumerate("^~\\&")]
        return cls(field, *chars)

    def unescape(self, value: str) -> str:
        r"""Undo escapes of delimiters (\F\ \S\ \T\ \R\ \E\) and hex (\Xhh\); formatting ones are dropped."""
        if self.escape not in value:
            return value
        table = {"F": self.field, "S": self.component, "T": self.subcomponent, "R": self.repetition, "E": self.escape}

        def replace(match: re.Match[str]) -> str:
            body = match.group(1)
            if body in table:
                return table[body]
            if re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", body):
                return decode_lenient(bytes.fromhex(body[1:]))
            return ""  # formatting escapes such as \.br\ or \H\ carry no text

        esc = re.escape(self.escape)
        return re.sub(f"{esc}([^{esc}]*){esc}", replace, value)


def _err_texts(err: list[str], d: _Delimiters) -> list[str]:
    """Human-readable parts of an ERR segment, for HL7 2.5+ (ERR-8, ERR-7, ERR-3) and older (ERR-1.4)."""

    def components(n: int) -> list[str]:
        return err[n].split(d.component) if len(err) > n else []

    def words(parts: list[str]) -> str:
        return " ".join(d.unescape(p).strip() for p in parts if p.strip())

    texts = [d.unescape(err[n]).strip() for n in (8, 7) if len(err) > n]  # user message, diagnostic information
    texts.append(words(components(3)[:2]))  # 2.5+: HL7 error code as CWE: code^text^table
    location = components(1)  # up to 2.4: ELD, whose 4th component is a CE written with subcomponents
    if len(location) > 3:
        texts.append(words(location[3].split(d.subcomponent)[:2]))
    return texts
