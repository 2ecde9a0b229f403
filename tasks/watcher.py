"""Follow Orthanc's change log and start exactly one study run per stable state of a study.

The decisions are in ``tasks.watch_logic`` (pure); this module does the reading. Where runs are created and
where the cursor is kept are arguments (``create_run``, ``store``), so the Prefect parts stay in the flow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tasks.config import WatchSettings
from tasks.orthanc import OrthancClient
from tasks.watch_logic import (
    Change,
    LogState,
    after_horizon,
    derived_from,
    log_state,
    looks_settled,
    next_cursor,
    run_key,
    run_name,
    within_horizon,
)

PAGE = 500
OPENING = ("NewStudy", "NewSeries", "StableStudy")


@dataclass
class WatchCursor:
    """What survives a restart: every change up to ``seq`` is handled. ``horizon`` (Orthanc time): studies
    updated before it and already stable at it are never notified. ``date``: Orthanc time of change ``seq``."""

    seq: int
    horizon: str
    date: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> WatchCursor | None:
        if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int):
            return None
        return cls(int(doc["seq"]), str(doc.get("horizon", "")), str(doc.get("date", "")))


class CursorStore(Protocol):
    def load(self) -> WatchCursor | None: ...

    def save(self, cursor: WatchCursor) -> None: ...


@dataclass(frozen=True)
class StudyRun:
    """A run to create: ``key`` makes a second creation return the same run."""

    study_id: str
    key: str
    name: str
    last_update: str
    study_uid: str | None
    why: str


# create_run(run) -> flow run id; raises WorkflowError (or anything) when the run could not be created
RunCreator = Callable[[StudyRun], str]


@dataclass
class WatchReport:
    runs: list[tuple[StudyRun, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    waiting: int = 0


class StudyWatcher:
    """One per watcher run. ``poll()`` reads what is new in the log and creates the runs that are due."""

    def __init__(
        self,
        orthanc: OrthancClient,
        create_run: RunCreator,
        store: CursorStore,
        settings: WatchSettings,
        logger: logging.Logger | logging.LoggerAdapter,
    ) -> None:
        self.orthanc = orthanc
        self.create_run = create_run
        self.store = store
        self.settings = settings
        self.log = logger
        self.cursor: WatchCursor | None = None
        self.read_to = 0  # every change up to here has been read into ``open``
        self.open: dict[str, int] = {}  # study -> first change seq that is not handled yet
        self.stable_seen: set[str] = set()
        self.created: set[str] = set()  # keys created by this watcher run (saves repeat calls)

    # -- the log ---------------------------------------------------------------------------------------
    def _start(self) -> WatchCursor:
        saved = self.store.load()
        if saved is not None:
            self.log.info("following Orthanc's change log from change %d", saved.seq)
            return saved
        now = self.orthanc.now()
        horizon = self.settings.horizon or now
        cursor = WatchCursor(0, horizon)
        self.store.save(cursor)
        self.log.info("first start: studies updated from %s on will be notified", horizon)
        return cursor

    def _read(self, report: WatchReport) -> None:
        assert self.cursor is not None
        first_page = True
        while True:
            page = self.orthanc.get_json("/changes", since=self.read_to, limit=PAGE)
            raw = page.get("Changes", [])
            changes = [Change.from_orthanc(c) for c in raw]
            if first_page:
                first_page = False
                last = int(page.get("Last", 0))
                state = log_state(self.read_to, last, changes[0].seq if changes else None)
                if state is LogState.RESET:
                    self._rebuild(state, last, changes, report)
                    continue  # read the new log from its start
                if state is LogState.GAP:
                    self._rebuild(state, last, changes, report)
                    if not changes:
                        self.read_to = last
            for doc, ch in zip(raw, changes, strict=True):
                self._absorb(ch, str(doc.get("Date", "")))
            if changes:
                self.read_to = changes[-1].seq
                self.cursor.date = str(raw[-1].get("Date", "")) or self.cursor.date
            if page.get("Done", True) or not changes:
                return

    def _absorb(self, ch: Change, date: str) -> None:
        assert self.cursor is not None
        if ch.change_type not in OPENING:
            return
        if date and not after_horizon(date, self.cursor.horizon):
            return  # older than the horizon: not ours to notify
        study: str | None = ch.resource_id
        if ch.change_type == "NewSeries":
            series = self.orthanc.find_json(f"/series/{ch.resource_id}")
            study = str(series["ParentStudy"]) if series else None  # None: deleted since
        if study is None:
            return
        self.open.setdefault(study, ch.seq)
        if ch.change_type == "StableStudy":
            self.stable_seen.add(study)

    def _rebuild(self, state: LogState, last: int, changes: list[Change], report: WatchReport) -> None:
        """The log went backwards (a new or restored Orthanc database) or lost changes (cleared): open
        every study updated since the cursor's time and let the usual checks decide. Studies already
        notified are recognised by their notification metadata, so nothing is sent twice."""
        assert self.cursor is not None
        since = self.cursor.date or self.cursor.horizon
        if state is LogState.RESET:
            why = (f"Orthanc's change log restarted (its last change is {last}, we had read up to "
                   f"{self.read_to}): a new or restored database")  # fmt: skip
        else:
            first = changes[0].seq if changes else last + 1
            why = f"changes {self.read_to + 1}..{first - 1} of Orthanc's change log were deleted before we read them"
        studies = self.orthanc.get_json("/studies", expand="")
        hold = 1 if state is LogState.RESET else self.read_to + 1  # keeps the cursor here until handled
        reopened = 0
        for study in studies:
            updated = str(study.get("LastUpdate", ""))
            if after_horizon(updated, since) and after_horizon(updated, self.cursor.horizon):
                self.open.setdefault(str(study["ID"]), hold)
                reopened += 1
        message = f"{why}; checking the {reopened} studies updated since {since}"
        self.log.warning(message)
        report.warnings.append(message)
        if state is LogState.RESET:
            self.read_to = 0

    # -- the studies -----------------------------------------------------------------------------------
    def _decide(self, report: WatchReport) -> None:
        if not self.open:
            return
        orthanc_now: str | None = None
        for study_id, _seq in sorted(self.open.items(), key=lambda kv: kv[1]):
            study = self.orthanc.find_json(f"/studies/{study_id}")
            if study is None:
                self._close(study_id)  # deleted: nothing to notify
                continue
            origin = derived_from(study)
            if origin:
                self.log.debug("study %s is a copy of %s made by routing: not notified", study_id, origin)
                self._close(study_id)
                continue
            last_update = str(study.get("LastUpdate", ""))
            horizon = self.cursor.horizon if self.cursor else ""
            if not within_horizon(last_update, horizon, study_id in self.stable_seen):
                self.log.info("study %s was last updated at %s, before the watcher's horizon %s: not notified "
                              "(watch.horizon moves that point)", study_id, last_update, horizon)  # fmt: skip
                self._close(study_id)
                continue
            why = ""
            if not study.get("IsStable", False):
                self.stable_seen.discard(study_id)  # more images came: a new StableStudy change will follow
            elif study_id in self.stable_seen:
                why = "stable"
            else:
                if orthanc_now is None:
                    orthanc_now = self.orthanc.now()
                if looks_settled(last_update, orthanc_now, self.settings.settle_seconds):
                    why = (f"no images for {self.settings.settle_seconds} s but no StableStudy change "
                           "(Orthanc restarted while the study was settling?)")  # fmt: skip
            if not why:
                report.waiting += 1
                continue
            tags = study.get("MainDicomTags", {})
            run = StudyRun(
                study_id=study_id,
                key=run_key(study_id, last_update),
                name=run_name(tags.get("AccessionNumber"), tags.get("StudyInstanceUID"), study_id),
                last_update=last_update,
                study_uid=tags.get("StudyInstanceUID"),
                why=why,
            )
            if run.key not in self.created:
                run_id = self.create_run(run)  # raises: the study stays open, the cursor stays behind it
                self.created.add(run.key)
                report.runs.append((run, run_id))
                if why != "stable":
                    self.log.warning("study %s: %s", study_id, why)
            self._close(study_id)

    def _close(self, study_id: str) -> None:
        self.open.pop(study_id, None)
        self.stable_seen.discard(study_id)

    # -- one poll --------------------------------------------------------------------------------------
    def poll(self) -> WatchReport:
        """Read the log, create due runs, save the cursor. Raises OrthancError when Orthanc cannot be
        read and whatever ``create_run`` raises; in both cases nothing was skipped: the next poll retries."""
        report = WatchReport()
        if self.cursor is None:
            self.cursor = self._start()
            self.read_to = self.cursor.seq
        self._read(report)
        try:
            self._decide(report)
        finally:
            new = next_cursor(self.read_to, self.open)
            if new != self.cursor.seq:
                self.cursor.seq = new
                self.store.save(self.cursor)
        return report
