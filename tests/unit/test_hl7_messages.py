"""build_message: tables of report rows -> HL7 fields, read back by splitting and with hl7apy. No server, no clock.

Cases: C12 (charset on the wire, MSH-18, unrepresentable characters), C14 (PN -> XPN/XCN order), escaping of
the five delimiters in every kind of field, missing values, each message type's key fields, field_map.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import hl7
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydantic import ValidationError

from tasks.errors import Hl7EncodingError, WorkflowError
from tasks.hl7_messages import CODECS, OutgoingMessage, build_message, escape, transliterate
from tasks.hl7_settings import MESSAGE_SEGMENTS, Hl7Settings
from tasks.mllp import frame
from tests.conftest import CASES

NOW = datetime(2024, 3, 15, 10, 16, 0)
DELIMITERS = "A|B^C~D\\E&F"
ESCAPED = "A\\F\\B\\S\\C\\R\\D\\E\\E\\T\\F"
PN_DELIMITERS = "O|Brien~\\&Co^Ana"  # ^ separates PN components, the other four are data
PN_ESCAPED = "O\\F\\Brien\\R\\\\E\\\\T\\Co^Ana"


def report_row(**overrides: Any) -> dict[str, Any]:
    """A complete report row as the report builder produces it; overrides replace or add columns."""
    row: dict[str, Any] = {
        "orthanc_study_id": "6b9e19d9-62094390-5f9ddb01-4a191ae7-9766b715",
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "accession_number": "ACC0001",
        "patient_id": "PID0001",
        "issuer_of_patient_id": None,
        "patient_name": "Rivera^Ana^Maria^Dr.^III",
        "patient_birth_date": "19700102",
        "patient_sex": "F",
        "study_date": "20240315",
        "study_time": "101500",
        "study_description": "CT Thorax",
        "modalities": "CT,SR",
        "institution_name": "Klinikum Nord",
        "station_names": "CT1",
        "referring_physician": "Smith^John^^Dr.",
        "number_of_series": 2,
        "number_of_instances": 120,
        "number_of_frames": 120,
        "sources": "CT-ROOM1",
        "ctdivol_mgy": 12.35,
        "dlp_mgycm": 456.7,
        "dap_gycm2": None,
        "kvp": 120,
        "exposure_mas": 250.5,
        "dose_source": "RDSR",
        "warnings": None,
    }
    row.update(overrides)
    return row


def build(row: dict[str, Any] | None = None, *, update: bool = False, **settings: Any) -> OutgoingMessage:
    return build_message(
        report_row() if row is None else row,
        Hl7Settings(**settings),
        control_id="MSG0001",
        now=NOW,
        update=update,
    )


def segments(message: OutgoingMessage) -> list[list[str]]:
    """The message split into segments and fields; for MSH, index n is MSH-n as for every other segment."""
    assert message.text.endswith("\r") and "\n" not in message.text
    out = []
    for line in message.text.split("\r")[:-1]:
        fields = line.split("|")
        out.append(["MSH", "|", *fields[1:]] if fields[0] == "MSH" else fields)
    return out


def field(message: OutgoingMessage, path: str, occurrence: int = 0) -> str:
    """Raw (escaped) value at a path like PID-5 or OBR-4.2 of the n-th segment of that name; "" if absent."""
    name, _, rest = path.partition("-")
    number, _, component = rest.partition(".")
    found = [s for s in segments(message) if s[0] == name]
    assert len(found) > occurrence, f"no {name} segment #{occurrence} in {message.text!r}"
    fields = found[occurrence]
    value = fields[int(number)] if len(fields) > int(number) else ""
    if component:
        parts = value.split("^")
        value = parts[int(component) - 1] if len(parts) >= int(component) else ""
    return value


def observation(message: OutgoingMessage, column: str) -> list[str] | None:
    """The OBX segment whose OBX-3.1 is ``column``, or None."""
    for fields in segments(message):
        if fields[0] == "OBX" and fields[3].split("^")[0] == column:
            return fields + [""] * (12 - len(fields))
    return None


# --- C14: DICOM PN -> XPN (PID-5) and XCN (OBR-16) --------------------------------------------------------------

C14 = json.loads((CASES / "C14_expected_xpn.json").read_text())

NAMES = [
    pytest.param(C14["dicom_PatientName"], C14["expected_PID-5"], id="c14-prefix-suffix-swapped"),
    pytest.param(
        C14["also"]["name_with_trailing_empty_components"]["dicom"],
        C14["also"]["name_with_trailing_empty_components"]["expected_PID-5"],
        id="c14-trailing-empties-trimmed",
    ),
    pytest.param("Rivera", "Rivera", id="family-only"),
    pytest.param("Rivera^^^Dr.", "Rivera^^^^Dr.", id="prefix-only-goes-to-xpn5"),
    pytest.param("Rivera^Ana^^^III", "Rivera^Ana^^III", id="suffix-only-goes-to-xpn4"),
    pytest.param("Rivera ^Ana  ", "Rivera^Ana", id="dicom-padding-stripped"),
    pytest.param("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada^Tarou", id="alphabetic-group-used"),
    pytest.param("=山田^太郎", "山田^太郎", id="ideographic-when-no-alphabetic"),
    pytest.param(PN_DELIMITERS, PN_ESCAPED, id="delimiters-in-components-escaped"),
    pytest.param(None, "", id="none-is-empty"),
    pytest.param("", "", id="empty-is-empty"),
    pytest.param("^^^^", "", id="only-separators-is-empty"),
]


@pytest.mark.parametrize(("dicom", "xpn"), NAMES)
def test_patient_name_is_reordered_into_xpn(dicom: str | None, xpn: str) -> None:
    message = build(report_row(patient_name=dicom))
    assert field(message, "PID-5") == xpn


@pytest.mark.parametrize(("dicom", "xpn"), NAMES)
def test_referring_physician_is_xcn_with_empty_id_then_the_xpn_order(dicom: str | None, xpn: str) -> None:
    message = build(report_row(referring_physician=dicom))
    assert field(message, "OBR-16") == (f"^{xpn}" if xpn else "")


def test_c14_dicom_file_name_reaches_pid5_in_hl7_order() -> None:
    ds = pydicom.dcmread(CASES / "C14_pn_prefix_suffix.dcm")
    message = build(report_row(patient_name=str(ds.PatientName), referring_physician=str(ds.PatientName)))
    assert field(message, "PID-5") == C14["expected_PID-5"]
    assert field(message, "OBR-16") == "^" + C14["expected_PID-5"]
    assert field(message, "OBR-16.6") == "Dr."  # XCN.6 prefix, XCN.5 suffix
    assert field(message, "OBR-16.5") == "III"


# --- C12: charset on the wire ----------------------------------------------------------------------------------

C12 = json.loads((CASES / "C12_expected_hl7.json").read_text())


def c12_names(file: str) -> tuple[str, str]:
    ds = pydicom.dcmread(CASES / file)
    expected = C12["input_files"][file]
    assert (str(ds.PatientName), ds.InstitutionName) == (expected["PatientName"], expected["InstitutionName"])
    return str(ds.PatientName), ds.InstitutionName


def wire_field(message: OutgoingMessage, segment: str, number: int) -> bytes:
    line = next(s for s in message.wire.split(b"\r") if s.startswith(segment.encode() + b"|"))
    return line.split(b"|")[number]


@pytest.mark.parametrize(
    ("charset", "expected"),
    [
        pytest.param("UNICODE UTF-8", C12["expected"]["if_hl7_charset_utf8"], id="utf8"),
        pytest.param("8859/1", C12["expected"]["if_hl7_charset_latin1"], id="latin1"),
    ],
)
def test_c12_latin1_dicom_name_on_the_wire(charset: str, expected: dict[str, str]) -> None:
    name, institution = c12_names("C12_latin1_umlauts.dcm")
    message = build(report_row(patient_name=name, institution_name=institution), charset=charset)
    assert field(message, "MSH-18") == expected["MSH-18"]
    assert wire_field(message, "PID", 5).hex() == expected["wire_bytes_of_PID-5"]
    decoded = message.wire.decode(message.charset)
    assert decoded == message.text
    assert field(message, "PID-5") == expected["PID-5"]
    assert observation(message, "institution_name")[5] == "Klinikum Süd"
    assert "Ã" not in decoded and message.warnings == []


@pytest.mark.parametrize(
    ("charset", "policy", "pid5", "institution", "warned"),
    [
        pytest.param("UNICODE UTF-8", "reject", "Łukasiewicz^Zoë", "Szpital Św. Łukasza", [], id="utf8-carries-all"),
        pytest.param(
            "8859/1",
            "transliterate",
            "Lukasiewicz^Zoë",
            "Szpital Sw. Lukasza",
            [
                "PID-5: 1 character not representable in 8859/1 was transliterated",
                "OBX-5 (institution_name): 2 characters not representable in 8859/1 were transliterated",
            ],
            id="latin1-transliterate-keeps-e-diaeresis",
        ),
        pytest.param(
            "8859/1",
            "replace",
            "?ukasiewicz^Zoë",
            "Szpital ?w. ?ukasza",
            [
                "PID-5: 1 character not representable in 8859/1 was replaced by '?'",
                "OBX-5 (institution_name): 2 characters not representable in 8859/1 were replaced by '?'",
            ],
            id="latin1-replace",
        ),
        pytest.param(
            "ASCII",
            "transliterate",
            "Lukasiewicz^Zoe",
            "Szpital Sw. Lukasza",
            [
                "PID-5: 2 characters not representable in ASCII were transliterated",
                "OBX-5 (institution_name): 2 characters not representable in ASCII were transliterated",
            ],
            id="ascii-transliterate",
        ),
    ],
)
def test_c12b_utf8_name_follows_the_unrepresentable_policy(
    charset: str, policy: str, pid5: str, institution: str, warned: list[str]
) -> None:
    name, inst = c12_names("C12b_utf8_iso_ir_192.dcm")
    message = build(report_row(patient_name=name, institution_name=inst), charset=charset, unrepresentable=policy)
    assert message.charset == CODECS[charset]
    assert message.wire.decode(message.charset) == message.text  # one encoding for the whole message
    assert field(message, "PID-5") == pid5
    assert observation(message, "institution_name")[5] == institution
    assert message.warnings == warned
    assert not any("ukasiewicz" in w or "Zo" in w for w in message.warnings)  # no patient data in warnings


def test_c12b_reject_raises_a_domain_error_naming_fields_not_values() -> None:
    name, inst = c12_names("C12b_utf8_iso_ir_192.dcm")
    with pytest.raises(Hl7EncodingError) as caught:
        build(report_row(patient_name=name, institution_name=inst), charset="8859/1", unrepresentable="reject")
    assert isinstance(caught.value, WorkflowError) and not isinstance(caught.value, UnicodeError)
    text = str(caught.value)
    assert "PID-5 (1)" in text and "OBX-5 (institution_name) (2)" in text and "8859/1" in text
    assert "ukasiewicz" not in text and "Szpital" not in text


def test_ascii_leaves_msh18_empty_and_sends_ascii_only() -> None:
    name, inst = c12_names("C12_latin1_umlauts.dcm")
    message = build(report_row(patient_name=name, institution_name=inst), charset="ASCII")
    assert field(message, "MSH-18") == ""
    assert message.wire.isascii()
    assert field(message, "PID-5") == "Muller^Jurgen"
    assert message.warnings == [
        "PID-5: 2 characters not representable in ASCII were transliterated",
        "OBX-5 (institution_name): 1 character not representable in ASCII was transliterated",
    ]


@pytest.mark.parametrize(
    ("charset", "policy", "name", "pid5", "warning"),
    [
        ("ASCII", "transliterate", "Straße^Jörg", "Strasse^Jorg", "2 characters not representable in ASCII were "
         "transliterated"),
        ("ASCII", "transliterate", "Øster^Æsa", "Oster^AEsa", "2 characters"),
        ("ASCII", "transliterate", "山田^太郎", "??^??", "4 characters not representable in ASCII were "
         "transliterated (4 without an equivalent became '?')"),
        ("ASCII", "replace", "Straße^Jörg", "Stra?e^J?rg", "2 characters not representable in ASCII were replaced"),
        ("8859/1", "transliterate", "Zoe\u0308^Ana", "Zoë^Ana", None),  # combining diaeresis composes to ë
        ("8859/1", "transliterate", "Ša^Ana", "Sa^Ana", "1 character not representable in 8859/1 was transliterated"),
        ("UNICODE UTF-8", "transliterate", "Bad\udcff^Ana", "Bad?^Ana", "1 character not representable in UNICODE "
         "UTF-8 was transliterated (1 without an equivalent became '?')"),  # lone surrogate: never an exception
    ],
)  # fmt: skip
def test_unrepresentable_characters_table(charset: str, policy: str, name: str, pid5: str, warning: str | None) -> None:
    message = build(report_row(patient_name=name, institution_name=None), charset=charset, unrepresentable=policy)
    assert field(message, "PID-5") == pid5
    message.wire.decode(message.charset)
    if warning is None:
        assert message.warnings == []
    else:
        assert len(message.warnings) == 1 and message.warnings[0].startswith("PID-5: " + warning)


@pytest.mark.parametrize(("char", "ascii"), [("Ł", "L"), ("ś", "s"), ("ß", "ss"), ("é", "e"), ("山", None)])
def test_transliterate(char: str, ascii: str | None) -> None:
    assert transliterate(char) == ascii


# --- escaping ---------------------------------------------------------------------------------------------------


def test_escape_all_five_delimiters_and_control_characters() -> None:
    assert escape(DELIMITERS) == ESCAPED
    assert escape("a\rb\nc\x0bd\x1ce") == "a\\X0D\\b\\X0A\\c\\X0B\\d\\X1C\\e"


ESCAPE_CASES = [
    pytest.param({"patient_id": DELIMITERS}, "PID-3", ESCAPED, id="pid3-cx1"),
    pytest.param({"issuer_of_patient_id": DELIMITERS}, "PID-3.4", ESCAPED, id="pid3-cx4-authority"),
    pytest.param({"patient_name": PN_DELIMITERS}, "PID-5", PN_ESCAPED, id="pid5-xpn"),
    pytest.param({"referring_physician": PN_DELIMITERS}, "OBR-16", "^" + PN_ESCAPED, id="obr16-xcn"),
    pytest.param({"study_description": DELIMITERS}, "OBR-4.2", ESCAPED, id="obr4-ce-text"),
    pytest.param({"accession_number": DELIMITERS}, "OBR-18", ESCAPED, id="obr18-accession"),
    pytest.param({"accession_number": DELIMITERS}, "OBR-2", ESCAPED, id="obr2-placer"),
    pytest.param({"modalities": DELIMITERS}, "OBR-24", "A\\F\\B\\S\\C\\R\\D", id="obr24-modality"),
    pytest.param({"study_instance_uid": DELIMITERS}, "OBX-5", ESCAPED, id="obx5-study-uid"),
]


@pytest.mark.parametrize(("overrides", "path", "expected"), ESCAPE_CASES)
def test_delimiters_in_values_are_escaped(overrides: dict[str, Any], path: str, expected: str) -> None:
    message = build(report_row(**overrides))
    assert field(message, path) == expected
    assert [s[0] for s in segments(message)] == [s[0] for s in segments(build())]


def test_delimiters_in_observation_values_and_column_names_are_escaped() -> None:
    message = build(report_row(**{"sources": DELIMITERS, DELIMITERS: "x"}))
    assert observation(message, "sources")[5] == ESCAPED
    extra = observation(message, ESCAPED)
    assert extra is not None and extra[3] == f"{ESCAPED}^{ESCAPED}^L" and extra[5] == "x"


def test_delimiters_in_settings_values_are_escaped() -> None:
    message = build(sending_facility="Klinik A^1.2.3^ISO", patient_id_authority="HOSP&1.2.3&ISO",
                    field_map={"PID-11": "sources"}, message_type="ORU^R01")  # fmt: skip
    assert field(message, "MSH-4") == "Klinik A^1.2.3^ISO"  # HD components as configured
    assert field(message, "PID-3.4") == "HOSP&1.2.3&ISO"  # HD subcomponents inside CX.4
    message = build(report_row(sources=DELIMITERS), field_map={"PID-11": "sources", "OBR-4.1": "sources"})
    assert field(message, "PID-11") == ESCAPED and field(message, "OBR-4.1") == ESCAPED


def test_line_breaks_and_mllp_bytes_in_values_cannot_break_segments_or_framing() -> None:
    message = build(report_row(study_description="CT\rThorax\n\x0b\x1cX", warnings="one\r\ntwo"))
    assert field(message, "OBR-4.2") == "CT\\X0D\\Thorax\\X0A\\\\X0B\\\\X1C\\X"
    assert observation(message, "warnings")[5] == "one\\X0D\\\\X0A\\two"
    assert [s[0] for s in segments(message)] == [s[0] for s in segments(build(report_row(warnings="x")))]
    frame(message.wire)  # would raise if 0x0B or 0x1C were left in the payload


def test_escaped_values_read_back_unchanged_by_an_independent_parser() -> None:
    message = build(report_row(patient_id=DELIMITERS, study_instance_uid=DELIMITERS, sources="a\rb"))
    parsed = hl7.parse(message.text)  # python-hl7 unescapes on access
    assert parsed["PID.F3"] == DELIMITERS
    assert parsed["OBX.F5"] == DELIMITERS
    assert len(parsed) == len(segments(message))


# --- missing values ---------------------------------------------------------------------------------------------


def test_missing_values_leave_fields_empty_never_none_or_zero() -> None:
    row = dict.fromkeys(report_row())
    message = build(row)
    assert "None" not in message.text and "nan" not in message.text.lower()
    for path in ("PID-3", "PID-5", "PID-7", "PID-8", "OBR-2", "OBR-3", "OBR-4", "OBR-7", "OBR-16", "OBR-18",
                 "OBR-24", "OBX-5"):  # fmt: skip
        assert field(message, path) == "", path
    assert [s[0] for s in segments(message)] == ["MSH", "PID", "PV1", "OBR", "OBX"]  # only the study UID OBX
    assert field(message, "OBX-3") == "113014^DICOM Study^DCM"
    assert message.warnings == ["OBX-5: the study has no Study Instance UID; the DICOM Study observation is empty"]


@pytest.mark.parametrize(
    ("value", "present", "obx5"),
    [(None, False, ""), (float("nan"), False, ""), ("", False, ""), ("  ", False, ""), (0, True, "0"),
     (0.0, True, "0.0"), (12.35, True, "12.35"), (1e-05, True, "0.00001"), (120, True, "120")],
)  # fmt: skip
def test_numbers_and_not_available(value: Any, present: bool, obx5: str) -> None:
    obx = observation(build(report_row(ctdivol_mgy=value)), "ctdivol_mgy")
    assert (obx is not None) == present
    if obx:
        assert obx[2] == "NM" and obx[5] == obx5 and obx[6] == "mGy^mGy^UCUM"


@pytest.mark.parametrize(
    ("column", "value", "value_type", "units", "label"),
    [
        ("ctdivol_mgy", 12.35, "NM", "mGy", "CTDIvol"),
        ("dlp_mgycm", 456.7, "NM", "mGy.cm", "DLP"),
        ("dap_gycm2", 1.5, "NM", "Gy.cm2", "DAP"),
        ("kvp", 120, "NM", "kV", "kVp"),
        ("exposure_mas", 250.5, "NM", "mA.s", "Exposure"),
        ("number_of_frames", 3, "NM", "", "Number of frames"),
        ("ctdivol_mgy", "invalid value", "ST", "", "CTDIvol"),  # a report marker, not a number: no units
        ("institution_name", "Klinikum Nord", "ST", "", "Institution"),
        ("body_part", "CHEST", "ST", "", "body_part"),  # an extra column of the site's report
    ],
)
def test_observation_per_report_value(column: str, value: Any, value_type: str, units: str, label: str) -> None:
    obx = observation(build(report_row(**{column: value})), column)
    assert obx is not None
    assert obx[2] == value_type and obx[3] == f"{column}^{label}^L" and obx[6].split("^")[0] == units
    assert obx[11] == "F"


def test_placed_columns_are_not_repeated_as_observations() -> None:
    message = build()
    codes = [s[3].split("^")[0] for s in segments(message) if s[0] == "OBX"]
    assert codes[0] == "113014"
    assert not {"patient_name", "patient_id", "accession_number", "study_instance_uid"} & set(codes)
    assert [s[1] for s in segments(message) if s[0] == "OBX"] == [str(n) for n in range(1, len(codes) + 1)]


@pytest.mark.parametrize(
    ("overrides", "path", "expected", "warned"),
    [
        ({"patient_birth_date": "1970.01.02"}, "PID-7", "19700102", False),
        ({"patient_birth_date": "unknown"}, "PID-7", "", True),
        ({"patient_sex": "m"}, "PID-8", "M", False),
        ({"patient_sex": "X"}, "PID-8", "U", False),
        ({"study_time": "1015"}, "OBR-7", "202403151015", False),
        ({"study_time": "101500.123456"}, "OBR-7", "20240315101500.1234", False),
        ({"study_time": "10:15:00"}, "OBR-7", "20240315101500", False),
        ({"study_time": None}, "OBR-7", "20240315", False),
        ({"study_time": "late"}, "OBR-7", "20240315", True),
        ({"study_date": None}, "OBR-7", "", False),
        ({"modalities": "SR,PR,MR"}, "OBR-24", "MR", False),
        ({"modalities": "SR"}, "OBR-24", "SR", False),
        ({"issuer_of_patient_id": None}, "PID-3", "PID0001", False),
        ({"issuer_of_patient_id": "HOSP-A"}, "PID-3", "PID0001^^^HOSP-A", False),
    ],
)
def test_dicom_values_in_hl7_form(overrides: dict[str, Any], path: str, expected: str, warned: bool) -> None:
    message = build(report_row(**overrides))
    assert field(message, path) == expected
    assert bool(message.warnings) == warned
    assert all(("1970" not in w and "late" not in w) for w in message.warnings)


def test_patient_id_authority_is_used_only_without_issuer() -> None:
    assert field(build(patient_id_authority="HOSP"), "PID-3") == "PID0001^^^HOSP"
    assert field(build(report_row(issuer_of_patient_id="RIS"), patient_id_authority="HOSP"), "PID-3.4") == "RIS"
    assert field(build(report_row(patient_id=None), patient_id_authority="HOSP"), "PID-3") == ""


# --- message types ----------------------------------------------------------------------------------------------

TYPES = [
    pytest.param("ORU^R01", ["MSH", "PID", "PV1", "OBR", "OBX"], id="oru"),
    pytest.param("ORM^O01", ["MSH", "PID", "PV1", "ORC", "OBR", "OBX"], id="orm"),
    pytest.param("OMG^O19", ["MSH", "PID", "PV1", "ORC", "OBR", "OBX"], id="omg"),
    pytest.param("OMI^O23", ["MSH", "PID", "PV1", "ORC", "OBR", "OBX", "IPC"], id="omi"),
]


@pytest.mark.parametrize(("message_type", "order"), TYPES)
@pytest.mark.parametrize("update", [False, True], ids=["final", "update"])
def test_message_type_key_fields(message_type: str, order: list[str], update: bool) -> None:
    message = build(message_type=message_type, update=update)
    names = [s[0] for s in segments(message)]
    assert list(dict.fromkeys(names)) == order == list(MESSAGE_SEGMENTS[message_type])
    code, trigger = message_type.split("^")
    status = "C" if update else "F"
    expected = {
        "MSH-1": "|",
        "MSH-2": "^~\\&",
        "MSH-3": "ORTHANC-WF",
        "MSH-7": "20240315101600",
        "MSH-9": f"{code}^{trigger}^{code}_{trigger}",
        "MSH-10": "MSG0001",
        "MSH-11": "P",
        "MSH-12": "2.5",
        "MSH-18": "UNICODE UTF-8",
        "PID-3": "PID0001",
        "PID-5": "Rivera^Ana^Maria^III^Dr.",
        "PID-7": "19700102",
        "PID-8": "F",
        "PV1-2": "U",
        "OBR-2": "ACC0001",
        "OBR-3": "ACC0001",
        "OBR-4.2": "CT Thorax",
        "OBR-7": "20240315101500",
        "OBR-16": "^Smith^John^^^Dr.",
        "OBR-18": "ACC0001",
        "OBR-24": "CT",
        "OBR-25": status,
        "OBX-2": "ST",
        "OBX-3": "113014^DICOM Study^DCM",
        "OBX-5": "1.2.826.0.1.3680043.8.498.1",
        "OBX-11": status,
    }
    if message_type != "ORU^R01":
        expected |= {"ORC-1": "SC", "ORC-2": "ACC0001", "ORC-3": "ACC0001", "ORC-5": "CM"}
    if message_type == "OMI^O23":
        expected |= {"IPC-1": "ACC0001", "IPC-2": "ACC0001", "IPC-3": "1.2.826.0.1.3680043.8.498.1",
                     "IPC-4": "ACC0001", "IPC-5.1": "CT"}  # fmt: skip
    assert {path: field(message, path) for path in expected} == expected
    assert all(s[11] == status for s in segments(message) if s[0] == "OBX")
    assert message.message_type == message_type and message.control_id == "MSG0001"


@pytest.mark.parametrize(("message_type", "order"), TYPES)
def test_hl7apy_reads_the_message_back(message_type: str, order: list[str]) -> None:
    message = build(message_type=message_type)
    parsed = parse_message(message.text, find_groups=False)
    assert [s.name for s in parsed.children if s.name in order] == [s[0] for s in segments(message)]
    assert parsed.msh.msh_9.to_er7() == field(message, "MSH-9")
    assert parsed.pid.pid_5.xpn_4.to_er7() == "III" and parsed.pid.pid_5.xpn_5.to_er7() == "Dr."
    assert parsed.obr.obr_16.xcn_2.to_er7() == "Smith"
    if message_type == "OMI^O23":
        assert parsed.ipc.ipc_3.to_er7() == "1.2.826.0.1.3680043.8.498.1"


@pytest.mark.parametrize("message_type", ["ORU^R01", "OMG^O19", "OMI^O23"])
def test_strict_hl7apy_validation_of_the_message_structure(message_type: str) -> None:
    # ORM^O01 is left out: hl7apy 1.3.5 requires RQD in ORM's OBR/RQD/RQ1/RXO/ODS/ODT choice group.
    message = build(message_type=message_type)
    parse_message(message.text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


@pytest.mark.parametrize(("version", "msh9"), [("2.3", "ORU^R01"), ("2.3.1", "ORU^R01^ORU_R01"), ("2.5.1", None)])
def test_msh9_structure_component_exists_from_231(version: str, msh9: str | None) -> None:
    message = build(version=version)
    assert field(message, "MSH-12") == version
    assert field(message, "MSH-9") == (msh9 or "ORU^R01^ORU_R01")


def test_msh_from_settings_and_now() -> None:
    settings = {"sending_application": "WF", "sending_facility": "HOSP", "receiving_application": "RIS",
                "receiving_facility": "HOSP2", "processing_id": "T"}  # fmt: skip
    tz = timezone(timedelta(hours=1))
    message = build_message(report_row(), Hl7Settings(**settings), control_id="X-1.2", now=NOW.replace(tzinfo=tz),
                            update=False)  # fmt: skip
    msh = {n: field(message, f"MSH-{n}") for n in (3, 4, 5, 6, 7, 10, 11)}
    assert msh == {3: "WF", 4: "HOSP", 5: "RIS", 6: "HOSP2", 7: "20240315101600+0100", 10: "X-1.2", 11: "T"}


def test_same_input_gives_the_same_bytes() -> None:
    assert build().wire == build().wire
    assert build().wire != build(update=True).wire


@pytest.mark.parametrize("control_id", ["", "A" * 21, "MSG|1", "MSG 1", "MSG^1", "MSGé"])
def test_invalid_control_id_is_a_caller_bug(control_id: str) -> None:
    with pytest.raises(ValueError, match="control_id"):
        build_message(report_row(), Hl7Settings(), control_id=control_id, now=NOW, update=False)


# --- field_map --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_type", "field_map", "row", "path", "expected", "warned"),
    [
        ("ORU^R01", {"PV1-3": "station_names"}, {}, "PV1-3", "CT1", False),
        ("ORU^R01", {"OBR-4.1": "procedure_code"}, {"procedure_code": "RPID17"}, "OBR-4", "RPID17^CT Thorax", False),
        ("ORU^R01", {"OBR-4": "procedure_code"}, {"procedure_code": "RPID17"}, "OBR-4", "RPID17", False),
        ("ORU^R01", {"PID-11": "institution_name"}, {}, "PID-11", "Klinikum Nord", False),
        ("ORU^R01", {"PID-3.5": "id_type"}, {"id_type": "MR"}, "PID-3", "PID0001^^^^MR", False),
        ("ORU^R01", {"OBR-18": "dap_gycm2"}, {}, "OBR-18", "", False),  # None empties the default
        ("ORU^R01", {"OBR-18": "no_such_column"}, {}, "OBR-18", "", True),
        ("ORU^R01", {"OBX-5": "number_of_series"}, {}, "OBX-5", "2", False),  # first OBX
        ("OMI^O23", {"IPC-2": "requested_procedure_id"}, {"requested_procedure_id": "RP1"}, "IPC-2", "RP1", False),
        ("ORM^O01", {"ORC-2": "placer"}, {"placer": "PL&1"}, "ORC-2", "PL\\T\\1", False),
    ],
)
def test_field_map_puts_report_values_anywhere(
    message_type: str, field_map: dict[str, str], row: dict[str, Any], path: str, expected: str, warned: bool
) -> None:
    message = build(report_row(**row), message_type=message_type, field_map=field_map)
    assert field(message, path) == expected
    assert bool(message.warnings) == warned
    if warned:
        assert message.warnings == [f"field_map: the report has no column 'no_such_column'; {path} was left empty"]


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"field_map": {"MSH-3": "x"}}, "PV1-3 or OBR-4.1"),
        ({"field_map": {"PID3": "x"}}, "PV1-3 or OBR-4.1"),
        ({"field_map": {"ZDS-1": "x"}}, "PV1-3 or OBR-4.1"),
        ({"field_map": {"PID-0": "x"}}, "PV1-3 or OBR-4.1"),
        ({"field_map": {"PID-3": " "}}, "report column"),
        ({"field_map": {"IPC-1": "x"}}, "does not carry"),
        ({"field_map": {"ORC-2": "x"}, "message_type": "ORU^R01"}, "does not carry"),
        ({"message_type": "OMI^O23", "version": "2.4"}, "from HL7 2.5"),
        ({"message_type": "OMG^O19", "version": "2.3.1"}, "from HL7 2.4"),
        ({"version": "3.0"}, "version"),
        ({"charset": "UTF-8"}, "charset"),
        ({"unrepresentable": "drop"}, "unrepresentable"),
        ({"sending_facility": "A|B"}, "sending_facility"),
        ({"patient_id_authority": "A^B"}, "patient_id_authority"),
        ({"processing_id": "X"}, "processing_id"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_settings_reject_what_cannot_work(settings: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        Hl7Settings(**settings)


def test_settings_defaults() -> None:
    s = Hl7Settings()
    assert (s.enabled, s.host, s.port, s.tls, s.message_type, s.charset, s.unrepresentable, s.version) == (
        False, "127.0.0.1", 2575, False, "ORU^R01", "UNICODE UTF-8", "transliterate", "2.5"
    )  # fmt: skip
    assert (s.retries, s.retry_backoff_seconds, s.connect_timeout_seconds, s.ack_timeout_seconds) == (3, 2, 5, 10)
    assert all(f.description for f in Hl7Settings.model_fields.values())
