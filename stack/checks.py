"""``owf check``: validate a site config and try every connection it names, before anything runs.

Every problem is collected and reported, not just the first. Nothing is written anywhere.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx

from tasks.config import SiteConfig
from tasks.errors import WorkflowError
from tasks.mllp import MllpClient
from tasks.orthanc import client_from_config
from tasks.routing import echo, register_destination
from tasks.routing_config import Destination
from tasks.secrets import resolve_password
from tasks.shares import open_share


def check_site(cfg: SiteConfig, say: Callable[[str], object] = print) -> list[str]:
    problems: list[str] = []

    def fail(what: str, why: str) -> None:
        say(f"FAIL  {what}: {why}")
        problems.append(f"{what}: {why}")

    say("OK    configuration file parsed and validated")
    if cfg.embedded_orthanc:
        say(f"--    Orthanc: the embedded Orthanc at {cfg.orthanc_url} (started by `owf up`)")
    orthanc_up = False
    try:
        with client_from_config(cfg) as client:
            system = client.system()
        say(f"OK    Orthanc {cfg.orthanc_url}: version {system.get('Version')}, AET {system.get('DicomAet')}")
        orthanc_up = True
    except WorkflowError as e:
        if cfg.embedded_orthanc:
            say(f"--    Orthanc not running yet ({e}); `owf up` starts it")
        else:
            fail(f"Orthanc {cfg.orthanc_url}", str(e))
    if cfg.routes:
        say(f"OK    {len(cfg.routes)} route(s) to {len(cfg.destinations)} destination(s) validated")
    for dest in cfg.destinations:
        what = f"destination {dest.name!r}"
        if dest.registered_here:
            problem = _reachable(dest)
        elif orthanc_up:
            with client_from_config(cfg) as client:
                try:
                    register_destination(client, dest)  # only checks: it declares no address
                    problem = echo(client, dest)
                except WorkflowError as e:
                    problem = str(e)
        else:
            say(f"--    {what}: declared in Orthanc's configuration; checked once Orthanc runs")
            continue
        if problem:
            fail(what, problem)
        else:
            say(f"OK    {what} ({dest.kind}) answers")
    if cfg.hl7.enabled:
        what = f"HL7 partner {cfg.hl7.host}:{cfg.hl7.port}"
        try:
            MllpClient.from_settings(cfg.hl7).probe()  # connects and closes; no message is sent
            say(f"OK    {what} accepts connections" + (" (TLS certificate verified)" if cfg.hl7.tls else ""))
        except WorkflowError as e:
            fail(what, str(e))
    else:
        say("--    HL7 notification is off (hl7.enabled: false)")
    for share_cfg in cfg.all_shares:
        what = f"share {share_cfg.name!r}"
        try:
            share = open_share(share_cfg, resolve_password(share_cfg, what))
            try:
                entries = share.scan(cfg.ingest_for(share_cfg).quarantine_folder)
            finally:
                share.close()
            say(f"OK    {what} ({share.describe()}): listed, {len(entries)} file(s) waiting")
        except WorkflowError as e:
            fail(what, str(e))
    return problems


def _reachable(dest: Destination) -> str | None:
    """Can this host reach a destination we register ourselves (TCP for a modality, GET /system for a peer)?"""
    if dest.kind == "modality":
        assert dest.host is not None and dest.port is not None
        try:
            socket.create_connection((dest.host, dest.port), timeout=5).close()
        except OSError as e:
            return f"{dest.host}:{dest.port} cannot be reached ({e.strerror or type(e).__name__})"
        return None
    assert dest.url is not None
    try:
        password = resolve_password(dest, f"destination {dest.name}")
        auth = httpx.BasicAuth(dest.username, password or "") if dest.username else None
        r = httpx.get(dest.url.rstrip("/") + "/system", auth=auth, timeout=10)
    except (httpx.HTTPError, WorkflowError) as e:
        return f"{dest.url} cannot be reached ({e})"
    return None if r.status_code == 200 else f"{dest.url} answered HTTP {r.status_code}"
