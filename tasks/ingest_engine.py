"""Move ready files from a share into Orthanc: upload, confirm, then delete or quarantine.

This is the work of one sweep batch, without Prefect: ``tasks.ingest`` wraps it in a task and the flow
decides when to call it. The one rule everything here serves: a source file is deleted only after Orthanc
answered Success or AlreadyStored for it (for a ZIP: for every DICOM entry in it), and only if the file did
not change while we read it. Files Orthanc rejects go to quarantine with a reason; when Orthanc is down or
answers 5xx nothing is deleted or moved and the batch stops early, so the caller can back off.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import BinaryIO

from tasks import quarantine as q
from tasks.config import IngestSettings
from tasks.dicom_sniff import HEAD_BYTES, Kind, classify, incomplete_image
from tasks.errors import OrthancAuthError, OrthancError, OrthancUnavailable, ShareError
from tasks.orthanc import OrthancClient
from tasks.orthanc_answers import UploadAnswer, Verdict
from tasks.readiness import Entry
from tasks.shares import FileBusy, FileChanged, FileGone, Share

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


class Outcome(Enum):
    UPLOADED = "uploaded"
    ALREADY_STORED = "already stored"
    QUARANTINED = "quarantined"
    SET_ASIDE = "set aside"  # DICOMDIR: not an image, not an error
    NOT_READY = "not ready"  # busy or changed while read: try again next scan
    GONE = "gone"
    KEPT = "kept"  # Orthanc or the share failed: the file stays where it is


@dataclass
class FileResult:
    path: str
    outcome: Outcome
    size: int = 0
    instances: int = 0
    study_ids: set[str] = field(default_factory=set)
    message: str = ""
    warning: str = ""
    defer_until: float | None = None  # epoch seconds: do not offer this file again before then, unless it changes


@dataclass
class BatchReport:
    """Counts of one batch (or, merged, of one run). No patient data: paths, counts and Orthanc IDs."""

    files: int = 0
    uploaded: int = 0  # instances newly stored
    already_stored: int = 0
    not_ready: int = 0
    quarantined: int = 0
    set_aside: int = 0
    kept: int = 0
    gone: int = 0
    bytes: int = 0
    seconds: float = 0.0
    study_ids: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per quarantined file
    stop_reason: str | None = None  # why the batch stopped early (Orthanc or share unavailable)
    fatal: bool = False  # the stop needs an operator (credentials, Orthanc config), not patience
    handled: list[str] = field(default_factory=list)  # paths that left the share (deleted or moved)
    deferred: dict[str, float] = field(default_factory=dict)  # path -> epoch seconds to wait until

    def add(self, r: FileResult) -> None:
        self.files += 1
        if r.outcome is Outcome.UPLOADED:
            self.uploaded += r.instances
        elif r.outcome is Outcome.ALREADY_STORED:
            self.already_stored += max(r.instances, 1)
        elif r.outcome is Outcome.QUARANTINED:
            self.quarantined += 1
            self.problems.append(f"{r.path}: {r.message}")
        elif r.outcome is Outcome.SET_ASIDE:
            self.set_aside += 1
        elif r.outcome is Outcome.NOT_READY:
            self.not_ready += 1
        elif r.outcome is Outcome.GONE:
            self.gone += 1
        elif r.outcome is Outcome.KEPT:
            self.kept += 1
        if r.outcome in (Outcome.UPLOADED, Outcome.ALREADY_STORED, Outcome.QUARANTINED, Outcome.SET_ASIDE):
            self.handled.append(r.path)
            self.bytes += r.size
        if r.defer_until is not None:
            self.deferred[r.path] = r.defer_until
        self.study_ids |= r.study_ids
        if r.warning:
            self.warnings.append(r.warning)

    def merge(self, other: BatchReport) -> None:
        for name in ("files", "uploaded", "already_stored", "not_ready", "quarantined", "set_aside", "kept",
                     "gone", "bytes", "seconds"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.study_ids |= other.study_ids
        self.warnings += other.warnings
        self.problems += other.problems
        self.handled += other.handled
        self.deferred.update(other.deferred)
        self.stop_reason = other.stop_reason
        self.fatal = other.fatal

    @property
    def did_something(self) -> bool:
        return bool(self.files or self.stop_reason)

    def summary(self) -> str:
        line = (
            f"{self.files} file(s): {self.uploaded} uploaded, {self.already_stored} already stored, "
            f"{self.quarantined} quarantined, {self.set_aside} set aside, {self.not_ready} not ready, "
            f"{self.kept} kept for retry; {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s; "
            f"{len(self.study_ids)} stud{'y' if len(self.study_ids) == 1 else 'ies'}"
        )
        return line + (f"; stopped: {self.stop_reason}" if self.stop_reason else "")


class _Stop(Exception):
    def __init__(self, reason: str, fatal: bool) -> None:
        super().__init__(reason)
        self.reason, self.fatal = reason, fatal


class _FileChanged(Exception):
    pass


class _Incomplete(Exception):
    """An image object with no pixel data (yet)."""


def _stream(f: BinaryIO, head: bytes, size: int, digest: hashlib._Hash) -> Iterator[bytes]:
    """Yield exactly ``size`` bytes (``head`` first), hashing them; raise if the file is not that long."""
    digest.update(head)
    sent = len(head)
    yield head
    while sent < size:
        chunk = f.read(min(CHUNK, size - sent))
        if not chunk:
            raise _FileChanged("file became shorter while it was read")
        digest.update(chunk)
        sent += len(chunk)
        yield chunk
    if f.read(1):
        raise _FileChanged("file grew while it was read")


class IngestEngine:
    """Uploads ready files of one share. One engine per share and run; ``run_batch`` per sweep."""

    def __init__(
        self,
        share: Share,
        orthanc: OrthancClient,
        settings: IngestSettings,
        *,
        source_metadata: str = "IngestSource",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.share = share
        self.orthanc = orthanc
        self.settings = settings
        self.source_metadata = source_metadata
        self._clock = clock
        self._quarantine_lock = threading.Lock()

    # -- batch -----------------------------------------------------------------------------------------
    def run_batch(self, entries: list[Entry]) -> BatchReport:
        report = BatchReport()
        stop = threading.Event()
        stop_info: list[_Stop] = []
        started = self._clock()

        def one(entry: Entry) -> FileResult:
            if stop.is_set():
                return FileResult(entry.path, Outcome.KEPT)
            try:
                return self._ingest_file(entry)
            except _Stop as s:
                stop_info.append(s)
                stop.set()
                return FileResult(entry.path, Outcome.KEPT, message=s.reason)

        workers = min(self.settings.parallel_uploads, max(1, len(entries)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload") as pool:
            for result in pool.map(one, entries):
                report.add(result)
        if stop_info:
            report.stop_reason = stop_info[0].reason
            report.fatal = any(s.fatal for s in stop_info)
        report.seconds = (self._clock() - started).total_seconds()
        return report

    # -- one file --------------------------------------------------------------------------------------
    def _ingest_file(self, entry: Entry) -> FileResult:
        path = entry.path
        try:
            with self.share.open_read(path, entry) as f:
                # A file up to the stream threshold is read whole, in one request (SMB: one round trip).
                whole = self._read_whole(f, entry) if entry.size <= self.settings.stream_threshold_bytes else None
                head = whole[:HEAD_BYTES] if whole is not None else f.read(HEAD_BYTES)
                kind = classify(path, head)
                if kind is Kind.ZIP:
                    return self._ingest_zip(entry, f, whole)
                if kind is Kind.DICOMDIR:
                    answer, md5 = None, ""
                else:
                    answer, md5 = self._upload(f, head, whole, entry.size, kind is Kind.DICOM)
                    if answer.verdict in (Verdict.STORED, Verdict.ALREADY_STORED):
                        # Delete through the handle we hold (SMB: nobody could change the file meanwhile).
                        confirmed = self._confirmed(entry, answer, md5, f)
                        if confirmed is not None:
                            return confirmed
            if answer is None:
                return self._set_aside(entry)
            if answer.verdict is Verdict.REJECTED and kind is Kind.DICOM and self._young(entry):
                # DICOM that Orthanc cannot parse yet: perhaps its writer paused mid-file. Wait, once.
                return self._wait(entry, f"Orthanc cannot read it yet ({answer.reason})")
            return self._settle(entry, answer)
        except _Incomplete:
            if self._young(entry):
                return self._wait(entry, "an image without pixel data so far")
            return self._quarantine(
                entry,
                q.REJECTED,
                "image object without pixel data: the file looks cut short "
                f"(unchanged for {self.settings.incomplete_grace_seconds:.0f} s or more)",
                None,
            )
        except FileBusy:
            return FileResult(path, Outcome.NOT_READY)
        except (_FileChanged, FileChanged):
            return FileResult(path, Outcome.NOT_READY, message="changed while read")
        except FileGone:
            return FileResult(path, Outcome.GONE)
        except OrthancAuthError as e:
            raise _Stop(str(e), fatal=True) from e
        except OrthancUnavailable as e:
            raise _Stop(str(e), fatal=False) from e
        except OrthancError as e:
            raise _Stop(str(e), fatal=True) from e
        except ShareError as e:
            raise _Stop(str(e), fatal=False) from e

    @staticmethod
    def _read_whole(f: BinaryIO, entry: Entry) -> bytes:
        data = f.read(entry.size + 1)
        while len(data) < entry.size:  # a reader may return less than asked; only b"" means the end
            chunk = f.read(entry.size + 1 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) != entry.size:
            raise _FileChanged("size differs from the scan")
        return data

    def _upload(
        self, f: BinaryIO, head: bytes, whole: bytes | None, size: int, looks_like_dicom: bool
    ) -> tuple[UploadAnswer, str]:
        digest = hashlib.md5(usedforsecurity=False)
        if whole is not None:
            if incomplete_image(whole):
                raise _Incomplete()
            digest.update(whole)
            answer = self.orthanc.upload(whole, size, looks_like_dicom)
        else:
            answer = self.orthanc.upload(_stream(f, head, size, digest), size, looks_like_dicom)
        return answer, digest.hexdigest()

    def _confirmed(self, entry: Entry, answer: UploadAnswer, md5: str, f: BinaryIO) -> FileResult | None:
        """Orthanc holds the instance: tag its source, then delete the file (still open as ``f``).
        None when the file must go to quarantine instead (a conflicting resend, conflict_policy: quarantine),
        which can only happen once ``f`` is closed."""
        path = entry.path
        assert answer.instance_id is not None
        self.orthanc.set_instance_metadata(answer.instance_id, self.source_metadata, self.share.source)
        warning = ""
        if answer.verdict is Verdict.ALREADY_STORED:
            stored_md5 = self.orthanc.attachment_md5(answer.instance_id)
            if stored_md5 and stored_md5 != md5:
                if self.settings.conflict_policy == "quarantine":
                    return None
                warning = (
                    f"{path}: Orthanc already holds instance {answer.instance_id} with different content; "
                    "the resent file was ignored (Orthanc keeps the first copy unless OverwriteInstances is on)"
                )
        if not self._unchanged(entry):
            return FileResult(path, Outcome.NOT_READY, message="changed during upload; will upload again")
        self.share.remove_open(f, path)
        outcome = Outcome.UPLOADED if answer.verdict is Verdict.STORED else Outcome.ALREADY_STORED
        studies = {answer.study_id} if answer.study_id else set()
        return FileResult(path, outcome, entry.size, 1, studies, warning=warning)

    def _settle(self, entry: Entry, answer: UploadAnswer) -> FileResult:
        """Act on an answer that did not end in a delete (after the file was closed)."""
        if answer.verdict is Verdict.UNAVAILABLE:
            raise _Stop(answer.reason, fatal=False)
        if answer.verdict is Verdict.AUTH:
            raise _Stop(answer.reason, fatal=True)
        if answer.verdict is Verdict.REJECTED:
            return self._quarantine(entry, q.REJECTED, answer.reason, answer.orthanc_status)
        return self._quarantine(
            entry,
            q.CONFLICT,
            f"Orthanc already holds instance {answer.instance_id} with other content; "
            "kept for review (conflict_policy: quarantine)",
            None,
        )

    def _young(self, entry: Entry) -> bool:
        return self._clock().timestamp() - entry.mtime < self.settings.incomplete_grace_seconds

    def _wait(self, entry: Entry, why: str) -> FileResult:
        until = entry.mtime + self.settings.incomplete_grace_seconds
        return FileResult(entry.path, Outcome.NOT_READY, message=f"looks unfinished: {why}", defer_until=until)

    def _unchanged(self, entry: Entry) -> bool:
        """Is the file still as it was scanned? On SMB our exclusive open, held from the check at open
        time through the upload, already guaranteed it."""
        if self.share.exclusive_reads:
            return True
        try:
            now = self.share.stat(entry.path)
        except FileGone:
            return False
        return (now.size, now.mtime) == (entry.size, entry.mtime)

    # -- ZIP -------------------------------------------------------------------------------------------
    def _ingest_zip(self, entry: Entry, f: BinaryIO, whole: bytes | None) -> FileResult:
        """Upload every entry of a ZIP on its own and judge each. Orthanc's own ZIP upload silently skips
        entries it cannot read, so it cannot tell us whether deleting the archive is safe."""
        stored = already = 0
        studies: set[str] = set()
        failed: list[str] = []
        ignored: list[str] = []
        try:
            if whole is not None:
                archive = zipfile.ZipFile(io.BytesIO(whole))
            else:
                f.seek(0)
                archive = zipfile.ZipFile(f)
            infos = [i for i in archive.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            archive = None
            infos = []
            failed.append(f"(archive): damaged ZIP archive ({e})")
        for info in infos:
            assert archive is not None
            name = info.filename
            try:
                with archive.open(info) as ef:
                    head = ef.read(HEAD_BYTES)
                    kind = classify(name, head)
                    if kind is Kind.DICOMDIR:
                        ignored.append(f"{name} (DICOMDIR)")
                        continue
                    if kind is Kind.ZIP:
                        failed.append(f"{name}: nested ZIP archives are not unpacked")
                        continue
                    digest = hashlib.md5(usedforsecurity=False)
                    stream = _stream(ef, head, info.file_size, digest)
                    answer = self.orthanc.upload(stream, info.file_size, kind is Kind.DICOM)
            except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as e:
                failed.append(f"{name}: cannot be unpacked ({e})")
                continue
            except _FileChanged as e:
                failed.append(f"{name}: {e}")
                continue
            if answer.verdict is Verdict.UNAVAILABLE:
                raise _Stop(answer.reason, fatal=False)
            if answer.verdict is Verdict.AUTH:
                raise _Stop(answer.reason, fatal=True)
            if answer.verdict is Verdict.REJECTED:
                if kind is Kind.DICOM or name.lower().endswith((".dcm", ".dicom")):
                    failed.append(f"{name}: {answer.reason}")
                else:
                    ignored.append(f"{name} (not DICOM)")
                continue
            assert answer.instance_id is not None
            self.orthanc.set_instance_metadata(answer.instance_id, self.source_metadata, self.share.source)
            if answer.study_id:
                studies.add(answer.study_id)
            if answer.verdict is Verdict.STORED:
                stored += 1
            else:
                already += 1
        f.close()  # release the SMB handle before moving or deleting the archive
        if failed:
            reason = f"ZIP archive: {len(failed)} entr{'y' if len(failed) == 1 else 'ies'} could not be stored"
            result = self._quarantine(entry, q.ZIP_FAILED, reason, None, details=failed + ignored)
        elif stored + already == 0:
            result = self._quarantine(entry, q.ZIP_FAILED, "ZIP archive holds no DICOM image", None,
                                      details=ignored)  # fmt: skip
        elif not self._unchanged(entry):
            return FileResult(entry.path, Outcome.NOT_READY, message="changed during upload")
        else:
            self.share.remove(entry.path)
            outcome = Outcome.UPLOADED if stored else Outcome.ALREADY_STORED
            result = FileResult(entry.path, outcome, entry.size, stored or already)
            if stored and already:
                result.message = f"{already} entries were already stored"
        result.study_ids = studies
        return result

    # -- quarantine ------------------------------------------------------------------------------------
    def _set_aside(self, entry: Entry) -> FileResult:
        reason = "DICOMDIR media index: holds no image; the images it lists are ingested on their own"
        result = self._quarantine(entry, q.DICOMDIR, reason, None)
        if result.outcome is Outcome.QUARANTINED:
            result.outcome = Outcome.SET_ASIDE
        return result

    def _quarantine(
        self, entry: Entry, kind: str, reason: str, orthanc_status: int | None, details: list[str] | None = None
    ) -> FileResult:
        if not self._unchanged(entry):
            return FileResult(entry.path, Outcome.NOT_READY, message="changed while read")
        folder = self.settings.quarantine_folder
        doc = q.reason_document(
            share=self.share.name,
            source=self.share.source,
            original_path=entry.path,
            kind=kind,
            reason=reason,
            when=self._clock(),
            size=entry.size,
            orthanc_status=orthanc_status,
            details=details,
        )
        with self._quarantine_lock:  # two threads must not pick the same free name
            taken: set[str] = set()
            target = q.quarantine_target(folder, entry.path)
            while self.share.exists(target):
                taken.add(target)
                target = q.quarantine_target(folder, entry.path, taken)
            self.share.move(entry.path, target)
        self.share.write_bytes(target + q.REASON_SUFFIX, doc)
        return FileResult(entry.path, Outcome.QUARANTINED, entry.size, message=f"{reason} -> {target}")
