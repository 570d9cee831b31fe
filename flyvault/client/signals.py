"""Signal names as people and agents write them, and as results report them.

Shared by ``fly-vault kill`` and the MCP ``signal`` tool, so both accept the same spellings
(TERM, SIGTERM, term, 15) and refuse the same way.
"""

from __future__ import annotations

import signal as signal_module

from flyvault.errors import UsageError

#: The vault sends any signal 1-64 (real-time ones included), named or not.
MAX_SIGNAL = 64


def parse_signal(value: str) -> int:
    """A signal number from a name (with or without SIG, any case) or a number 1-64."""
    text = value.strip().upper()
    if text.isdigit():
        number = int(text)
        if 1 <= number <= MAX_SIGNAL:
            return number
    else:
        name = text if text.startswith("SIG") else f"SIG{text}"
        member = getattr(signal_module.Signals, name, None)
        if member is not None:
            return int(member)
    raise UsageError(
        f"unknown signal {value!r}", hint="use a name such as TERM, INT, KILL or HUP, or 1-64"
    )


def signal_name(signo: int | None) -> str | None:
    """``SIGTERM`` for 15; ``SIG40`` for a number this platform has no name for."""
    if signo is None:
        return None
    try:
        return signal_module.Signals(signo).name
    except ValueError:
        return f"SIG{signo}"


__all__ = ["parse_signal", "signal_name"]
