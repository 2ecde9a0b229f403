"""Start and stop the real servers this project runs beside: Orthanc, Samba, the Prefect server and worker.

Used by the ``owf up`` command and by the test fixtures alike, so tests exercise the same start-up code an
operator runs. Every server listens on 127.0.0.1, is started as a child process, and is stopped by its PID
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up\n{tail}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid`` (or the process), then SIGKILL after ``grace`` seconds; then
    SIGKILL whatever it had started in a session of its own (a Prefect worker's flow runs are such), which
    would otherwise outlive it."""
    descendants = [p for p in process_tree(pid) if p != pid]
    _stop_group(pid, grace)
    for child in descendants:
        if _alive(child):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)


def _stop_group(pid: int, grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            except ChildProcessError:
                if not _alive(pid):
                    return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 on), or None without such a process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if there is no such process.
    Together with the PID it names one process: a PID alone may have been reused since."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant process alive now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its live descendants, each with the children it has reaped
    (so flow runs that already ended count). For benchmarks: how much a stack process cost."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields and len(fields) > 14:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS); 0 when it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and its live descendants (VmRSS summed; shared pages count once per process)."""
    return sum(rss_bytes(pid) for pid in process_tree(root))


def pid_files(folder: Path) -> dict[str, int]:
    """The processes `owf up` (or a fixture) recorded in ``folder``: PID file name -> PID."""
    out = {}
    for path in folder.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[path.stem] = int(path.read_text().split()[0])
    return out


def write_pid_file(path: Path, pid: int) -> None:
    path.write_text(f"{pid} {process_start_time(pid) or ''}\n")


def stop_pid_file(path: Path, grace: float = 10.0) -> str:
    """Stop the process a PID file names, if it is still that process; remove the file. Returns what
    happened, for the operator."""
    try:
        parts = path.read_text().split()
        pid, started = int(parts[0]), (parts[1] if len(parts) > 1 else None)
    except (OSError, ValueError, IndexError):
        path.unlink(missing_ok=True)
        return f"{path.stem}: unreadable PID file removed"
    now = process_start_time(pid)
    try:
        if now is None:
            return f"{path.stem}: not running (stale PID file removed)"
        if started is None or now != started:
            return f"{path.stem}: PID {pid} now belongs to another process; left alone (stale PID file removed)"
        stop_pid(pid, grace)
        return f"{path.stem}: stopped (pid {pid})"
    finally:
        path.unlink(missing_ok=True)


@dataclass
class Service:
    """A child process with its log file and PID file (``pid_dir``, default its working folder)."""

    name: str
    argv: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    pid_dir: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return (self.pid_dir or self.workdir) / f"{self.name}.pid"

    def spawn(self) -> subprocess.Popen:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.workdir,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its children too
        )
        log.close()
        write_pid_file(self.pid_path, self.proc.pid)
        return self.proc

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid, grace)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if not path:
        raise RuntimeError(f"{binary} not found: install the Debian package '{package}' (scripts/setup does)")
    return path


# -- Orthanc --------------------------------------------------------------------------------------------
@dataclass
class OrthancServer:
    workdir: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    stable_age: int = 60
    storage_dir: Path | None = None
    extra_config: dict = field(default_factory=dict)
    pid_dir: Path | None = None
    service: Service | None = None
    env: dict[str, str] = field(default_factory=dict)  # e.g. TZ, to run it in a hospital's time zone
    # The metadata our flows write: source of every uploaded instance, what was notified for a study, and
    # a message built but not yet acknowledged. Names as in the site config (orthanc.*_metadata).
    user_metadata: tuple[str, ...] = ("IngestSource", "HL7Notified", "HL7Pending", "RouteDeliveries")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict:
        storage = str(self.storage_dir or self.workdir / "storage")
        cfg = {
            "Name": f"owf-{self.aet}",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StableAge": self.stable_age,
            "UserMetadata": {name: 1024 + i for i, name in enumerate(self.user_metadata)},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 16,
            "SaveJobs": True,
            # Routing: Orthanc transcodes when an archive refuses the stored transfer syntax (C21).
            "TranscodeDicomProtocol": True,
            "Plugins": [],
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout: float = 60) -> OrthancServer:
        binary = _require("Orthanc", "orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        # DCMTK leaves Nagle on unless TCP_NODELAY=1: C-STORE crawls at ~11 instances/s without it.
        self.service = Service("orthanc", [binary, str(cfg_path)], self.workdir, {"TCP_NODELAY": "1", **self.env},
                               self.pid_dir)  # fmt: skip
        proc = self.service.spawn()
        wait_until(lambda: httpx.get(self.url + "/system", timeout=1).status_code == 200, timeout, "Orthanc",
                   proc, self.service.log_path)  # fmt: skip
        return self

    def stop(self) -> None:
        if self.service:
            self.service.stop()


# -- Samba ----------------------------------------------------------------------------------------------
@dataclass
class SambaServer:
    """A Samba server on a high port with one share and one user, for tests and benchmarks."""

    workdir: Path
    port: int
    share_name: str = "dicom"
    username: str = "owfsmb"
    password: str = "owf-test-only-9Q"
    service: Service | None = None

    readonly_share_name: str = "dicom-ro"

    @property
    def share_dir(self) -> Path:
        return self.workdir / "share"

    @property
    def readonly_dir(self) -> Path:
        """Behind a second share that the user may read but not change."""
        return self.workdir / "share-ro"

    def _conf(self) -> str:
        w = self.workdir
        return f"""[global]
    smb ports = {self.port}
    interfaces = 127.0.0.1
    bind interfaces only = yes
    private dir = {w}/private
    lock directory = {w}/lock
    state directory = {w}/state
    cache directory = {w}/cache
    pid directory = {w}/pid
    passdb backend = tdbsam:{w}/private/passdb.tdb
    log file = {w}/smbd.%m.log
    log level = 1
    disable netbios = yes
    server role = standalone server
    server min protocol = SMB2_02
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
    map to guest = never
    deadtime = 0

[{self.share_name}]
    path = {self.share_dir}
    read only = no
    browseable = yes
    force user = root
    valid users = {self.username}

[{self.readonly_share_name}]
    path = {self.readonly_dir}
    read only = yes
    force user = root
    valid users = {self.username}
"""

    def start(self, timeout: float = 30) -> SambaServer:
        smbd = _require("smbd", "samba")
        smbpasswd = _require("smbpasswd", "samba")
        for sub in ("private", "lock", "state", "cache", "pid", "share", "share-ro"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "smb.conf"
        conf.write_text(self._conf())
        if subprocess.run(["id", self.username], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", self.username], check=True,
                           capture_output=True)  # fmt: skip
        subprocess.run([smbpasswd, "-c", str(conf), "-s", "-a", self.username],
                       input=f"{self.password}\n{self.password}\n", text=True, check=True,
                       capture_output=True)  # fmt: skip
        self.service = Service("smbd", [smbd, "-F", "--no-process-group", "-s", str(conf)], self.workdir)
        proc = self.service.spawn()
        wait_until(lambda: port_open(self.port), timeout, "Samba", proc, self.service.log_path)
        return self

    def stop(self) -> None:
        if self.service:
            self.service.stop(grace=5)


# -- PostgreSQL -----------------------------------------------------------------------------------------
def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("PostgreSQL not found: install the Debian package 'postgresql' (scripts/setup does)")
    return versions[-1].parent


@dataclass
class PostgresServer:
    """A PostgreSQL cluster of its own (Debian ``postgresql``) on a loopback port, for the Prefect server in
    scale-out tests and the soak run. One database and one password-protected role; the password is made
    up at first start and kept in ``workdir/password`` (mode 600), never in a config file.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` system user and
    lives in a folder of its own under /tmp (a pytest folder is not reachable for other users)."""

    workdir: Path
    port: int
    database: str = "prefect"
    user: str = "prefect"
    pid_dir: Path | None = None
    service: Service | None = None

    @classmethod
    def in_tmp(cls, port: int, **kw) -> PostgresServer:
        """A cluster in a new folder under /tmp that the ``postgres`` user can reach."""
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix="owf-pg-"))
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres", "postgres")
        return cls(workdir, port, **kw)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def password(self) -> str:
        return (self.workdir / "password").read_text().strip()

    def prefect_settings(self) -> dict[str, str]:
        """Prefect's database settings for the server process only: workers never need them."""
        return {
            "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
            "PREFECT_SERVER_DATABASE_HOST": "127.0.0.1",
            "PREFECT_SERVER_DATABASE_PORT": str(self.port),
            "PREFECT_SERVER_DATABASE_USER": self.user,
            "PREFECT_SERVER_DATABASE_PASSWORD": self.password,
            "PREFECT_SERVER_DATABASE_NAME": self.database,
        }

    def _as_owner(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        return [_require("setpriv", "util-linux"), "--reuid=postgres", "--regid=postgres", "--init-groups"]

    def _init(self, bindir: Path) -> None:
        import secrets

        self.workdir.mkdir(parents=True, exist_ok=True)
        pw = self.workdir / "password"
        pw.write_text(secrets.token_urlsafe(24) + "\n")
        pw.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            shutil.chown(pw, "postgres", "postgres")
        out = subprocess.run([*self._as_owner(), str(bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                        "--pwfile", str(pw), "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                        "--encoding=UTF8", "--locale=C.UTF-8"], capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed in {self.workdir}: {out.stderr.strip()[-500:]}")

    def start(self, timeout: float = 60) -> PostgresServer:
        bindir = _postgres_bin()
        if not (self.data_dir / "PG_VERSION").exists():
            self._init(bindir)
        argv = [*self._as_owner(), str(bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.workdir}",
                "-c", "max_connections=200"]  # fmt: skip
        self.service = Service("postgresql", argv, self.workdir, {}, self.pid_dir)
        proc = self.service.spawn()
        wait_until(lambda: self._query("select 1") == "1", timeout, "PostgreSQL", proc, self.service.log_path)
        if self._query(f"select 1 from pg_database where datname = '{self.database}'") != "1":
            self._query(f'create database "{self.database}"')
        return self

    def _query(self, sql: str) -> str:
        out = subprocess.run([str(_postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                              self.user, "-d", "postgres", "-tAc", sql], capture_output=True, text=True,
                             env={**os.environ, "PGPASSWORD": self.password}, timeout=30)  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"psql: {out.stderr.strip()[-300:]}")
        return out.stdout.strip()

    def database_bytes(self) -> int:
        return int(self._query(f"select pg_database_size('{self.database}')"))

    def stop(self) -> None:
        if self.service:
            self.service.stop(grace=20)


# -- Prefect ------------------------------------------------------------------------------------------
def prefect_env(home: Path, port: int, retention_days: int = 7, event_retention_days: int = 2) -> dict[str, str]:
    """Environment for the embedded Prefect server and for every client (worker, CLI) that talks to it."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
        # Bounded database: old runs and events are deleted.
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": f"P{retention_days}D",
        "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": f"P{event_retention_days}D",
        # Concurrency leases (the per-share sweep locks) on disk: in memory, a server restart forgets
        # them while their slots stay taken, and the share would never be swept again.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "1",
        # Every flow run sends a heartbeat; the crash automation (deployments/deploy.py) marks a run whose
        # heartbeats stopped as Crashed. 30 s is Prefect's minimum.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        # Workers: poll every second, fetch only runs due now, so that a fast schedule is not over-fetched.
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }


@dataclass
class PrefectServer:
    home: Path
    port: int
    retention_days: int = 7
    event_retention_days: int = 2
    pid_dir: Path | None = None
    database: PostgresServer | None = None  # None: SQLite in ``home``
    service: Service | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def env(self) -> dict[str, str]:
        """What every client (worker, CLI) needs: no database settings, those are the server's alone."""
        return prefect_env(self.home, self.port, self.retention_days, self.event_retention_days)

    def database_bytes(self) -> int:
        if self.database is not None:
            return self.database.database_bytes()
        return sum(p.stat().st_size for p in self.home.glob("prefect.db*"))

    def start(self, timeout: float = 120) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        env = {**self.env, **(self.database.prefect_settings() if self.database else {})}
        self.service = Service("prefect-server", argv, self.home, env, self.pid_dir)
        proc = self.service.spawn()
        wait_until(lambda: httpx.get(self.api_url + "/health", timeout=2).status_code == 200, timeout,
                   "Prefect server", proc, self.service.log_path)  # fmt: skip
        return self

    def stop(self) -> None:
        if self.service:
            self.service.stop(grace=15)


@dataclass
class PrefectWorker:
    home: Path
    env: dict[str, str]
    pool: str
    name: str = "owf-worker"
    service: Service | None = None

    def start(self) -> PrefectWorker:
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool, "--type", "process",
                "--name", self.name]  # fmt: skip
        self.service = Service(f"worker-{self.name}", argv, self.home, self.env)
        self.service.spawn()
        return self

    def stop(self) -> None:
        if self.service:
            # A worker asked to stop can keep finishing runs for a minute; the runs are its children
            # in its process group, so the group is killed after a short grace.
            self.service.stop(grace=10)
