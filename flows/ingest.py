"""Share ingest: one scheduled run per share and window, sweeping the share every few seconds.

Why a window and not one run per scan: every Prefect flow run is a new Python process (about 1.5-2 CPU
seconds here) and about 50 KB of database. One run per 2-second scan would keep most of a core busy and
grow the database by gigabytes a day. Instead each scheduled run sweeps for ``window_seconds`` (default
300) and the next scheduled run takes over; a per-share Prefect concurrency limit makes sure two runs never
sweep the same share at once (the next run waits for the previous one during the short handover). An idle
sweep is one directory listing: no task run, no log line. A sweep that finds ready files becomes one
``ingest-batch`` task run in the UI.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.config import load_config
from tasks.errors import ShareAuthError, ShareConfigError, ShareError, WorkflowError
from tasks.ingest import IngestStopped, ingest_batch
from tasks.ingest_engine import BatchReport, IngestEngine
from tasks.orthanc import client_from_config
from tasks.secrets import resolve_password
from tasks.shares import open_share
from tasks.sweep import Sweeper


class IngestFailed(WorkflowError):
    """The run ended with files it could not deliver; they are still in the share."""


def _run_name() -> str:
    params = flow_run.parameters or {}
    start = flow_run.scheduled_start_time or datetime.now(UTC)
    return f"ingest-{params.get('share', 'share')}-{start:%Y%m%d-%H%M%S}"


def share_lock(share: str, wait_seconds: float):
    """Hold the per-share concurrency slot (limit 1) for the whole sweep; yields False if the previous
    run did not hand over within ``wait_seconds``."""
    from tasks.prefect_limits import exclusive, share_limit_name

    return exclusive(share_limit_name(share), wait_seconds)


def _artifact(share: str, report: BatchReport, orthanc_url: str) -> None:
    rows = [
        ("files handled", report.files),
        ("instances uploaded", report.uploaded),
        ("already stored", report.already_stored),
        ("quarantined", report.quarantined),
        ("set aside (DICOMDIR)", report.set_aside),
        ("not ready (retried)", report.not_ready),
        ("kept after a failure", report.kept),
        ("MB", f"{report.bytes / 1e6:.1f}"),
        ("seconds uploading", f"{report.seconds:.1f}"),
    ]
    lines = [f"## Ingest of share `{share}`", "", "| | |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if report.study_ids:
        lines += ["", "### Studies touched", ""]
        lines += [f"- [{sid}]({orthanc_url}/app/explorer.html#study?uuid={sid})" for sid in sorted(report.study_ids)]
    if report.problems:
        lines += ["", "### Quarantined", ""] + [f"- {p}" for p in report.problems[:200]]
    if report.warnings:
        lines += ["", "### Warnings", ""] + [f"- {w}" for w in report.warnings[:200]]
    if report.stop_reason:
        lines += ["", f"**Stopped:** {report.stop_reason}"]
    create_markdown_artifact("\n".join(lines), key=f"ingest-{share}", description=report.summary())


@flow(name="ingest-share", flow_run_name=_run_name, persist_result=False)
def ingest_share(share: str = "inbox", window_seconds: int = 0, config_path: str = "") -> dict[str, Any]:
    """Sweep one configured share into Orthanc for one window.

    Args:
        share: Name of the share in the site configuration (e.g. inbox, ct-room1).
        window_seconds: How long this run keeps sweeping; 0: the configured window (default 300 s).
        config_path: Site config file on the worker. Empty: $OWF_CONFIG, else the embedded default.
    """
    logger = get_run_logger()
    cfg = load_config(config_path)
    share_cfg = cfg.share(share)
    settings = cfg.ingest_for(share_cfg)
    window = window_seconds or settings.window_seconds
    scheduled = flow_run.scheduled_start_time or datetime.now(UTC)
    deadline = scheduled + timedelta(seconds=window + settings.handover_seconds)
    now = datetime.now(UTC)
    if deadline <= now:
        logger.info("this run started after its window ended; a newer run covers the share")
        return {"skipped": "late"}

    with share_lock(share, wait_seconds=max(1.0, (deadline - now).total_seconds() - settings.interval_seconds)) as got:
        if not got:
            logger.info("another run is still sweeping share %r; this one stands down", share)
            return {"skipped": "busy"}
        src = open_share(share_cfg, resolve_password(share_cfg, f"share {share!r}"))
        with client_from_config(cfg, max_connections=settings.parallel_uploads) as orthanc:
            engine = IngestEngine(src, orthanc, settings, source_metadata=cfg.orthanc.source_metadata)
            swept_from = datetime.now(UTC)
            total, last_error = _sweep(share, src, engine, settings, deadline, logger)
            swept_until = datetime.now(UTC)
        src.close()

    if total.did_something:
        logger.info("share %r: %s", share, total.summary())
        _artifact(share, total, cfg.orthanc_url)
    if last_error:
        raise IngestFailed(last_error)
    return {
        "swept_from": swept_from.isoformat(),
        "swept_until": swept_until.isoformat(),
        "uploaded": total.uploaded,
        "already_stored": total.already_stored,
        "quarantined": total.quarantined,
        "set_aside": total.set_aside,
        "kept": total.kept,
        "studies": sorted(total.study_ids),
    }


def _sweep(share, src, engine, settings, deadline, logger) -> tuple[BatchReport, str | None]:
    """Scan until ``deadline``; upload what is ready. Returns the run's totals and, if the share or
    Orthanc was still failing at the end, the operator-facing reason."""
    sweeper = Sweeper(src, settings, logger)
    total = BatchReport()
    share_error: str | None = None
    orthanc_error: str | None = None
    while True:
        ready = []
        try:
            ready = sweeper.poll(time.time())
        except (ShareAuthError, ShareConfigError):
            raise  # needs an operator: fail now with the message
        except ShareError as e:
            sweeper.failures += 1
            if share_error != str(e):
                logger.warning("%s; retrying with backoff", e)
            share_error = str(e)
        else:
            if share_error:
                logger.info("share %r reachable again", share)
                share_error = None
                sweeper.failures = 0
        if ready:
            state = ingest_batch(engine, ready, share, len(ready), return_state=True)
            if state.is_completed():
                report = state.result()
                if orthanc_error:
                    logger.info("share %r: delivering again after: %s", share, orthanc_error)
                orthanc_error = None
                sweeper.failures = 0
            else:
                exc = state.result(raise_on_failure=False)
                if not isinstance(exc, IngestStopped):
                    raise exc if isinstance(exc, BaseException) else IngestFailed(str(exc))
                report = exc.report
                total.merge(report)
                sweeper.handled(report.handled, report.deferred, ready)
                if report.fatal:
                    raise IngestFailed(f"{report.stop_reason}; files stay in the share until this is fixed")
                sweeper.failures += 1
                orthanc_error = (
                    f"{report.stop_reason}; files are kept in the share and retried with backoff, nothing "
                    "was deleted or quarantined because of it"
                )
                report = BatchReport()
            total.merge(report)
            sweeper.handled(report.handled, report.deferred, ready)
        delay = sweeper.next_delay()
        if datetime.now(UTC) + timedelta(seconds=delay) >= deadline:
            return total, orthanc_error or share_error
        time.sleep(delay)
