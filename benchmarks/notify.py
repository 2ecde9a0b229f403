"""Stable-study notification benchmark: from Orthanc's StableStudy change to the HL7 partner's ACK, in one run.

    .venv/bin/python benchmarks/notify.py [--studies 20] [--spacing 10] [--slices 3] [--burst 20]
                                          [--stable-age 3] [--timeout 120] [--workdir DIR] [--keep]

It starts its own stack with `owf up --detach` on free ports (embedded Orthanc, Prefect server, one worker,
the watch-orthanc and study-notify deployments) at the project's default settings (the watcher reads
/changes every 2 s, the worker polls every 1 s), with no share, HL7 on, and Orthanc's StableAge shortened
to --stable-age seconds. The HL7 partner is python-hl7's MLLP server (tests/integration/partner.py) in a
thread of this process; it answers AA and records when each message arrived and when its ACK was written.

  (1) latency:    --studies studies of --slices CT slices each (accession numbers BENCH-0001, ...) are sent
                  by dcmtk storescu (TCP_NODELAY=1), one about every --spacing seconds (0.5-1.5x, seeded), so
                  that each is measured more or less on its own. The default (10 s, about 6 studies a minute)
                  stays below what one worker sustains on 2 cores (the burst measures it: about 16 a minute,
                  each study run costing about 5 CPU s in the two processes Prefect's process worker starts).
                  Studies arriving faster than that queue up, and the latency then measures the queue;
  (2) throughput: --burst studies (BURST-0001, ...) sent in one storescu association at once; studies per
                  minute = notified studies / seconds from the first StableStudy change to the last ACK.

Latency of a study = its ACK written by the partner (time.time(), close enough to the ACK received) minus
the moment its StableStudy change was seen in Orthanc's /changes, which this benchmark polls every 0.1 s
(Orthanc's own "Date" has second resolution). StableAge (Orthanc waiting for no new instances) is NOT in
the latency: the latency starts at the StableStudy change. Where the time goes, per study, from the Prefect
API (runs of study-notify/study-notify, named study-<accession> by the watcher):

  watcher_detection  flow run created - StableStudy seen (the watcher reads /changes every 2 s)
  worker_pickup      flow run start (Running) - created: the worker's poll and the new processes of the run.
                     pickup_detail splits it: pickup_worker_poll (Pending - created), pickup_process_spawn
                     (Running - Pending), and the latter by the run's own log lines into spawn_supervisor
                     (Prefect's workspace supervisor process starting, until its pull steps begin),
                     spawn_pull_steps, and spawn_engine (the `python -m prefect.engine` process importing
                     prefect and flows/study.py until the run is Running)
  process_start      first task run start - flow run start (the flow body before its first task; the imports
                     of the spawned processes are in worker_pickup, before the run is Running)
  orthanc_reads      sum of the task runs find-study, read-study, same-uid-studies, read-notification-state
  study_lock         read-study start - find-study end (the per-study Prefect lock is taken there). For each
                     wait over 1 s, lock_waits says what the Prefect API showed of that lock meanwhile
                     (polled every 0.25 s): held by another study's run (lock_by_run), taken while no
                     other run of that lock ran (lock_taken), or free (lock_free: the time went elsewhere)
  hl7_round_trip     the send-hl7 task run (connect, message, ACK)
  rest               latency minus all of the above (report building, writing files and pending state, ...)

The target is a p95 latency under 10 s with the default settings; a study never notified counts as over
it. Every message is counted: more than one for one accession is reported as a duplicate, never hidden.

The last line printed is one JSON object. Timings on a shared 2-core machine are noisy: compare numbers
measured in the same run, and never use these numbers in a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7  # python-hl7 (a dev dependency): the independent HL7 partner
import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack.services import free_port, pid_files, tree_cpu_seconds
from stack.synthetic import write_ct_series
from tests.integration.partner import Partner

ROOT = Path(__file__).resolve().parent.parent
OWF = [sys.executable, "-m", "stack.cli"]
DEPLOYMENT = "study-notify/study-notify"
TARGET_P95_S = 10
WATCH_INTERVAL_S = 2  # the project's defaults, which this benchmark does not change
WORKER_QUERY_S = 1
ORTHANC_READS = ("find-study", "read-study", "same-uid-studies", "read-notification-state")
HL7_TASK = "send-hl7"
BREAKDOWN = ("watcher_detection", "worker_pickup", "process_start", "orthanc_reads", "study_lock", "hl7_round_trip",
             "rest")  # fmt: skip
PICKUP_DETAIL = ("pickup_worker_poll", "pickup_process_spawn", "spawn_supervisor", "spawn_pull_steps", "spawn_engine")
PULL_START = re.compile(r"Running \d+ deployment pull step")
PULL_DONE = re.compile(r"All deployment steps completed")
ACCESSION = re.compile(r"\b(?:BENCH|BURST)-\d{4}\b")


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the stack ----------------------------------------------------------------------------------------------
class Stack:
    """An `owf up --detach` stack with its own config (free ports, HL7 to our partner), stopped by `owf down`."""

    def __init__(self, workdir: Path, hl7_port: int, stable_age: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port, self.prefect_port = free_port(), free_port(), free_port()
        self.config = workdir / "site.yaml"
        self.config.write_text(yaml.safe_dump({
            "data_dir": str(workdir / "data"),
            "local_orthanc": {"http_port": self.http_port, "dicom_port": self.dicom_port,
                              "stable_age_seconds": stable_age},
            "prefect": {"port": self.prefect_port},
            "shares": [],
            "hl7": {"enabled": True, "host": "127.0.0.1", "port": hl7_port},
        }))  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.api_url = f"http://127.0.0.1:{self.prefect_port}/api"

    def up(self) -> None:
        r = subprocess.run([*OWF, "--config", str(self.config), "up", "--detach"], env=self.env,
                           capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"owf up failed:\n{r.stdout}\n{r.stderr}")

    def down(self) -> None:
        subprocess.run([*OWF, "--config", str(self.config), "down"], env=self.env, capture_output=True,
                       timeout=180, cwd=ROOT)  # fmt: skip


def storescu(port: int, files: list[Path]) -> None:
    subprocess.run([shutil.which("storescu") or "storescu", "-aet", "MODALITY1", "-aec", "ORTHANC", "127.0.0.1",
                    str(port), *map(str, files)], check=True, capture_output=True,
                   env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)  # fmt: skip


# -- the HL7 partner, with times ------------------------------------------------------------------------------
@dataclass
class Arrival:
    accession: str | None
    control_id: str
    arrived: float  # time.time() when the whole message was read
    acked: float  # time.time() after the ACK was written and drained


@dataclass
class TimedPartner(Partner):
    """python-hl7's MLLP server (tests/integration/partner.py) that also records when each message came."""

    arrivals: list[Arrival] = field(default_factory=list)
    unparsed: int = 0

    async def _handle(self, reader, writer) -> None:
        try:
            while not writer.is_closing():
                block = await reader.readblock()
                arrived = time.time()
                self.raw.append(block)
                try:
                    message = hl7.parse(block.decode(self.encoding))
                except Exception:  # not ours to judge: count it, close the connection (no ACK)
                    self.unparsed += 1
                    break
                self.received.append(message)
                writer.writemessage(message.create_ack("AA"))
                await writer.drain()
                self.arrivals.append(Arrival(accession_of(message, block), str(message.segment("MSH")[10]),
                                             arrived, time.time()))  # fmt: skip
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def accession_of(message: hl7.Message, block: bytes) -> str | None:
    """OBR-18 (ORU^R01, ORM^O01), else the first accession of ours anywhere in the message (IPC-1 of OMI)."""
    with contextlib.suppress(Exception):
        value = str(message.segment("OBR")[18]).strip()
        if ACCESSION.fullmatch(value):
            return value
    found = ACCESSION.search(block.decode("utf-8", "replace"))
    return found.group(0) if found else None


# -- StableStudy changes, seen at 10 Hz -------------------------------------------------------------------------
class ChangeWatch(threading.Thread):
    """Reads Orthanc's /changes every ``period`` seconds; records when each study's NewStudy and StableStudy
    changes were first seen (time.time() of the answer), by accession number."""

    def __init__(self, url: str, period: float = 0.1) -> None:
        super().__init__(daemon=True, name="orthanc-changes")
        self.url, self.period = url, period
        self.stop_event = threading.Event()
        self.accession: dict[str, str] = {}  # Orthanc study ID -> accession number
        self.new_study: dict[str, float] = {}  # accession -> first NewStudy seen
        self.stable: dict[str, float] = {}  # accession -> first StableStudy seen
        self.stable_count: Counter[str] = Counter()  # accession -> StableStudy changes (2+: stable twice)
        self.errors = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        since = 0
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while not self.stop_event.is_set():
                try:
                    page = c.get("/changes", params={"since": since, "limit": 1000}).json()
                    seen = time.time()
                    for ch in page.get("Changes", []):
                        since = max(since, int(ch["Seq"]))
                        if ch.get("ChangeType") in ("NewStudy", "StableStudy"):
                            self._record(c, ch["ChangeType"], str(ch["ID"]), seen)
                    if not page.get("Done", True):
                        continue
                except (httpx.HTTPError, ValueError, KeyError):
                    self.errors += 1
                self.stop_event.wait(self.period)

    def _record(self, c: httpx.Client, kind: str, study_id: str, seen: float) -> None:
        if study_id not in self.accession:
            r = c.get(f"/studies/{study_id}")
            if r.status_code != 200:
                return  # deleted since
            self.accession[study_id] = str(r.json().get("MainDicomTags", {}).get("AccessionNumber", ""))
        acc = self.accession[study_id]
        with self.lock:
            if kind == "NewStudy":
                self.new_study.setdefault(acc, seen)
            else:
                self.stable.setdefault(acc, seen)
                self.stable_count[acc] += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


class LockWatch(threading.Thread):
    """Reads the Prefect global concurrency limits every ``period`` seconds and keeps, per ``study-*`` limit,
    when it had a slot taken: tells a wait for a lock another run holds from a slow acquisition."""

    def __init__(self, api_url: str, period: float = 0.25) -> None:
        super().__init__(daemon=True, name="prefect-locks")
        self.api_url, self.period = api_url, period
        self.stop_event = threading.Event()
        self.samples: dict[str, list[tuple[float, int]]] = {}  # name -> (time, active slots)
        self.denied_max: dict[str, int] = {}

    def run(self) -> None:
        with httpx.Client(base_url=self.api_url, timeout=5) as c:
            while not self.stop_event.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    limits = c.post("/v2/concurrency_limits/filter", json={"limit": 200, "offset": 0}).json()
                    seen = time.time()
                    for limit in limits:
                        name = str(limit.get("name", ""))
                        if name.startswith("study-"):
                            self.samples.setdefault(name, []).append((seen, int(limit.get("active_slots", 0))))
                            denied = int(limit.get("denied_slots", 0))
                            self.denied_max[name] = max(self.denied_max.get(name, 0), denied)
                self.stop_event.wait(self.period)

    def held(self, name: str, start: float, end: float) -> bool | None:
        """Whether the limit had a slot taken at some sample in [start, end]; None without a sample there."""
        inside = [active for t, active in self.samples.get(name, []) if start <= t <= end]
        return any(a > 0 for a in inside) if inside else None

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


# -- CPU --------------------------------------------------------------------------------------------------------
def stack_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each process `owf up` started (by its PID file), with its descendants."""
    return {name: tree_cpu_seconds(pid) for name, pid in pid_files(stack.workdir / "data" / "run").items()}


def cpu_per_study(before: dict[str, float], after: dict[str, float], studies: int) -> dict[str, float]:
    return {k: round((after[k] - before.get(k, 0.0)) / studies, 2) for k in after} if studies else {}


# -- the Prefect side -------------------------------------------------------------------------------------------
def _ts(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


def _pages(read: Callable[..., list[Any]], page: int = 200, **filters: Any) -> Iterator[Any]:
    """Every item a Prefect client ``read_*`` call finds, page by page."""
    offset = 0
    while True:
        items = read(limit=page, offset=offset, **filters)
        yield from items
        offset += len(items)
        if len(items) < page:
            return


def study_runs(accession_by_id: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Every run of the study-notify deployment, by accession: times of the run, of its states and of its
    task runs (name, start, end)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        runs = list(_pages(client.read_flow_runs, deployment_filter=of_deployment))
        tasks: dict[str, list[dict[str, Any]]] = {}
        for i in range(0, len(runs), 50):
            of_runs = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in runs[i : i + 50]]))
            for t in _pages(client.read_task_runs, task_run_filter=of_runs):
                tasks.setdefault(str(t.flow_run_id), []).append(
                    {"name": t.name, "start": _ts(t.start_time), "end": _ts(t.end_time)}
                )
        # The pull steps run in the workspace supervisor process, before the engine process starts: their
        # log lines split the pickup (no such line: that part stays None).
        pulls: dict[str, dict[str, float]] = {}
        for i in range(0, len(runs), 50):
            of_logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs[i : i + 50]]))
            for log in _pages(client.read_logs, log_filter=of_logs):
                marks = pulls.setdefault(str(log.flow_run_id), {})
                if PULL_START.match(log.message):
                    marks.setdefault("pull_start", log.timestamp.timestamp())
                elif PULL_DONE.match(log.message):
                    marks.setdefault("pull_done", log.timestamp.timestamp())
        out: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            states = client.read_flow_run_states(r.id)
            pending = [s.timestamp for s in states if s.type == StateType.PENDING]
            study = str((r.parameters or {}).get("study", ""))
            accession = accession_by_id.get(study) or (r.name.removeprefix("study-") if r.name else "")
            out.setdefault(accession, []).append({
                "name": r.name, "state": r.state_type.value if r.state_type else None,
                "message": (r.state.message or "")[:300] if r.state else "",
                "created": _ts(r.created), "pending": _ts(pending[0]) if pending else None,
                "start": _ts(r.start_time), "end": _ts(r.end_time), **pulls.get(str(r.id), {}),
                "tasks": sorted(tasks.get(str(r.id), []), key=lambda t: t["start"] or 0),
            })  # fmt: skip
        for v in out.values():
            v.sort(key=lambda run: run["created"] or 0)
        return out


def unfinished_study_runs() -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    busy = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        return client.count_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=busy))),
        )


def watcher_running() -> bool:
    """The watcher's first start sets its horizon (older studies are never notified): wait for its cursor."""
    from prefect.client.orchestration import get_client

    from flows.watch import CURSOR_VARIABLE

    with get_client(sync_client=True) as client:
        return client.read_variable_by_name(CURSOR_VARIABLE) is not None


def _task_sum(tasks: list[dict[str, Any]], prefixes: tuple[str, ...]) -> float:
    return sum(t["end"] - t["start"] for t in tasks if t["start"] and t["end"] and t["name"].startswith(prefixes))


def _first(tasks: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    return next((t for t in tasks if t["name"].startswith(prefix) and t["start"]), None)


def breakdown(stable: float, acked: float, run: dict[str, Any]) -> dict[str, float | None]:
    """Where one study's latency went (seconds); None where the API has no time for a part."""
    tasks = run["tasks"]
    parts: dict[str, float | None] = {
        "watcher_detection": run["created"] - stable if run["created"] else None,
        "worker_pickup": run["start"] - run["created"] if run["start"] and run["created"] else None,
        "process_start": (tasks[0]["start"] - run["start"]) if tasks and tasks[0]["start"] and run["start"] else None,
        "orthanc_reads": _task_sum(tasks, ORTHANC_READS),
        "study_lock": None,
        "hl7_round_trip": _task_sum(tasks, (HL7_TASK,)),
    }
    find, read = _first(tasks, "find-study"), _first(tasks, "read-study")
    if find and read and find["end"]:
        parts["study_lock"] = max(0.0, read["start"] - find["end"])
        run["lock_window"] = (find["end"], read["start"])
    parts["rest"] = (acked - stable) - sum(v for v in parts.values() if v is not None)
    parts["pickup_worker_poll"] = run["pending"] - run["created"] if run["pending"] and run["created"] else None
    parts["pickup_process_spawn"] = run["start"] - run["pending"] if run["start"] and run["pending"] else None
    pull_start, pull_done = run.get("pull_start"), run.get("pull_done")
    parts["spawn_supervisor"] = pull_start - run["pending"] if pull_start and run["pending"] else None
    parts["spawn_pull_steps"] = pull_done - pull_start if pull_done and pull_start else None
    parts["spawn_engine"] = run["start"] - pull_done if run["start"] and pull_done else None
    return parts


def lock_names(accession_by_id: dict[str, str]) -> dict[str, str]:
    """The per-study Prefect lock each study's run takes (if the project still has ``study_lock_name``)."""
    try:
        from tasks.prefect_limits import study_lock_name
    except ImportError:
        return {}
    return {acc: study_lock_name(study_id) for study_id, acc in accession_by_id.items()}


def shared_locks(accessions: list[str], locks: dict[str, str], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Studies whose run took a lock that another study's run held at some point of it (so one may wait)."""
    spans = {a: (runs[a][0]["start"], runs[a][0]["end"]) for a in accessions if runs.get(a) and a in locks}
    out = []
    for a, (start, end) in spans.items():
        if start and end and any(b != a and locks[b] == locks[a] and s2 and e2 and s2 < end and start < e2
                                 for b, (s2, e2) in spans.items()):  # fmt: skip
            out.append(a)
    return sorted(out)


def cpu_times() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot (every process, not only ours)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def cpu_busy(since: tuple[int, int]) -> float | None:
    busy, total = cpu_times()
    return round((busy - since[0]) / (total - since[1]), 3) if total > since[1] else None


# -- numbers --------------------------------------------------------------------------------------------------
def p95(values: list[float]) -> float:
    s = sorted(values)
    return s[max(0, round(0.95 * len(s)) - 1)]


def median_of(rows: list[dict[str, float | None]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def wait_for(check, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def make_studies(folder: Path, prefix: str, n: int, slices: int) -> dict[str, list[Path]]:
    out = {}
    for i in range(1, n + 1):
        accession = f"{prefix}-{i:04d}"
        out[accession] = write_ct_series(folder / accession, slices, accession=accession,
                                         patient_id=f"PAT{prefix[0]}{i:04d}", patient_name=f"Bench^{i}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20, help="studies sent one by one for the latency")
    ap.add_argument("--spacing", type=float, default=10.0, help="mean seconds between two of them (0.5-1.5x)")
    ap.add_argument("--slices", type=int, default=3, help="CT slices per study")
    ap.add_argument("--burst", type=int, default=20, help="studies sent at once for the throughput (0: skip)")
    ap.add_argument("--stable-age", type=int, default=3, help="Orthanc's StableAge (not part of the latency)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait for notifications after a phase")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (stack logs, reports) at the end")
    args = ap.parse_args()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # stop everything on SIGTERM too (the finally below)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="owf-bench-notify-"))
    progress(f"generating {args.studies} + {args.burst} studies of {args.slices} slices")
    latency_set = make_studies(work / "studies", "BENCH", args.studies, args.slices)
    burst_set = make_studies(work / "studies", "BURST", args.burst, args.slices)

    partner = TimedPartner(free_port())
    stack = Stack(work / "stack", partner.port, args.stable_age)
    os.environ["PREFECT_API_URL"] = stack.api_url  # for get_client in this process (prefect imported later)
    os.environ["PREFECT_HOME"] = str(work / "client-home")
    changes = ChangeWatch(stack.url)
    lock_watch = LockWatch(stack.api_url)
    sent: dict[str, float] = {}
    phases: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        partner.start()
        progress(f"starting the stack (owf up), config {stack.config}, HL7 partner on port {partner.port}")
        stack.up()
        changes.start()
        lock_watch.start()
        progress("waiting for the watcher's first read of the change log")
        if not wait_for(watcher_running, 120, every=0.5):
            raise SystemExit("the watcher did not start within 120 s")

        def notified(accessions: list[str]) -> int:
            got = {a.accession for a in partner.arrivals}
            return sum(1 for a in accessions if a in got)

        # (1) latency: one study at a time
        rng = random.Random(1)
        names = list(latency_set)
        cpu0, stack0 = cpu_times(), stack_cpu(stack)
        t0 = time.perf_counter()
        due = 0.0
        for i, accession in enumerate(names):
            due += args.spacing * rng.uniform(0.5, 1.5) if i else 0.0
            time.sleep(max(0.0, t0 + due - time.perf_counter()))
            sent[accession] = time.time()
            storescu(stack.dicom_port, latency_set[accession])
            progress(f"latency: sent {accession} ({i + 1}/{len(names)}); notified so far {notified(names)}")
        ok = wait_for(lambda: notified(names) == len(names), args.timeout + args.stable_age)
        progress(f"latency: {notified(names)}/{len(names)} notified" + ("" if ok else " (timed out)"))
        wait_for(lambda: unfinished_study_runs() == 0, args.timeout, every=1)
        time.sleep(5)  # a late duplicate would show here
        phases["latency"] = {"accessions": names, "cpu_busy": cpu_busy(cpu0),
                             "cpu_s_per_study": cpu_per_study(stack0, stack_cpu(stack), len(names))}  # fmt: skip

        # (2) throughput: a burst at once
        if burst_set:
            names = list(burst_set)
            for accession in names:
                sent[accession] = time.time()
            progress(f"burst: sending {len(names)} studies at once")
            cpu0, stack0 = cpu_times(), stack_cpu(stack)
            storescu(stack.dicom_port, [p for a in names for p in burst_set[a]])
            last, last_change = -1, time.monotonic()

            def burst_done() -> bool:
                nonlocal last, last_change
                n = notified(names)
                if n != last:
                    progress(f"burst: {n}/{len(names)} notified")
                    last, last_change = n, time.monotonic()
                return n == len(names)

            ok = wait_for(burst_done, args.timeout + 10 * len(names), every=0.5)
            if not ok:
                progress("burst: timed out")
            wait_for(lambda: unfinished_study_runs() == 0, args.timeout, every=1)
            time.sleep(5)
            phases["burst"] = {"accessions": names, "cpu_busy": cpu_busy(cpu0),
                               "cpu_s_per_study": cpu_per_study(stack0, stack_cpu(stack), len(names))}  # fmt: skip

        time.sleep(2)  # task run states reach the API through events: let the last ones land
        accession_by_id = dict(changes.accession)
        runs = study_runs(accession_by_id)
    finally:
        for thread in (changes, lock_watch):
            if thread.is_alive():
                thread.stop()
        progress("stopping the stack (owf down) and the HL7 partner")
        stack.down()
        partner.stop()

    # -- results ------------------------------------------------------------------------------------------------
    messages = Counter(a.accession for a in partner.arrivals)
    first_ack: dict[str, float] = {}
    for a in sorted(partner.arrivals, key=lambda a: a.acked):
        if a.accession:
            first_ack.setdefault(a.accession, a.acked)
    duplicates = {acc: n for acc, n in messages.items() if acc and n > 1}
    extra_runs = {acc: len(v) for acc, v in runs.items() if acc in sent and len(v) > 1}
    stable_twice = {acc: n for acc, n in changes.stable_count.items() if acc in sent and n > 1}
    unknown = messages.get(None, 0) + partner.unparsed
    failed_runs = sorted({f"{acc}: {r['state']} {r['message']}".strip() for acc, v in runs.items() if acc in sent
                          for r in v if r["state"] != "COMPLETED"})  # fmt: skip
    locks = lock_names(changes.accession)

    def rows_of(accessions: list[str], show: bool) -> list[dict[str, Any]]:
        rows = []
        for accession in accessions:
            stable, acked = changes.stable.get(accession), first_ack.get(accession)
            row: dict[str, Any] = {"accession": accession, "latency": None}
            if stable is not None and acked is not None:
                row["latency"] = acked - stable
                if runs.get(accession):
                    row.update(breakdown(stable, acked, runs[accession][0]))
            row["stable_after_send"] = stable - sent[accession] if stable is not None else None
            row["lock"] = locks.get(accession)
            window = runs[accession][0].get("lock_window") if runs.get(accession) else None
            if row["lock"] and window and (row.get("study_lock") or 0) > 1:
                held = lock_watch.held(row["lock"], window[0] + 0.1, window[1] - 0.3)
                holder = any(
                    b != accession and locks.get(b) == row["lock"] and r["start"] and r["end"]
                    and r["start"] < window[1] and window[0] < r["end"]
                    for b, v in runs.items() for r in v
                )  # fmt: skip
                # taken by another study's run / taken while no other run of that lock was running / free
                row["lock_seen"] = (
                    None if held is None else "by-run" if held and holder else "taken" if held else "free"
                )
            rows.append(row)
            if show:
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items() if v is not None}
                progress(f"{shown}")
        return rows

    def lock_waits(rows: list[dict[str, Any]]) -> dict[str, int]:
        waits = [r for r in rows if (r.get("study_lock") or 0) > 1]
        return {"over_1s": len(waits),
                **{f"lock_{kind.replace('-', '_')}": sum(1 for r in waits if r.get("lock_seen") == kind)
                   for kind in ("by-run", "taken", "free")}}  # fmt: skip

    def rounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if v is not None} for r in rows]

    lat = phases.get("latency", {}).get("accessions", [])
    rows = rows_of(lat, show=True)
    latencies = [r["latency"] for r in rows if r["latency"] is not None]
    medians = {k: median_of(rows, k) for k in BREAKDOWN}
    pickup_detail = {k: median_of(rows, k) for k in PICKUP_DETAIL}
    shared = shared_locks(lat, locks, runs)

    burst: dict[str, Any] = {}
    burst_names = phases.get("burst", {}).get("accessions", [])
    if burst_names:
        b_rows = rows_of(burst_names, show=False)
        b_lat = [r["latency"] for r in b_rows if r["latency"] is not None]
        stables = [changes.stable[a] for a in burst_names if a in changes.stable]
        acks = [first_ack[a] for a in burst_names if a in first_ack]
        span = max(acks) - min(stables) if acks and stables else None
        burst = {
            "studies": len(burst_names),
            "notified": len(acks),
            "seconds_first_stable_to_last_ack": round(span, 2) if span else None,
            "studies_per_minute": round(len(acks) / span * 60, 1) if span else None,
            "latency_p50_s": round(statistics.median(b_lat), 2) if b_lat else None,
            "latency_max_s": round(max(b_lat), 2) if b_lat else None,
            "breakdown_median_s": {k: median_of(b_rows, k) for k in BREAKDOWN},
            "pickup_detail_median_s": {k: median_of(b_rows, k) for k in PICKUP_DETAIL},
            "studies_sharing_a_busy_lock": shared_locks(burst_names, locks, runs),
            "lock_waits": lock_waits(b_rows),
            "machine_cpu_busy": phases["burst"].get("cpu_busy"),
            "cpu_s_per_study": phases["burst"].get("cpu_s_per_study"),
            "per_study": rounded(b_rows),
        }

    n_sent = len(lat) + len(burst_names)
    got = sum(1 for a in list(lat) + burst_names if a in first_ack)
    p95_s = round(p95(latencies), 2) if latencies else None
    summary = {
        "benchmark": "notify",
        "studies": len(lat),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p95_s": p95_s,
        "latency_max_s": round(max(latencies), 2) if latencies else None,
        "studies_per_minute": burst.get("studies_per_minute"),
        "breakdown_median_s": medians,
        "pickup_detail_median_s": pickup_detail,
        "target_p95_s": TARGET_P95_S,
        "p95_within_target": bool(p95_s is not None and p95_s < TARGET_P95_S and len(latencies) == len(lat)),
        "studies_sent": n_sent,
        "studies_notified": got,
        "notifications_received": len(partner.arrivals) + partner.unparsed,
        "missing": sorted(a for a in list(lat) + burst_names if a not in first_ack),
        "duplicates": duplicates,
        "unrecognised_messages": unknown,
        "study_runs_more_than_one": extra_runs,
        "stable_study_more_than_once": stable_twice,
        "study_runs_not_completed": failed_runs,
        "studies_sharing_a_busy_lock": shared,
        "lock_waits": lock_waits(rows),
        "machine_cpu_busy": phases.get("latency", {}).get("cpu_busy"),
        "cpu_s_per_study": phases.get("latency", {}).get("cpu_s_per_study"),
        "burst": burst,
        "settings": {
            "watch_interval_s": WATCH_INTERVAL_S,
            "worker_query_s": WORKER_QUERY_S,
            "stable_age_s": args.stable_age,
            "stable_age_in_latency": False,
            "slices": args.slices,
            "spacing_s": args.spacing,
            "changes_poll_s": changes.period,
        },
        "per_study": rounded(rows),
    }
    progress(f"target: p95 latency under {TARGET_P95_S} s with default settings (StableAge excluded: the latency "
             "starts at the StableStudy change)")  # fmt: skip
    progress(
        f"latency over {len(latencies)} studies: p50 {summary['latency_p50_s']} s, p95 {p95_s} s, max "
        f"{summary['latency_max_s']} s -> {'within' if summary['p95_within_target'] else 'NOT within'} target"
    )
    progress(f"breakdown medians (s): {json.dumps(medians)}")
    progress(f"pickup detail medians (s): {json.dumps(pickup_detail)}")
    progress(
        f"machine CPU busy during the latency phase: {summary['machine_cpu_busy']} (all cores = 1.0); CPU "
        f"seconds per study: {json.dumps(summary['cpu_s_per_study'])}; lock waits {json.dumps(summary['lock_waits'])}"
    )
    if burst:
        progress(f"burst: {json.dumps({k: v for k, v in burst.items() if k != 'per_study'})}")
    if duplicates or extra_runs or summary["missing"] or unknown:
        progress(f"WARNING: duplicates {duplicates}, extra runs {extra_runs}, missing {summary['missing']}, "
                 f"unrecognised {unknown}")  # fmt: skip
    if args.keep:
        progress(f"work folder kept: {work} (logs in {stack.workdir / 'data'})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
