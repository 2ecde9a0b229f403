"""Site configuration: one YAML file, environment overrides, secrets only by reference.

The file is optional. Without one, the embedded default runs: a local Orthanc started by the stack and one
local inbox folder under the data directory. Every key is documented in ``deployments/site.example.yaml``.

Environment overrides use ``OWF__SECTION__KEY`` (double underscores between levels, case-insensitive),
e.g. ``OWF__ORTHANC__URL=https://pacs:8042``; a share is addressed by its name:
``OWF__SHARES__CT_ROOM1__FOLDER=incoming``.

Passwords never live in the file: a share or Orthanc names an environment variable (``password_env``) or a
Prefect Secret block (``password_secret_block``) that holds it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ConfigError
from tasks.hl7_settings import Hl7Settings
from tasks.routing_config import Destination, Route, RoutingSettings, validate_routing
from tasks.study_report import ExtraTag

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "OWF__"
SHARE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")

# Names that operating systems and office programs leave in shared folders. They are never uploaded and
# never moved: an operator expects them to stay where they are.
DEFAULT_IGNORE = [
    "Thumbs.db",
    "desktop.ini",
    ".DS_Store",
    "._*",
    "~$*",
    "*.tmp",
    "*.part",
    "*.partial",
    "*.crdownload",
    ".~lock.*",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_passwords(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "password" in data:
            raise ValueError(
                "a password may not be written in the config file: name an environment variable "
                "(password_env) or a Prefect Secret block (password_secret_block) instead"
            )
        return data


class Credentials(_Strict):
    """Where a password comes from. Exactly one of the two, or neither for anonymous access."""

    username: str | None = None
    password_env: str | None = Field(None, description="Environment variable that holds the password.")
    password_secret_block: str | None = Field(None, description="Prefect Secret block that holds it.")

    @model_validator(mode="after")
    def _one_source(self) -> Credentials:
        if self.password_env and self.password_secret_block:
            raise ValueError("set password_env or password_secret_block, not both")
        return self


class OrthancConfig(Credentials):
    """The Orthanc server that files are uploaded to."""

    url: str = Field("", description="Base URL of Orthanc's REST API. Empty: the embedded local Orthanc.")
    verify_tls: bool = True
    ca_bundle: Path | None = Field(None, description="PEM file of the CA that signed Orthanc's certificate.")
    timeout_seconds: float = Field(60.0, gt=0)
    outage_wait_seconds: float = Field(
        180.0,
        ge=0,
        le=3600,
        description="Study and route runs wait this long for an Orthanc that cannot be reached (restarting), "
        "retrying with backoff, before they fail.",
    )
    source_metadata: str = Field(
        "IngestSource",
        description="Name of the Orthanc user metadata (declared in Orthanc's UserMetadata) that carries "
        "the share's source name on every uploaded instance.",
    )
    notified_metadata: str = Field(
        "HL7Notified",
        description="Study metadata (declared in Orthanc's UserMetadata) that records what was last "
        "notified for a study, so a study is never notified twice for the same content.",
    )
    pending_metadata: str = Field(
        "HL7Pending",
        description="Study metadata holding a message built but not yet acknowledged, so a rerun resends "
        "exactly the same bytes.",
    )
    routes_metadata: str = Field(
        "RouteDeliveries",
        description="Study metadata recording what each route delivered where, so a rerun does not send the same "
        "content twice.",
    )

    @property
    def user_metadata(self) -> tuple[str, ...]:
        """Every metadata name our flows write; Orthanc must declare each in its UserMetadata."""
        return (self.source_metadata, self.notified_metadata, self.pending_metadata, self.routes_metadata)


class LocalOrthancConfig(_Strict):
    """The Orthanc process the stack starts when ``orthanc.url`` is empty."""

    http_port: int = Field(8142, ge=1, le=65535)
    dicom_port: int = Field(4342, ge=1, le=65535)
    aet: str = "ORTHANC"
    stable_age_seconds: int = Field(60, ge=1)
    storage_dir: Path | None = Field(None, description="Default: <data_dir>/orthanc.")


class PrefectConfig(_Strict):
    port: int = Field(4200, ge=1, le=65535)
    home: Path | None = Field(None, description="PREFECT_HOME of the embedded server. Default <data_dir>/prefect.")
    work_pool: str = "orthanc-workflows"
    flow_run_retention_days: int = Field(7, ge=1, description="Older runs are deleted by the server.")
    event_retention_days: int = Field(2, ge=1)


class IngestSettings(_Strict):
    """How a share is swept. Every key can be overridden per share."""

    interval_seconds: float = Field(2.0, gt=0, le=3600, description="Pause between two scans of a share.")
    window_seconds: int = Field(
        300,
        ge=10,
        le=86400,
        description="One scheduled run sweeps for this long, then the next run takes over. Longer windows "
        "mean fewer runs in the UI and less process start-up cost; shorter ones recover sooner after a crash.",
    )
    handover_seconds: int = Field(15, ge=0, le=600, description="Overlap that lets the next run start up.")
    min_age_seconds: float = Field(0.0, ge=0, description="A file must also be this old (mtime) to be read.")
    parallel_uploads: int = Field(4, ge=1, le=32)
    stream_threshold_bytes: int = Field(
        8 * 1024 * 1024, ge=0, description="Files larger than this are streamed instead of read whole."
    )
    max_files_per_batch: int = Field(2000, ge=1)
    incomplete_grace_seconds: float = Field(
        60.0,
        ge=0,
        description="A file that looks unfinished (an image without pixel data, or DICOM Orthanc cannot parse) "
        "is waited for this long after its last change before it is quarantined: a writer may have paused.",
    )
    backoff_max_seconds: float = Field(60.0, gt=0)
    quarantine_folder: str = Field(".quarantine", description="Folder inside the share for rejected files.")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    conflict_policy: Literal["warn", "quarantine"] = Field(
        "warn",
        description="A file whose SOP Instance UID Orthanc already holds with other content: 'warn' deletes "
        "it with a warning (Orthanc keeps the first copy), 'quarantine' keeps it for review.",
    )

    @field_validator("quarantine_folder")
    @classmethod
    def _relative(cls, v: str) -> str:
        return _quarantine_folder(v)


def _quarantine_folder(v: str) -> str:
    parts = [p for p in re.split(r"[\\/]", v) if p]
    if not parts or ".." in parts:
        raise ValueError("quarantine_folder must be a folder name inside the share, e.g. .quarantine")
    return "/".join(parts)


class IngestOverrides(_Strict):
    interval_seconds: float | None = Field(None, gt=0, le=3600)
    window_seconds: int | None = Field(None, ge=10, le=86400)
    handover_seconds: int | None = Field(None, ge=0, le=600)
    min_age_seconds: float | None = Field(None, ge=0)
    parallel_uploads: int | None = Field(None, ge=1, le=32)
    stream_threshold_bytes: int | None = Field(None, ge=0)
    max_files_per_batch: int | None = Field(None, ge=1)
    incomplete_grace_seconds: float | None = Field(None, ge=0)
    backoff_max_seconds: float | None = Field(None, gt=0)
    quarantine_folder: str | None = None
    ignore: list[str] | None = None
    conflict_policy: Literal["warn", "quarantine"] | None = None

    @field_validator("quarantine_folder")
    @classmethod
    def _relative(cls, v: str | None) -> str | None:
        return None if v is None else _quarantine_folder(v)


class WatchSettings(_Strict):
    """How Orthanc's change log is followed to find stable studies."""

    interval_seconds: float = Field(2.0, gt=0, le=3600, description="Pause between two reads of /changes.")
    window_seconds: int = Field(300, ge=10, le=86400, description="One scheduled watcher run follows the log "
                                "this long; the next run takes over (same design as the share sweeps).")  # fmt: skip
    handover_seconds: int = Field(15, ge=0, le=600)
    settle_seconds: int = Field(
        180,
        ge=1,
        description="A study that stopped receiving images this long ago but never got a StableStudy change "
        "(Orthanc restarted while it was settling) is processed anyway. Must exceed Orthanc's StableAge.",
    )
    horizon: str = Field(
        "",
        description="Studies last updated before this moment (UTC, as Orthanc's LastUpdate, e.g. 20260101T000000) and "
        "already stable then are the backlog: never notified. Empty: when the watcher first ran.",
    )
    deployment: str = Field("study-notify/study-notify", description="Deployment each stable study runs.")
    crash_restarts: int = Field(
        3,
        ge=0,
        le=20,
        description="A study run whose process was lost (worker killed, host down: Prefect marks it Crashed) is "
        "started again by the watcher up to this many times, then marked Failed for an operator.",
    )


class ReportSettings(_Strict):
    """The per-study report."""

    folder: Path | None = Field(None, description="Where CSV and JSON reports go. Default <data_dir>/reports.")
    extra_tags: list[ExtraTag] = Field(
        default_factory=list,
        description="DICOM attributes added as report columns: keywords (BodyPartExamined) or, for private "
        'tags, {keyword: ScannerMode, tag: "0019,10a0"}.',
    )
    show_phi_in_ui: bool = Field(
        False,
        description="Show patient ID, name, birth date, sex and referring physician in the run's report table "
        "in the Prefect UI. Off: they show as (hidden) there (every UI user can read artifacts); the CSV and JSON "
        "files always have them.",
    )


class _ShareBase(Credentials):
    name: str = Field(description="Lower-case name; the deployment is called ingest-<name>.")
    source: str = Field(
        description="Source name stored on every instance from this share (routing keys on it, as it "
        "would on a calling AE title)."
    )
    ingest: IngestOverrides = Field(default_factory=IngestOverrides)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SHARE_NAME.fullmatch(v):
            raise ValueError("share name must be lower-case letters, digits and dashes (e.g. ct-room1)")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip() or len(v) > 64:
            raise ValueError("source must be a non-empty name of at most 64 characters")
        return v


class LocalShareConfig(_ShareBase):
    """A local folder, or a mounted NFS/SMB path."""

    kind: Literal["local"] = "local"
    path: Path


class SmbShareConfig(_ShareBase):
    """An SMB2/3 share read with the native client (no mount)."""

    kind: Literal["smb"] = "smb"
    server: str
    port: int = Field(445, ge=1, le=65535)
    share: str
    folder: str = Field("", description="Folder inside the share; empty for its root.")
    domain: str | None = None
    encrypt: bool = False
    connection_timeout_seconds: float = Field(10.0, gt=0)


ShareConfig = Annotated[LocalShareConfig | SmbShareConfig, Field(discriminator="kind")]


class SiteConfig(_Strict):
    data_dir: Path = Field(PROJECT_ROOT / "data", description="Where the embedded stack keeps its state.")
    orthanc: OrthancConfig = Field(default_factory=OrthancConfig)
    local_orthanc: LocalOrthancConfig = Field(default_factory=LocalOrthancConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    destinations: list[Destination] = Field(default_factory=list, description="Where routes send studies.")
    routes: list[Route] = Field(default_factory=list, description="Morph-and-route branches, in order.")
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    shares: list[ShareConfig] | None = Field(
        None, description="Default: one local share 'inbox' at <data_dir>/inbox with source INBOX."
    )

    @field_validator("shares", mode="before")
    @classmethod
    def _default_kind(cls, v: Any) -> Any:
        # kind may be left out: a share with a server is SMB, one with a path is a local folder
        if isinstance(v, list):
            return [
                {**s, "kind": "smb" if "server" in s else "local"} if isinstance(s, dict) and "kind" not in s else s
                for s in v
            ]
        return v

    @model_validator(mode="after")
    def _unique_share_names(self) -> SiteConfig:
        names = [s.name for s in self.shares or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"share names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _routes_fit(self) -> SiteConfig:
        problems = validate_routing(self.routes, self.destinations, self.routing)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"no destination named {name!r} in the configuration")

    # Derived values -----------------------------------------------------------------------------------
    @property
    def embedded_orthanc(self) -> bool:
        return not self.orthanc.url

    @property
    def orthanc_url(self) -> str:
        return self.orthanc.url.rstrip("/") or f"http://127.0.0.1:{self.local_orthanc.http_port}"

    @property
    def orthanc_storage_dir(self) -> Path:
        return self.local_orthanc.storage_dir or self.data_dir / "orthanc"

    @property
    def report_folder(self) -> Path:
        return self.report.folder or self.data_dir / "reports"

    @property
    def prefect_home(self) -> Path:
        return self.prefect.home or self.data_dir / "prefect"

    @property
    def all_shares(self) -> list[LocalShareConfig | SmbShareConfig]:
        if self.shares is not None:
            return list(self.shares)
        return [LocalShareConfig(name="inbox", source="INBOX", path=self.data_dir / "inbox")]

    def share(self, name: str) -> LocalShareConfig | SmbShareConfig:
        for s in self.all_shares:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.all_shares) or "none"
        raise ConfigError(f"no share named {name!r} in the configuration (configured: {known})")

    def ingest_for(self, share: LocalShareConfig | SmbShareConfig) -> IngestSettings:
        """The global ingest settings with the share's own overrides applied."""
        overrides = share.ingest.model_dump(exclude_none=True)
        return self.ingest.model_copy(update=overrides) if overrides else self.ingest


def _set_path(data: dict[str, Any], keys: list[str], value: str) -> None:
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if key == "shares":
            if len(keys) < i + 3:
                raise ConfigError(f"environment override OWF__{'__'.join(keys).upper()} names no setting of the share")
            share_name = keys[i + 1].replace("_", "-")
            shares = node.setdefault("shares", [])
            match = next((s for s in shares if isinstance(s, dict) and s.get("name") == share_name), None)
            if match is None:
                raise ConfigError(f"environment override names share {share_name!r}, which is not configured")
            _set_path(match, keys[i + 2 :], value)
            return
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"environment override {'__'.join(keys)} does not name a setting")
    node[keys[-1]] = yaml.safe_load(value) if value != "" else ""


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``OWF__A__B=value`` applied (values parsed as YAML scalars)."""
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX):
            keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__") if k]
            if keys:
                _set_path(data, keys, environ[name])
    return data


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (see deployments/site.example.yaml for the keys there are)"
        lines.append(f"  - {where or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any] | None, base_dir: Path | None = None) -> SiteConfig:
    """Validate a config mapping; relative paths are taken from ``base_dir``. Raises ConfigError listing
    every problem."""
    try:
        cfg = SiteConfig.model_validate(dict(data or {}))
    except ValidationError as err:
        raise ConfigError(f"the configuration has {err.error_count()} problem(s):\n{_describe(err)}") from None
    if base_dir is None:
        return cfg
    return _resolve_paths(cfg, base_dir)


def _resolve_paths(cfg: SiteConfig, base: Path) -> SiteConfig:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p).resolve()

    shares = None
    if cfg.shares is not None:
        shares = [
            s.model_copy(update={"path": fix(s.path)}) if isinstance(s, LocalShareConfig) else s for s in cfg.shares
        ]
    return cfg.model_copy(
        update={
            "data_dir": fix(cfg.data_dir),
            "shares": shares,
            "orthanc": cfg.orthanc.model_copy(update={"ca_bundle": fix(cfg.orthanc.ca_bundle)}),
            "local_orthanc": cfg.local_orthanc.model_copy(update={"storage_dir": fix(cfg.local_orthanc.storage_dir)}),
            "prefect": cfg.prefect.model_copy(update={"home": fix(cfg.prefect.home)}),
            "report": cfg.report.model_copy(update={"folder": fix(cfg.report.folder)}),
        }
    )


def config_path_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    value = env.get("OWF_CONFIG", "").strip()
    return Path(value) if value else None


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> SiteConfig:
    """Load the site config: ``path``, else ``$OWF_CONFIG``, else the embedded default; then apply
    ``OWF__`` environment overrides. Raises ConfigError naming every problem."""
    env = os.environ if environ is None else environ
    file = Path(path) if path else config_path_from_env(env)
    data: dict[str, Any] = {}
    base = PROJECT_ROOT
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {file}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {file} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a mapping of settings at the top level")
        data = loaded or {}
        base = file.resolve().parent
    if "OWF_DATA_DIR" in env and "data_dir" not in data:
        data["data_dir"] = env["OWF_DATA_DIR"]
    data = apply_env_overrides(data, env)
    return parse_config(data, base)
