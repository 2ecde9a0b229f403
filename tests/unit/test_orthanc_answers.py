"""What an answer of Orthanc to POST /instances means: the table in tasks/orthanc_answers.py, case by case.

The JSON bodies are the ones Orthanc 1.10.1 sends.
"""

from __future__ import annotations

import json

import pytest

from tasks.orthanc_answers import UploadAnswer, Verdict, judge_single, judge_upload

V = Verdict
INSTANCE = "9e8fbd1e-5b7e1c3a-0d2b1f4c-8a6e7d5b-3c2a1f0e"
STUDY = "27f7126f-4f66fb14-03f4081b-f9341db2-53925988"


def success(status: str) -> dict:
    return {
        "ID": INSTANCE,
        "ParentPatient": "da39a3ee-5e6b4b0d-3255bfef-95601890-afd80709",
        "ParentSeries": "5a8e3e5f-0f6a0a1e-7a0c9a8e-3c0f3f1a-6b8c2d4e",
        "ParentStudy": STUDY,
        "Path": f"/instances/{INSTANCE}",
        "Status": status,
    }


def orthanc_error(http: int, status: int, error: str, details: str = "", uri: str = "/instances") -> dict:
    doc = {
        "HttpError": {400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}.get(http, "Error"),
        "HttpStatus": http,
        "Message": error,
        "Method": "POST",
        "OrthancError": error,
        "OrthancStatus": status,
        "Uri": uri,
    }
    if details:
        doc["Details"] = details
    return doc


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


BAD_FORMAT = orthanc_error(400, 15, "Bad file format", "Cannot parse an invalid DICOM file (size: 512 bytes)")
OUT_OF_RANGE = orthanc_error(400, 3, "Parameter out of range")
INEXISTENT_TAG = orthanc_error(404, 21, "Inexistent tag")
INTERNAL = orthanc_error(500, 1, "Internal error")

# http status, body, looks_like_dicom, verdict, words the reason contains, orthanc_status
ANSWERS = [
    pytest.param(200, body(success("Success")), True, V.STORED, [], None, id="200-success"),
    pytest.param(200, body(success("AlreadyStored")), True, V.ALREADY_STORED, [], None, id="200-already-stored"),
    pytest.param(200, body(success("FilteredOut")), True, V.REJECTED, ["filter"], None, id="200-filtered-out"),
    pytest.param(
        200, body(success("Mystery")), True, V.UNAVAILABLE, ["unknown status", "Mystery"], None, id="200-unknown-status"
    ),
    pytest.param(
        200, body({"ID": INSTANCE}), True, V.UNAVAILABLE, ["unknown status", "None"], None, id="200-no-status"
    ),
    pytest.param(200, body([success("Success")]), True, V.STORED, [], None, id="200-list-of-one-success"),
    pytest.param(200, body([success("AlreadyStored")]), True, V.ALREADY_STORED, [], None, id="200-list-of-one-dupe"),
    pytest.param(
        200,
        body([success("Success"), success("Success")]),
        True,
        V.REJECTED,
        ["2 instances"],
        None,
        id="200-list-of-two",
    ),
    pytest.param(200, body([]), True, V.REJECTED, ["0 instances"], None, id="200-empty-list"),
    pytest.param(200, body(["x"]), True, V.UNAVAILABLE, ["without a JSON object"], None, id="200-list-of-string"),
    pytest.param(200, b"<html>OK</html>", True, V.UNAVAILABLE, ["without a JSON object"], None, id="200-not-json"),
    pytest.param(200, b"", True, V.UNAVAILABLE, ["without a JSON object"], None, id="200-empty-body"),
    pytest.param(200, b"\xff\xfe\x00", True, V.UNAVAILABLE, ["without a JSON object"], None, id="200-binary-body"),
    pytest.param(200, b'"Success"', True, V.UNAVAILABLE, ["without a JSON object"], None, id="200-json-string"),
    pytest.param(
        400,
        body(BAD_FORMAT),
        False,
        V.REJECTED,
        ["not a DICOM file", "Bad file format", "Cannot parse an invalid DICOM file (size: 512 bytes)"],
        15,
        id="400-bad-file-format-not-dicom",
    ),
    pytest.param(
        400,
        body(BAD_FORMAT),
        True,
        V.REJECTED,
        ["damaged DICOM file", "Bad file format", "size: 512 bytes"],
        15,
        id="400-bad-file-format-looks-like-dicom",
    ),
    pytest.param(
        400,
        body(OUT_OF_RANGE),
        True,
        V.REJECTED,
        ["corrupt or unsupported", "Parameter out of range"],
        3,
        id="400-parameter-out-of-range",
    ),
    pytest.param(
        400,
        body(OUT_OF_RANGE),
        False,
        V.REJECTED,
        ["corrupt or unsupported", "Parameter out of range"],
        3,
        id="400-parameter-out-of-range-not-dicom",
    ),
    pytest.param(400, body([BAD_FORMAT]), False, V.REJECTED, ["not a DICOM file"], 15, id="400-list-of-one"),
    pytest.param(
        404, body(INEXISTENT_TAG), True, V.REJECTED, ["lacks a tag", "Inexistent tag"], 21, id="404-inexistent-tag"
    ),
    pytest.param(
        415,
        body(orthanc_error(415, 9, "Unsupported media type")),
        True,
        V.REJECTED,
        ["Unsupported media type"],
        9,
        id="415",
    ),
    pytest.param(422, body({"Message": "Unprocessable"}), True, V.REJECTED, ["Unprocessable"], None, id="422"),
    pytest.param(401, b"", True, V.AUTH, ["credentials", "401"], None, id="401-empty"),
    pytest.param(401, b"<html>Unauthorized</html>", True, V.AUTH, ["credentials", "401"], None, id="401-html"),
    pytest.param(403, body({"Message": "Forbidden"}), True, V.AUTH, ["credentials", "403"], None, id="403"),
    pytest.param(500, body(INTERNAL), True, V.UNAVAILABLE, ["500", "Internal error"], 1, id="500-json"),
    pytest.param(500, b"<html>boom</html>", True, V.UNAVAILABLE, ["500"], None, id="500-not-json"),
    pytest.param(502, b"Bad Gateway", True, V.UNAVAILABLE, ["502"], None, id="502-proxy"),
    pytest.param(503, b"", True, V.UNAVAILABLE, ["503"], None, id="503-empty"),
    pytest.param(
        503,
        body({"Message": "Service Unavailable"}),
        True,
        V.UNAVAILABLE,
        ["503", "Service Unavailable"],
        None,
        id="503-json",
    ),
    pytest.param(429, b"Too Many Requests", True, V.UNAVAILABLE, ["429"], None, id="429"),
    pytest.param(405, body({"Message": "Method not allowed"}), True, V.UNAVAILABLE, ["405"], None, id="405"),
    pytest.param(408, b"", True, V.UNAVAILABLE, ["408"], None, id="408"),
    pytest.param(409, b"", True, V.UNAVAILABLE, ["409"], None, id="409"),
    pytest.param(413, b"", True, V.UNAVAILABLE, ["413"], None, id="413-too-large"),
    pytest.param(302, b"", True, V.UNAVAILABLE, ["302"], None, id="302-redirect"),
]


@pytest.mark.parametrize(("http", "raw", "looks_like_dicom", "verdict", "words", "orthanc_status"), ANSWERS)
def test_judge_upload(http, raw, looks_like_dicom, verdict, words, orthanc_status):
    answer = judge_upload(http, raw, looks_like_dicom)
    assert isinstance(answer, UploadAnswer)
    assert answer.verdict is verdict
    for word in words:
        assert word in answer.reason
    assert answer.orthanc_status == orthanc_status
    assert answer.confirmed is (verdict in (V.STORED, V.ALREADY_STORED))


@pytest.mark.parametrize(
    ("raw", "verdict"),
    [
        (body(success("Success")), V.STORED),
        (body(success("AlreadyStored")), V.ALREADY_STORED),
        (body(success("FilteredOut")), V.REJECTED),
        (body([success("Success")]), V.STORED),
    ],
)
def test_success_answers_carry_the_orthanc_ids(raw, verdict):
    answer = judge_upload(200, raw)
    assert answer.verdict is verdict
    assert (answer.instance_id, answer.study_id) == (INSTANCE, STUDY)


@pytest.mark.parametrize("status", ["Success", "AlreadyStored"])
def test_stored_answers_have_no_reason(status):
    assert judge_upload(200, body(success(status))).reason == ""


@pytest.mark.parametrize(
    ("http", "raw", "looks_like_dicom"),
    [
        (400, body(BAD_FORMAT), False),
        (400, body(BAD_FORMAT), True),
        (404, body(INEXISTENT_TAG), True),
        (401, b"", True),
        (503, b"", True),
        (429, b"", True),
    ],
)
def test_answers_that_hold_no_instance_carry_no_ids(http, raw, looks_like_dicom):
    answer = judge_upload(http, raw, looks_like_dicom)
    assert (answer.instance_id, answer.study_id) == (None, None)
    assert answer.reason


def test_looks_like_dicom_defaults_to_false():
    assert "not a DICOM file" in judge_upload(400, body(BAD_FORMAT)).reason


def test_rejection_reason_is_at_most_500_characters():
    doc = orthanc_error(400, 15, "Bad file format", "x" * 2000)
    answer = judge_upload(400, body(doc), False)
    assert answer.verdict is V.REJECTED
    assert len(answer.reason) == 500
    assert answer.reason.startswith("not a DICOM file (Orthanc: Bad file format; xxx")


@pytest.mark.parametrize(
    ("http", "doc", "looks_like_dicom", "verdict", "reason"),
    [
        (200, success("Success"), False, V.STORED, ""),
        (200, None, False, V.UNAVAILABLE, "Orthanc answered 2xx without a JSON object"),
        (200, [success("Success")], False, V.UNAVAILABLE, "Orthanc answered 2xx without a JSON object"),
        (
            400,
            BAD_FORMAT,
            False,
            V.REJECTED,
            "not a DICOM file (Orthanc: Bad file format; Cannot parse an invalid DICOM file (size: 512 bytes))",
        ),
        (
            400,
            BAD_FORMAT,
            True,
            V.REJECTED,
            "damaged DICOM file (truncated, or an encoding Orthanc cannot parse) "
            "(Orthanc: Bad file format; Cannot parse an invalid DICOM file (size: 512 bytes))",
        ),
        (400, OUT_OF_RANGE, True, V.REJECTED, "corrupt or unsupported DICOM file (Orthanc: Parameter out of range)"),
        (404, INEXISTENT_TAG, True, V.REJECTED, "DICOM file lacks a tag Orthanc requires (Orthanc: Inexistent tag)"),
        (400, {"OrthancStatus": "15"}, False, V.REJECTED, "corrupt or unsupported DICOM file (Orthanc: HTTP 400)"),
        (401, None, False, V.AUTH, "Orthanc refused our credentials (HTTP 401)"),
        (403, None, False, V.AUTH, "Orthanc refused our credentials (HTTP 403)"),
        (503, None, False, V.UNAVAILABLE, "Orthanc error HTTP 503"),
        (429, None, False, V.UNAVAILABLE, "Orthanc answered HTTP 429"),
    ],
)
def test_judge_single_exact_reasons(http, doc, looks_like_dicom, verdict, reason):
    answer = judge_single(http, doc, looks_like_dicom)
    assert (answer.verdict, answer.reason) == (verdict, reason)


def test_orthanc_status_must_be_an_integer():
    answer = judge_single(400, {"OrthancStatus": "15", "OrthancError": "Bad file format"})
    assert answer.orthanc_status is None


@pytest.mark.parametrize(
    ("verdict", "confirmed"),
    [
        (V.STORED, True),
        (V.ALREADY_STORED, True),
        (V.REJECTED, False),
        (V.AUTH, False),
        (V.UNAVAILABLE, False),
    ],
)
def test_confirmed_only_when_orthanc_holds_the_instance(verdict, confirmed):
    assert UploadAnswer(verdict).confirmed is confirmed
    assert UploadAnswer(verdict, instance_id=INSTANCE, study_id=STUDY).confirmed is confirmed


def test_every_verdict_is_in_the_confirmed_table():
    assert {v for v in Verdict if UploadAnswer(v).confirmed} == {V.STORED, V.ALREADY_STORED}


@pytest.mark.parametrize("http", [400, 404, 415, 422])
@pytest.mark.parametrize("raw", [b"<html>Bad Gateway</html>", b"", b"[1, 2"])
def test_content_errors_without_an_orthanc_json_body_keep_the_file(http, raw):
    """A proxy's HTML error page says nothing about the file: never quarantine on it."""
    answer = judge_upload(http, raw, True)
    assert answer.verdict is V.UNAVAILABLE and "proxy" in answer.reason


def test_a_500_does_not_blame_the_file():
    answer = judge_upload(500, body(INTERNAL), True)
    assert answer.verdict is V.UNAVAILABLE
    assert answer.reason == "Orthanc error HTTP 500: Internal error"
