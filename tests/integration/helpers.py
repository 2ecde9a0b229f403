"""Helpers shared by the ingest integration tests."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from stack.services import SambaServer
from tasks.config import IngestSettings, LocalShareConfig, SmbShareConfig
from tasks.ingest_engine import BatchReport, IngestEngine
from tasks.orthanc import OrthancClient
from tasks.shares import LocalShare, Share, SmbShare
from tasks.sweep import Sweeper


class CountingTransport(httpx.HTTPTransport):
    """A real HTTP transport that counts requests per (method, path prefix) and can run a hook after each."""

    def __init__(self, after=None) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.after = after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.calls.append((request.method, request.url.path))
        if self.after:
            self.after(request, response)
        return response

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.calls if m == method and p == path)


@dataclass
class ShareUnderTest:
    share: Share
    root: Path  # the folder on disk behind the share (for SMB: the Samba share's directory)
    kind: str
    extra: dict = field(default_factory=dict)

    def place(self, src: Path, rel: str | None = None) -> Path:
        target = self.root / (rel or src.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, target)
        return target

    def files(self, skip_quarantine: bool = True) -> set[str]:
        out = set()
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and not (skip_quarantine and rel.startswith(".quarantine/")):
                out.add(rel)
        return out

    def quarantined(self) -> dict[str, dict]:
        """original path -> reason document, for every reason file in quarantine."""
        q = self.root / ".quarantine"
        docs = {}
        for reason in q.rglob("*.reason.json") if q.exists() else []:
            doc = json.loads(reason.read_text())
            docs[doc["original_path"]] = doc
        return docs


def local_share(root: Path, name: str = "inbox", source: str = "INBOX") -> ShareUnderTest:
    root.mkdir(parents=True, exist_ok=True)
    return ShareUnderTest(LocalShare(LocalShareConfig(name=name, source=source, path=root)), root, "local")


def smb_share_config(samba: SambaServer, name: str = "ct-room1", source: str = "CT_ROOM1", **kw) -> SmbShareConfig:
    kw.setdefault("share", samba.share_name)
    return SmbShareConfig(
        name=name,
        source=source,
        server="127.0.0.1",
        port=samba.port,
        username=samba.username,
        password_env="OWF_TEST_SMB_PASSWORD",
        **kw,
    )


def smb_share(samba: SambaServer, **kw) -> ShareUnderTest:
    cfg = smb_share_config(samba, **kw)
    return ShareUnderTest(SmbShare(cfg, samba.password), samba.share_dir, "smb")


def engine_for(sut: ShareUnderTest, orthanc_url: str, transport=None, **settings) -> IngestEngine:
    """An engine on ``sut``. Files written by a test are seconds old, so the grace given to files that look
    unfinished is 0 here unless a test sets it."""
    settings.setdefault("incomplete_grace_seconds", 0)
    client = OrthancClient(orthanc_url, transport=transport, timeout=10)
    return IngestEngine(sut.share, client, IngestSettings(**settings))


def drain(sut: ShareUnderTest, engine: IngestEngine, sweeps: int = 4, now: float = 2e9) -> BatchReport:
    """Run ``sweeps`` scans (clock advanced 10 s each, no sleeping) and a batch for every ready set."""
    sweeper = Sweeper(sut.share, engine.settings, logging.getLogger("test.sweep"))
    total = BatchReport()
    for i in range(sweeps):
        ready = sweeper.poll(now + 10 * i)
        if ready:
            report = engine.run_batch(ready)
            total.merge(report)
            sweeper.handled(report.handled, report.deferred, ready)
    return total
