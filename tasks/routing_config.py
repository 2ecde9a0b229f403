"""Configuration of morph-and-route: destinations, routes and the routing policy. Pure data and validation.

Three sections of the site configuration (see ``deployments/site.example.yaml``)::

    destinations:            # where studies go
      - name: archive
        kind: modality       # an Orthanc DICOM modality: C-STORE (host/port given: registered in Orthanc)
        aet: ARCHIVE
        host: 10.0.0.5
        port: 104
    routes:                  # in order; every route that matches runs (fan-out) unless one says stop
      - name: modality1
        when: {source: MODALITY1}
        modify: {replace: {InstitutionName: "Imaging Center West"}}
        to: [archive]
      - name: modality2
        when: {source: MODALITY2}
        anonymize: {profile: "2021b", keep: [StudyDescription]}
        to: [archive]
    routing:
      mixed_sources: hold
      default_route: null

Everything that can be wrong before deployment is a validation error here (``owf check`` lists it): an
unknown destination, an unknown DICOM keyword, a modify that cannot work (removing a UID, one fixed value
for every SOP Instance UID, changing the Study Instance UID while keeping UIDs), modify and anonymize both.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROUTE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")
DEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,30}")
AE_TITLE = re.compile(r"[ -\[\]-~]{1,16}")  # printable ASCII without backslash, at most 16 characters

# Identifiers whose change needs Orthanc's "Force" (design notes, C19).
IDENTIFIERS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _check_keyword(keyword: str, where: str) -> str:
    from pydicom.datadict import tag_for_keyword  # here, not at import: 0.45 CPU s in every flow run's process

    if tag_for_keyword(keyword) is None:
        raise ValueError(f"{where}: {keyword!r} is not a DICOM keyword (e.g. InstitutionName, StationName)")
    return keyword


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValueMatch(_Strict):
    """How one value is compared. In the config: a string (exactly that), a list (any of them), or a mapping
    ``{glob: "ST*"}`` / ``{regex: "^ST0[12]$"}``. Values are compared after stripping DICOM padding;
    ``ignore_case`` (default true for glob and regex, false for exact values) as configured."""

    equals: list[str] | None = None
    glob: str | None = None
    regex: str | None = None
    ignore_case: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"equals": [data]}
        if isinstance(data, list):
            return {"equals": data}
        if isinstance(data, dict) and isinstance(data.get("equals"), str):
            return {**data, "equals": [data["equals"]]}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> ValueMatch:
        kinds = [k for k in ("equals", "glob", "regex") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a match is a value, a list of values, {glob: ...} or {regex: ...}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        if self.equals is not None and not self.equals:
            raise ValueError("an empty list matches nothing")
        return self

    def describe(self) -> str:
        if self.equals is not None:
            return " or ".join(repr(v) for v in self.equals)
        return f"glob {self.glob!r}" if self.glob is not None else f"regex {self.regex!r}"


class RouteWhen(_Strict):
    """What a study must be for the route to match. Every condition given must hold; none given: every study.

    ``source`` is where each instance came from: the share's source name (ingest metadata) or, for C-STORE,
    the calling AE title. ``calling_aet``, ``called_aet`` and ``remote_ip`` are Orthanc's RemoteAET, CalledAET
    and RemoteIP of each instance. ``tags`` compares DICOM attributes by keyword; a tag condition holds when
    any value of it in the study (study, series or instance level) matches.
    """

    source: ValueMatch | None = None
    calling_aet: ValueMatch | None = None
    called_aet: ValueMatch | None = None
    remote_ip: ValueMatch | None = None
    tags: dict[str, ValueMatch] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _keywords(cls, v: dict[str, ValueMatch]) -> dict[str, ValueMatch]:
        for keyword in v:
            _check_keyword(keyword, "when.tags")
        return v


class ModifySpec(_Strict):
    """Orthanc's /modify, with the parts that need care decided here.

    ``uids: keep`` (default) sends the study with its original UIDs: the archive receives the same study,
    changed only where the route says (each instance is modified on the way out; nothing is stored in
    Orthanc). ``uids: new`` lets Orthanc give the copy new Study/Series/SOP Instance UIDs (a temporary copy
    is stored in Orthanc, sent, then deleted). ``Force`` is set whenever an identifier changes or is kept.
    """

    replace: dict[str, str] = Field(default_factory=dict, description="keyword -> new value")
    remove: list[str] = Field(default_factory=list, description="keywords to remove")
    keep: list[str] = Field(default_factory=list, description="keywords Orthanc would otherwise change")
    uids: Literal["keep", "new"] = "keep"
    remove_private_tags: bool = False

    @model_validator(mode="after")
    def _possible(self) -> ModifySpec:
        for where, keywords in (("replace", self.replace), ("remove", self.remove), ("keep", self.keep)):
            for keyword in keywords:
                _check_keyword(keyword, f"modify.{where}")
        both = sorted(set(self.replace) & set(self.remove))
        if both:
            raise ValueError(f"modify: {', '.join(both)} both replaced and removed")
        kept_and_changed = sorted(set(self.keep) & (set(self.replace) | set(self.remove)))
        if kept_and_changed:
            raise ValueError(f"modify: {', '.join(kept_and_changed)} both kept and changed")
        removed_ids = [k for k in IDENTIFIERS if k in self.remove]
        if removed_ids:
            raise ValueError(f"modify: {', '.join(removed_ids)} cannot be removed (Orthanc and archives need it)")
        fixed = [k for k in ("SeriesInstanceUID", "SOPInstanceUID") if k in self.replace]
        if fixed:
            raise ValueError(
                f"modify: replacing {', '.join(fixed)} with one value would give every series/instance the same "
                "UID; use uids: new to let Orthanc generate new UIDs"
            )
        if "StudyInstanceUID" in self.replace and self.uids == "new":
            raise ValueError("modify: StudyInstanceUID is replaced and uids: new also makes a new one; choose one")
        if self.uids == "new" and any(k in self.keep for k in UIDS):
            raise ValueError("modify: uids: new contradicts keeping a UID; use uids: keep")
        return self

    @property
    def changes_identifiers(self) -> bool:
        return any(k in self.replace for k in IDENTIFIERS) or self.uids == "new"


class AnonymizeSpec(_Strict):
    """Orthanc's /anonymize: a new patient and new UIDs. The copy is stored in Orthanc, sent, then deleted.

    The anonymized Study Instance UID is derived from the original one (a hash, so it reveals nothing but stays
    the same when the study is routed again); Series and SOP Instance UIDs are new on every anonymization.
    """

    profile: Literal["2008", "2017c", "2021b"] = Field("2021b", description="Orthanc's DicomVersion")
    keep: list[str] = Field(default_factory=list, description="keywords kept as they are")
    replace: dict[str, str] = Field(default_factory=dict, description="keyword -> value, e.g. PatientID")
    remove: list[str] = Field(default_factory=list)
    keep_private_tags: bool = False

    @model_validator(mode="after")
    def _possible(self) -> AnonymizeSpec:
        for where, keywords in (("replace", self.replace), ("remove", self.remove), ("keep", self.keep)):
            for keyword in keywords:
                _check_keyword(keyword, f"anonymize.{where}")
        both = sorted(set(self.replace) & set(self.remove)) + sorted(set(self.keep) & set(self.replace))
        if both:
            raise ValueError(f"anonymize: {', '.join(both)} named twice (keep/replace/remove)")
        kept_ids = [k for k in ("PatientName", "PatientID", *UIDS) if k in self.keep]
        if kept_ids:
            raise ValueError(f"anonymize: keeping {', '.join(kept_ids)} would not anonymize; use modify instead")
        fixed = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k in self.replace]
        if fixed:
            raise ValueError(f"anonymize: {', '.join(fixed)} are generated by anonymization and cannot be replaced")
        return self


class Route(_Strict):
    """One branch: which studies, what to do with them, where they go."""

    name: str = Field(description="Lower-case name; the route's subflow is route-<name>.")
    when: RouteWhen = Field(default_factory=RouteWhen)
    modify: ModifySpec | None = None
    anonymize: AnonymizeSpec | None = None
    to: list[str] = Field(description="Destination names, in order.")
    stop: bool = Field(False, description="When this route matches, later routes are not tried.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ROUTE_NAME.fullmatch(v):
            raise ValueError("route name must be lower-case letters, digits and dashes (e.g. modality1-archive)")
        return v

    @model_validator(mode="after")
    def _one_action(self) -> Route:
        if self.modify is not None and self.anonymize is not None:
            raise ValueError(f"route {self.name}: modify and anonymize are two routes, not one")
        if not self.to:
            raise ValueError(f"route {self.name}: no destination (to: [...])")
        if len(set(self.to)) != len(self.to):
            raise ValueError(f"route {self.name}: a destination is named twice")
        return self

    @property
    def action(self) -> str:
        if self.anonymize is not None:
            return "anonymize"
        return "modify" if self.modify is not None else "as-is"


class Destination(_Strict):
    """Where routed studies go: an Orthanc DICOM modality (C-STORE) or an Orthanc peer (HTTP).

    With ``aet``/``host``/``port`` (modality) or ``url`` (peer) given, the destination is registered in Orthanc
    before it is used; without them it must already be declared in Orthanc's configuration under this name.
    """

    name: str
    kind: Literal["modality", "peer"] = "modality"
    aet: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None
    username: str | None = None
    password_env: str | None = Field(None, description="Environment variable holding the peer's password.")
    password_secret_block: str | None = Field(None, description="Or a Prefect Secret block holding it.")
    max_concurrent: int = Field(2, ge=1, le=32, description="Routes sending to it at once (all workers).")
    verify: Literal["job", "cfind"] = Field(
        "job",
        description="job: Orthanc's count of instances sent must equal the study's. cfind: also ask the "
        "destination (C-FIND, NumberOfStudyRelatedInstances) how many it holds.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_passwords(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("a password may not be written in the config file: use password_env")
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DEST_NAME.fullmatch(v):
            raise ValueError("destination name: letters, digits, - and _ (it is Orthanc's modality/peer name)")
        return v

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.kind == "modality":
            given = [x is not None for x in (self.aet, self.host, self.port)]
            if any(given) and not all(given):
                raise ValueError(f"destination {self.name}: give aet, host and port together (or none of them)")
            if self.aet is not None and not AE_TITLE.fullmatch(self.aet):
                raise ValueError(f"destination {self.name}: AE title must be 1-16 printable ASCII characters")
            if self.url or self.username or self.password_env or self.password_secret_block:
                raise ValueError(f"destination {self.name}: url/username/password are for kind: peer")
        else:
            if self.aet or self.host or self.port:
                raise ValueError(f"destination {self.name}: aet/host/port are for kind: modality")
            if self.password_env and self.password_secret_block:
                raise ValueError(f"destination {self.name}: set password_env or password_secret_block, not both")
            if self.verify == "cfind":
                raise ValueError(f"destination {self.name}: verify: cfind needs a DICOM modality")
        return self

    @property
    def registered_here(self) -> bool:
        """Do we register it in Orthanc, or must Orthanc's own configuration declare it?"""
        return self.host is not None or self.url is not None


class RoutingSettings(_Strict):
    """How routes are applied."""

    mixed_sources: Literal["hold", "any", "all"] = Field(
        "hold",
        description="A study whose instances came from more than one source: 'hold' routes nothing and fails the "
        "run with the sources named, for an operator to decide (rerun with only_route); 'any' lets a source "
        "condition match when one instance matches; 'all' only when every instance does.",
    )
    default_route: str | None = Field(
        None, description="Route applied to a study no other route matched. Empty: such a study is not routed."
    )
    keep_copies: bool = Field(False, description="Keep the modified/anonymized copies in Orthanc after delivery.")
    retries: int = Field(3, ge=0, le=20, description="Further attempts of a failed delivery, per destination.")
    retry_backoff_seconds: float = Field(10.0, ge=0, le=3600, description="Doubles at each attempt.")
    job_timeout_seconds: float = Field(900.0, gt=0, description="Longest wait for one Orthanc modify/store job.")
    parallel_instances: int = Field(4, ge=1, le=16, description="Instances modified and sent at once (uids: keep).")


def validate_routing(routes: list[Route], destinations: list[Destination], settings: RoutingSettings) -> list[str]:
    """Problems that need both lists: unknown destination, duplicate names, unknown default route."""
    problems = []
    names = [d.name for d in destinations]
    for dupe in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"destination {dupe} is defined twice")
    route_names = [r.name for r in routes]
    for dupe in sorted({n for n in route_names if route_names.count(n) > 1}):
        problems.append(f"route {dupe} is defined twice")
    for route in routes:
        for dest in route.to:
            if dest not in names:
                known = ", ".join(names) or "none"
                problems.append(f"route {route.name}: unknown destination {dest!r} (destinations: {known})")
    if settings.default_route is not None and settings.default_route not in route_names:
        problems.append(f"routing.default_route: no route named {settings.default_route!r}")
    return problems
