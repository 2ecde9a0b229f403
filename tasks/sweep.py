"""One share's scan-and-decide loop state, without Prefect: which files are ready now, which are ignored,
and how long to wait after a failure.

The scan itself is a plain call, not a Prefect task: an empty scan every few seconds must cost neither a
task-run record in the database nor the CPU of creating one. Only a scan that found ready files turns into
a task run (``tasks.ingest.ingest_batch``).
"""

from __future__ import annotations

import logging

from tasks.config import IngestSettings
from tasks.readiness import Backoff, Entry, Readiness, ReadinessTracker
from tasks.shares import Share


class Sweeper:
    def __init__(self, share: Share, settings: IngestSettings, logger: logging.Logger | logging.LoggerAdapter):
        self.share = share
        self.settings = settings
        self.log = logger
        self.tracker = ReadinessTracker(settings.ignore, settings.min_age_seconds)
        self.backoff = Backoff(settings.interval_seconds, settings.backoff_max_seconds)
        self.failures = 0
        self._reported_ignored: set[str] = set()
        self._deferred: dict[str, tuple[int, float, float]] = {}  # path -> (size, mtime, until)
        self.waiting = 0  # files seen but not ready at the last scan

    def poll(self, now: float) -> list[Entry]:
        """Scan the share once; return the files ready to be read (at most max_files_per_batch).
        Raises ShareError when the share cannot be listed."""
        entries = self.share.scan(self.settings.quarantine_folder)
        decisions = self.tracker.observe(entries, now)
        ready: list[Entry] = []
        waiting = 0
        for entry in entries:
            d = decisions[entry.path]
            if d is Readiness.READY:
                held = self._deferred.get(entry.path)
                if held and held[:2] == (entry.size, entry.mtime) and now < held[2]:
                    waiting += 1  # looked unfinished; wait for a change or the grace period
                    continue
                self._deferred.pop(entry.path, None)
                ready.append(entry)
            elif d is Readiness.IGNORED:
                if entry.path not in self._reported_ignored:
                    self._reported_ignored.add(entry.path)
                    self.log.info("ignoring %s (matches an ignore pattern; left in place)", entry.path)
            else:
                waiting += 1
        self.waiting = waiting
        ready.sort(key=lambda e: e.path)
        return ready[: self.settings.max_files_per_batch]

    def handled(self, paths: list[str], deferred: dict[str, float] | None = None,
                entries: list[Entry] | None = None) -> None:  # fmt: skip
        """Forget files that left the share; hold back ``deferred`` ones (path -> until) while unchanged."""
        for p in paths:
            self.tracker.forget(p)
            self._deferred.pop(p, None)
        by_path = {e.path: e for e in entries or []}
        for p, until in (deferred or {}).items():
            if p in by_path:
                self._deferred[p] = (by_path[p].size, by_path[p].mtime, until)

    def next_delay(self) -> float:
        return self.backoff.delay(self.failures) if self.failures else self.settings.interval_seconds
