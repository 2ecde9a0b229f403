"""``owf``: run the stack, check a config, deploy, and look after the quarantine.

owf up [--config FILE]           start Orthanc (embedded default), Prefect server, deployments, worker;
                                 stays in the foreground; Ctrl-C (or ``owf down``) stops all of it
owf down                         stop every process ``owf up`` started (by PID)
owf check [--config FILE]        validate the config and try every connection; lists every problem
owf deploy [--config FILE]       create/update the deployments (Prefect server must be running)
owf rerun STUDY [--resend-hl7] [--rerun-routes] [--route NAME] [--wait]
                                 start the study flow again for a study (UID, accession or Orthanc ID)
owf runs [--limit N] [--state S] list recent study runs with their outcome
owf quarantine list [SHARE]      list quarantined files with their reasons
owf quarantine requeue SHARE [PATH ...] [--all]
                                 move files back to where they came from, for the next sweep
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from tasks.config import PROJECT_ROOT, SiteConfig, load_config
from tasks.errors import ConfigError, WorkflowError


def _prefect_environment(cfg: SiteConfig) -> dict[str, str]:
    from stack.services import prefect_env

    env = prefect_env(cfg.prefect_home, cfg.prefect.port, cfg.prefect.flow_run_retention_days,
                      cfg.prefect.event_retention_days)  # fmt: skip
    if os.environ.get("PREFECT_API_URL") and os.environ.get("OWF_EXTERNAL_PREFECT") == "1":
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
    env["OWF_PROJECT_DIR"] = str(PROJECT_ROOT)
    env["OWF_DATA_DIR"] = str(cfg.data_dir)
    return env


def _use_prefect(cfg: SiteConfig) -> None:
    """Point this process's Prefect client at the stack's server. Must run before prefect is imported."""
    os.environ.update(_prefect_environment(cfg))


def _load(args: argparse.Namespace) -> SiteConfig:
    if args.config:
        os.environ["OWF_CONFIG"] = str(Path(args.config).resolve())
    return load_config(args.config)


# -- up / down ------------------------------------------------------------------------------------------
def _run_dir(cfg: SiteConfig) -> Path:
    return cfg.data_dir / "run"


def cmd_up(args: argparse.Namespace) -> int:
    from stack.services import OrthancServer, PrefectServer, PrefectWorker, port_open

    cfg = _load(args)
    _use_prefect(cfg)
    run = _run_dir(cfg)
    run.mkdir(parents=True, exist_ok=True)
    if any(run.glob("*.pid")):
        cmd_down(args, quiet=True)
    started: list = []  # registered before they start, so an interrupted start-up stops them too

    def stop_all(*_: object) -> None:
        for svc in reversed(started):
            if svc.service and svc.service.proc is not None:
                print(f"stopping {svc.service.name}", flush=True)
            svc.stop()
        started.clear()

    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), sys.exit(0)))
    try:
        if cfg.shares is None:
            Path(cfg.all_shares[0].path).mkdir(parents=True, exist_ok=True)  # the default inbox
        if cfg.embedded_orthanc:
            lo = cfg.local_orthanc
            if port_open(lo.http_port):
                raise WorkflowError(f"port {lo.http_port} is taken (another Orthanc?): stop it, or set "
                                    "local_orthanc.http_port to a free port")  # fmt: skip
            orthanc = OrthancServer(run / "orthanc", lo.http_port, lo.dicom_port, lo.aet, lo.stable_age_seconds,
                                    cfg.orthanc_storage_dir, pid_dir=run,
                                    user_metadata=cfg.orthanc.user_metadata)  # fmt: skip
            started.append(orthanc)
            orthanc.start()
            print(f"Orthanc        {orthanc.url}/app/explorer.html   (DICOM port {lo.dicom_port}, AET {lo.aet})")
        if port_open(cfg.prefect.port):
            raise WorkflowError(f"port {cfg.prefect.port} is taken (a Prefect server left running?): stop it, "
                                "or set prefect.port to a free port")  # fmt: skip
        server = PrefectServer(cfg.prefect_home, cfg.prefect.port, cfg.prefect.flow_run_retention_days,
                               cfg.prefect.event_retention_days, pid_dir=run)  # fmt: skip
        started.append(server)
        print("starting the Prefect server (about 20 s on first start)...", flush=True)
        server.start()
        print(f"Prefect UI     http://127.0.0.1:{cfg.prefect.port}")

        from deployments.deploy import deploy_all

        names = deploy_all(cfg)
        print(f"deployments    {', '.join(names)}")
        worker = PrefectWorker(run, {**server.env, **_prefect_environment(cfg)}, cfg.prefect.work_pool)
        started.append(worker)
        worker.start()
        _sweep_now(cfg)
        for share in cfg.all_shares:
            where = share.path if share.kind == "local" else f"smb://{share.server}:{share.port}/{share.share}"
            print(f"share          {share.name}: {where} (source {share.source})")
        hl7 = f"HL7 to {cfg.hl7.host}:{cfg.hl7.port} ({cfg.hl7.message_type})" if cfg.hl7.enabled else "HL7 off"
        print(f"stable studies reported to {cfg.report_folder}; {hl7}")
        print("running; Ctrl-C or `owf down` stops everything", flush=True)
        if args.detach:
            started.clear()  # leave them running; `owf down` stops them by their PID files
            return 0
        while True:
            for svc in started:
                if not svc.service.pid_path.exists():
                    print("stopped by `owf down`", flush=True)
                    return 0
                proc = svc.service.proc
                if proc is not None and proc.poll() is not None:
                    name, log = svc.service.name, svc.service.log_path
                    raise WorkflowError(f"{name} exited (code {proc.returncode}); see {log}")
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all()


def _sweep_now(cfg: SiteConfig) -> None:
    """Start one ingest run per share and the watcher right away: the scheduler would otherwise take up to a
    minute to create the first ones. Later scheduled runs wait for them to hand over (Prefect locks)."""
    from prefect.deployments import run_deployment

    for share in cfg.all_shares:
        run_deployment(f"ingest-share/ingest-{share.name}", parameters={"share": share.name}, timeout=0)
    run_deployment("watch-orthanc/watch-orthanc", timeout=0)


def cmd_down(args: argparse.Namespace, quiet: bool = False) -> int:
    from stack.services import stop_pid_file

    cfg = _load(args)
    run = _run_dir(cfg)
    # Worker first (it stops its flow runs), then the Prefect server, then Orthanc.
    order = ["worker-owf-worker", "prefect-server", "orthanc"]
    pid_files = sorted(run.glob("*.pid"), key=lambda p: order.index(p.stem) if p.stem in order else -1)
    for pid_file in pid_files:
        outcome = stop_pid_file(pid_file)
        if not quiet:
            print(outcome)
    if not pid_files and not quiet:
        print("nothing to stop")
    return 0


# -- check ----------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from stack.checks import check_site

    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"FAIL  {e}")
        return 1
    problems = check_site(cfg, print)
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nconfiguration OK")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _use_prefect(cfg)
    from deployments.deploy import deploy_all

    for name in deploy_all(cfg):
        print(f"deployed {name}")
    return 0


# -- study runs -----------------------------------------------------------------------------------------
STUDY_DEPLOYMENT = "study-notify/study-notify"


def cmd_rerun(args: argparse.Namespace) -> int:
    """What the UI's Run form does: one study-notify run with the operator's options."""
    cfg = _load(args)
    _use_prefect(cfg)
    from prefect.deployments import run_deployment

    params: dict = {"study": args.study, "resend_hl7": args.resend_hl7, "rerun_routes": args.rerun_routes}
    if args.route:
        params["only_route"] = args.route
    run = run_deployment(STUDY_DEPLOYMENT, parameters=params, timeout=None if args.wait else 0,
                         tags=["rerun"])  # fmt: skip
    url = f"http://127.0.0.1:{cfg.prefect.port}/runs/flow-run/{run.id}"
    print(f"study run {run.name} ({run.id}): {run.state.name if run.state else 'scheduled'}  {url}")
    return 0 if not args.wait or (run.state and run.state.is_completed()) else 1


def cmd_runs(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _use_prefect(cfg)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    state = FlowRunFilterState(name=FlowRunFilterStateName(any_=[args.state.capitalize()])) if args.state else None
    run_filter = FlowRunFilter(state=state) if state else None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[STUDY_DEPLOYMENT.split("/")[1]])),
            flow_run_filter=run_filter,
            sort=FlowRunSort.START_TIME_DESC,
            limit=args.limit,
        )
    for r in runs:
        when = r.start_time.strftime("%Y-%m-%d %H:%M:%S") if r.start_time else "not started"
        state = r.state.name if r.state else "?"
        message = (r.state.message or "").splitlines()[0][:160] if r.state and not r.state.is_completed() else ""
        tags = ",".join(t for t in r.tags if t.startswith(("source:", "route:")))
        print(f"{when}\t{state}\t{r.name}\t{tags}\t{message}".rstrip())
    print(f"{len(runs)} study run(s)", file=sys.stderr)
    return 0


# -- quarantine -----------------------------------------------------------------------------------------
def cmd_quarantine(args: argparse.Namespace) -> int:
    from stack.quarantine_admin import list_quarantine, requeue

    cfg = _load(args)
    if args.action == "list":
        shares = [cfg.share(args.share)] if args.share else cfg.all_shares
        total = 0
        for share in shares:
            for item in list_quarantine(cfg, share):
                total += 1
                print(f"{share.name}\t{item.kind}\t{item.original_path}\t{item.quarantined_at}\t{item.reason}")
        print(f"{total} file(s) in quarantine", file=sys.stderr)
        return 0
    if not args.share:
        print("requeue needs a share name", file=sys.stderr)
        return 2
    if not args.all and not args.paths:
        print("name the files to requeue (original paths, as `owf quarantine list` shows) or --all", file=sys.stderr)
        return 2
    moved, problems = requeue(cfg, cfg.share(args.share), None if args.all else args.paths)
    for m in moved:
        print(f"requeued {m}")
    for p in problems:
        print(f"not requeued: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="owf", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", help="site config YAML (default: $OWF_CONFIG, else the embedded default)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole stack in the foreground")
    up.add_argument("--detach", action="store_true", help="start and return; stop later with `owf down`")
    sub.add_parser("down", help="stop what `owf up` started")
    sub.add_parser("check", help="validate the config and test every connection")
    sub.add_parser("deploy", help="create or update the Prefect deployments")
    rr = sub.add_parser("rerun", help="run the study flow again for one study")
    rr.add_argument("study", help="Study Instance UID, accession number or Orthanc study ID")
    rr.add_argument("--resend-hl7", action="store_true", help="send the HL7 notification even if acknowledged")
    rr.add_argument("--rerun-routes", action="store_true", help="deliver every matching route again")
    rr.add_argument("--route", help="run only this route (delivered again)")
    rr.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 if it failed")
    rs = sub.add_parser("runs", help="list recent study runs with their outcome")
    rs.add_argument("--limit", type=int, default=20)
    rs.add_argument("--state", help="only runs in this state, e.g. Failed")
    q = sub.add_parser("quarantine", help="list or requeue quarantined files")
    q.add_argument("action", choices=["list", "requeue"])
    q.add_argument("share", nargs="?")
    q.add_argument("paths", nargs="*")
    q.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    handlers = {"up": cmd_up, "down": cmd_down, "check": cmd_check, "deploy": cmd_deploy, "rerun": cmd_rerun,
                "runs": cmd_runs, "quarantine": cmd_quarantine}  # fmt: skip
    try:
        return handlers[args.command](args)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
