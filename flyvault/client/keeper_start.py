"""Finding and starting a vault's connection keeper: for CLI calls and the MCP server.

A keeper is its own process, ``python -m flyvault.cli.keeperd``, started here with
``posix_spawn`` (no ``subprocess`` import on the CLI's thin path). A caller either leaves it
to start in the background (the CLI's default: the call connects directly meanwhile) or
waits for its answer on a pipe (``FLY_VAULT_MUX=wait``, and the MCP server with
``--share-keeper``, which starts once and stays). Nothing heavier than
``flyvault.client.mux``, ``envvars`` and ``errors``: light enough for the thin path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from flyvault.client.mux import (
    NOT_FOR_KEEPERS,
    KeeperPaths,
    keeper_key,
    keeper_paths,
    runtime_dir,
)
from flyvault.envvars import FALSE_WORDS, TRUE_WORDS, env_text
from flyvault.errors import UsageError, VaultError

log = logging.getLogger("flyvault.mux")

#: ``FLY_VAULT_MUX``: a yes word (or unset) starts keepers in the background, ``wait``
#: has the call that starts one wait for it, a no word turns keepers off.
MUX_VARIABLE = "FLY_VAULT_MUX"
WAIT = "wait"
BACKGROUND = "background"


def mux_mode() -> str | None:
    """``BACKGROUND`` or ``WAIT`` from ``FLY_VAULT_MUX``, None when it turns keepers off.
    A value that is none of these is a usage error (exit 2), found before connecting."""
    text = env_text(MUX_VARIABLE)
    if text is None or text.lower() in TRUE_WORDS:
        return BACKGROUND
    if text.lower() == WAIT:
        return WAIT
    if text.lower() in FALSE_WORDS:
        return None
    raise UsageError(
        f"{MUX_VARIABLE}={text!r} is not valid: expected {WAIT}, one of "
        f"{', '.join(TRUE_WORDS)} (on) or one of {', '.join(FALSE_WORDS)} (off)",
        hint=f"unset {MUX_VARIABLE} for the default, or set {MUX_VARIABLE}=0 to turn keepers off",
    )


#: The descriptor a waited-for keeper answers on.
READY_FD = 3
#: How long a caller waits for a keeper it started to listen (or refuse).
START_TIMEOUT = 10.0


def alive(socket_path: str) -> bool:
    """Whether a process accepts connections on ``socket_path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def locate(vault_name: str, *, create: bool = True) -> KeeperPaths:
    """Where the keeper for ``vault_name`` (as the config reads now) listens, whether or not
    one does. ``OSError`` (``FileNotFoundError`` for a missing directory when ``create`` is
    false) or ``ConfigError`` when no keeper can be there."""
    from flyvault.paths import config_file

    path = config_file()
    data = path.read_bytes()
    directory = runtime_dir(create=create)
    return keeper_paths(directory, vault_name, keeper_key(vault_name, path, data))


def spawn(paths: KeeperPaths, vault_name: str, ready_fd: int | None) -> None:
    """Start the keeper process; ``ready_fd`` is the pipe it answers on (None: nobody
    waits, it starts in the background). The keeper detaches itself (its own session, no
    inherited descriptors). Failing to start is logged, never raised: the caller then
    connects directly."""
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)
    ]
    spare = None
    if ready_fd is not None:
        # Only the keeper gets the pipe, as descriptor 3 (dup2 clears close-on-exec there):
        # marking it inheritable would leak it into anything else spawned meanwhile (the
        # MCP server is threaded), and a dead keeper would then not close it.
        if ready_fd == READY_FD:  # dup2 onto itself would keep close-on-exec
            spare = ready_fd = os.dup(ready_fd)
        actions.append((os.POSIX_SPAWN_DUP2, ready_fd, READY_FD))
    argv = [
        sys.executable,
        "-m",
        "flyvault.cli.keeperd",
        vault_name,
        str(paths.socket),
        "-" if ready_fd is None else str(READY_FD),
        str(os.getpid()),
    ]
    env = {k: v for k, v in os.environ.items() if k not in NOT_FOR_KEEPERS}
    # Signals the caller ignores (a background job's SIGINT, nohup's SIGHUP) are the
    # keeper's to handle: back to their defaults. keeperd leaves the caller's session.
    defaults = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
    try:
        pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsigdef=defaults)
    except Exception as exc:
        log.info("the connection keeper could not be started: %s", exc)
        return
    finally:
        if spare is not None:
            os.close(spare)
    # The keeper stays our child (it only leaves our session): reaped when it exits, so a
    # long-lived caller (the MCP server, a long exec) keeps no zombie of it.
    threading.Thread(target=_reap, args=(pid,), name="keeper-reaper", daemon=True).start()


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def start_and_wait(paths: KeeperPaths, vault_name: str, timeout: float = START_TIMEOUT) -> bool:
    """Start the keeper and wait for its answer. True when it listens (this one or one that
    won the race); False (the reason logged) when the caller must connect directly: the
    config says ``mux = false``, or it did not answer in time. A config error the keeper
    found is raised as the direct path would raise it (a bad variable: ``UsageError``)."""
    read_fd, write_fd = os.pipe()
    try:
        spawn(paths, vault_name, write_fd)
    finally:
        os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout)
        reply = os.read(read_fd, 8192) if ready else b"no answer in time"
    finally:
        os.close(read_fd)
    if reply == b"ok":
        return True
    if reply.startswith(b"error:"):
        detail = json.loads(reply[len(b"error:") :])
        code = int(detail.get("exit_code") or 1)
        # A bad variable is a usage error (exit 2, before any connection) wherever found.
        kind = UsageError if code == 2 else VaultError
        error = kind(detail["message"], hint=detail.get("hint"))
        error.exit_code = code
        raise error
    log.info("the connection keeper did not start: %s", reply.decode(errors="replace"))
    return False


def shared_keeper(vault_name: str) -> Path | None:
    """The socket of ``vault_name``'s keeper for a long-lived client (the MCP server with
    ``--share-keeper``): the running one, else one started and waited for. None (the reason
    logged) when there can be none: ``mux = false`` in the config, an unsafe runtime
    directory, a keeper that would not start. Blocking: call it off the event loop."""
    from flyvault.errors import ConfigError

    try:
        paths = locate(vault_name)
    except (OSError, ConfigError) as exc:
        log.info("vault %s: no connection keeper to share: %s", vault_name, exc)
        return None
    if mux_mode() is None or paths.off.exists():
        log.info("vault %s: no connection keeper to share: turned off", vault_name)
        return None
    if alive(str(paths.socket)) or start_and_wait(paths, vault_name):
        return paths.socket
    return None
