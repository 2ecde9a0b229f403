"""ReadinessTracker, is_ignored and Backoff: table-driven, no disk and no clock."""

from __future__ import annotations

import pytest

from tasks.config import DEFAULT_IGNORE
from tasks.readiness import Backoff, Entry, Readiness, ReadinessTracker, is_ignored

R = Readiness
T0 = 1_700_000_000.0  # an mtime; "now" values are given relative to it


def scan(*files: tuple[str, int, float]) -> list[Entry]:
    return [Entry(path, size, mtime) for path, size, mtime in files]


# Each case: a list of (entries of one scan, now, expected decisions for that scan), observed in order.
SCAN_SEQUENCES = [
    pytest.param(
        [(scan(("a.dcm", 100, T0)), T0 + 60, {"a.dcm": R.NEW})],
        id="first-sight-is-new-even-if-old",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 100, T0)), T0 + 1, {"a.dcm": R.NEW}),
            (scan(("a.dcm", 100, T0)), T0 + 3, {"a.dcm": R.READY}),
        ],
        id="unchanged-in-two-scans-is-ready",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 100, T0)), T0 + 1, {"a.dcm": R.NEW}),
            (scan(("a.dcm", 200, T0 + 2)), T0 + 3, {"a.dcm": R.CHANGING}),
            (scan(("a.dcm", 300, T0 + 4)), T0 + 5, {"a.dcm": R.CHANGING}),
            (scan(("a.dcm", 300, T0 + 4)), T0 + 7, {"a.dcm": R.READY}),
        ],
        id="growing-file-is-changing-until-stable",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 100, T0)), T0 + 1, {"a.dcm": R.NEW}),
            (scan(("a.dcm", 100, T0 + 1)), T0 + 3, {"a.dcm": R.CHANGING}),
        ],
        id="same-size-other-mtime-is-changing",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 100, T0)), T0 + 1, {"a.dcm": R.NEW}),
            (scan(("a.dcm", 120, T0)), T0 + 3, {"a.dcm": R.CHANGING}),
        ],
        id="copy-tool-keeps-mtime-but-size-grows",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 0, T0)), T0 + 1, {"a.dcm": R.EMPTY}),
            (scan(("a.dcm", 0, T0)), T0 + 3, {"a.dcm": R.EMPTY}),
            (scan(("a.dcm", 0, T0)), T0 + 900, {"a.dcm": R.EMPTY}),
        ],
        id="empty-file-is-never-ready",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 0, T0)), T0 + 1, {"a.dcm": R.EMPTY}),
            (scan(("a.dcm", 512, T0 + 2)), T0 + 3, {"a.dcm": R.CHANGING}),
            (scan(("a.dcm", 512, T0 + 2)), T0 + 5, {"a.dcm": R.READY}),
        ],
        id="empty-then-written-is-changing-then-ready",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 100, T0)), T0 + 1, {"a.dcm": R.NEW}),
            (scan(), T0 + 3, {}),
            (scan(("a.dcm", 100, T0)), T0 + 5, {"a.dcm": R.NEW}),
            (scan(("a.dcm", 100, T0)), T0 + 7, {"a.dcm": R.READY}),
        ],
        id="disappearing-and-coming-back-counts-as-new",
    ),
    pytest.param(
        [
            (scan(("a.dcm", 100, T0), ("b.dcm", 50, T0)), T0 + 1, {"a.dcm": R.NEW, "b.dcm": R.NEW}),
            (scan(("b.dcm", 50, T0), ("c.dcm", 70, T0)), T0 + 3, {"b.dcm": R.READY, "c.dcm": R.NEW}),
            (scan(("a.dcm", 100, T0), ("c.dcm", 70, T0)), T0 + 5, {"a.dcm": R.NEW, "c.dcm": R.READY}),
        ],
        id="files-are-judged-independently",
    ),
    pytest.param(
        [
            (scan(("ct/2024/IMG1", 10, T0), ("mr/IMG1", 10, T0)), T0 + 1, {"ct/2024/IMG1": R.NEW, "mr/IMG1": R.NEW}),
            (
                scan(("ct/2024/IMG1", 10, T0), ("mr/IMG1", 11, T0)),
                T0 + 3,
                {"ct/2024/IMG1": R.READY, "mr/IMG1": R.CHANGING},
            ),
        ],
        id="same-name-in-other-folder-is-another-file",
    ),
    pytest.param(
        [
            (scan(("Thumbs.db", 512, T0)), T0 + 1, {"Thumbs.db": R.IGNORED}),
            (scan(("Thumbs.db", 512, T0)), T0 + 3, {"Thumbs.db": R.IGNORED}),
        ],
        id="ignored-stays-ignored",
    ),
    pytest.param(
        [(scan(("sub/THUMBS.DB", 0, T0)), T0 + 1, {"sub/THUMBS.DB": R.IGNORED})],
        id="ignore-wins-over-empty-and-case",
    ),
    pytest.param(
        [(scan(), T0, {}), (scan(), T0 + 2, {})],
        id="empty-scan",
    ),
]


@pytest.mark.parametrize("scans", SCAN_SEQUENCES)
def test_decisions_across_consecutive_scans(scans):
    tracker = ReadinessTracker(ignore=DEFAULT_IGNORE)
    for i, (entries, now, expected) in enumerate(scans):
        assert tracker.observe(entries, now) == expected, f"scan {i}"


MIN_AGE_CASES = [
    # min_age, mtime of the (unchanged) file, now of the second scan, expected
    pytest.param(0.0, T0, T0, R.READY, id="no-min-age-ready-at-once"),
    pytest.param(30.0, T0, T0 + 10, R.TOO_YOUNG, id="younger-than-min-age"),
    pytest.param(30.0, T0, T0 + 29.9, R.TOO_YOUNG, id="just-below-min-age"),
    pytest.param(30.0, T0, T0 + 30, R.READY, id="exactly-min-age"),
    pytest.param(30.0, T0, T0 + 31, R.READY, id="older-than-min-age"),
    pytest.param(30.0, T0 + 100, T0, R.TOO_YOUNG, id="mtime-in-the-future"),
]


@pytest.mark.parametrize(("min_age", "mtime", "now", "expected"), MIN_AGE_CASES)
def test_min_age_seconds(min_age, mtime, now, expected):
    tracker = ReadinessTracker(min_age_seconds=min_age)
    assert tracker.observe(scan(("a.dcm", 100, mtime)), now - 1) == {"a.dcm": R.NEW}
    assert tracker.observe(scan(("a.dcm", 100, mtime)), now) == {"a.dcm": expected}


@pytest.mark.parametrize(
    ("entry", "expected_first", "expected_second"),
    [
        pytest.param(("a.dcm", 100, T0), R.NEW, R.READY, id="unchanged"),
        pytest.param(("a.dcm", 0, T0), R.EMPTY, R.EMPTY, id="empty"),
    ],
)
def test_min_age_does_not_change_the_other_rules(entry, expected_first, expected_second):
    tracker = ReadinessTracker(min_age_seconds=5.0)
    assert tracker.observe(scan(entry), T0 + 100) == {"a.dcm": expected_first}
    assert tracker.observe(scan(entry), T0 + 102) == {"a.dcm": expected_second}


@pytest.mark.parametrize(
    ("forget_path", "expected"),
    [
        pytest.param("a.dcm", {"a.dcm": R.NEW, "b.dcm": R.READY}, id="forgotten-file-starts-over"),
        pytest.param("b.dcm", {"a.dcm": R.READY, "b.dcm": R.NEW}, id="only-the-named-file"),
        pytest.param("never-seen.dcm", {"a.dcm": R.READY, "b.dcm": R.READY}, id="unknown-path-is-harmless"),
    ],
)
def test_forget(forget_path, expected):
    tracker = ReadinessTracker()
    files = scan(("a.dcm", 100, T0), ("b.dcm", 100, T0))
    tracker.observe(files, T0 + 1)
    tracker.forget(forget_path)
    assert tracker.observe(files, T0 + 3) == expected


def test_forget_then_new_content_under_same_name_is_new_not_changing():
    tracker = ReadinessTracker()
    tracker.observe(scan(("a.dcm", 100, T0)), T0 + 1)
    assert tracker.observe(scan(("a.dcm", 100, T0)), T0 + 3) == {"a.dcm": R.READY}
    tracker.forget("a.dcm")
    assert tracker.observe(scan(("a.dcm", 999, T0 + 4)), T0 + 5) == {"a.dcm": R.NEW}
    assert tracker.observe(scan(("a.dcm", 999, T0 + 4)), T0 + 7) == {"a.dcm": R.READY}


IGNORE_CASES = [
    ("Thumbs.db", True),
    ("thumbs.db", True),
    ("THUMBS.DB", True),
    ("ct/2024/Thumbs.db", True),
    ("desktop.ini", True),
    ("Desktop.INI", True),
    (".DS_Store", True),
    ("sub/.ds_store", True),
    ("._IMG0001", True),
    ("~$lock.tmp", True),
    ("~$report.docx", True),
    ("study.tmp", True),
    ("study.TMP", True),
    ("IMG0001.dcm.part", True),
    ("IMG0001.dcm.partial", True),
    ("IMG0001.DCM.PARTIAL", True),
    ("download.crdownload", True),
    (".~lock.notes.odt#", True),
    ("IMG0001", False),
    ("IMG0001.dcm", False),
    ("DICOMDIR", False),
    ("study.zip", False),
    ("report.pdf", False),
    ("Thumbs.db.dcm", False),
    ("myThumbs.db", False),
    ("partial.dcm", False),
    ("IMG.partial.dcm", False),
    ("Thumbs.db/IMG0001", False),  # only the file's own name counts, not its folders
    (".tmp/IMG0001", False),
]


@pytest.mark.parametrize(("path", "expected"), IGNORE_CASES)
def test_is_ignored_with_default_patterns(path, expected):
    assert is_ignored(path, DEFAULT_IGNORE) is expected


@pytest.mark.parametrize(
    ("path", "patterns", "expected"),
    [
        ("a.dcm", [], False),
        ("Thumbs.db", [], False),
        ("IMG.DCM", ["*.dcm"], True),
        ("img.dcm", ["*.DCM"], True),
        ("IMG0001", ["IMG????"], True),
        ("IMG00001", ["IMG????"], False),
        ("scan1.raw", ["*.tmp", "scan[0-9].raw"], True),
    ],
)
def test_is_ignored_with_custom_patterns(path, patterns, expected):
    assert is_ignored(path, patterns) is expected


@pytest.mark.parametrize("patterns", [("Thumbs.db",), ["Thumbs.db"], iter(["Thumbs.db"])])
def test_tracker_accepts_any_iterable_of_patterns(patterns):
    tracker = ReadinessTracker(ignore=patterns)
    for now in (T0 + 1, T0 + 3):  # a one-shot iterator must not be used up by the first scan
        assert tracker.observe(scan(("Thumbs.db", 5, T0)), now) == {"Thumbs.db": R.IGNORED}


BACKOFF_CASES = [
    # base, max, failures, expected
    (2.0, 60.0, -1, 2.0),
    (2.0, 60.0, 0, 2.0),
    (2.0, 60.0, 1, 4.0),
    (2.0, 60.0, 2, 8.0),
    (2.0, 60.0, 3, 16.0),
    (2.0, 60.0, 4, 32.0),
    (2.0, 60.0, 5, 60.0),
    (2.0, 60.0, 6, 60.0),
    (2.0, 60.0, 1000, 60.0),
    (0.5, 3.0, 1, 1.0),
    (0.5, 3.0, 2, 2.0),
    (0.5, 3.0, 3, 3.0),
    (1.0, 1.0, 1, 1.0),
]


@pytest.mark.parametrize(("base", "cap", "failures", "expected"), BACKOFF_CASES)
def test_backoff_delay(base, cap, failures, expected):
    assert Backoff(base, cap).delay(failures) == pytest.approx(expected)


def test_backoff_doubles_until_the_cap_then_stays():
    backoff = Backoff(1.0, 100.0)
    delays = [backoff.delay(n) for n in range(12)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0, 100.0, 100.0, 100.0, 100.0]
