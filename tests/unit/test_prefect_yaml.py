"""prefect.yaml is the single source of truth for deployments: every entrypoint imports, every default
parameter set validates against its flow, and the per-share expansion is what the site config says."""

from __future__ import annotations

import importlib
import inspect

import pytest

from deployments.deploy import INGEST_ENTRYPOINT, load_prefect_yaml, planned_deployments
from tasks.config import parse_config

DOC = load_prefect_yaml()


@pytest.mark.parametrize("dep", DOC["deployments"], ids=lambda d: d["name"])
def test_every_deployment_imports_and_its_parameters_validate(dep):
    from prefect.flows import Flow

    module_path, func = dep["entrypoint"].split(":")
    flow = getattr(importlib.import_module(module_path.removesuffix(".py").replace("/", ".")), func)
    assert isinstance(flow, Flow)
    # parameters without a default (the study of study-notify) are asked for in the UI's Run form
    required = {
        name: "x" for name, p in inspect.signature(flow.fn).parameters.items() if p.default is inspect.Parameter.empty
    }
    flow.validate_parameters({**required, **dep.get("parameters", {})})
    assert dep.get("description") and dep.get("tags") and dep["work_pool"]["name"]
    assert flow.__doc__ and "Args:" in flow.__doc__, "every flow documents its parameters for the Run form"
    # the Run form shows a typed field with a description for every parameter, and no "str | None" toggles
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow).model_dump_for_openapi()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{dep['name']}: parameter {name} has no description"
        assert "anyOf" not in prop, f"{dep['name']}: parameter {name} is optional-typed; give it a plain default"
    assert dep.get("schedules") or dep["name"] == "study-notify", "only the per-study flow runs unscheduled"


def test_ingest_template_expands_to_one_deployment_per_share():
    cfg = parse_config({
        "ingest": {"window_seconds": 120},
        "shares": [
            {"name": "inbox", "source": "INBOX", "path": "/srv/in"},
            {"name": "ct-room1", "source": "CT_ROOM1", "server": "fs", "share": "s", "ingest": {"window_seconds": 60}},
        ],
    })  # fmt: skip
    plans = [p for p in planned_deployments(cfg, DOC) if p["entrypoint"] == INGEST_ENTRYPOINT]
    assert [(p["name"], p["parameters"]["share"], p["interval"]) for p in plans] == [
        ("ingest-inbox", "inbox", 120),
        ("ingest-ct-room1", "ct-room1", 60),
    ]
    assert plans[1]["tags"] == ["ingest", "ct-room1", "source:CT_ROOM1"]
