"""Morph-and-route decisions without servers: matching, the policy for mixed sources, the default route,
Orthanc request bodies (Force, UIDs), validation of impossible routes, delivery records. Cases C09 and C19."""

from __future__ import annotations

import json

import pytest

from tasks.config import parse_config
from tasks.errors import ConfigError
from tasks.hl7_messages import masked
from tasks.routing_config import Destination, ModifySpec, Route, RoutingSettings, ValueMatch
from tasks.rules import (
    Delivery,
    DeliveryRecord,
    RouteOutcome,
    anonymize_body,
    anonymized_study_uid,
    forced_plan,
    modify_body,
    needs_copy,
    plan_routes,
    route_digest,
    route_outcomes,
    routes_summary,
    study_facts,
    value_matches,
)
from tasks.study_report import InstanceDocuments, StudyDocuments
from tests.conftest import CASES


# -- value matching ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ("MODALITY1", "MODALITY1", True),
        ("MODALITY1", "MODALITY1 ", True),  # DICOM pads AE titles with spaces
        ("MODALITY1", "modality1", False),  # exact values are exact
        ({"equals": "MODALITY1", "ignore_case": True}, "modality1", True),
        (["CT", "MR"], "MR", True),
        (["CT", "MR"], "US", False),
        ({"glob": "ST*"}, "st01", True),  # glob and regex ignore case unless told
        ({"glob": "ST*", "ignore_case": False}, "st01", False),
        ({"glob": "ST0?"}, "ST012", False),
        ({"regex": "^ST0[12]$"}, "ST02", True),
        ({"regex": "^ST0[12]$"}, "ST03", False),
        ({"regex": "ROOM"}, "CT_ROOM1", True),  # search, not full match
        ("MODALITY1", None, False),  # not recorded (REST upload has no RemoteAET) never matches
    ],
)
def test_value_matches(spec, value, expected):
    assert value_matches(ValueMatch.model_validate(spec), value) is expected


@pytest.mark.parametrize("spec", [{}, {"glob": "a", "regex": "b"}, [], {"regex": "("}])
def test_bad_matches_are_refused(spec):
    with pytest.raises(ValueError):
        ValueMatch.model_validate(spec)


# -- facts and plans -------------------------------------------------------------------------------------------
def docs(*instances: dict, study_tags: dict | None = None, series: list | None = None) -> StudyDocuments:
    """instances: {"md": metadata, "tags": tags}"""
    return StudyDocuments(
        study={"ID": "s1", "MainDicomTags": study_tags or {"StudyInstanceUID": "1.2.3"}},
        series=series or [],
        instances=tuple(
            InstanceDocuments(f"i{n}", inst.get("tags", {}), inst.get("md", {})) for n, inst in enumerate(instances)
        ),
    )


def from_aet(aet: str, **tags) -> dict:
    return {
        "md": {"RemoteAET": aet, "CalledAET": "ORTHANC", "RemoteIP": "10.0.0.7", "Origin": "DicomProtocol"},
        "tags": tags,
    }


def from_share(source: str, **tags) -> dict:
    return {"md": {"IngestSource": source, "RemoteIP": "127.0.0.1", "Origin": "RestApi"}, "tags": tags}


def routes(*specs: dict) -> list[Route]:
    return [Route.model_validate({"to": ["archive"], **s}) for s in specs]


M1 = {"name": "m1", "when": {"source": "MODALITY1"}, "modify": {"replace": {"InstitutionName": "X"}}}
M2 = {"name": "m2", "when": {"source": "MODALITY2"}, "anonymize": {}}
CT_ROOM = {"name": "ct-room", "when": {"source": "CT_ROOM1"}}
STATION = {"name": "st01", "when": {"tags": {"StationName": {"glob": "ST0*"}}}}
EVERYTHING = {"name": "all"}
DEFAULT = {"name": "fallback"}


@pytest.mark.parametrize(
    ("study", "route_specs", "settings", "expected"),
    [
        (docs(from_aet("MODALITY1"), from_aet("MODALITY1")), [M1, M2], {}, ["m1"]),
        (docs(from_aet("MODALITY2")), [M1, M2], {}, ["m2"]),
        (docs(from_aet("OTHER")), [M1, M2], {}, []),  # nothing matched, no default: not routed
        (docs(from_aet("OTHER")), [M1, M2, DEFAULT], {"default_route": "fallback"}, ["fallback"]),
        (docs(from_aet("MODALITY1")), [M1, DEFAULT], {"default_route": "fallback"}, ["m1"]),
        # C09: a file from a share has no RemoteAET; the share's source name is what matches
        (docs(from_share("CT_ROOM1", StationName="ST01")), [M1, CT_ROOM], {}, ["ct-room"]),
        (docs(from_share("CT_ROOM1", StationName="ST01")), [STATION], {}, ["st01"]),
        (docs(from_share("CT_ROOM1", StationName="XR9")), [STATION], {}, []),
        # fan-out, and stop
        (docs(from_aet("MODALITY1")), [M1, EVERYTHING], {}, ["m1", "all"]),
        (docs(from_aet("MODALITY1")), [{**M1, "stop": True}, EVERYTHING], {}, ["m1"]),
        # two sources in one study
        (docs(from_aet("MODALITY1"), from_aet("MODALITY2")), [M1, M2, EVERYTHING], {}, []),  # hold
        (docs(from_aet("MODALITY1"), from_aet("MODALITY2")), [M1, M2], {"mixed_sources": "any"}, ["m1", "m2"]),
        (
            docs(from_aet("MODALITY1"), from_aet("MODALITY2")),
            [M1, M2, EVERYTHING],
            {"mixed_sources": "all"},
            ["all"],
        ),
        (docs(from_aet("MODALITY1"), from_share("MODALITY1")), [M1], {}, ["m1"]),  # one source by two ways
    ],
)
def test_plan_routes(study, route_specs, settings, expected):
    plan = plan_routes(study_facts(study), routes(*route_specs), RoutingSettings(**settings))
    assert [r.name for r in plan.to_run] == expected


def test_every_route_says_why_it_did_or_did_not_run():
    study = docs(from_aet("MODALITY2", Modality="CT"))
    plan = plan_routes(study_facts(study), routes(M1, M2, {**STATION}), RoutingSettings())
    why = {d.route.name: d.reason for d in plan.decisions}
    assert why["m2"] == "matched"
    assert why["m1"] == "not matched: source is MODALITY2; the route wants 'MODALITY1'"
    assert why["st01"] == "not matched: StationName is absent; the route wants glob 'ST0*'"


def test_mixed_sources_hold_names_the_sources_and_routes_nothing():
    study = docs(from_aet("MODALITY1"), from_aet("MODALITY1"), from_aet("MODALITY2"))
    plan = plan_routes(study_facts(study), routes(M1, M2), RoutingSettings())
    assert plan.to_run == [] and plan.held
    assert "MODALITY1: 2, MODALITY2: 1" in plan.held and "only_route" in plan.held


def test_tags_match_at_any_level_and_in_multi_valued_strings():
    study = docs(
        from_aet("M"),
        series=[{"MainDicomTags": {"Modality": "CT", "StationName": "ST01"}}],
        study_tags={"StudyInstanceUID": "1.2", "InstitutionName": "North Clinic"},
    )
    facts = study_facts(study)
    for when in ({"Modality": "CT"}, {"StationName": {"regex": "^ST0"}}, {"InstitutionName": {"glob": "north*"}}):
        [route] = routes({"name": "r", "when": {"tags": when}})
        assert plan_routes(facts, [route], RoutingSettings()).to_run == [route], when
    multi = study_facts(docs(from_aet("M", ImageType="ORIGINAL\\PRIMARY\\AXIAL")))
    [route] = routes({"name": "r", "when": {"tags": {"ImageType": "AXIAL"}}})
    assert plan_routes(multi, [route], RoutingSettings()).to_run == [route]


def test_called_aet_and_remote_ip_conditions():
    facts = study_facts(docs(from_aet("MODALITY1")))
    ok = routes({"name": "a", "when": {"called_aet": "ORTHANC", "remote_ip": {"glob": "10.0.*"}}})
    no = routes({"name": "b", "when": {"remote_ip": "192.168.1.1"}})
    assert [r.name for r in plan_routes(facts, ok + no, RoutingSettings()).to_run] == ["a"]


def test_an_operator_can_force_one_route():
    rs = routes(M1, M2)
    plan = forced_plan(rs, "m2")
    assert [r.name for r in plan.to_run] == ["m2"]
    with pytest.raises(KeyError):
        forced_plan(rs, "nope")


# -- request bodies ---------------------------------------------------------------------------------------------
def test_c19_rule_changing_patient_id_carries_force_and_keeps_uids():
    rule = json.loads((CASES / "C19_rule.json").read_text())
    spec = ModifySpec(replace=rule["rule"]["Replace"])
    body = modify_body(spec)
    assert body["Force"] is True
    assert body["Replace"] == {
        "PatientID": "EXT-777",
        "IssuerOfPatientID": "EXT",
        "InstitutionName": "Imaging Center West",
    }
    assert body["Keep"] == ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


@pytest.mark.parametrize(
    ("spec", "force", "keep"),
    [
        ({"replace": {"InstitutionName": "X"}}, True, ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]),
        ({"replace": {"InstitutionName": "X"}, "uids": "new"}, True, None),  # new UIDs: identifiers change
        ({"replace": {"StudyInstanceUID": "1.2.3"}}, True, ["SeriesInstanceUID", "SOPInstanceUID"]),
        ({"remove": ["StationName"], "uids": "new"}, True, None),
    ],
)
def test_modify_bodies(spec, force, keep):
    body = modify_body(ModifySpec(**spec))
    assert body["Force"] is force
    assert body.get("Keep") == keep


def test_anonymized_study_uid_is_stable_per_study_and_route_and_reveals_nothing():
    a = anonymized_study_uid("1.2.840.1", "m2")
    assert a == anonymized_study_uid("1.2.840.1", "m2")
    assert a != anonymized_study_uid("1.2.840.2", "m2") and a != anonymized_study_uid("1.2.840.1", "other")
    assert a.startswith("2.25.") and "1.2.840.1" not in a and len(a) <= 64
    [route] = routes({**M2, "anonymize": {"keep": ["StudyDescription"], "replace": {"PatientName": "ANON"}}})
    body = anonymize_body(route, "1.2.840.1")
    assert body == {
        "DicomVersion": "2021b",
        "Force": True,
        "KeepPrivateTags": False,
        "Keep": ["StudyDescription"],
        "Replace": {"PatientName": "ANON", "StudyInstanceUID": a},
    }


def test_which_routes_store_a_copy():
    as_is, m1, m2, new_uids = routes(EVERYTHING, M1, M2, {"name": "n", "modify": {"uids": "new"}})
    assert [needs_copy(r) for r in (as_is, m1, m2, new_uids)] == [False, False, True, True]


# -- validation before deploy ---------------------------------------------------------------------------------------
DEST = [{"name": "archive", "aet": "ARCHIVE", "host": "127.0.0.1", "port": 104}]


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"routes": [{"name": "r", "to": ["nowhere"]}]}, "unknown destination 'nowhere'"),
        (
            {"routes": [{"name": "r", "to": ["archive"], "when": {"tags": {"StationNam": "x"}}}]},
            "'StationNam' is not a DICOM keyword",
        ),
        (
            {"routes": [{"name": "r", "to": ["archive"], "modify": {"replace": {"InstitutionNme": "x"}}}]},
            "'InstitutionNme' is not a DICOM keyword",
        ),
        ({"routes": [{"name": "r", "to": ["archive"], "modify": {"remove": ["SOPInstanceUID"]}}]}, "cannot be removed"),
        (
            {"routes": [{"name": "r", "to": ["archive"], "modify": {"replace": {"SOPInstanceUID": "1.2"}}}]},
            "every series/instance the same UID",
        ),
        (
            {
                "routes": [
                    {"name": "r", "to": ["archive"], "modify": {"replace": {"StudyInstanceUID": "1.2"}, "uids": "new"}}
                ]
            },
            "choose one",
        ),
        (
            {
                "routes": [
                    {
                        "name": "r",
                        "to": ["archive"],
                        "modify": {"replace": {"PatientName": "x"}, "remove": ["PatientName"]},
                    }
                ]
            },
            "both replaced and removed",
        ),
        ({"routes": [{"name": "r", "to": ["archive"], "modify": {}, "anonymize": {}}]}, "two routes, not one"),
        ({"routes": [{"name": "r", "to": ["archive"], "anonymize": {"keep": ["PatientName"]}}]}, "would not anonymize"),
        ({"routes": [{"name": "r", "to": []}]}, "no destination"),
        ({"routes": [{"name": "r", "to": ["archive"]}, {"name": "r", "to": ["archive"]}]}, "route r is defined twice"),
        ({"routes": [{"name": "r", "to": ["archive"]}], "routing": {"default_route": "x"}}, "no route named 'x'"),
        ({"routes": [{"name": "R 1", "to": ["archive"]}]}, "lower-case"),
        ({"destinations": [{"name": "archive", "aet": "ARCHIVE"}]}, "aet, host and port together"),
        (
            {"destinations": [{"name": "p", "kind": "peer", "url": "http://x", "password": "secret"}]},
            "may not be written in the config file",
        ),
        ({"destinations": [{"name": "p", "kind": "peer", "url": "http://x", "verify": "cfind"}]}, "needs a DICOM"),
    ],
)
def test_impossible_routing_is_refused_before_deploy(routing, message):
    with pytest.raises(ConfigError) as err:
        parse_config({"destinations": DEST, **routing})
    assert message in str(err.value)
    assert "secret" not in str(err.value)


def test_a_valid_routing_config_parses():
    cfg = parse_config(
        {
            "destinations": DEST,
            "routes": [{"to": ["archive"], **s} for s in (M1, M2, DEFAULT)],
            "routing": {"default_route": "fallback"},
        }
    )
    assert [r.name for r in cfg.routes] == ["m1", "m2", "fallback"]
    assert [r.action for r in cfg.routes] == ["modify", "anonymize", "as-is"]


# -- delivery records and outcomes ---------------------------------------------------------------------------------
def test_delivery_record_round_trip_and_garbage():
    record = DeliveryRecord()
    record.add("m1", "archive", Delivery("d1", 3, "1.2.3", "2026-12-04T10:00:00+00:00"))
    again = DeliveryRecord.load(record.dump())
    assert again.delivered("m1", "archive", "d1") == record.delivered("m1", "archive", "d1")
    assert again.delivered("m1", "archive", "other-digest") is None
    for junk in (None, "", "{", "[]", '{"m1": 3}', '{"m1": {"archive": {"x": 1}}}'):
        assert DeliveryRecord.load(junk).routes == {}


def test_digest_changes_with_content_route_and_destination_but_not_order():
    [m1] = routes(M1)
    archive = Destination(**DEST[0])
    base = route_digest(m1, archive, ["a", "b"])
    assert base == route_digest(m1, archive, ["b", "a"])
    assert base != route_digest(m1, archive, ["a", "b", "c"])  # more images: deliver again
    assert base != route_digest(routes({**M1, "modify": {"replace": {"InstitutionName": "Y"}}})[0], archive, ["a", "b"])
    assert base != route_digest(m1, Destination(name="archive", aet="OTHER", host="h", port=1), ["a", "b"])
    assert base == route_digest(Route.model_validate({**M1, "to": ["archive"], "stop": True}), archive, ["a", "b"])


def test_outcomes_come_from_the_record_so_a_rerun_writes_the_same_report_text():
    rs = routes(M1, M2)
    dests = {"archive": Destination(**DEST[0])}
    facts = study_facts(docs(from_aet("MODALITY1")))
    plan = plan_routes(facts, rs, RoutingSettings())
    record = DeliveryRecord()
    failed = route_outcomes(plan, record, dests, ["i0"], "1.2.3", {"m1": "archive: connection refused"})
    assert [(o.route, o.status) for o in failed] == [("m1", "failed"), ("m2", "skipped")]
    assert routes_summary(failed) == ("m1: failed", None)
    record.add("m1", "archive", Delivery(route_digest(rs[0], dests["archive"], ["i0"]), 1, "1.2.3", "t"))
    first = route_outcomes(plan, record, dests, ["i0"], "1.2.3", {})
    rerun = route_outcomes(plan, DeliveryRecord.load(record.dump()), dests, ["i0"], "1.2.3", {})
    assert routes_summary(first) == routes_summary(rerun) == ("m1: delivered to archive", None)


def test_summary_says_which_uid_went_where_when_a_route_changed_it():
    outcomes = [
        RouteOutcome("m2", "delivered", "matched", {"archive": "2.25.99"}, changed_uid=True),
        RouteOutcome("m1", "delivered", "matched", {"pacs": "1.2.3"}),
    ]
    assert routes_summary(outcomes) == ("m2: delivered to archive; m1: delivered to pacs", "archive=2.25.99")


# -- the HL7 artifact ----------------------------------------------------------------------------------------------
def test_masked_message_hides_patient_fields_only():
    text = (
        "MSH|^~\\&|A\rPID|1||PAT-1^^^HOSP||Doe^Jane||19700101|F\rOBR|1|A1|A1|^CT" + "|" * 12 + "Smith^Bob\rOBX|1|ST|x\r"
    )
    shown = masked(text)
    assert "Doe" not in shown and "PAT-1" not in shown and "19700101" not in shown and "Smith" not in shown
    assert shown.splitlines()[1] == "PID|1||***||***||***|***"
    assert shown.splitlines()[0] == "MSH|^~\\&|A" and shown.splitlines()[3] == "OBX|1|ST|x"
