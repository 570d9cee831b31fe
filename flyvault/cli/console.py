"""stderr notices that stay readable while the terminal is raw (light: no asyncio)."""

from __future__ import annotations

import os
import sys
from typing import Any


class Console:
    """stderr notices that stay readable while the terminal is raw."""

    def __init__(self) -> None:
        self.raw = False

    def notice(self, message: str) -> None:
        from flyvault.client.events import DevelopmentIssuer
        from flyvault.redact import scrub

        note = DevelopmentIssuer.parse(message)  # relayed by a keeper as text, too
        if note is not None:
            from flyvault.cli.notes import show_dev_issuer_note

            if not show_dev_issuer_note(note.vault, note.issuer):
                return

        text = scrub(f"fly-vault: {message}")  # os.write below bypasses the wrapped stderr
        if self.raw:
            os.write(2, b"\r\n" + text.encode() + b"\r\n")
        else:
            print(text, file=sys.stderr, flush=True)

    def event(self, event: Any) -> None:
        """What the client reports besides results (``flyvault.client.events``)."""
        self.notice(event.message)


async def with_vault(config: Any, action: Any) -> Any:
    """``await action(vault)`` on a ``Vault`` whose notices and events go to stderr, closed
    afterwards whatever happens."""
    from flyvault.client import Vault

    console = Console()
    vault = Vault(config, on_notice=console.notice, on_event=console.event)
    try:
        return await action(vault)
    finally:
        await vault.close()
