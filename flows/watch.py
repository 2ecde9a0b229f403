"""Stable-study watcher: follows Orthanc's change log and starts one ``study-notify`` run per stable study.

Same windowed design as the share sweeps (see flows/ingest.py): one scheduled run reads ``/changes`` every
few seconds for a window (default 300 s), holding a Prefect lock so that two watchers never overlap; an
idle read is one HTTP request, no task run, no log line.

Why runs are created with ``run_deployment`` and an idempotency key rather than by an event trigger: an
emitted event is fire-and-forget (lost while the Prefect server is down), while ``run_deployment`` either
returns the run or raises, and the same key returns the same run. The cursor (a Prefect Variable) moves only
after the run exists. An ``orthanc.study.stable`` event is still emitted for each study, for users'
own automations and the UI's event feed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.config import WatchSettings, load_config
from tasks.errors import OrthancAuthError, OrthancError, WorkflowError
from tasks.orthanc import client_from_config
from tasks.prefect_limits import exclusive
from tasks.readiness import Backoff
from tasks.watch_logic import CrashedRun, crashed_run_plan, gave_up_message, is_lost
from tasks.watcher import StudyRun, StudyWatcher, WatchCursor

CURSOR_VARIABLE = "orthanc-watch-cursor"
LOCK = "watch-orthanc"
EVENT = "orthanc.study.stable"
CRASH_CHECK_SECONDS = 20.0
# A run's worker claims it (Pending) and starts its process within seconds; still Pending after this long, the
# worker died before the run began. Such a run never sent a heartbeat, so the crash automation cannot see it.
PENDING_LOST_SECONDS = 150.0


class WatchFailed(WorkflowError):
    """The watcher ended its window unable to read Orthanc or to create runs; nothing was skipped."""


class VariableCursorStore:
    """The cursor in a Prefect Variable: kept by the Prefect server, so any worker host can take over."""

    def __init__(self, name: str = CURSOR_VARIABLE) -> None:
        self.name = name

    def load(self) -> WatchCursor | None:
        from prefect.variables import Variable

        return WatchCursor.from_json(Variable.get(self.name, default=None))

    def save(self, cursor: WatchCursor) -> None:
        from prefect.variables import Variable

        Variable.set(self.name, cursor.to_json(), overwrite=True)


def make_run_creator(settings: WatchSettings):
    def create_run(run: StudyRun) -> str:
        from prefect.deployments import run_deployment
        from prefect.events import emit_event

        tags = ["study"] + ([f"study-uid:{run.study_uid}"] if run.study_uid else [])
        created = run_deployment(
            name=settings.deployment,
            parameters={"study": run.study_id, "stable_at": run.last_update},
            idempotency_key=run.key,
            flow_run_name=run.name,
            tags=tags,
            timeout=0,
            as_subflow=False,
        )
        emit_event(
            event=EVENT,
            resource={"prefect.resource.id": f"orthanc.study.{run.study_id}", "prefect.resource.name": run.name},
            payload={
                "study": run.study_id,
                "study_uid": run.study_uid,
                "last_update": run.last_update,
                "flow_run_id": str(created.id),
                "why": run.why,
            },
        )
        return str(created.id)

    return create_run


def restart_crashed_study_runs(settings: WatchSettings, logger) -> int:
    """Start again every study run Prefect marked Crashed (the crash automation, deployments/deploy.py: its
    process was lost with its worker or host), and every one left Pending by a worker that died before the run
    began. The same run is set Scheduled, as the UI's Retry button does: its
    name, idempotency key and history stay, and the study flow's own records (HL7Notified, RouteDeliveries in
    Orthanc) keep it from notifying or delivering twice. Returns how many were started again."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Failed, Scheduled

    flow_name, deployment_name = settings.deployment.split("/", 1)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{flow_name}/{deployment_name}")
        found = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED, StateType.PENDING]))
            ),
            limit=200,
        )
        now = datetime.now(UTC)
        lost = [
            CrashedRun(str(r.id), r.name, r.run_count)
            for r in found
            if r.state is not None
            and is_lost(r.state.type.value, (now - r.state.timestamp).total_seconds(), PENDING_LOST_SECONDS)
        ]
        again, give_up = crashed_run_plan(lost, settings.crash_restarts)
        for run in again:
            client.set_flow_run_state(
                run.id, Scheduled(message="started again by the watcher: its process was lost"), force=True
            )
            logger.warning("study run %s crashed (its process was lost); started again", run.name)
        for run in give_up:
            client.set_flow_run_state(run.id, Failed(message=gave_up_message(run)), force=True)
            logger.error(gave_up_message(run))
    return len(again)


def _run_name() -> str:
    start = flow_run.scheduled_start_time or datetime.now(UTC)
    return f"watch-orthanc-{start:%Y%m%d-%H%M%S}"


@flow(name="watch-orthanc", flow_run_name=_run_name, persist_result=False)
def watch_orthanc(window_seconds: int = 0, config_path: str = "") -> dict[str, Any]:
    """Follow Orthanc's change log for one window and start a study-notify run for every stable study.

    Args:
        window_seconds: How long this run keeps watching; 0: the configured window (default 300 s).
        config_path: Site config file on the worker. Empty: $OWF_CONFIG, else the embedded default.
    """
    logger = get_run_logger()
    cfg = load_config(config_path)
    settings = cfg.watch
    window = window_seconds or settings.window_seconds
    scheduled = flow_run.scheduled_start_time or datetime.now(UTC)
    deadline = scheduled + timedelta(seconds=window + settings.handover_seconds)
    now = datetime.now(UTC)
    if deadline <= now:
        logger.info("this run started after its window ended; a newer run follows the log")
        return {"skipped": "late"}
    with exclusive(LOCK, wait_seconds=max(1.0, (deadline - now).total_seconds() - settings.interval_seconds)) as got:
        if not got:
            logger.info("another watcher is still following the log; this one stands down")
            return {"skipped": "busy"}
        with client_from_config(cfg) as orthanc:
            watcher = StudyWatcher(orthanc, make_run_creator(settings), VariableCursorStore(), settings, logger)
            created, error = _follow(watcher, settings, deadline, logger)
    if error:
        raise WatchFailed(error)
    return {"runs_created": created, "cursor": watcher.cursor.seq if watcher.cursor else None}


def _follow(watcher: StudyWatcher, settings: WatchSettings, deadline: datetime, logger) -> tuple[int, str | None]:
    backoff = Backoff(settings.interval_seconds, 60.0)
    failures = 0
    error: str | None = None
    created = 0
    next_crash_check = 0.0
    crash_check_error: str | None = None
    while True:
        if time.monotonic() >= next_crash_check:
            next_crash_check = time.monotonic() + CRASH_CHECK_SECONDS
            try:
                restart_crashed_study_runs(settings, logger)
                crash_check_error = None
            except Exception as e:  # the Prefect API is away: the next check finds them still crashed
                if crash_check_error != type(e).__name__:
                    logger.warning("could not look for crashed study runs: %s: %s", type(e).__name__, e)
                crash_check_error = type(e).__name__
        try:
            report = watcher.poll()
        except OrthancAuthError:
            raise  # needs an operator
        except OrthancError as e:
            failures += 1
            if error != str(e):
                logger.warning("%s; retrying with backoff, nothing is skipped", e)
            error = str(e)
        except Exception as e:  # the Prefect API (run creation, cursor) failed: retry, nothing is skipped
            failures += 1
            message = f"could not create a study run or save the cursor: {type(e).__name__}: {e}"
            if error != message:
                logger.warning("%s; retrying with backoff, nothing is skipped", message)
            error = message
        else:
            if error:
                logger.info("watching again after: %s", error)
            error, failures = None, 0
            for run, run_id in report.runs:
                created += 1
                logger.info("study %s %s: run %s (%s)", run.study_id, run.why, run.name, run_id)
        delay = backoff.delay(failures) if failures else settings.interval_seconds
        if datetime.now(UTC) + timedelta(seconds=delay) >= deadline:
            return created, error
        time.sleep(delay)
