"""Checks of the client's environment variables, for long-running callers to make at start.

A bad ``FLY_VAULT_*`` value would otherwise surface at the first connection, possibly hours
into an MCP session, as the error of an unrelated tool call.
"""

from __future__ import annotations

import os


def check_environment() -> None:
    """Raise ``ConfigError`` for a ``FLY_VAULT_CONFIG`` naming a directory or a
    ``FLY_VAULT_DATAGRAM_SIZE`` out of range or a ``FLY_VAULT_PMTU`` that is not yes/no."""
    from flyvault.paths import config_file
    from flyvault.transport.endpoint import forced_datagram_size
    from flyvault.transport.pmtu import discovery_enabled

    if os.environ.get("FLY_VAULT_CONFIG"):
        config_file()  # refuses a FLY_VAULT_CONFIG that names a directory
    forced_datagram_size()
    discovery_enabled()


__all__ = ["check_environment"]
