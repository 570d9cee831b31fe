"""What an exec request may hold: the console stream's limits and checks, on their own.

The vault applies them to every OPEN it decodes (``flyvault.protocol.console``); the client
applies the same ones before connecting (``flyvault.client.exec_request``), so a bad flag is
a usage error at once. This module is light (no codec, no dataclasses), because the
keeper's thin CLI path validates requests with it.
"""

from __future__ import annotations

import re

from flyvault.errors import RemoteProtocolError
from flyvault.protocol.codec import wire_size

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_ARGV = 4096
MAX_ARG_LENGTH = 128 * 1024
MAX_ENV = 1024
MAX_TERM_LENGTH = 64
MAX_PATH_LENGTH = 4096
MAX_CONTEXT_LENGTH = 4096
#: The longest environment variable name the vault reads.
MAX_ENV_NAME_LENGTH = 1024
#: What the names and values of one request's variables may add up to (UTF-8 bytes): well
#: inside the kernel's room for argv and environment together (ARG_MAX, 2 MiB by default).
MAX_ENV_TOTAL = 256 * 1024
#: A user name as useradd takes it (32 characters at most; a trailing '$' is allowed for
#: machine accounts): nothing that could confuse a passwd line or a path.
USER_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")
#: The longest user name the vault reads (more than the pattern allows, so the decoder can
#: name the rule instead of failing on a length).
MAX_USER_LENGTH = 256


def check_user(user: str) -> str:
    """A user name (from the vault's ``/etc/passwd``) as a request may carry it."""
    if not USER_PATTERN.fullmatch(user):
        raise RemoteProtocolError(
            f"invalid user name {user[:40]!r}: use 1-32 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-'"
        )
    return user


def check_cwd(cwd: str) -> str:
    """A working directory must be absolute: relative to what would depend on the vault's
    mode (the server's directory in host mode, ``/`` inside a workload)."""
    if not cwd.startswith("/"):
        raise RemoteProtocolError(f"the working directory {cwd[:80]!r} is not an absolute path")
    if "\0" in cwd:
        raise RemoteProtocolError("the working directory contains a NUL byte")
    return cwd


def check_env(env: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Names without '=' or NUL (the kernel would cut or split them), values without NUL,
    at most ``MAX_ENV`` variables of at most ``MAX_ENV_TOTAL`` bytes together."""
    if len(env) > MAX_ENV:
        raise RemoteProtocolError(f"{len(env)} environment variables, more than {MAX_ENV}")
    total = 0
    for name, value in env:
        if not name or "=" in name or "\0" in name:
            raise RemoteProtocolError(f"invalid environment variable name {name[:40]!r}")
        if "\0" in value:
            raise RemoteProtocolError(f"environment variable {name[:40]} contains a NUL byte")
        total += wire_size(name) + wire_size(value)
    if total > MAX_ENV_TOTAL:
        raise RemoteProtocolError(
            f"the environment variables add up to {total} bytes, more than {MAX_ENV_TOTAL}"
        )
    return env


def check_session_id(session_id: str) -> str:
    """Session ids are 1-128 characters of letters, digits, '.', '_' and '-'."""
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise RemoteProtocolError(
            f"invalid session id {session_id[:40]!r}: use 1-128 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return session_id
