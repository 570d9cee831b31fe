"""ssh-style escapes typed on an interactive session, and the terminal modes reset after one.

Pure logic (no I/O): the session runner (``flyvault.client.session_runner``) feeds it the
bytes typed on the user's terminal, wherever that terminal is (the CLI's own, or a CLI
process served through the connection keeper).
"""

from __future__ import annotations

#: Sent when a session ends abnormally: leave the alternate screen, stop bracketed paste,
#: show the cursor, reset colours. A remote program that died mid-screen leaves these on.
RESET_MODES = b"\x1b[?1049l\x1b[?2004l\x1b[?25h\x1b[0m"


class EscapeDetector:
    """ssh-style escapes: ``~.`` at the start of a line disconnects, ``~~`` sends one ``~``,
    ``~?`` lists the escapes. Everything else passes through unchanged."""

    HELP = (
        b"\r\nSupported escape sequences (after a newline):\r\n"
        b"  ~.  disconnect (the remote session keeps running)\r\n"
        b"  ~~  send a single ~\r\n"
        b"  ~?  this help\r\n"
    )

    def __init__(self) -> None:
        self._line_start = True
        self._tilde = False

    def feed(self, data: bytes) -> tuple[bytes, str | None]:
        """Return (bytes to send, action) where action is None, "disconnect" or "help"."""
        out = bytearray()
        for byte in data:
            char = bytes((byte,))
            if self._tilde:
                self._tilde = False
                if char == b".":
                    return bytes(out), "disconnect"
                if char == b"?":
                    self._line_start = False
                    return bytes(out), "help"
                if char != b"~":
                    out += b"~"
                out += char
                self._line_start = char in (b"\r", b"\n")
                continue
            if self._line_start and char == b"~":
                self._tilde = True
                continue
            out += char
            self._line_start = char in (b"\r", b"\n")
        return bytes(out), None


__all__ = ["RESET_MODES", "EscapeDetector"]
