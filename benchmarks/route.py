"""Morph-and-route benchmark: our route subflow against the same Orthanc REST calls made directly, in one run.

    .venv/bin/python benchmarks/route.py [--instances 200] [--side 512] [--repeat 3] [--workdir DIR]

It starts its own servers on free ports: a Prefect server (SQLite, temporary PREFECT_HOME; this process is
its client), a main Orthanc holding one study of --instances CT slices of --side x --side pixels (512: a real
CT slice, about 0.5 MB; 128: about 33 KB, where Prefect's fixed cost per run outweighs the work), from
stack.synthetic, and a second Orthanc as the archive (AET ARCHIVE). Both Orthancs run with TCP_NODELAY=1.
The site config names the main Orthanc, the archive as destination `archive`, and two routes:

  (1) modify_keep_uids: route `modify-keep-uids` (modify: replace InstitutionName, UIDs kept). The
      per-instance path: POST /instances/{id}/modify, then POST /modalities/archive/store-straight with the
      answer, --parallel (the project's default, 4) instances at a time;
  (2) anonymize: route `anonymize` (profile 2021b). The copy path: POST /studies/{id}/anonymize as an
      asynchronous job, wait, POST /modalities/archive/store as a job, wait, check InstancesCount, DELETE
      the copy.

For each variant:

  ours    wall time of flows.route.run_route(study_id, route, force=True, config_path=...) in this process,
          which is how the study run runs a route: the route flow run and its task runs on the Prefect
          server, the destination's concurrency-limit slot, the delivery record read and written on the study;
  direct  the same Orthanc REST calls by plain httpx (same request bodies, from tasks.rules; the same
          parallelism; jobs polled as often as tasks.routing does), with no orchestration: list the
          study's instances, read the study, register the modality, then the path above, then the same
          verification the route does (confirmed instances = the study's).

The archive is emptied (DELETE of its patients) before every run, so each does the same work; after every
run the archive must hold --instances instances and the main Orthanc only the original study. One warm-up
of each (not measured), then --repeat repetitions alternating ours/direct; the medians are compared. The
target (issue 4) is ours/direct <= 1.25.

Where the time goes (from the last measured "ours" run, through the Prefect API): the time before the flow
run is Running (creating it, the engine), the time it is Running, the time after it ends until the call
returns; inside it, each task run's duration and the time between task runs. Besides, measured on their
own: an empty flow run, an empty task run (inside a flow), and taking and giving back one slot of the
destination's concurrency limit.

The last line printed is one JSON object. Timings on a shared 2-core machine are noisy: compare numbers
measured in the same run, and never use these numbers in a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack.services import OrthancServer, PrefectServer, free_port, prefect_env
from stack.synthetic import write_ct_series

TARGET_RATIO = 1.25
ARCHIVE = "archive"
VARIANTS = {  # JSON key -> route name in the site config
    "modify_keep_uids": "modify-keep-uids",
    "anonymize": "anonymize",
}
# Task runs a successful run of each route makes (used to wait until the Prefect server recorded them all).
EXPECTED_TASK_RUNS = {"modify_keep_uids": 5, "anonymize": 8}


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- Orthanc helpers ---------------------------------------------------------------------------------------
def upload(url: str, paths: list[Path], clients: int = 4) -> str:
    """POST every file to Orthanc; returns the Orthanc ID of their (one) study."""
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as c:

        def post(p: Path) -> str:
            r = c.post("/instances", content=p.read_bytes(), headers={"Content-Type": "application/dicom"})
            r.raise_for_status()
            return r.json()["ParentStudy"]

        with ThreadPoolExecutor(clients) as pool:
            studies = set(pool.map(post, paths))
    if len(studies) != 1:
        raise SystemExit(f"expected one study in Orthanc, the upload made {len(studies)}")
    return studies.pop()


def clear(url: str) -> None:
    for patient in httpx.get(url + "/patients", timeout=30).json():
        httpx.delete(f"{url}/patients/{patient}", timeout=300).raise_for_status()


def count_instances(url: str) -> int:
    return httpx.get(url + "/statistics", timeout=30).json()["CountInstances"]


def check_after_run(main_url: str, archive_url: str, study_id: str, n: int, what: str) -> None:
    """Outside the timing: the archive holds the study, and no copy was left in the main Orthanc."""
    held = count_instances(archive_url)
    if held != n:
        raise SystemExit(f"{what}: the archive holds {held} instances, expected {n}")
    left = httpx.get(main_url + "/studies", timeout=30).json()
    if left != [study_id]:
        raise SystemExit(f"{what}: the main Orthanc holds studies {left}, expected only the original {study_id}")


# -- direct: the same REST calls, no orchestration ---------------------------------------------------------
class Direct:
    """The Orthanc calls a route makes, by plain httpx. Each run opens its own client, as a flow run does."""

    def __init__(self, url: str, archive: dict[str, Any], parallel: int, poll: float) -> None:
        self.url = url
        self.archive = archive
        self.parallel = parallel
        self.poll = poll
        self.last_work_s = 0.0  # seconds of the send path alone (after the reads and the registration)

    def _client(self) -> httpx.Client:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)  # as OrthancClient
        return httpx.Client(base_url=self.url, timeout=httpx.Timeout(120, connect=10), limits=limits)

    def _prepare(self, c: httpx.Client, study_id: str) -> tuple[list[str], str]:
        r = c.get(f"/studies/{study_id}/instances")
        r.raise_for_status()
        ids = sorted(str(i["ID"]) for i in r.json())
        study = c.get(f"/studies/{study_id}")
        study.raise_for_status()
        uid = study.json()["MainDicomTags"]["StudyInstanceUID"]
        body = {"AET": self.archive["aet"], "Host": self.archive["host"], "Port": self.archive["port"],
                "AllowTranscoding": True}  # fmt: skip
        c.put(f"/modalities/{ARCHIVE}", json=body).raise_for_status()
        return ids, uid

    def _wait(self, c: httpx.Client, job_id: str, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            r = c.get(f"/jobs/{job_id}")
            r.raise_for_status()
            job = r.json()
            if job["State"] == "Success":
                return job
            if job["State"] == "Failure":
                raise SystemExit(f"direct: {what} failed: {job.get('ErrorDescription')} {job.get('ErrorDetails')}")
            time.sleep(self.poll)
        raise SystemExit(f"direct: {what} not finished after 900 s")

    def modify(self, study_id: str, body: dict[str, Any]) -> int:
        """Per instance: /instances/{id}/modify, its answer to store-straight; ``parallel`` at a time."""
        with self._client() as c:
            ids, _uid = self._prepare(c, study_id)
            t0 = time.perf_counter()
            target = f"/modalities/{ARCHIVE}/store-straight"

            def one(instance_id: str) -> bool:
                r = c.post(f"/instances/{instance_id}/modify", json=body)
                if r.status_code != 200:
                    return False
                return c.post(target, content=r.content).status_code == 200

            with ThreadPoolExecutor(max_workers=self.parallel) as pool:
                confirmed = sum(pool.map(one, ids))
            self.last_work_s = time.perf_counter() - t0
        if confirmed != len(ids):
            raise SystemExit(f"direct modify: {confirmed} of {len(ids)} instances confirmed")
        return confirmed

    def anonymize(self, study_id: str, body_for: Callable[[str], dict[str, Any]]) -> int:
        """Anonymize job, wait; store job, wait; check InstancesCount; delete the copy."""
        with self._client() as c:
            ids, uid = self._prepare(c, study_id)
            t0 = time.perf_counter()
            r = c.post(f"/studies/{study_id}/anonymize", json={**body_for(uid), "Asynchronous": True,
                                                                "KeepSource": True})  # fmt: skip
            r.raise_for_status()
            content = self._wait(c, r.json()["ID"], "anonymize")["Content"]
            copy_id = content["ID"]
            if int(content.get("FailedInstancesCount") or 0):
                raise SystemExit("direct anonymize: some instances were not anonymized")
            c.get(f"/studies/{copy_id}").raise_for_status()  # the route reads the copy's UID
            copy_ids = c.get(f"/studies/{copy_id}/instances").json()  # and lists its instances
            try:
                r = c.post(f"/modalities/{ARCHIVE}/store", json={"Resources": [copy_id], "Synchronous": False})
                r.raise_for_status()
                sent = self._wait(c, r.json()["ID"], "store")["Content"]
                confirmed = int(sent.get("InstancesCount") or 0) - int(sent.get("FailedInstancesCount") or 0)
            finally:
                c.delete(f"/studies/{copy_id}").raise_for_status()
            self.last_work_s = time.perf_counter() - t0
        if confirmed != len(ids) or len(copy_ids) != len(ids):
            raise SystemExit(f"direct anonymize: {confirmed} of {len(ids)} instances confirmed")
        return confirmed


# -- where the time of one flow run went (Prefect API) ------------------------------------------------------
def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


def flow_breakdown(flow_run_id: UUID, wall_start: float, wall_end: float, expected_tasks: int) -> dict[str, Any]:
    """The flow run's and its task runs' times as the Prefect server recorded them. Task run states reach
    the server by events, a moment after the run: wait until all are there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:
            fr = client.read_flow_run(flow_run_id)
            trs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = [t for t in trs if t.start_time and t.end_time]
            if (fr.end_time and len(done) >= expected_tasks) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    tasks: dict[str, float] = {}
    for t in sorted(done, key=lambda t: t.start_time):
        name = re.sub(r"-\d+$", "", t.name)
        tasks[name] = round(tasks.get(name, 0.0) + (t.end_time - t.start_time).total_seconds(), 3)
    running = _seconds(fr.start_time, fr.end_time) or 0.0
    start_wall = fr.start_time.timestamp() if fr.start_time else wall_start
    end_wall = fr.end_time.timestamp() if fr.end_time else wall_end
    return {
        "flow_run_id": str(flow_run_id),
        "before_running_s": round(start_wall - wall_start, 3),
        "running_s": running,
        "after_running_s": round(wall_end - end_wall, 3),
        "task_runs_s": tasks,
        "task_runs_recorded": len(done),
        "in_flow_between_task_runs_s": round(running - sum(tasks.values()), 3),
    }


def prefect_probes(slot_limit: str, n: int = 5) -> dict[str, float]:
    """Prefect's fixed costs, each measured on its own (medians of ``n``): an empty flow run, one empty task
    run inside a flow, taking and giving back one slot of a global concurrency limit."""
    from prefect import flow, task
    from prefect.concurrency.sync import concurrency

    from tasks.notify import NO_CACHING

    @task(name="bench-noop", **NO_CACHING)
    def noop() -> None:
        return None

    @flow(name="bench-empty", persist_result=False)
    def empty() -> None:
        return None

    @flow(name="bench-tasks", persist_result=False)
    def ten_tasks() -> None:
        for _ in range(10):
            noop()

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def slot() -> None:
        with concurrency(slot_limit, occupy=1, timeout_seconds=60, strict=True):
            pass

    empty()  # warm-up
    ten_tasks()
    slot()
    flow_s = statistics.median(timed(empty) for _ in range(n))
    tasks_s = statistics.median(timed(ten_tasks) for _ in range(n))
    return {
        "empty_flow_run_s": round(flow_s, 3),
        "empty_task_run_s": round(max(0.0, tasks_s - flow_s) / 10, 4),
        "concurrency_slot_s": round(statistics.median(timed(slot) for _ in range(n)), 4),
    }


# -- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=200, help="CT slices in the study")
    ap.add_argument("--side", type=int, default=512, help="pixels per row and column of each slice (512: ~0.5 MB)")
    ap.add_argument("--repeat", type=int, default=3, help="measured repetitions of each of ours and direct")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    n = args.instances

    work = args.workdir or Path(tempfile.mkdtemp(prefix="owf-bench-route-"))
    work.mkdir(parents=True, exist_ok=True)
    prefect_port = free_port()
    # Prefect reads its settings when it is first imported: the environment is set before that.
    os.environ.update(prefect_env(work / "prefect", prefect_port))
    os.environ.pop("OWF_CONFIG", None)

    prefect_server = PrefectServer(work / "prefect", prefect_port)
    main_orthanc = OrthancServer(work / "orthanc", free_port(), free_port())
    archive = OrthancServer(work / "archive", free_port(), free_port(), aet="ARCHIVE")
    results: dict[str, Any] = {}
    try:
        progress(f"starting the Prefect server on port {prefect_port}")
        prefect_server.start()
        progress(f"starting the main Orthanc (HTTP {main_orthanc.http_port}) and the archive "
                 f"(HTTP {archive.http_port}, DICOM {archive.dicom_port}, AET ARCHIVE)")  # fmt: skip
        main_orthanc.start()
        archive.start()

        progress(f"generating {n} CT slices of {args.side}x{args.side} and uploading them to the main Orthanc")
        paths = write_ct_series(work / "study", n, side=args.side, accession="BENCH-ROUTE")
        study_id = upload(main_orthanc.url, paths)
        shutil.rmtree(work / "study")

        dest = {"name": ARCHIVE, "aet": "ARCHIVE", "host": "127.0.0.1", "port": archive.dicom_port}
        site = work / "site.yaml"
        site.write_text(yaml.safe_dump({
            "data_dir": str(work / "data"),
            "orthanc": {"url": main_orthanc.url},
            "destinations": [dest],
            "routes": [
                {"name": VARIANTS["modify_keep_uids"], "to": [ARCHIVE],
                 "modify": {"replace": {"InstitutionName": "Imaging Center West"}}},
                {"name": VARIANTS["anonymize"], "anonymize": {"profile": "2021b"}, "to": [ARCHIVE]},
            ],
            "hl7": {"enabled": False},
            "shares": [],
        }))  # fmt: skip
        progress(f"site config: {site}")

        progress("importing prefect and the route flow")
        from flows.route import run_route
        from tasks.config import load_config
        from tasks.prefect_limits import destination_limit_name
        from tasks.routing import JOB_POLL_SECONDS
        from tasks.rules import anonymize_body, modify_body

        cfg = load_config(site)
        routes = {r.name: r for r in cfg.routes}
        modify_spec = routes[VARIANTS["modify_keep_uids"]].modify
        assert modify_spec is not None
        modify_request = modify_body(modify_spec)
        anon_route = routes[VARIANTS["anonymize"]]
        direct = Direct(main_orthanc.url, dest, cfg.routing.parallel_instances, JOB_POLL_SECONDS)

        def run_direct(variant: str) -> float:
            t0 = time.perf_counter()
            if variant == "modify_keep_uids":
                direct.modify(study_id, modify_request)
            else:
                direct.anonymize(study_id, lambda uid: anonymize_body(anon_route, uid))
            return time.perf_counter() - t0

        last_ours: dict[str, tuple[UUID, float, float]] = {}

        def run_ours(variant: str) -> float:
            w0, t0 = time.time(), time.perf_counter()
            state = run_route(study_id, VARIANTS[variant], True, str(site))
            secs = time.perf_counter() - t0
            if not state.is_completed():
                raise SystemExit(f"ours {variant}: the route run ended {state.type.value}: {state.message}")
            flow_run_id = state.state_details.flow_run_id
            assert flow_run_id is not None
            last_ours[variant] = (flow_run_id, w0, time.time())
            return secs

        runners = {"ours": run_ours, "direct": run_direct}
        for variant in VARIANTS:
            timings: dict[str, list[float]] = {"ours": [], "direct": [], "direct_work": []}
            for kind in ("ours", "direct"):
                clear(archive.url)
                progress(f"{variant}: warm-up {kind} (not measured)")
                secs = runners[kind](variant)
                check_after_run(main_orthanc.url, archive.url, study_id, n, f"{variant} warm-up {kind}")
                progress(f"{variant}: warm-up {kind}: {secs:.2f} s")
            if variant == "modify_keep_uids":  # what the archive got is what the route says
                sample = httpx.get(f"{archive.url}/instances", timeout=30).json()[0]
                tags = httpx.get(f"{archive.url}/instances/{sample}/simplified-tags", timeout=30).json()
                if tags.get("InstitutionName") != "Imaging Center West":
                    raise SystemExit(f"modify: the archive got InstitutionName {tags.get('InstitutionName')!r}")
            for i in range(args.repeat):
                for kind in ("ours", "direct") if i % 2 == 0 else ("direct", "ours"):
                    clear(archive.url)
                    secs = runners[kind](variant)
                    check_after_run(main_orthanc.url, archive.url, study_id, n, f"{variant} {kind}")
                    timings[kind].append(secs)
                    if kind == "direct":
                        timings["direct_work"].append(direct.last_work_s)
                    progress(f"{variant}: repetition {i + 1}/{args.repeat} {kind}: {secs:.2f} s "
                             f"({n / secs:.1f} instances/s)")  # fmt: skip
            ours_s, direct_s = statistics.median(timings["ours"]), statistics.median(timings["direct"])
            ratio = ours_s / direct_s
            progress(f"{variant}: reading where the time of the last ours run went (Prefect API)")
            flow_run_id, w0, w1 = last_ours[variant]
            breakdown = flow_breakdown(flow_run_id, w0, w1, EXPECTED_TASK_RUNS[variant])
            breakdown["direct_send_path_s"] = round(statistics.median(timings["direct_work"]), 3)
            results[variant] = {
                "instances": n,
                "direct_s": round(direct_s, 3),
                "ours_s": round(ours_s, 3),
                "direct_instances_per_s": round(n / direct_s, 1),
                "ours_instances_per_s": round(n / ours_s, 1),
                "ratio": round(ratio, 3),
                "within_target": ratio <= TARGET_RATIO,
                "runs_s": {k: [round(x, 3) for x in v] for k, v in timings.items()},
                "breakdown": breakdown,
            }
            progress(f"{variant}: direct {direct_s:.2f} s ({n / direct_s:.1f}/s), ours {ours_s:.2f} s "
                     f"({n / ours_s:.1f}/s), ours/direct {ratio:.2f}: "
                     f"{'meets' if ratio <= TARGET_RATIO else 'MISSES'} the target of {TARGET_RATIO}")  # fmt: skip
            progress(f"{variant}: breakdown {json.dumps(breakdown)}")

        progress("measuring Prefect's fixed costs on their own (empty flow run, empty task run, one slot)")
        results["prefect_costs"] = prefect_probes(destination_limit_name(ARCHIVE))
        progress(f"prefect costs: {json.dumps(results['prefect_costs'])}")
    finally:
        progress("stopping the servers")
        archive.stop()
        main_orthanc.stop()
        prefect_server.stop()

    summary = {"benchmark": "route", "target_ratio": TARGET_RATIO, "slice_side": args.side, **results}
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
