"""Create the Prefect deployments from ``prefect.yaml`` and the site config.

``prefect.yaml`` holds the deployment templates (entrypoint, description, tags, pool, schedule). The site
config says which shares exist. Shares come and go in the site config; this module makes one
``ingest-<share>`` deployment per share from the ingest template and removes ingest deployments of shares
that are no longer configured.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from tasks.config import PROJECT_ROOT, SiteConfig

INGEST_ENTRYPOINT = "flows/ingest.py:ingest_share"
WATCH_ENTRYPOINT = "flows/watch.py:watch_orthanc"


def load_prefect_yaml(path: Path | None = None) -> dict[str, Any]:
    return yaml.safe_load((path or PROJECT_ROOT / "prefect.yaml").read_text())


def ingest_template(doc: dict[str, Any]) -> dict[str, Any]:
    for d in doc.get("deployments", []):
        if d.get("entrypoint") == INGEST_ENTRYPOINT:
            return d
    raise ValueError(f"prefect.yaml has no deployment with entrypoint {INGEST_ENTRYPOINT}")


def planned_deployments(cfg: SiteConfig, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The deployments to create: the template expanded per share, other entries as they are. Pure."""
    template = ingest_template(doc)
    out = []
    for share in cfg.all_shares:
        settings = cfg.ingest_for(share)
        out.append(
            {
                "name": f"ingest-{share.name}",
                "entrypoint": INGEST_ENTRYPOINT,
                "description": template.get("description", ""),
                "tags": ["ingest", share.name, f"source:{share.source}"],
                "parameters": {**template.get("parameters", {}), "share": share.name},
                "work_pool": cfg.prefect.work_pool,
                "interval": settings.window_seconds,
            }
        )
    for d in doc.get("deployments", []):
        if d.get("entrypoint") != INGEST_ENTRYPOINT:
            schedules = d.get("schedules") or []
            out.append(
                {
                    "name": d["name"],
                    "entrypoint": d["entrypoint"],
                    "description": d.get("description", ""),
                    "tags": d.get("tags", []),
                    "parameters": d.get("parameters", {}),
                    "work_pool": cfg.prefect.work_pool,
                    "interval": (
                        cfg.watch.window_seconds
                        if d["entrypoint"] == WATCH_ENTRYPOINT
                        else (schedules[0].get("interval") if schedules else None)
                    ),
                }
            )
    return out


def ensure_work_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def _load_flow(entrypoint: str, project_root: Path):
    from prefect.flows import load_flow_from_entrypoint

    file, func = entrypoint.split(":")
    return load_flow_from_entrypoint(f"{project_root / file}:{func}")


def deploy_all(cfg: SiteConfig, project_root: Path = PROJECT_ROOT) -> list[str]:
    """Create or update every deployment; delete ingest deployments of removed shares. Returns names.

    Workers run the code in place: the pull step sets the working directory to ``project_root`` (the
    same path must hold a checkout of this project on every worker host), so nothing is copied per run.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.utilities.callables import parameter_schema

    from tasks.prefect_limits import ensure_share_limit

    ensure_work_pool(cfg.prefect.work_pool)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(project_root)}}]
    names = []
    with get_client(sync_client=True) as client:
        for plan in planned_deployments(cfg, load_prefect_yaml(project_root / "prefect.yaml")):
            flow = _load_flow(plan["entrypoint"], project_root)
            flow_id = client.create_flow_from_name(flow.name)
            schedules = []
            if plan["interval"]:
                interval = IntervalSchedule(interval=timedelta(seconds=plan["interval"]))
                schedules.append(DeploymentScheduleCreate(schedule=interval, active=True, slug="window"))
            client.create_deployment(
                flow_id=flow_id,
                name=plan["name"],
                schedules=schedules,
                parameters=plan["parameters"],
                description=plan["description"],
                tags=plan["tags"],
                work_pool_name=plan["work_pool"],
                entrypoint=plan["entrypoint"],
                pull_steps=pull,
                parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
                enforce_parameter_schema=True,
            )
            names.append(plan["name"])
        for share in cfg.all_shares:
            ensure_share_limit(share.name)
        ensure_crash_automation(client)
        wanted = set(names)
        ingest = DeploymentFilter(tags=DeploymentFilterTags(all_=["ingest"]))
        for d in client.read_deployments(deployment_filter=ingest):
            if d.name.startswith("ingest-") and d.name not in wanted:
                client.delete_deployment(d.id)
    return names


CRASH_AUTOMATION = "owf: mark silent runs crashed"
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of every flow run (stack.services.prefect_env)
SILENT_SECONDS = 3 * HEARTBEAT_SECONDS


def ensure_crash_automation(client) -> None:
    """A run whose process died with its worker (killed, host lost, out of memory) stays Running forever: no
    one is left to end it. This automation (Prefect's own zombie detection, docs "detect zombie flows") marks a
    run Crashed once it has sent no heartbeat for ``SILENT_SECONDS``; the watcher then starts crashed study runs
    again (flows/watch.py), and the next window's run takes over a crashed sweep. Created once, by name."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if client.read_automations_by_name(CRASH_AUTOMATION):
        return
    client.create_automation(
        AutomationCore(
            name=CRASH_AUTOMATION,
            description="A flow run that stopped sending heartbeats (its worker or host died) is marked Crashed.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={
                    "prefect.flow-run.heartbeat",
                    "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed",
                },
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=timedelta(seconds=SILENT_SECONDS),
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    message=f"No heartbeat for {SILENT_SECONDS} s: the process running this flow was lost "
                    "(worker killed or host down). Study runs are started again by the watcher.",
                )
            ],
        )
    )
