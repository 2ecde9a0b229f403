"""Share-ingest benchmark: our deployed ingest flow against Orthanc's raw upload ceiling, in one run.

    .venv/bin/python benchmarks/ingest.py [--small 1000] [--large 100] [--large-side 1600]
                                          [--latency-files 20] [--idle-seconds 300]

It starts its own stack with `owf up` (embedded Orthanc, Prefect server, a worker, deployments at the
default settings: 2 s interval, 300 s window) on free ports, plus a Samba server, and measures for a set
of small CT slices (128x128, about 33 KB) and a set of large ones (about 5 MB):

  (a) raw:   parallel POST /instances (4 clients, httpx) straight from local disk: Orthanc's ceiling;
  (b) local: our ingest deployment sweeping a local folder;
  (c) smb:   our ingest deployment sweeping an SMB share (native client, non-default port).

For (b) and (c), throughput counts from the first instance appearing in Orthanc to the last file deleted
from the source; latency is from a file landing in the source (dropped one at a time) until it is deleted,
which happens only after Orthanc confirmed it. Each of (a), (b), (c) also reports the CPU seconds every
process tree used (``cpu_s``: Orthanc, the Prefect server, the worker with the runs it started, smbd, and
this process, which is the raw upload's client): on 2 cores, where Samba runs beside Orthanc, they show what
the SMB path costs. Then, with a stack that has one empty share and no traffic, it measures the CPU share of
every stack process and the growth of the Prefect database.

The last line printed is one JSON object. Timings on a shared 2-core machine are noisy: compare ratios
measured in the same run, and never use these numbers in a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack.services import SambaServer, free_port, pid_files, tree_cpu_seconds
from stack.synthetic import write_ct_series

OWF = [sys.executable, "-m", "stack.cli"]


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Stack:
    """An `owf up --detach` stack with its own config, stopped by `owf down`."""

    def __init__(self, workdir: Path, shares: list[dict], smb_password: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.prefect_port = free_port(), free_port()
        self.config = workdir / "site.yaml"
        self.config.write_text(yaml.safe_dump({
            "data_dir": str(workdir / "data"),
            "local_orthanc": {"http_port": self.http_port, "dicom_port": free_port()},
            "prefect": {"port": self.prefect_port},
            "shares": shares,
        }))  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        if smb_password:
            self.env["BENCH_SMB_PASSWORD"] = smb_password
        self.url = f"http://127.0.0.1:{self.http_port}"

    def up(self) -> None:
        r = subprocess.run([*OWF, "--config", str(self.config), "up", "--detach"], env=self.env,
                           capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"owf up failed:\n{r.stdout}\n{r.stderr}")

    def down(self) -> None:
        subprocess.run([*OWF, "--config", str(self.config), "down"], env=self.env, capture_output=True,
                       timeout=180, cwd=Path(__file__).parent.parent)  # fmt: skip

    def roots(self) -> dict[str, int]:
        """The processes `owf up` started: name -> PID."""
        return pid_files(self.workdir / "data" / "run")

    def count(self) -> int:
        return httpx.get(self.url + "/statistics", timeout=10).json()["CountInstances"]

    def clear(self) -> None:
        for patient in httpx.get(self.url + "/patients", timeout=30).json():
            httpx.delete(f"{self.url}/patients/{patient}", timeout=300)


def files_under(folder: Path) -> int:
    n = 0
    for _root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".quarantine"]
        n += len(files)
    return n


def raw_upload(url: str, paths: list[Path], clients: int = 4) -> float:
    """Seconds to POST every file with ``clients`` parallel httpx clients: Orthanc's ceiling."""
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as c:

        def post(p: Path) -> None:
            r = c.post("/instances", content=p.read_bytes(), headers={"Content-Type": "application/dicom"})
            r.raise_for_status()

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post, paths))
        return time.perf_counter() - t0


def swept_throughput(stack: Stack, staging: Path, target: Path, n: int, timeout: float = 900) -> dict:
    """Move ``n`` staged files into ``target`` at once; time from the first instance in Orthanc to the
    last file gone from ``target``."""
    before = stack.count()
    names = sorted(p.name for p in staging.iterdir())
    dest = target / f"batch-{time.time_ns()}"
    dest.mkdir(parents=True)
    t_drop = time.perf_counter()
    for name in names:
        os.rename(staging / name, dest / name)  # same file system: atomic, complete files
    t_first = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if t_first is None and stack.count() > before:
            t_first = time.perf_counter()
        if t_first is not None and files_under(dest) == 0:
            t_last = time.perf_counter()
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"timed out: {files_under(dest)} files left in {dest}")
    stored = stack.count() - before
    if stored != n:
        raise SystemExit(f"expected {n} new instances in Orthanc, found {stored}")
    return {"seconds": t_last - t_first, "first_upload_after_drop_s": t_first - t_drop}


def latency(target: Path, sources: list[Path], spacing: float, seed: int = 1) -> list[float]:
    """Drop files one at a time (moved in whole); seconds from landing to deletion (after confirmation)."""
    rng = random.Random(seed)
    landed: dict[Path, float] = {}
    done: dict[Path, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path, t in list(landed.items()):
                if path not in done and not path.exists():
                    done[path] = time.perf_counter() - t
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    folder = target / f"latency-{time.time_ns()}"
    folder.mkdir(parents=True)
    for src in sources:
        time.sleep(spacing * rng.uniform(0.5, 1.5))
        dst = folder / src.name
        os.rename(src, dst)
        landed[dst] = time.perf_counter()
    deadline = time.monotonic() + 120
    while len(done) < len(landed) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    watcher.join()
    if len(done) < len(landed):
        raise SystemExit(f"latency: {len(landed) - len(done)} files never left {folder}")
    return sorted(done.values())


class CpuSplit:
    """CPU seconds each process tree used between ``start()`` and ``stop()``: the stack's (Orthanc, Prefect
    server, worker and the runs it started), Samba's, and this process (the raw upload's client)."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots

    def _sample(self) -> dict[str, float]:
        out = {name: tree_cpu_seconds(pid) for name, pid in self.roots.items()}
        t = os.times()
        out["benchmark"] = t.user + t.system
        return out

    def start(self) -> None:
        self._c0 = self._sample()

    def stop(self) -> dict[str, float]:
        c1 = self._sample()
        return {k: round(c1[k] - self._c0[k], 2) for k in c1 if round(c1[k] - self._c0[k], 2) > 0}


def idle_cost(workdir: Path, seconds: float) -> dict:
    stack = Stack(workdir, [{"name": "idle", "source": "IDLE", "kind": "local", "path": str(workdir / "idle")}])
    (workdir / "idle").mkdir(parents=True)
    stack.up()
    try:
        progress("idle stack up; letting the first run start (30 s)")
        time.sleep(30)
        roots = stack.roots()
        db = workdir / "data" / "prefect"

        def db_bytes() -> int:
            return sum(f.stat().st_size for f in db.glob("prefect.db*"))

        def sample() -> dict[str, float]:
            return {name: tree_cpu_seconds(pid) for name, pid in roots.items()}

        c0, d0, t0 = sample(), db_bytes(), time.perf_counter()
        step = max(1.0, seconds / 10)
        while time.perf_counter() - t0 < seconds:
            time.sleep(min(step, seconds - (time.perf_counter() - t0)))
            progress(f"idle: {time.perf_counter() - t0:.0f}/{seconds:.0f} s")
        c1, d1, t1 = sample(), db_bytes(), time.perf_counter()
        elapsed = t1 - t0
        cores = {name: (c1[name] - c0[name]) / elapsed for name in roots}
        return {
            "seconds": round(elapsed, 1),
            "cores_by_process": {k: round(v, 4) for k, v in cores.items()},
            "cores_total": round(sum(cores.values()), 4),
            "db_growth_mb_per_hour": round((d1 - d0) / 1e6 * 3600 / elapsed, 2),
        }
    finally:
        stack.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=1000, help="small CT slices (about 33 KB each)")
    ap.add_argument("--large", type=int, default=100, help="large CT slices")
    ap.add_argument("--large-side", type=int, default=1600, help="pixels per side of a large slice (1600: ~5 MB)")
    ap.add_argument("--latency-files", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=300)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="owf-bench-"))
    results: dict = {"interval_seconds": 2}
    samba = SambaServer(work / "samba", free_port()).start()
    inbox = work / "inbox"
    inbox.mkdir(parents=True)
    stack = Stack(work / "stack", [
        {"name": "inbox", "source": "INBOX", "kind": "local", "path": str(inbox)},
        {"name": "smb", "source": "SMB", "kind": "smb", "server": "127.0.0.1", "port": samba.port,
         "share": samba.share_name, "username": samba.username, "password_env": "BENCH_SMB_PASSWORD"},
    ], smb_password=samba.password)  # fmt: skip
    try:
        progress("starting the stack (owf up)")
        stack.up()
        sets = [("small", args.small, 128), ("large", args.large, args.large_side)]
        for label, n, side in sets:
            if n <= 0:
                continue
            progress(f"{label}: generating {n} instances of {side}x{side}")
            master = write_ct_series(work / f"{label}-master", n, side=side)
            mb = sum(p.stat().st_size for p in master) / 1e6
            row: dict = {"instances": n, "mb": round(mb, 1)}
            stack.clear()
            progress(f"{label}: (a) raw parallel POST")
            cpu = CpuSplit({**stack.roots(), "smbd": samba.service.pid})  # type: ignore[union-attr, dict-item]
            cpu.start()
            secs = raw_upload(stack.url, master)
            row["raw"] = {"instances_per_s": round(n / secs, 1), "mb_per_s": round(mb / secs, 1),
                          "cpu_s": cpu.stop()}  # fmt: skip
            for name, target in (("local", inbox), ("smb", samba.share_dir)):
                stack.clear()
                staging = target.parent / f"staging-{label}-{name}"
                staging.mkdir()
                for p in master:
                    shutil.copyfile(p, staging / p.name)
                progress(f"{label}: ({'b' if name == 'local' else 'c'}) {name} share, {n} files dropped at once")
                cpu.start()
                m = swept_throughput(stack, staging, target, n)
                staging.rmdir()
                row[name] = {"instances_per_s": round(n / m["seconds"], 1), "mb_per_s": round(mb / m["seconds"], 1),
                             "first_upload_after_drop_s": round(m["first_upload_after_drop_s"], 2),
                             "cpu_s": cpu.stop()}  # fmt: skip
            row["ratio_local"] = round(row["local"]["instances_per_s"] / row["raw"]["instances_per_s"], 3)
            row["ratio_smb"] = round(row["smb"]["instances_per_s"] / row["raw"]["instances_per_s"], 3)
            results[label] = row
            progress(f"{label}: {json.dumps(row)}")
            shutil.rmtree(work / f"{label}-master")

        if args.latency_files > 0:
            lat_src = write_ct_series(work / "latency-src", 2 * args.latency_files)
            for i, (name, target) in enumerate((("local", inbox), ("smb", samba.share_dir))):
                progress(f"latency: {args.latency_files} files dropped one by one into {name}")
                chunk = lat_src[i * args.latency_files : (i + 1) * args.latency_files]
                staged = []
                for p in chunk:
                    q = target.parent / f"lat-{name}-{p.name}"
                    shutil.copyfile(p, q)
                    staged.append(q)
                values = latency(target, staged, spacing=1.5)
                results[f"latency_{name}"] = {
                    "p50_s": round(statistics.median(values), 2),
                    "p95_s": round(values[max(0, round(0.95 * len(values)) - 1)], 2),
                    "max_s": round(max(values), 2),
                    "target_s": 2 * 2 + 3,
                }
                progress(f"latency {name}: {results[f'latency_{name}']}")
    finally:
        stack.down()
        samba.stop()

    if args.idle_seconds > 0:
        progress(f"idle cost: one empty share, {args.idle_seconds:.0f} s")
        results["idle"] = idle_cost(work / "idle-stack", args.idle_seconds)
        progress(f"idle: {results['idle']}")

    summary = {
        "benchmark": "ingest",
        **{
            f"{label}_ratio_b_over_a": results[label]["ratio_local"] for label in ("small", "large") if label in results
        },
        **{f"{label}_ratio_c_over_a": results[label]["ratio_smb"] for label in ("small", "large") if label in results},
        "latency_local_p95_s": results.get("latency_local", {}).get("p95_s"),
        "latency_smb_p95_s": results.get("latency_smb", {}).get("p95_s"),
        "idle_cores_total": results.get("idle", {}).get("cores_total"),
        "idle_db_growth_mb_per_hour": results.get("idle", {}).get("db_growth_mb_per_hour"),
        "details": results,
    }
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
