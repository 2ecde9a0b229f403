"""Resolve passwords named in the config: from an environment variable or a Prefect Secret block.

Passwords are returned to the caller and never logged; error messages name where a password was looked
for, never its value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from tasks.config import Credentials
from tasks.errors import ConfigError
from tasks.routing_config import Destination


def resolve_password(
    creds: Credentials | Destination, what: str, environ: Mapping[str, str] | None = None
) -> str | None:
    """The password for ``what`` (e.g. "share 'ct-room1'"), or None when none is configured."""
    env = os.environ if environ is None else environ
    if creds.password_env:
        value = env.get(creds.password_env)
        if value is None:
            raise ConfigError(
                f"{what}: environment variable {creds.password_env} (its password) is not set on this host"
            )
        return value
    if creds.password_secret_block:
        from prefect.blocks.system import Secret

        try:
            return str(Secret.load(creds.password_secret_block).get())
        except ValueError as e:
            raise ConfigError(
                f"{what}: Prefect Secret block {creds.password_secret_block!r} could not be loaded ({e})"
            ) from None
    return None
