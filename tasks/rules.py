"""Morph-and-route decisions: which routes a study takes, the Orthanc request bodies, and what was delivered.

Pure: no Prefect, no network, no clock. The facts come from documents already fetched from Orthanc
(``tasks.study_report.StudyDocuments``).

Matching (``plan_routes``)
--------------------------
Routes are tried in order. A route matches when every condition of its ``when`` holds (see
``RouteWhen``); a matched route with ``stop: true`` ends the search. When no route matched, the configured
``default_route`` (if any) is used; it is never tried in the ordinary order. Per-instance conditions
(source, calling/called AE title, remote IP) follow ``routing.mixed_sources`` when the study's instances came
from more than one source:

- ``hold``: nothing is routed; the plan says which sources were found, for an operator to decide;
- ``any``: a condition holds when it holds for at least one instance;
- ``all``: a condition holds only when it holds for every instance.

With a single source, ``any`` and ``all`` agree. An instance without a value (e.g. no RemoteAET: it came
over REST) never matches a condition on it.

Delivery records
----------------
What a route delivered is kept with the study (Orthanc study metadata, see ``tasks.routing``): per route, the
digest of the route's definition and the study's instances, and per destination the instances confirmed and
the Study Instance UID that went there. A route whose record has the same digest for a destination is not sent
there again, unless forced.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.routing_config import IDENTIFIERS, Destination, ModifySpec, Route, RoutingSettings, ValueMatch
from tasks.study_report import StudyDocuments

_STRIP = " \x00"


# -- facts ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceOrigin:
    """Where one instance came from, as Orthanc recorded it (None: not recorded)."""

    source: str | None
    calling_aet: str | None
    called_aet: str | None
    remote_ip: str | None


@dataclass(frozen=True)
class StudyFacts:
    """What routes are matched against: one origin per instance and every value of every tag in the study."""

    origins: tuple[InstanceOrigin, ...]
    tag_values: Mapping[str, frozenset[str]]

    @property
    def sources(self) -> list[str]:
        return sorted({o.source for o in self.origins if o.source})

    def source_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self.origins:
            key = o.source or "(none)"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


def _clean(value: Any) -> str | None:
    if value is None or isinstance(value, (list, dict)):
        return None
    text = str(value).strip(_STRIP)
    return text or None


def _values(value: Any) -> Iterable[str]:
    text = _clean(value)
    if text is None:
        return ()
    return [part.strip(_STRIP) for part in text.split("\\") if part.strip(_STRIP)]


def study_facts(docs: StudyDocuments, source_metadata: str = "IngestSource") -> StudyFacts:
    """The facts of one study: per instance its source (the share's source name from ``source_metadata``,
    else the calling AE title) and Orthanc's origin metadata; the values of every tag at every level."""
    origins = []
    for inst in docs.instances:
        md = inst.metadata
        calling = _clean(md.get("RemoteAET"))
        origins.append(
            InstanceOrigin(
                source=_clean(md.get(source_metadata)) or calling,
                calling_aet=calling,
                called_aet=_clean(md.get("CalledAET")),
                remote_ip=_clean(md.get("RemoteIP")),
            )
        )
    values: dict[str, set[str]] = {}
    levels: list[Mapping[str, Any]] = [
        docs.study.get("MainDicomTags") or {},
        docs.study.get("PatientMainDicomTags") or {},
        *(s.get("MainDicomTags") or {} for s in docs.series),
        *(inst.tags for inst in docs.instances),
    ]
    for tags in levels:
        for keyword, value in tags.items():
            for v in _values(value):
                values.setdefault(keyword, set()).add(v)
    return StudyFacts(tuple(origins), {k: frozenset(v) for k, v in values.items()})


# -- matching ------------------------------------------------------------------------------------------------
def value_matches(match: ValueMatch, value: str | None) -> bool:
    """Does one value satisfy a match? ``None`` (not recorded) never does."""
    if value is None:
        return False
    value = value.strip(_STRIP)
    if match.equals is not None:
        if match.ignore_case:
            return value.casefold() in {v.strip(_STRIP).casefold() for v in match.equals}
        return value in {v.strip(_STRIP) for v in match.equals}
    ignore_case = match.ignore_case is not False
    if match.glob is not None:
        pattern = match.glob.casefold() if ignore_case else match.glob
        return fnmatch.fnmatchcase(value.casefold() if ignore_case else value, pattern)
    assert match.regex is not None
    return re.search(match.regex, value, re.IGNORECASE if ignore_case else 0) is not None


_PER_INSTANCE = ("source", "calling_aet", "called_aet", "remote_ip")


@dataclass(frozen=True)
class RouteDecision:
    """A route and whether it runs for this study; ``reason`` is one sentence for the UI."""

    route: Route
    runs: bool
    reason: str


@dataclass(frozen=True)
class RoutingPlan:
    """Every route with its decision, in config order (the default route last when it was used). ``held`` is
    the reason nothing was routed because the study mixes sources, else None."""

    decisions: tuple[RouteDecision, ...]
    held: str | None = None

    @property
    def to_run(self) -> list[Route]:
        return [d.route for d in self.decisions if d.runs]


def _why_not(route: Route, facts: StudyFacts, policy: str) -> str | None:
    """None when the route's conditions hold, else the first condition that failed, as a sentence."""
    when = route.when
    for attr in _PER_INSTANCE:
        match: ValueMatch | None = getattr(when, attr)
        if match is None:
            continue
        hits = [value_matches(match, getattr(o, attr)) for o in facts.origins]
        ok = bool(hits) and (all(hits) if policy == "all" else any(hits))
        if not ok:
            seen = sorted({v for o in facts.origins if (v := getattr(o, attr))}) or ["none recorded"]
            label = attr.replace("_", " ")
            return f"{label} is {', '.join(seen)}; the route wants {match.describe()}"
    for keyword, match in when.tags.items():
        values = facts.tag_values.get(keyword, frozenset())
        if not any(value_matches(match, v) for v in values):
            shown = "absent" if not values else f"{len(values)} other value(s)"
            return f"{keyword} is {shown}; the route wants {match.describe()}"
    return None


def plan_routes(facts: StudyFacts, routes: Sequence[Route], settings: RoutingSettings) -> RoutingPlan:
    """Decide which routes run for a study (see the module docstring)."""
    if not routes:
        return RoutingPlan(())
    sources = facts.sources
    if settings.mixed_sources == "hold" and len(sources) > 1:
        counts = ", ".join(f"{s}: {n}" for s, n in facts.source_counts().items())
        held = (
            f"the study's instances came from {len(sources)} sources ({counts}); routing is held "
            "(routing.mixed_sources: hold). Rerun the study with only_route set to the route it should take"
        )
        return RoutingPlan(tuple(RouteDecision(r, False, "held: mixed sources") for r in routes), held)
    policy = "all" if settings.mixed_sources == "hold" else settings.mixed_sources
    decisions: list[RouteDecision] = []
    stopped_by: str | None = None
    default = settings.default_route
    for route in routes:
        if route.name == default:
            continue
        if stopped_by is not None:
            decisions.append(RouteDecision(route, False, f"not tried: route {stopped_by} matched and says stop"))
            continue
        why = _why_not(route, facts, policy)
        if why is None:
            decisions.append(RouteDecision(route, True, "matched"))
            if route.stop:
                stopped_by = route.name
        else:
            decisions.append(RouteDecision(route, False, f"not matched: {why}"))
    if default is not None:
        route = next(r for r in routes if r.name == default)
        if any(d.runs for d in decisions):
            decisions.append(RouteDecision(route, False, "default route: not needed, another route matched"))
        else:
            decisions.append(RouteDecision(route, True, "default route: no other route matched"))
    return RoutingPlan(tuple(decisions))


def forced_plan(routes: Sequence[Route], name: str) -> RoutingPlan:
    """The plan of an operator's rerun of one route: that route runs, whatever it would match."""
    known = [r.name for r in routes]
    if name not in known:
        raise KeyError(f"no route named {name!r} (routes: {', '.join(known) or 'none'})")
    return RoutingPlan(
        tuple(
            RouteDecision(r, r.name == name, "run by the operator" if r.name == name else "not asked for")
            for r in routes
        )
    )


# -- Orthanc request bodies ------------------------------------------------------------------------------------
def modify_body(spec: ModifySpec) -> dict[str, Any]:
    """The body of Orthanc's modify for one route.

    With ``uids: keep`` it is sent per instance (``POST /instances/{id}/modify`` answers the modified file
    without storing it): the UIDs are kept explicitly, which needs Force. With ``uids: new`` it is sent for the
    study (``POST /studies/{id}/modify``, a stored copy with new UIDs). Force is set whenever an identifier
    changes or is kept (Orthanc refuses otherwise, C19).
    """
    keep = list(spec.keep)
    if spec.uids == "keep":
        keep += [uid for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                 if uid not in spec.replace and uid not in keep]  # fmt: skip
    body: dict[str, Any] = {}
    if spec.replace:
        body["Replace"] = dict(spec.replace)
    if spec.remove:
        body["Remove"] = list(spec.remove)
    if keep:
        body["Keep"] = keep
    if spec.remove_private_tags:
        body["RemovePrivateTags"] = True
    body["Force"] = spec.uids == "keep" or spec.changes_identifiers or any(k in keep for k in IDENTIFIERS)
    return body


def anonymized_study_uid(original_uid: str, route_name: str) -> str:
    """The Study Instance UID an anonymizing route gives a study: derived from the original by a hash (so it
    reveals nothing about it) and the same every time the study takes this route, so a second delivery lands
    in the same study at the archive. A ``2.25`` UID (ITU-T X.667: a UUID as a UID)."""
    digest = hashlib.sha256(f"owf-anonymize\x00{route_name}\x00{original_uid}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def anonymize_body(route: Route, original_uid: str | None) -> dict[str, Any]:
    """The body of ``POST /studies/{id}/anonymize`` for an anonymizing route."""
    spec = route.anonymize
    assert spec is not None
    replace = dict(spec.replace)
    if original_uid:
        replace["StudyInstanceUID"] = anonymized_study_uid(original_uid, route.name)
    body: dict[str, Any] = {"DicomVersion": spec.profile, "Force": True}
    if replace:
        body["Replace"] = replace
    if spec.keep:
        body["Keep"] = list(spec.keep)
    if spec.remove:
        body["Remove"] = list(spec.remove)
    body["KeepPrivateTags"] = spec.keep_private_tags
    return body


def needs_copy(route: Route) -> bool:
    """Does the route store a temporary copy in Orthanc (anonymize, modify with new UIDs)? Otherwise it sends
    the original (as-is) or modifies each instance on the way out (modify keeping UIDs)."""
    return route.anonymize is not None or (route.modify is not None and route.modify.uids == "new")


# -- delivery records ------------------------------------------------------------------------------------------
def route_digest(route: Route, destination: Destination, instance_ids: Iterable[str]) -> str:
    """Equal digests: delivering again would send the same content to the same place the same way."""
    doc = {
        "route": route.model_dump(mode="json", exclude={"stop", "when"}),
        "destination": destination.model_dump(mode="json", include={"name", "kind", "aet", "host", "port", "url"}),
        "instances": sorted(instance_ids),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Delivery:
    """One route's confirmed delivery to one destination."""

    digest: str
    instances: int
    study_uid: str | None  # the Study Instance UID the destination received
    delivered_at: str
    copy_id: str | None = None  # the Orthanc copy that was sent (kept only with keep_copies)


@dataclass
class DeliveryRecord:
    """Every route's deliveries for one study: route name -> destination name -> Delivery."""

    routes: dict[str, dict[str, Delivery]] = field(default_factory=dict)

    def delivered(self, route: str, destination: str, digest: str) -> Delivery | None:
        d = self.routes.get(route, {}).get(destination)
        return d if d is not None and d.digest == digest else None

    def add(self, route: str, destination: str, delivery: Delivery) -> None:
        self.routes.setdefault(route, {})[destination] = delivery

    def dump(self) -> str:
        return json.dumps({r: {d: asdict(x) for d, x in ds.items()} for r, ds in self.routes.items()}, sort_keys=True)

    @classmethod
    def load(cls, text: str | None) -> DeliveryRecord:
        """Read a record back; anything unreadable is an empty record (a delivery is then repeated, which
        archives accept for the same UIDs, rather than skipped)."""
        try:
            doc = json.loads(text) if text else {}
        except ValueError:
            doc = {}
        record = cls()
        if not isinstance(doc, dict):
            return record
        for route, dests in doc.items():
            if not isinstance(dests, dict):
                continue
            for dest, d in dests.items():
                try:
                    record.add(str(route), str(dest), Delivery(**d))
                except TypeError:
                    continue
        return record


@dataclass(frozen=True)
class RouteOutcome:
    """What happened to one route in one run, for the report, the UI and the HL7 message."""

    route: str
    status: str  # delivered | failed | skipped | held
    reason: str
    destinations: dict[str, str] = field(default_factory=dict)  # destination -> Study Instance UID sent there
    changed_uid: bool = False


def routes_summary(outcomes: Sequence[RouteOutcome]) -> tuple[str | None, str | None]:
    """The two report columns: ``routes`` ("name: status to dest,dest; ...") and ``routed_study_uids``
    ("dest=UID; ...", only where a route changed the Study Instance UID). None when there is nothing to say.

    Both are written from the delivery state, not from what this run did, so a rerun that finds every route
    already delivered writes the same text (and sends no HL7 update)."""
    routes = "; ".join(
        f"{o.route}: {o.status}" + (f" to {','.join(o.destinations)}" if o.destinations else "")
        for o in outcomes
        if o.status != "skipped"
    )
    uids = "; ".join(f"{dest}={uid}" for o in outcomes if o.changed_uid for dest, uid in o.destinations.items() if uid)
    return routes or None, uids or None


def route_outcomes(
    plan: RoutingPlan,
    record: DeliveryRecord,
    destinations: Mapping[str, Destination],
    instance_ids: Sequence[str],
    original_uid: str | None,
    failures: Mapping[str, str],
) -> list[RouteOutcome]:
    """Each route's outcome from the plan and the delivery record after the routes ran: delivered only when
    every destination holds a delivery of the current content; ``failures`` gives the reason of a route
    that failed in this run."""
    outcomes = []
    for decision in plan.decisions:
        route = decision.route
        if not decision.runs:
            status = "held" if plan.held else "skipped"
            outcomes.append(RouteOutcome(route.name, status, plan.held or decision.reason))
            continue
        found = {}
        for name in route.to:
            dest = destinations[name]
            delivery = record.delivered(route.name, name, route_digest(route, dest, instance_ids))
            if delivery is not None:
                found[name] = delivery.study_uid or ""
        if len(found) == len(route.to) and route.name not in failures:
            changed = any(uid and uid != original_uid for uid in found.values())
            outcomes.append(RouteOutcome(route.name, "delivered", decision.reason, found, changed))
        else:
            missing = [n for n in route.to if n not in found]
            reason = failures.get(route.name) or f"not delivered to {', '.join(missing)}"
            outcomes.append(RouteOutcome(route.name, "failed", reason, found))
    return outcomes
