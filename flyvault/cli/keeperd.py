"""``python -m flyvault.cli.keeperd VAULT SOCKET READY_FD CALLER``: a connection keeper's
process, started by a CLI call (``flyvault.cli.mux._start``).

Started in the background (READY_FD ``-``), it first waits for the call that started it
(pid CALLER) to end, for ``CALLER_HEAD_START`` seconds at most, with nothing but ``os`` and
``select`` loaded: the keeper's imports, config check and handshake then take no CPU from
that call, so the first call on a vault is no slower for starting a keeper. Calls made
meanwhile find no socket and go direct.
"""

from __future__ import annotations

import os
import select
import sys

#: The longest a keeper started in the background waits for its caller to end.
CALLER_HEAD_START = 1.0


def after_caller(pid: int, limit: float) -> None:
    """Return once process ``pid`` has ended, or after ``limit`` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # already gone, or no pidfd on this system
        return
    try:
        select.select([pidfd], [], [], limit)
    finally:
        os.close(pidfd)


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        sys.exit("usage: python -m flyvault.cli.keeperd VAULT SOCKET READY_FD CALLER_PID")
    if argv[2] == "-":
        after_caller(int(argv[3]), CALLER_HEAD_START)
    from flyvault.cli.mux import keeper_process

    keeper_process(argv[:3])


if __name__ == "__main__":
    main(sys.argv[1:])
