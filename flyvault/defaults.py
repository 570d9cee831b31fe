"""Defaults that more than one part of fly-vault relies on, each stated once."""

from __future__ import annotations

from typing import Final

#: How long a client keeps reconnecting to a vault it lost (``--reconnect-timeout``), and so
#: how long the server holds a session's output for it after a lost connection.
RECONNECT_TIMEOUT: Final = 30.0

#: The org and app of the local dev vault's ``[vault.local]`` entry (``fly-vault local up``):
#: the client tells a stopped local vault by them, to say how to start it.
LOCAL_ORG: Final = "local"
LOCAL_APP: Final = "fly-vault-local"
