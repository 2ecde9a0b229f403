"""Prefect tasks of the share ingest. Thin: the work is in ``tasks.ingest_engine``."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.ingest_engine import BatchReport, IngestEngine
from tasks.readiness import Entry


class IngestStopped(Exception):
    """A batch stopped early because Orthanc or the share failed. Files not handled stay in place."""

    def __init__(self, report: BatchReport) -> None:
        super().__init__(report.stop_reason or "stopped")
        self.report = report


@task(
    name="ingest-batch",
    task_run_name="{share_name}: {count} ready file(s)",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,  # the sweep loop retries with backoff; a task retry would hammer a down Orthanc
)
def ingest_batch(engine: IngestEngine, entries: list[Entry], share_name: str, count: int) -> BatchReport:
    """Upload ``entries`` (ready files of one share) to Orthanc; delete what Orthanc confirmed and
    quarantine what it rejected. Fails (keeping every unhandled file) when Orthanc or the share fails."""
    logger = get_run_logger()
    report = engine.run_batch(entries)
    for warning in report.warnings:
        logger.warning(warning)
    for problem in report.problems:
        logger.warning("quarantined %s", problem)
    logger.info(report.summary())
    if report.stop_reason:
        raise IngestStopped(report)
    return report
