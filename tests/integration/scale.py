"""The whole product scaled out on one machine, for the scale-out and fault-injection tests.

A Prefect server on PostgreSQL (both started here), two or more process workers on one work pool, each with a
Prefect home of its own as on separate hosts, Orthanc, Samba, a folder share, an HL7 partner and an archive
that is a process of its own (tests/integration/archive_proc.py). The deployments are made by ``owf deploy``
with the site file, as an operator would. Every component can be killed (SIGKILL, no goodbye) and started
again. The test process talks to this Prefect server over its REST API only: its own Prefect settings belong
to the test session's SQLite server.

``Traffic`` writes what a hospital sends (C-STORE from two modalities, files dropped on both shares, junk,
files cut short, files written slowly) and remembers it; ``Ledger`` compares that with what Orthanc, the
shares, the partner and the archive hold in the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from pydicom.uid import generate_uid

from stack.services import (
    OrthancServer,
    PostgresServer,
    PrefectServer,
    PrefectWorker,
    SambaServer,
    Service,
    free_port,
    port_open,
    prefect_env,
    process_tree,
    wait_until,
)
from stack.synthetic import ct_dataset
from tasks.config import PROJECT_ROOT
from tasks.rules import anonymized_study_uid
from tests.integration.deployed import storescu
from tests.integration.partner import Partner

SMB_PASSWORD_ENV = "OWF_SCALE_SMB_PASSWORD"
ROUTES = [
    {"name": "modality1", "when": {"source": "MODALITY1"},
     "modify": {"replace": {"InstitutionName": "Imaging Center West"}}, "to": ["archive"]},
    {"name": "modality2", "when": {"source": "MODALITY2"},
     "anonymize": {"profile": "2021b", "keep": ["StudyDescription"]}, "to": ["archive"]},
]  # fmt: skip
ROUTE_OF = {"MODALITY1": "modality1", "MODALITY2": "modality2"}
QUARANTINE = ".quarantine"


# -- the Prefect server, over REST ----------------------------------------------------------------------------
class PrefectApi:
    """The few reads and writes the tests need, retried while the server is down (it is killed on purpose)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def _call(self, method: str, path: str, body: dict | None = None, wait: float = 90) -> httpx.Response:
        deadline = time.monotonic() + wait
        while True:
            try:
                r = self.http.request(method, path, json=body)
                if r.status_code < 500:
                    return r
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Prefect API {method} {path} failed for {wait:.0f} s")
            time.sleep(1)

    def _paged(self, path: str, body: dict) -> list[dict]:
        """Every item a ``POST .../filter`` endpoint answers, 200 at a time."""
        out: list[dict] = []
        while True:
            page = self._call("POST", path, {**body, "limit": 200, "offset": len(out)}).json()
            out += page
            if len(page) < 200:
                return out

    def flow_runs(self, deployment: str) -> list[dict]:
        return self._paged("/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})

    def artifacts(self, key: str) -> list[dict]:
        return self._paged("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})

    def start(self, deployment: str, parameters: dict | None = None) -> str:
        dep = self._call("GET", f"/deployments/name/{deployment}").json()
        run = self._call("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters or {}})
        return run.json()["id"]

    def variable(self, name: str) -> str | None:
        r = self._call("GET", f"/variables/name/{name}")
        return r.json().get("value") if r.status_code == 200 else None


def flow_run_pids(run_id: str) -> list[int]:
    """The processes running one flow run (the process worker sets PREFECT__FLOW_RUN_ID in their environment)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
    return pids


def kill_group(service: Service | None) -> None:
    """SIGKILL a service and everything it started, and reap it: a crash, not a shutdown."""
    if service is None or service.proc is None:
        return
    pid = service.proc.pid
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    service.proc.wait(10)
    service.proc = None


# -- the pipeline ---------------------------------------------------------------------------------------------
@dataclass
class Pipeline:
    root: Path
    workers: int = 2
    window_seconds: int = 40
    max_concurrent: int = 1
    sent: set[str] = field(default_factory=set)  # Study Instance UIDs of every study any Traffic sent
    bad: set[str] = field(default_factory=set)  # share/path of every bad file any Traffic wrote
    counter: int = 0  # names and accession numbers stay unique across the tests sharing this pipeline

    def start(self) -> Pipeline:
        self.root.mkdir(parents=True, exist_ok=True)
        self.pg = PostgresServer.in_tmp(free_port()).start()
        self.prefect = PrefectServer(self.root / "prefect-server", free_port(), database=self.pg).start()
        self.api = PrefectApi(self.prefect.api_url)
        self.orthanc = OrthancServer(self.root / "orthanc", free_port(), free_port(), stable_age=3).start()
        self.samba = SambaServer(self.root / "samba", free_port()).start()
        self.partner = Partner(free_port()).start()
        self.archive_port = free_port()
        self.archive_ledger = self.root / "archive" / "ledger.jsonl"
        self.archive: Service | None = None
        self.start_archive()
        self.drop = self.root / "drop"
        self.drop.mkdir(exist_ok=True)
        self.site = self._write_site()
        env = {**os.environ, "OWF_CONFIG": str(self.site)}
        env.pop("PREFECT_API_URL", None)  # owf takes the server from the site file
        out = subprocess.run([str(Path(sys.executable).parent / "owf"), "--config", str(self.site), "deploy"],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        self.worker_procs: dict[str, PrefectWorker] = {}
        for i in range(self.workers):
            self.start_worker(f"w{i + 1}")
        for share in ("drop", "smbdrop"):
            self.api.start(f"ingest-share/ingest-{share}", {"share": share})
        self.api.start("watch-orthanc/watch-orthanc")
        wait_until(lambda: self.api.variable("orthanc-watch-cursor") is not None, 120, "the watcher to start")
        return self

    def _write_site(self) -> Path:
        fast = {"interval_seconds": 1, "window_seconds": self.window_seconds, "handover_seconds": 5}
        site = {
            "data_dir": str(self.root / "data"),
            "orthanc": {"url": self.orthanc.url, "timeout_seconds": 15, "outage_wait_seconds": 120},
            "prefect": {"port": self.prefect.port, "work_pool": "scale"},
            "ingest": {**fast, "incomplete_grace_seconds": 8, "backoff_max_seconds": 5},
            "shares": [
                {"name": "drop", "kind": "local", "path": str(self.drop), "source": "DROP"},
                {
                    "name": "smbdrop",
                    "kind": "smb",
                    "server": "127.0.0.1",
                    "port": self.samba.port,
                    "share": self.samba.share_name,
                    "username": self.samba.username,
                    "password_env": SMB_PASSWORD_ENV,
                    "source": "SMBDROP",
                },
            ],
            "watch": {**fast, "settle_seconds": 10},
            "hl7": {
                "enabled": True,
                "port": self.partner.port,
                "ack_timeout_seconds": 3,
                "retries": 6,
                "retry_backoff_seconds": 1,
            },
            "destinations": [
                {
                    "name": "archive",
                    "aet": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": self.archive_port,
                    "max_concurrent": self.max_concurrent,
                }
            ],
            "routes": ROUTES,
            "routing": {"retries": 5, "retry_backoff_seconds": 2, "job_timeout_seconds": 60},
        }
        path = self.root / "site.yaml"
        path.write_text(yaml.safe_dump(site))
        return path

    # -- components, each started and killed -------------------------------------------------------------------
    def worker_env(self, name: str) -> dict[str, str]:
        """A worker host's environment: the API address, the site file and the share password. No database
        settings: only the Prefect server talks to PostgreSQL."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(prefect_env(self.root / name / "prefect-home", self.prefect.port))
        env.update({"OWF_CONFIG": str(self.site), "OWF_PROJECT_DIR": str(PROJECT_ROOT),
                    SMB_PASSWORD_ENV: self.samba.password})  # fmt: skip
        return env

    def start_worker(self, name: str) -> None:
        self.worker_procs[name] = PrefectWorker(self.root / name, self.worker_env(name), "scale", name=name).start()

    def start_archive(self) -> None:
        self.archive_ledger.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "tests.integration.archive_proc",
            str(self.archive_port),
            str(self.archive_ledger),
        ]
        self.archive = Service("archive", argv, self.archive_ledger.parent, {"PYTHONPATH": str(PROJECT_ROOT)})
        proc = self.archive.spawn()
        wait_until(lambda: port_open(self.archive_port), 30, "the archive", proc, self.archive.log_path)

    def kill(self, what: str) -> None:
        if what == "orthanc":
            kill_group(self.orthanc.service)
        elif what == "samba":
            kill_group(self.samba.service)
        elif what == "hl7":
            self.partner.stop()
        elif what == "archive":
            kill_group(self.archive)
        elif what == "prefect":
            kill_group(self.prefect.service)
        elif what.startswith("worker"):
            kill_group(self.worker_procs["w1"].service)
        elif what == "watcher-run":
            for run in self.api.flow_runs("watch-orthanc"):
                if run["state_type"] == "RUNNING":
                    for pid in flow_run_pids(run["id"]):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
        else:
            raise ValueError(what)

    def restart(self, what: str) -> None:
        if what == "orthanc":
            self.orthanc.start()
        elif what == "samba":
            self.samba.start()
        elif what == "hl7":
            self.partner = Partner(self.partner.port, received=self.partner.received, raw=self.partner.raw).start()
        elif what == "archive":
            self.start_archive()
        elif what == "prefect":
            self.prefect.start()
        elif what.startswith("worker"):
            self.start_worker("w1")
        # the watcher's run is not restarted by hand: the next scheduled run takes over

    def stop(self) -> None:
        for w in self.worker_procs.values():
            kill_group(w.service)
        for stop in (self.partner.stop, self.samba.stop, self.orthanc.stop, self.prefect.stop, self.pg.stop,
                     lambda: kill_group(self.archive)):  # fmt: skip
            with contextlib.suppress(Exception):
                stop()


# -- what was sent ----------------------------------------------------------------------------------------------
@dataclass
class SentStudy:
    uid: str
    source: str  # MODALITY1, MODALITY2 (C-STORE) or DROP, SMBDROP (files)
    sops: set[str]
    accession: str


@dataclass
class Traffic:
    """Writes the load and remembers every item of it."""

    pipe: Pipeline
    rng: random.Random
    studies: dict[str, SentStudy] = field(default_factory=dict)
    bad: dict[str, list[str]] = field(default_factory=lambda: {"drop": [], "smbdrop": []})  # share -> paths
    good_files: dict[str, dict[str, str]] = field(default_factory=lambda: {"drop": {}, "smbdrop": {}})  # path -> SOP

    def _folder(self, share: str) -> Path:
        return self.pipe.drop if share == "drop" else self.pipe.samba.share_dir

    def _next(self, prefix: str) -> str:
        self.pipe.counter += 1
        return f"{prefix}-{self.pipe.counter:04d}"

    def _datasets(self, source: str, count: int):
        accession = self._next("FT")
        study, series = generate_uid(), generate_uid()
        sent = SentStudy(study, source, set(), accession)
        self.studies[study] = sent
        self.pipe.sent.add(study)
        for i in range(count):
            ds = ct_dataset(study, series, i, side=32, patient_id=f"PID-{accession}", accession=accession)
            sent.sops.add(str(ds.SOPInstanceUID))
            yield ds

    def cstore(self, modality: str, count: int) -> None:
        """A modality sends a study; it sends again until Orthanc took it, as modalities do."""
        folder = self.pipe.root / "outbox" / self._next("cs")
        folder.mkdir(parents=True)
        paths = []
        for i, ds in enumerate(self._datasets(modality, count)):
            paths.append(folder / f"{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        for _attempt in range(60):
            try:
                storescu(self.pipe.orthanc, paths, aet=modality)
                return
            except subprocess.SubprocessError:
                time.sleep(2)
        raise AssertionError(f"{modality} could not store its study for two minutes")

    def share_study(self, share: str, count: int) -> None:
        folder = self._folder(share) / self._next("study")
        folder.mkdir(parents=True)
        for i, ds in enumerate(self._datasets(share.upper(), count)):
            path = folder / f"IMG{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.good_files[share][str(path.relative_to(self._folder(share)))] = str(ds.SOPInstanceUID)

    def slow_file(self, share: str) -> threading.Thread:
        """A file written in two halves a few seconds apart: it must be taken whole, never cut short."""
        [ds] = list(self._datasets(share.upper(), 1))
        scratch = self.pipe.root / "scratch" / f"{self._next('slow')}.dcm"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(scratch, enforce_file_format=True)
        data = scratch.read_bytes()
        path = self._folder(share) / scratch.name
        self.good_files[share][path.name] = str(ds.SOPInstanceUID)
        pause = self.rng.uniform(1.5, 4.0)

        def write() -> None:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(pause)
                f.write(data[len(data) // 2 :])

        t = threading.Thread(target=write, daemon=True)
        t.start()
        return t

    def junk(self, share: str) -> None:
        name = f"{self._next('junk')}{self.rng.choice(['.dcm', '.bin', ''])}"
        (self._folder(share) / name).write_bytes(self.rng.randbytes(self.rng.randint(200, 20000)))
        self.bad[share].append(name)
        self.pipe.bad.add(f"{share}/{name}")

    def cut_short(self, share: str) -> None:
        """A DICOM file whose writer died half-way: it waits out the grace period, then goes to quarantine."""
        ds = ct_dataset(generate_uid(), generate_uid(), 0, side=64, accession="CUT")
        scratch = self.pipe.root / "scratch" / f"{self._next('cut')}.dcm"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(scratch, enforce_file_format=True)
        data = scratch.read_bytes()
        (self._folder(share) / scratch.name).write_bytes(data[: int(len(data) * self.rng.uniform(0.4, 0.8))])
        self.bad[share].append(scratch.name)
        self.pipe.bad.add(f"{share}/{scratch.name}")


# -- what arrived ---------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    files_in: int = 0
    stored: int = 0
    quarantined: int = 0
    files_lost: list[str] = field(default_factory=list)
    files_left: list[str] = field(default_factory=list)  # still in a share (not yet handled)
    unexplained_quarantine: list[str] = field(default_factory=list)
    studies: int = 0
    notified: int = 0
    notifications: int = 0
    updates: int = 0
    not_notified: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # last notification does not carry the final image count
    duplicate_notifications: list[str] = field(default_factory=list)
    routes: int = 0
    deliveries: int = 0
    not_delivered: list[str] = field(default_factory=list)
    duplicate_deliveries: list[str] = field(default_factory=list)
    max_concurrent_deliveries: int = 0
    study_runs: int = 0
    study_runs_per_study: dict[str, int] = field(default_factory=dict)
    extra_runs: list[str] = field(default_factory=list)  # more study runs than the study had stable states
    extra_orthanc_studies: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.files_lost or self.files_left or self.not_notified or self.stale or self.not_delivered)

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_notifications) + len(self.duplicate_deliveries)

    def summary(self) -> dict:
        return {
            "files": {"in": self.files_in, "stored": self.stored, "quarantined": self.quarantined,
                      "lost": len(self.files_lost), "still_in_share": len(self.files_left)},
            "studies": {"sent": self.studies, "notified": self.notified, "notifications": self.notifications,
                        "updates": self.updates, "not_notified": len(self.not_notified),
                        "duplicates": len(self.duplicate_notifications), "study_runs": self.study_runs,
                        "extra_runs": len(self.extra_runs)},
            "routes": {"due": self.routes, "deliveries": self.deliveries, "not_delivered": len(self.not_delivered),
                       "duplicates": len(self.duplicate_deliveries),
                       "max_concurrent_deliveries": self.max_concurrent_deliveries},
        }  # fmt: skip

    def problems(self) -> dict:
        return {k: v for k, v in {
            "files_lost": self.files_lost, "files_left": self.files_left[:20],
            "unexplained_quarantine": self.unexplained_quarantine, "not_notified": self.not_notified,
            "stale": self.stale, "duplicate_notifications": self.duplicate_notifications, "extra_runs": self.extra_runs,
            "not_delivered": self.not_delivered, "duplicate_deliveries": self.duplicate_deliveries,
            "extra_orthanc_studies": self.extra_orthanc_studies}.items() if v}  # fmt: skip


def _obx(message) -> dict[str, tuple[str, str]]:
    """OBX-3 code -> (OBX-5, OBX-11) of one HL7 message."""
    return {str(s[3]).split("^")[0]: (str(s[5]), str(s[11])) for s in message.segments("OBX")}


def notifications_by_study(messages) -> dict[str, dict[str, tuple[str, int]]]:
    """Study UID -> {MSH-10 control id: (result status F/C, number of instances)}. A message received twice with
    the same control id is one notification (a resend after a lost ACK, which the receiver recognises)."""
    out: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for m in messages:
        obx = _obx(m)
        uid, status = obx.get("113014", ("", ""))
        count = int(float(obx.get("number_of_instances", ("0", ""))[0] or 0))
        out[uid][str(m.segment("MSH")[10])] = (status, count)
    return out


def take_ledger(pipe: Pipeline, traffic: Traffic) -> Ledger:
    led = Ledger()
    # files: every good file stored and gone from its share, every bad one in quarantine with its reason
    orthanc_sops: set[str] = set()
    orthanc_studies: dict[str, tuple[str, int, bool]] = {}  # uid -> (orthanc id, instances, is a routing copy)
    for study in httpx.get(pipe.orthanc.url + "/studies?expand", timeout=30).json():
        uid = study["MainDicomTags"].get("StudyInstanceUID", "")
        r = httpx.get(f"{pipe.orthanc.url}/studies/{study['ID']}/instances", timeout=30)
        if r.status_code == 404:  # a routing copy, deleted since the list was read
            continue
        instances = r.json()
        orthanc_sops |= {i["MainDicomTags"].get("SOPInstanceUID") for i in instances}
        copy = bool(study.get("AnonymizedFrom") or study.get("ModifiedFrom"))
        orthanc_studies[uid] = (study["ID"], len(instances), copy)
    for share, files in traffic.good_files.items():
        folder = traffic._folder(share)
        led.files_in += len(files)
        for name, sop in files.items():
            if (folder / name).exists():
                led.files_left.append(f"{share}/{name}")
            elif (folder / QUARANTINE / name).exists():
                led.files_lost.append(f"{share}/{name}: a good file was quarantined")
            elif sop in orthanc_sops:
                led.stored += 1
            else:
                led.files_lost.append(f"{share}/{name}: neither in Orthanc nor in the share")
    for share, names in traffic.bad.items():
        folder = traffic._folder(share)
        led.files_in += len(names)
        for name in names:
            q = folder / QUARANTINE / name
            if q.exists() and Path(f"{q}.reason.json").exists():
                led.quarantined += 1
            elif (folder / name).exists():
                led.files_left.append(f"{share}/{name}")
            else:
                led.files_lost.append(f"{share}/{name}")
    for share in traffic.bad:
        qdir = traffic._folder(share) / QUARANTINE
        expected = {b.split("/", 1)[1] for b in pipe.bad if b.startswith(f"{share}/")}
        for p in qdir.rglob("*") if qdir.exists() else []:
            if p.is_file() and not p.name.endswith(".reason.json"):
                rel = str(p.relative_to(qdir))
                if rel not in expected:
                    led.unexplained_quarantine.append(f"{share}/{rel}")
    for sent in traffic.studies.values():
        if sent.source.startswith("MODALITY") and not sent.sops <= orthanc_sops:
            led.files_lost.append(f"{sent.accession}: {len(sent.sops - orthanc_sops)} C-STORE instance(s) missing")
    # studies: one notification each (updates only where the study really changed), the last one up to date
    by_study = notifications_by_study(list(pipe.partner.received))
    led.studies = len(traffic.studies)
    for uid, sent in traffic.studies.items():
        got = by_study.get(uid, {})
        led.notifications += len(got)
        if not got:
            led.not_notified.append(sent.accession)
            continue
        led.notified += 1
        statuses = [s for s, _ in got.values()]
        counts = Counter(n for _, n in got.values())
        led.updates += statuses.count("C")
        if statuses.count("F") != 1 or any(c > 1 for c in counts.values()):
            led.duplicate_notifications.append(f"{sent.accession}: {sorted(got.values())}")
        if max(counts) != len(sent.sops):
            led.stale.append(f"{sent.accession}: notified with {max(counts)} of {len(sent.sops)} images")
    known = pipe.sent
    led.extra_orthanc_studies = [uid for uid, (_, _, copy) in orthanc_studies.items() if uid not in known and not copy]
    # routes: each routed study delivered whole, once, at most max_concurrent studies at a time
    received: dict[str, list[list[str]]] = defaultdict(list)  # archive study uid -> SOPs per association
    spans: dict[str, list[float]] = {}
    if pipe.archive_ledger.exists():
        for line in pipe.archive_ledger.read_text().splitlines():
            assoc = json.loads(line)
            per_study: dict[str, list[str]] = defaultdict(list)
            for study_uid, sop in assoc["stored"]:
                per_study[study_uid].append(sop)
            for study_uid, sops in per_study.items():
                received[study_uid].append(sops)
                span = spans.setdefault(study_uid, [assoc["start"], assoc["end"]])
                span[0], span[1] = min(span[0], assoc["start"]), max(span[1], assoc["end"])
    for uid, sent in traffic.studies.items():
        route = ROUTE_OF.get(sent.source)
        if route is None:
            continue
        led.routes += 1
        at_archive = uid if route == "modality1" else anonymized_study_uid(uid, route)
        sops = Counter(s for assoc in received.get(at_archive, []) for s in assoc)
        n = len(sent.sops)
        if route == "modality1":  # UIDs kept: the archive holds the very instances
            whole = set(sops) == sent.sops
            doubled = [s for s, c in sops.items() if c > 1]
        else:  # new instance UIDs per copy: one delivery is n distinct instances
            whole = len(sops) >= n
            doubled = [s for s, c in sops.items() if c > 1] + (["a second copy"] if len(sops) > n else [])
        if whole:
            led.deliveries += 1
        else:
            led.not_delivered.append(f"{sent.accession} ({route}): {len(sops)} of {n} instances")
        if doubled:
            led.duplicate_deliveries.append(f"{sent.accession} ({route}): {len(doubled)} instance(s) twice")
    edges = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
    level = 0
    for _, step in edges:
        level += step
        led.max_concurrent_deliveries = max(led.max_concurrent_deliveries, level)
    # runs: one study run per stable study (a second only when the study really changed)
    runs = pipe.api.flow_runs("study-notify")
    led.study_runs = len(runs)
    for run in runs:
        for tag in run["tags"]:
            if tag.startswith("study-uid:"):
                uid = tag.split(":", 1)[1]
                led.study_runs_per_study[uid] = led.study_runs_per_study.get(uid, 0) + 1
    for uid, sent in traffic.studies.items():
        # each run of a study is one stable state of it, and each stable state that changed the study sent a
        # notification or an update: more runs than that is a run created twice
        n_runs, n_notes = led.study_runs_per_study.get(uid, 0), len(by_study.get(uid, {}))
        if n_runs > max(n_notes, 1):
            led.extra_runs.append(f"{sent.accession}: {n_runs} study runs, {n_notes} notification(s)")
    return led


def ingest_totals(api: PrefectApi) -> dict[str, int]:
    """The sum of every ingest run's report (artifact rows 'instances uploaded', 'already stored', ...)."""
    totals: Counter[str] = Counter()
    for share in ("drop", "smbdrop"):
        for artifact in api.artifacts(f"ingest-{share}"):
            for line in (artifact.get("data") or "").splitlines():
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if len(cells) == 2 and cells[1].isdigit():
                    totals[cells[0]] += int(cells[1])
    return dict(totals)


def wait_for_ledger(pipe: Pipeline, traffic: Traffic, timeout: float, settle: float = 15) -> Ledger:
    """Wait until everything sent has arrived (or ``timeout``), then ``settle`` seconds more for anything late
    (a duplicate would come late); returns the final ledger."""
    deadline = time.monotonic() + timeout
    led = take_ledger(pipe, traffic)
    shown = time.monotonic()
    while not led.complete and time.monotonic() < deadline:
        time.sleep(3)
        led = take_ledger(pipe, traffic)
        if time.monotonic() - shown > 30:
            print(f"waiting for the ledger: {report(led)}", flush=True)
            shown = time.monotonic()
    if led.complete:
        time.sleep(settle)
        led = take_ledger(pipe, traffic)
    return led


def report(led: Ledger, **extra) -> str:
    """One JSON line with the counts, and the problems found (accession numbers of synthetic studies only)."""
    return json.dumps({**led.summary(), **extra, "problems": led.problems()})
