"""What the client tells its caller besides results: events, never printed here.

The client has no terminal; the CLI prints these on stderr, the MCP server logs them or
reports them as data (``dev_issuer`` in its results).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DevelopmentIssuer:
    """The vault's attestation is checked against a development issuer, not Fly's.

    Emitted once per ``Vault`` before its first connection: an override meant for the
    local dev vault must never go unnoticed against a real one.
    """

    vault: str
    issuer: str

    @property
    def message(self) -> str:
        return (
            f"note: '{self.vault}' is attested by the development issuer {self.issuer}, not by Fly"
        )

    @classmethod
    def parse(cls, message: str) -> DevelopmentIssuer | None:
        """The event whose ``message`` this is (a keeper relays events as notice text)."""
        match = _NOTE.fullmatch(message)
        return cls(match["vault"], match["issuer"]) if match else None


_NOTE = re.compile(
    r"note: '(?P<vault>[^']+)' is attested by the development issuer (?P<issuer>\S+), not by Fly"
)


#: Every event type the client emits (a union as more kinds arrive).
ClientEvent = DevelopmentIssuer
OnEvent = Callable[[ClientEvent], None]

__all__ = ["ClientEvent", "DevelopmentIssuer", "OnEvent"]
