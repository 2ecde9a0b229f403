"""A small client for the parts of Orthanc's REST API this project uses (httpx).

Transport errors and HTTP statuses are translated at this boundary: an upload returns an ``UploadAnswer``
value (see ``tasks.orthanc_answers``); other calls raise the ``OrthancError`` tree. Settings and the
transport are arguments, so tests can point the client anywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

from tasks.config import SiteConfig
from tasks.errors import OrthancAuthError, OrthancError, OrthancUnavailable
from tasks.orthanc_answers import UploadAnswer, Verdict, judge_upload
from tasks.secrets import resolve_password


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


class OrthancClient:
    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        verify: bool | str = True,
        timeout: float = 60.0,
        max_connections: int = 8,
        transport: httpx.BaseTransport | None = None,
        outage_wait: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """``outage_wait``: for how long a request waits out an Orthanc that cannot be reached (restarting,
        network blip), retrying with backoff, before OrthancUnavailable is raised. 0: raise at once (the ingest
        and the watcher have their own backoff). Only requests that are safe to repeat are retried: any request
        that never reached Orthanc (connection refused), and GET/PUT/DELETE after any transport error.
        ``on_wait`` is told, once per outage, what is being waited for."""
        self.url = url.rstrip("/")
        self.outage_wait = outage_wait
        self.on_wait = on_wait
        auth = httpx.BasicAuth(username, password or "") if username else None
        self._http = httpx.Client(
            base_url=self.url,
            auth=auth,
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OrthancClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generic ---------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        deadline = time.monotonic() + self.outage_wait
        delay, told = 0.5, False
        while True:
            try:
                return self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                repeatable = isinstance(e, httpx.ConnectError) or method in ("GET", "PUT", "DELETE", "HEAD")
                if not repeatable or time.monotonic() + delay > deadline:
                    raise OrthancUnavailable(f"Orthanc at {self.url} unreachable: {_first_line(e)}") from e
                if self.on_wait and not told:
                    self.on_wait(f"Orthanc at {self.url} unreachable ({_first_line(e)}); retrying with backoff for "
                                 f"up to {self.outage_wait:.0f} s")  # fmt: skip
                    told = True
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self._send(method, path, **kw)
        if r.status_code in (401, 403):
            raise OrthancAuthError(f"Orthanc at {self.url} refused our credentials (HTTP {r.status_code})")
        if r.status_code >= 500:
            raise OrthancUnavailable(f"Orthanc at {self.url} answered HTTP {r.status_code} to {method} {path}")
        return r

    def call(self, method: str, path: str, *, json_body: Any = None, content: bytes | None = None) -> httpx.Response:
        """One request whose answer the caller judges, whatever its status (Orthanc answers 500 for a
        destination it cannot reach). Transport errors and 401/403 still raise; nothing else does."""
        r = self._send(method, path, json=json_body, content=content)
        if r.status_code in (401, 403):
            raise OrthancAuthError(f"Orthanc at {self.url} refused our credentials (HTTP {r.status_code})")
        return r

    def get_json(self, path: str, **params: Any) -> Any:
        r = self._request("GET", path, params=params or None)
        if r.status_code != 200:
            raise OrthancError(f"Orthanc answered HTTP {r.status_code} to GET {path}")
        return r.json()

    def find_json(self, path: str, **params: Any) -> Any | None:
        """Like ``get_json``, but None when Orthanc answers 404 (the resource does not exist)."""
        r = self._request("GET", path, params=params or None)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise OrthancError(f"Orthanc answered HTTP {r.status_code} to GET {path}")
        return r.json()

    def post_json(self, path: str, content: bytes | str) -> Any:
        """``POST path`` with a raw body (e.g. ``/tools/lookup``), answered with JSON. Non-200 raises OrthancError;
        the body is never put in the message (it may be a patient's identifier)."""
        r = self._request("POST", path, content=content.encode("utf-8") if isinstance(content, str) else content)
        if r.status_code != 200:
            raise OrthancError(f"Orthanc answered HTTP {r.status_code} to POST {path}")
        return r.json()

    def now(self) -> str:
        """Orthanc's clock in UTC (``20261203T213912``): what LastUpdate and the change log's dates are written
        in. (``/tools/now-local`` is the host's local time: hours away from LastUpdate outside UTC.)"""
        r = self._request("GET", "/tools/now")
        if r.status_code != 200:
            raise OrthancError(f"Orthanc answered HTTP {r.status_code} to GET /tools/now")
        return r.text.strip().strip('"')

    def system(self) -> dict[str, Any]:
        """``GET /system``: name, version, API version. Raises OrthancUnavailable/OrthancAuthError."""
        return self.get_json("/system")

    # -- ingest ----------------------------------------------------------------------------------------
    def upload(self, content: bytes | Iterable[bytes], length: int, looks_like_dicom: bool = False) -> UploadAnswer:
        """``POST /instances`` with one DICOM file. Never raises for Orthanc's or the network's sake:
        an unreachable Orthanc is an ``UNAVAILABLE`` answer."""
        body: bytes | Iterator[bytes] = content if isinstance(content, bytes) else iter(content)
        headers = {"Content-Type": "application/dicom", "Content-Length": str(length), "Expect": ""}
        try:
            r = self._http.post("/instances", content=body, headers=headers)
        except httpx.TransportError as e:
            return UploadAnswer(Verdict.UNAVAILABLE, reason=f"Orthanc at {self.url} unreachable: {_first_line(e)}")
        return judge_upload(r.status_code, r.content, looks_like_dicom)

    def set_instance_metadata(self, instance_id: str, name: str, value: str) -> None:
        """``PUT /instances/{id}/metadata/{name}``. The name must be declared in Orthanc's UserMetadata."""
        r = self._request("PUT", f"/instances/{instance_id}/metadata/{name}", content=value.encode("utf-8"))
        if r.status_code == 200:
            return
        detail = _orthanc_status(r)
        if r.status_code == 404 and detail == 7:
            raise OrthancError(
                f"Orthanc at {self.url} does not know the metadata {name!r}: add "
                f'"UserMetadata": {{"{name}": 1024}} to its configuration (or set orthanc.source_metadata '
                "to a name it declares)"
            )
        raise OrthancError(f"Orthanc answered HTTP {r.status_code} when setting metadata {name!r}")

    # -- study metadata (the notification record) ------------------------------------------------------
    def study_metadata(self, study_id: str, name: str) -> str | None:
        """``GET /studies/{id}/metadata/{name}``; None when the study has none."""
        r = self._request("GET", f"/studies/{study_id}/metadata/{name}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise OrthancError(f"Orthanc answered HTTP {r.status_code} when reading study metadata {name!r}")
        return r.text

    def set_study_metadata(self, study_id: str, name: str, value: str) -> None:
        r = self._request("PUT", f"/studies/{study_id}/metadata/{name}", content=value.encode("utf-8"))
        if r.status_code != 200:
            raise OrthancError(
                f"Orthanc answered HTTP {r.status_code} when writing study metadata {name!r}: is it declared "
                f'in Orthanc\'s UserMetadata (e.g. "UserMetadata": {{"{name}": 1025}})?'
            )

    def delete_study_metadata(self, study_id: str, name: str) -> None:
        r = self._request("DELETE", f"/studies/{study_id}/metadata/{name}")
        if r.status_code not in (200, 404):
            raise OrthancError(f"Orthanc answered HTTP {r.status_code} when clearing study metadata {name!r}")

    def attachment_md5(self, instance_id: str) -> str | None:
        """MD5 of the file Orthanc stored for an instance, or None when Orthanc keeps no MD5."""
        r = self._request("GET", f"/instances/{instance_id}/attachments/dicom/md5")
        if r.status_code != 200:
            return None
        return r.text.strip().strip('"') or None


def orthanc_error(r: httpx.Response) -> str:
    """Orthanc's own explanation of a failed call (its Details, else its Message), one line."""
    try:
        doc = json.loads(r.content)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        text = str(doc.get("Details") or doc.get("Message") or "").strip()
        if text:
            return text.splitlines()[0][:300]
    return f"HTTP {r.status_code}"


def _orthanc_status(r: httpx.Response) -> int | None:
    try:
        doc = json.loads(r.content)
    except ValueError:
        return None
    status = doc.get("OrthancStatus") if isinstance(doc, dict) else None
    return status if isinstance(status, int) else None


def client_from_config(cfg: SiteConfig, *, max_connections: int = 8, logger: Any = None) -> OrthancClient:
    """The client for the configured Orthanc, with its password resolved (env or Secret block). With a
    ``logger`` (study and route runs), requests wait out an Orthanc outage of up to
    ``orthanc.outage_wait_seconds``, saying so in the run's log."""
    o = cfg.orthanc
    verify: bool | str = str(o.ca_bundle) if o.ca_bundle else o.verify_tls
    return OrthancClient(
        cfg.orthanc_url,
        username=o.username,
        password=resolve_password(o, "Orthanc"),
        verify=verify,
        timeout=o.timeout_seconds,
        max_connections=max_connections,
        outage_wait=o.outage_wait_seconds if logger is not None else 0.0,
        on_wait=logger.warning if logger is not None else None,
    )
