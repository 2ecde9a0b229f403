"""When is a file in a share ready to be read? Pure logic: no disk, no clock, no Prefect.

A writer on another host (a modality, a robocopy job, an NFS client) gives no signal when it is done, and
network file systems cache attributes for seconds. So a file is read only when

* it is not empty (a 0-byte file is a file being created, not a broken one),
* its size and modification time are the same in two consecutive scans, and
* it is at least ``min_age_seconds`` old by its modification time (0 by default).

The two-scan rule applies even to files that look old: copy tools keep the source's mtime while they are
still writing. On SMB, an exclusive open that fails with a sharing violation is a further "not yet" that
the share client reports; it is not decided here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class Entry:
    """One file seen in a scan. ``path`` is relative to the share root, with ``/`` separators."""

    path: str
    size: int
    mtime: float


class Readiness(Enum):
    READY = "ready"
    NEW = "new"  # first time seen: wait for a second scan
    CHANGING = "changing"  # size or mtime differ from the last scan
    EMPTY = "empty"  # 0 bytes: still being created
    TOO_YOUNG = "too young"  # unchanged, but younger than min_age_seconds
    IGNORED = "ignored"  # matches an ignore pattern (Thumbs.db, ~$lock files, ...)


def is_ignored(path: str, patterns: Iterable[str]) -> bool:
    """True when the file's name matches one of the glob ``patterns`` (case-insensitive)."""
    name = path.rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatchcase(name, p.lower()) for p in patterns)


class ReadinessTracker:
    """Remembers what the previous scan saw and decides, per file, whether it may be read now."""

    def __init__(self, ignore: Iterable[str] = (), min_age_seconds: float = 0.0) -> None:
        self._ignore = tuple(ignore)
        self._min_age = min_age_seconds
        self._last: dict[str, Entry] = {}

    def observe(self, entries: Iterable[Entry], now: float) -> dict[str, Readiness]:
        """Record one scan (taken at ``now``, epoch seconds) and classify every file in it.

        Files not in this scan are forgotten: if they come back they count as new.
        """
        decisions: dict[str, Readiness] = {}
        seen: dict[str, Entry] = {}
        for entry in entries:
            seen[entry.path] = entry
            decisions[entry.path] = self._decide(entry, self._last.get(entry.path), now)
        self._last = seen
        return decisions

    def forget(self, path: str) -> None:
        """Drop a file after it was handled, so a new file under the same name starts from scratch."""
        self._last.pop(path, None)

    def _decide(self, entry: Entry, previous: Entry | None, now: float) -> Readiness:
        if is_ignored(entry.path, self._ignore):
            return Readiness.IGNORED
        if entry.size == 0:
            return Readiness.EMPTY
        if previous is None:
            return Readiness.NEW
        if previous.size != entry.size or previous.mtime != entry.mtime:
            return Readiness.CHANGING
        if now - entry.mtime < self._min_age:
            return Readiness.TOO_YOUNG
        return Readiness.READY


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before the next attempt after ``failures`` consecutive failures: base, 2x, 4x, ... capped."""

    base_seconds: float
    max_seconds: float

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return self.base_seconds
        return min(self.max_seconds, self.base_seconds * (2 ** min(failures, 30)))
