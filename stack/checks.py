"""``owf check``: validate a site config and try every connection it names, before anything runs.

Every problem is collected and reported, not just the first. Nothing is written anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from tasks.config import SiteConfig
from tasks.errors import WorkflowError
from tasks.orthanc import client_from_config
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
    try:
        with client_from_config(cfg) as client:
            system = client.system()
        say(f"OK    Orthanc {cfg.orthanc_url}: version {system.get('Version')}, AET {system.get('DicomAet')}")
    except WorkflowError as e:
        if cfg.embedded_orthanc:
            say(f"--    Orthanc not running yet ({e}); `owf up` starts it")
        else:
            fail(f"Orthanc {cfg.orthanc_url}", str(e))
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
