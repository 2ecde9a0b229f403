"""The watcher's pure decisions: log state, cursor, keys, names, settling, horizon."""

from __future__ import annotations

import pytest

from tasks.notify_state import Decision, Notified, Pending, content_digest, decide, dump, load_notified, load_pending
from tasks.watch_logic import (
    CrashedRun,
    LogState,
    after_horizon,
    crashed_run_plan,
    derived_from,
    gave_up_message,
    is_lost,
    log_state,
    looks_settled,
    manual_run_name,
    next_cursor,
    run_key,
    run_name,
    within_horizon,
)


@pytest.mark.parametrize(
    ("cursor", "last", "first", "expected"),
    [
        (0, 0, None, LogState.OK),  # empty Orthanc, first start
        (0, 50, 1, LogState.OK),  # first start, log from its beginning
        (0, 8, None, LogState.GAP),  # cleared before the first read
        (0, 30, 9, LogState.GAP),
        (10, 10, None, LogState.OK),  # nothing new
        (10, 15, 11, LogState.OK),  # new changes right after the cursor
        (10, 4, 1, LogState.RESET),  # a new or restored database: numbers went backwards
        (10, 0, None, LogState.RESET),  # empty new database
        (10, 18, None, LogState.GAP),  # DELETE /changes after change 10: Last goes on, nothing returned
        (10, 30, 15, LogState.GAP),  # changes 11..14 were deleted before we read them
    ],
)
def test_log_state(cursor, last, first, expected):
    assert log_state(cursor, last, first) is expected


@pytest.mark.parametrize(
    ("read_to", "unsettled", "expected"),
    [
        (100, {}, 100),
        (100, {"a": 40}, 39),  # a study still settling since change 40 holds the cursor before it
        (100, {"a": 40, "b": 12}, 11),
        (100, {"a": 1}, 0),
        (30, {"a": 90}, 30),  # never beyond what was read
    ],
)
def test_next_cursor(read_to, unsettled, expected):
    assert next_cursor(read_to, unsettled) == expected


def test_run_key_differs_per_stable_state_and_is_stable_per_state():
    assert run_key("s1", "20261203T100000") == run_key("s1", "20261203T100000")
    assert run_key("s1", "20261203T100000") != run_key("s1", "20261203T100500")
    assert run_key("s1", "20261203T100000") != run_key("s2", "20261203T100000")


@pytest.mark.parametrize(
    ("accession", "uid", "expected"),
    [
        ("ACC0001", "1.2.3", "study-ACC0001"),
        ("", "1.2.3", "study-1.2.3"),
        (None, None, "study-orthanc-id"),
        ("  A/B 7 ", "1.2", "study-A-B-7"),  # no slashes or spaces in a run name
        ("x" * 100, None, "study-" + "x" * 64),
    ],
)
def test_run_name_is_accession_or_uid_never_more(accession, uid, expected):
    assert run_name(accession, uid, "orthanc-id") == expected


@pytest.mark.parametrize(
    ("current", "typed", "expected"),
    [
        ("study-ACC0001", "whatever", "study-ACC0001"),  # the watcher's name stays
        ("brave-otter", "1.2.826.0.1.3680043.8.498.1", "study-1.2.826.0.1.3680043.8.498.1"),
        ("brave-otter", " CLI-1 ", "study-CLI-1"),
        (
            "brave-otter",
            "4b9b60ea-97a58b00-e486d6a4-8cdd61c2-fdb20286",
            "study-4b9b60ea-97a58b00-e486d6a4-8cdd61c2-fdb20286",
        ),
        ("brave-otter", "Mueller", "study-manual"),  # letters alone could be a patient's name
        ("brave-otter", "Berg^Lena", "study-manual"),
        ("brave-otter", "Lena Berg 1970", "study-manual"),
        ("brave-otter", "", "study-manual"),
        ("brave-otter", "1" * 65, "study-manual"),
    ],
)
def test_a_manual_run_is_named_after_an_identifier_never_a_name(current, typed, expected):
    assert manual_run_name(current, typed) == expected


@pytest.mark.parametrize(
    ("study", "expected"),
    [
        ({"ID": "x"}, None),
        ({"ID": "x", "ModifiedFrom": "orig"}, "orig"),
        ({"ID": "x", "AnonymizedFrom": "orig2"}, "orig2"),
    ],
)
def test_derived_from(study, expected):
    assert derived_from(study) == expected


@pytest.mark.parametrize(
    ("last_update", "now", "settle", "expected"),
    [
        ("20261203T100000", "20261203T100300", 180, True),
        ("20261203T100000", "20261203T100259", 180, False),
        ("20261203T235900", "20261204T000300", 180, True),  # over midnight
        ("garbage", "20261203T100300", 180, False),  # unreadable: never guess "settled"
        ("20261203T100000", "", 180, False),
    ],
)
def test_looks_settled(last_update, now, settle, expected):
    assert looks_settled(last_update, now, settle) is expected


@pytest.mark.parametrize(
    ("updated", "horizon", "expected"),
    [
        ("20261203T100000", "20261203T090000", True),
        ("20261203T080000", "20261203T090000", False),
        ("20261203T090000", "20261203T090000", True),
        ("20261203T080000", "", True),
    ],
)
def test_after_horizon(updated, horizon, expected):
    assert after_horizon(updated, horizon) is expected


@pytest.mark.parametrize(
    ("updated", "horizon", "stable_change_after", "expected"),
    [
        ("20261203T100000", "20261203T090000", False, True),  # updated after the first start
        ("20261203T100000", "20261203T090000", True, True),
        ("20261203T085959", "20261203T090000", True, True),  # still arriving at the first start: ours
        ("20261203T085959", "20261203T090000", False, False),  # already stable then: the backlog
        ("20261203T080000", "", False, True),  # no horizon
        ("", "20261203T090000", False, True),  # unreadable LastUpdate: never dropped on a guess
    ],
)
def test_within_horizon(updated, horizon, stable_change_after, expected):
    assert within_horizon(updated, horizon, stable_change_after) is expected


ROW = {"study_instance_uid": "1.2.3", "number_of_instances": 3, "warnings": "no dose"}
D = content_digest(ROW)
SENT = Notified(D, 3, "C1", "2026-12-03T10:00:00", "new")
PENDING = Pending(D, "C2", False, "2026-12-03T10:01:00", "TVNI", "ORU^R01", "utf-8")


@pytest.mark.parametrize(
    ("notified", "pending", "digest", "force", "expected"),
    [
        (None, None, D, False, Decision.NEW),
        (SENT, None, D, False, Decision.NOTHING),  # stable again with nothing changed: send nothing
        (SENT, None, D, True, Decision.UPDATE),  # a forced rerun resends
        (SENT, None, "other", False, Decision.UPDATE),  # more images: an update, not a second "new"
        (None, PENDING, D, False, Decision.RESEND_PENDING),  # delivery failed before: same bytes again
        (SENT, PENDING, D, True, Decision.RESEND_PENDING),
        (None, PENDING, "other", False, Decision.NEW),  # the study changed since: build afresh
    ],
)
def test_decide(notified, pending, digest, force, expected):
    decision, why = decide(notified, pending, digest, force)
    assert decision is expected
    assert why


def test_digest_ignores_warnings_but_not_content():
    assert content_digest({**ROW, "warnings": "other words"}) == D
    assert content_digest({**ROW, "number_of_instances": 4}) != D


def test_records_round_trip_and_garbage_reads_as_none():
    assert load_notified(dump(SENT)) == SENT
    assert load_pending(dump(PENDING)) == PENDING
    assert PENDING.wire == b"MSH"
    for text in (None, "", "not json", "[1]", '{"unexpected": 1}'):
        assert load_notified(text) is None
        assert load_pending(text) is None


@pytest.mark.parametrize(
    ("run_count", "max_restarts", "again"),
    [
        (0, 3, True),  # lost before its body started (killed while Pending)
        (1, 3, True),  # first attempt lost
        (3, 3, True),  # third attempt lost: one more
        (4, 3, False),  # crashed every time: an operator looks at it
        (1, 0, False),  # restarts switched off
    ],
)
def test_crashed_study_runs_are_restarted_a_bounded_number_of_times(run_count, max_restarts, again):
    run = CrashedRun("id-1", "study-ACC1", run_count)
    restart, give_up = crashed_run_plan([run], max_restarts)
    assert (restart, give_up) == (([run], []) if again else ([], [run]))


def test_giving_up_says_what_to_do_and_names_no_patient():
    text = gave_up_message(CrashedRun("id-1", "study-ACC1", 4))
    assert "study-ACC1" in text and "crashed 4 times" in text and "owf rerun" in text


@pytest.mark.parametrize(
    ("state", "seconds", "lost"),
    [
        ("CRASHED", 0, True),
        ("PENDING", 10, False),  # a worker is starting its process
        ("PENDING", 151, True),  # the worker died after claiming it
        ("RUNNING", 10_000, False),  # a long run: the heartbeat automation judges it
        ("SCHEDULED", 10_000, False),
        ("FAILED", 10_000, False),  # failed for a reason an operator must see
    ],
)
def test_lost_study_runs(state, seconds, lost):
    assert is_lost(state, seconds, 150) is lost
