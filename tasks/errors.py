"""The domain's exceptions, one small tree.

Expected outcomes (a file not ready yet, a file Orthanc rejects) are values, not exceptions. These are
raised when something an operator must fix or wait for stands in the way::

    WorkflowError
    ├── ConfigError            the site configuration is wrong (unknown key, missing secret, bad value)
    ├── OrthancError
    │   ├── OrthancUnavailable  connection refused, timeout, 5xx: retry later, touch nothing
    │   └── OrthancAuthError    401/403: credentials wrong, retrying will not help
    └── ShareError
        ├── ShareUnavailable    network error, session expired, connection reset: reconnect and retry
        ├── ShareAuthError      logon failure: credentials wrong
        └── ShareConfigError    the configured path does not exist or is a DFS link we cannot follow

Clients translate httpx, socket and SMB errors into these at the boundary. Messages are written for an
operator and never contain patient data or credentials.
"""

from __future__ import annotations


class WorkflowError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(WorkflowError):
    """The site configuration is invalid; the message lists every problem found."""


class OrthancError(WorkflowError):
    """Orthanc did not do what was asked."""


class OrthancUnavailable(OrthancError):
    """Orthanc could not be reached or answered 5xx. Safe to retry later; nothing was changed."""


class OrthancAuthError(OrthancError):
    """Orthanc refused our credentials (401/403)."""


class ShareError(WorkflowError):
    """A share (local folder or SMB) could not be used."""


class ShareUnavailable(ShareError):
    """The share could not be reached right now (network, session expired). Retry later."""


class ShareAuthError(ShareError):
    """The SMB server refused the configured credentials."""


class ShareConfigError(ShareError):
    """The configured share or folder does not exist, or is a DFS link that cannot be followed."""
