"""Soak: the whole stack at its default settings for a long while, with a steady trickle of studies.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--every 20] [--sample 60] [--postgres]
                                        [--workdir DIR] [--keep]

It starts the stack an operator starts, `owf up --detach` (embedded Orthanc, Prefect server, the default inbox
share, the watcher and study-notify deployments, one worker) on free ports, with the HL7 partner of the tests
(python-hl7's MLLP server, tests/integration/partner.py) in a thread of this process. Everything else is at
its default: Orthanc's StableAge 60 s, 300 s windows, sweeps and watcher reads every 2 s, retention of runs
and events. With --postgres the Prefect server keeps its database in a PostgreSQL cluster this script starts
(Debian's postgresql, a free port), as the scale-out setup does; otherwise SQLite, the embedded default.

Every --every seconds a new study arrives, in turn by C-STORE (dcmtk storescu, AET MODALITY1) and as files
dropped into the inbox (3 CT slices each). Every --sample seconds it records, and prints as progress:

  memory   resident memory (MB) of every process tree `owf up` started (Orthanc, the Prefect server, the
           worker with the flow runs it started), from their PID files, and of each started process alone
  db       the Prefect database's size (MB): the SQLite files, or pg_database_size
  runs     flow runs by state so far, from the Prefect API (SCHEDULED ones include those Prefect's scheduler
           creates up to an hour ahead)
  errors   flow runs that Failed or Crashed, studies sent but not notified after StableAge plus 3 minutes,
           and ERROR lines in the stack's logs

The last line printed is one JSON object: the samples, and a summary (runs per minute; per process the
first, last and largest memory and its growth per hour over the second half, where start-up is over;
database growth per hour; errors). Targets: flat memory, bounded database, zero errors. Never use these
numbers in a pass/fail test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack.services import PostgresServer, free_port, pid_files, rss_bytes, tree_rss_bytes
from stack.synthetic import write_ct_series
from tests.integration.partner import Partner

ROOT = Path(__file__).resolve().parent.parent
OWF = [sys.executable, "-m", "stack.cli"]


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bar(done: float, total: float, width: int = 30) -> str:
    filled = int(width * min(done / total, 1.0)) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done / 60:5.1f}/{total / 60:.0f} min"


def flow_runs(api: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with httpx.Client(base_url=api, timeout=30) as c:
        while True:
            page = c.post("/flow_runs/filter", json={"limit": 200, "offset": len(out)}).json()
            out += page
            if len(page) < 200:
                return out


GLOG_ERROR = re.compile(r"^E\d{4} ")  # Orthanc's error lines


def error_lines(folder: Path) -> int:
    """ERROR lines in every log under ``folder``: Prefect's (server, worker, flow runs) and Orthanc's."""
    return sum(
        sum(1 for line in p.read_text(errors="replace").splitlines() if "| ERROR" in line or GLOG_ERROR.match(line))
        for p in folder.rglob("*.log")
    )


def growth_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) over the second half of the points, per hour."""
    half = points[len(points) // 2 :]
    if len(half) < 2:
        return None
    n = len(half)
    mx = sum(t for t, _ in half) / n
    my = sum(v for _, v in half) / n
    var = sum((t - mx) ** 2 for t, _ in half)
    return None if var == 0 else sum((t - mx) * (v - my) for t, v in half) / var * 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=float, default=20, help="seconds between two studies")
    ap.add_argument("--sample", type=float, default=60, help="seconds between two samples")
    ap.add_argument("--postgres", action="store_true", help="the Prefect server on PostgreSQL")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true", help="leave the work folder for inspection")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="owf-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    partner = Partner(free_port()).start()
    pg = PostgresServer.in_tmp(free_port()).start() if args.postgres else None
    http_port, dicom_port, prefect_port = free_port(), free_port(), free_port()
    config = workdir / "site.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(workdir / "data"),
        "local_orthanc": {"http_port": http_port, "dicom_port": dicom_port},
        "prefect": {"port": prefect_port},
        "hl7": {"enabled": True, "host": "127.0.0.1", "port": partner.port},
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    if pg is not None:
        env.update(pg.prefect_settings())  # read by the Prefect server `owf up` starts, nothing else
    api = f"http://127.0.0.1:{prefect_port}/api"
    inbox = workdir / "data" / "inbox"
    run_dir = workdir / "data" / "run"
    prefect_db = workdir / "data" / "prefect"

    def db_bytes() -> int:
        if pg is not None:
            return pg.database_bytes()
        return sum(p.stat().st_size for p in prefect_db.glob("prefect.db*"))

    progress(f"starting the stack (owf up), work folder {workdir}{' , Prefect on PostgreSQL' if pg else ''}")
    r = subprocess.run([*OWF, "--config", str(config), "up", "--detach"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"owf up failed:\n{r.stdout}\n{r.stderr}")
    samples: list[dict[str, Any]] = []
    sent: dict[str, float] = {}  # accession -> when sent
    stable_age = 60
    try:
        start = time.monotonic()
        total = args.minutes * 60
        next_study, next_sample, n = start, start, 0
        while (now := time.monotonic()) - start < total:
            if now >= next_study:
                n += 1
                accession = f"SOAK-{n:04d}"
                folder = workdir / "outbox" / accession
                files = write_ct_series(folder, 3, side=128, accession=accession, patient_id=f"PID-{n:04d}")
                if n % 2:
                    storescu = [shutil.which("storescu") or "storescu", "-aet", "MODALITY1", "-aec", "ORTHANC"]
                    env_nodelay = {**os.environ, "TCP_NODELAY": "1"}
                    subprocess.run([*storescu, "127.0.0.1", str(dicom_port), *map(str, files)], check=True,
                                   capture_output=True, env=env_nodelay, timeout=120)  # fmt: skip
                else:
                    target = inbox / accession
                    shutil.copytree(folder, target)
                sent[accession] = time.time()
                next_study += args.every
            if now >= next_sample:
                next_sample += args.sample
                pids = pid_files(run_dir)
                runs = flow_runs(api)
                states = Counter(r["state_type"] for r in runs)
                notified = {str(m.segment("OBR")[18]) for m in partner.received}
                overdue = [a for a, t in sent.items() if a not in notified and time.time() - t > stable_age + 180]
                sample = {
                    "t": round(now - start),
                    "memory_mb": {name: round(tree_rss_bytes(pid) / 1e6, 1) for name, pid in sorted(pids.items())},
                    # the started process alone (the worker without the flow runs it started)
                    "memory_self_mb": {name: round(rss_bytes(pid) / 1e6, 1) for name, pid in sorted(pids.items())},
                    "db_mb": round(db_bytes() / 1e6, 2),
                    "runs": dict(states),
                    "studies_sent": len(sent),
                    "notified": len(notified & set(sent)),
                    "messages": len(partner.received),
                    "errors": {"failed_runs": states.get("FAILED", 0), "crashed_runs": states.get("CRASHED", 0),
                               "overdue_studies": len(overdue), "log_errors": error_lines(run_dir)},
                }  # fmt: skip
                samples.append(sample)
                mem = " ".join(f"{k}={v:.0f}MB" for k, v in sample["memory_mb"].items())
                progress(f"{bar(now - start, total)}  {mem}  db={sample['db_mb']}MB  runs={dict(states)}  "
                         f"notified {sample['notified']}/{len(sent)}  errors={sample['errors']}")  # fmt: skip
            time.sleep(0.5)
        # the last studies: give them StableAge and a run to be notified
        deadline = time.monotonic() + stable_age + 120
        while time.monotonic() < deadline and not set(sent) <= {str(m.segment("OBR")[18]) for m in partner.received}:
            time.sleep(2)
        runs = flow_runs(api)
    finally:
        subprocess.run([*OWF, "--config", str(config), "down"], env=env, capture_output=True, timeout=180, cwd=ROOT)
        partner.stop()
        if pg is not None:
            pg.stop()
    notified_all = [str(m.segment("OBR")[18]) for m in partner.received]
    states = Counter(r["state_type"] for r in runs)
    minutes = args.minutes
    names = sorted({k for s in samples for k in s["memory_mb"]})
    memory = {}
    for name in names:
        for key, label in (("memory_mb", name), ("memory_self_mb", f"{name} (itself)")):
            pts = [(s["t"], s[key][name]) for s in samples if name in s[key]]
            slope = growth_per_hour(pts)
            memory[label] = {"first_mb": pts[0][1], "last_mb": pts[-1][1], "max_mb": max(v for _, v in pts),
                             "growth_mb_per_h_second_half": None if slope is None else round(slope, 1)}  # fmt: skip
    db_slope = growth_per_hour([(s["t"], s["db_mb"]) for s in samples])
    summary = {
        "minutes": minutes,
        "prefect_database": "postgresql" if pg else "sqlite",
        "studies_sent": len(sent),
        "studies_notified": len(set(notified_all) & set(sent)),
        "duplicate_notifications": len(notified_all) - len(set(notified_all)),
        "runs": dict(states),
        # runs that started (the scheduler also creates runs up to an hour ahead: those are not counted)
        "runs_per_minute": round(sum(1 for r in runs if r.get("start_time")) / minutes, 2),
        "memory": memory,
        "db_mb": {
            "first": samples[0]["db_mb"] if samples else None,
            "last": samples[-1]["db_mb"] if samples else None,
            "growth_mb_per_h_second_half": None if db_slope is None else round(db_slope, 2),
            "kb_per_study": round((samples[-1]["db_mb"] - samples[0]["db_mb"]) * 1000 / len(sent)) if sent else None,
        },
        "errors": {
            "failed_runs": states.get("FAILED", 0),
            "crashed_runs": states.get("CRASHED", 0),
            "not_notified": len(set(sent) - set(notified_all)),
            "not_notified_accessions": sorted(set(sent) - set(notified_all)),
            "log_errors": samples[-1]["errors"]["log_errors"] if samples else None,
        },
    }
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"summary": summary, "samples": samples}))


if __name__ == "__main__":
    main()
