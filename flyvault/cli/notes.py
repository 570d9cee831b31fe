"""Notes worth seeing once, not before every command's output.

The development-issuer note (``flyvault.client.events.DevelopmentIssuer``) says that a
vault's attestation is checked against a stand-in issuer, not Fly's: it must not go
unnoticed against a real vault, but printed before every command it becomes noise that
people learn to skip. So it is shown once per vault and issuer per day (a stamp under the
state directory), always with ``-v``, and ``doctor`` always lists it (its own output).
A stamp that cannot be read or written shows the note: when in doubt, say it.
"""

from __future__ import annotations

import contextlib
import time

#: How long a shown note stays quiet for the same vault and issuer.
QUIET_SECONDS = 24 * 3600
STAMPS = "notes.json"


def show_dev_issuer_note(vault: str, issuer: str, now: float | None = None) -> bool:
    """Whether to print the note for ``vault`` and ``issuer`` now (records that it was)."""
    from flyvault.cli.output import is_verbose
    from flyvault.paths import load_state, save_state

    if is_verbose():  # -v: every time
        return True
    now = time.time() if now is None else now
    key = f"dev-issuer {vault} {issuer}"
    stamps = load_state(STAMPS)
    last = stamps.get(key)
    if isinstance(last, (int, float)) and 0 <= now - last < QUIET_SECONDS:
        return False
    stamps = {
        k: v for k, v in stamps.items() if isinstance(v, (int, float)) and now - v < QUIET_SECONDS
    }
    stamps[key] = now
    with contextlib.suppress(OSError):  # shown now; shown again next time
        save_state(STAMPS, stamps)
    return True
