"""List and requeue quarantined files of a share (the ``owf quarantine`` command)."""

from __future__ import annotations

import contextlib

from tasks import quarantine as q
from tasks.config import LocalShareConfig, SiteConfig, SmbShareConfig
from tasks.secrets import resolve_password
from tasks.shares import FileGone, Share, open_share


def _open(cfg: SiteConfig, share_cfg: LocalShareConfig | SmbShareConfig) -> Share:
    return open_share(share_cfg, resolve_password(share_cfg, f"share {share_cfg.name!r}"))


def _items(share: Share, folder: str) -> list[q.QuarantinedFile]:
    entries = share.scan(skip_folder="\0", under=folder)  # a missing folder lists as empty
    by_path = {e.path: e for e in entries}
    items = []
    for e in entries:
        if e.path.endswith(q.REASON_SUFFIX):
            continue
        reason_path = e.path + q.REASON_SUFFIX
        raw = share.read_bytes(reason_path) if reason_path in by_path else None
        items.append(q.parse_reason(e.path, folder, raw, e.size))
    return sorted(items, key=lambda i: i.path)


def _has_folder(share: Share, folder: str) -> bool:
    try:
        share.scan(skip_folder="\0", under=folder)
    except Exception:
        return False
    return True


def list_quarantine(cfg: SiteConfig, share_cfg: LocalShareConfig | SmbShareConfig) -> list[q.QuarantinedFile]:
    share = _open(cfg, share_cfg)
    folder = cfg.ingest_for(share_cfg).quarantine_folder
    try:
        return _items(share, folder)
    finally:
        share.close()


def requeue(
    cfg: SiteConfig, share_cfg: LocalShareConfig | SmbShareConfig, original_paths: list[str] | None
) -> tuple[list[str], list[str]]:
    """Move quarantined files back to their original paths (all when ``original_paths`` is None).
    Returns (requeued paths, problems). A file whose original path is taken again stays in quarantine."""
    share = _open(cfg, share_cfg)
    folder = cfg.ingest_for(share_cfg).quarantine_folder
    moved: list[str] = []
    problems: list[str] = []
    try:
        items = _items(share, folder)
        wanted = None if original_paths is None else {p.strip("/") for p in original_paths}
        found = set()
        for item in items:
            if wanted is not None and item.original_path not in wanted and item.path not in wanted:
                continue
            found.add(item.original_path)
            found.add(item.path)
            if share.exists(item.original_path):
                problems.append(f"{item.original_path}: a file of that name is in the share again")
                continue
            share.move(item.path, item.original_path)
            with contextlib.suppress(FileGone):
                share.remove(item.path + q.REASON_SUFFIX)
            moved.append(item.original_path)
        for missing in sorted((wanted or set()) - found):
            problems.append(f"{missing}: not in quarantine")
    finally:
        share.close()
    return moved, problems
