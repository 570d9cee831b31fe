"""``ExecRequest``: what the CLI and the MCP server ask a vault to run, checked here.

Callers describe the session (a command, a shell, or a reattach to a named session) and get
a ``UsageError`` for what the vault would refuse anyway, before any connection: an invalid
session id, an empty argv, sizes over the wire limits, a NUL byte the kernel cannot take, a
relative working directory, an invalid user or environment variable name.
The wire message (``OpenSession``) is built from it by ``ExecSession`` only.
"""

from __future__ import annotations

import os
import re
import signal as _signal
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from flyvault.errors import RemoteProtocolError, UsageError
from flyvault.protocol.codec import COMMAND_BYTES
from flyvault.protocol.limits import (
    MAX_ARG_LENGTH,
    MAX_ARGV,
    MAX_CONTEXT_LENGTH,
    MAX_ENV_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_TERM_LENGTH,
    check_cwd,
    check_env,
    check_session_id,
    check_user,
)

if TYPE_CHECKING:
    from flyvault.protocol.console import OpenSession

#: Variable names callers may set: the portable (POSIX) ones. Anything else (a '-', a '.')
#: is a typo more often than not, and shells cannot expand it.
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
T = TypeVar("T")

#: The exit status of exec/connect when fly-vault itself failed or the user left with ``~.``
#: (as ssh's 255): any other status is the remote command's own.
CLIENT_FAILURE = 255
#: The shell's codes for a command that could not be started: not executable, not found.
COMMAND_FAILURES = (126, 127)


def failure_status(error: Exception) -> int:
    """The exit status of ``exec``/``connect`` that failed with ``error``: 126 or 127 when
    the command could not be started (as ssh's remote shell exits), 255 otherwise."""
    code = getattr(error, "exit_code", None)
    return code if code in COMMAND_FAILURES else CLIENT_FAILURE


#: Seconds a remote command that ignored the reader-gone signal gets before SIGTERM.
READER_GONE_GRACE = 2.0
#: ``exec`` exits with this when it stopped following a kept session because the reader
#: of its output left (128 + SIGPIPE, what the shell shows for a writer killed by a pipe).
READER_GONE_EXIT = 141
#: A plain ``exec`` left with a second Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPT_EXIT = 130


def detached_notice(request: ExecRequest, vault: str) -> str:
    """What a second Ctrl-C on a plain ``exec`` says: the command keeps running, and how
    to come back to it or stop it."""
    session = request.session_id
    return (
        f"detached; session {session} keeps running (reattach: fly-vault exec {vault} "
        f"--session {session}; stop: fly-vault kill {vault} {session})"
    )


def reader_gone_signal(request: ExecRequest) -> int:
    """The signal a command gets when the reader of its output left: SIGPIPE, as a local
    writer to a closed pipe gets; SIGHUP for a terminal session, as a vanished terminal
    gives."""
    return int(_signal.SIGHUP if request.pty or request.shell else _signal.SIGPIPE)


#: Terminal rows and columns travel as u16.
MAX_TERMINAL_SIZE = 0xFFFF


def new_session_id(prefix: str = "x") -> str:
    # os.urandom is what secrets.token_hex reads; importing secrets costs ~5 ms at start.
    return f"{prefix}-{os.urandom(8).hex()}"


def valid_session_id(session_id: str) -> str:
    """``session_id`` if the vault would take it, else a ``UsageError`` naming the rule."""
    try:
        return check_session_id(session_id)
    except RemoteProtocolError as exc:
        raise UsageError(exc.message) from None


class ExecRequest:
    """One exec session to open. ``argv`` None without ``shell`` means "reattach only".

    Immutable, compared and hashed by value, like a frozen dataclass; written out by hand
    because importing ``dataclasses`` costs ~10 ms, and the keeper's thin CLI path builds
    one on every ``fly-vault exec``.
    """

    #: The fields, in order (``to_fields``, ``__repr__``, ``__eq__``).
    FIELDS = (
        "session_id",
        "argv",
        "pty",
        "shell",
        "keep",
        "context",
        "term",
        "rows",
        "cols",
        "cwd",
        "env",
        "resume_offset",
        "user",
        "observe",
    )
    __slots__ = FIELDS

    session_id: str
    argv: tuple[str, ...] | None
    pty: bool
    #: A login shell (``bash -l``, else ``sh -l``); ``argv`` is ignored.
    shell: bool
    #: Keep the session after it exits until collected (named sessions).
    keep: bool
    context: str | None
    term: str
    rows: int
    cols: int
    cwd: str | None
    env: tuple[tuple[str, str], ...]
    #: Output bytes already seen: a reattach replays from here.
    resume_offset: int
    #: The account a new session runs as (a name in the vault's /etc/passwd); None: root.
    #: Needs a vault that speaks protocol 4. A reattach keeps the session's own user.
    user: str | None
    #: A read-only reattach: follows the output without displacing the attached client;
    #: sends no input. Needs a vault that speaks protocol 5.
    observe: bool

    def __init__(
        self,
        session_id: str,
        argv: tuple[str, ...] | None = None,
        pty: bool = False,
        shell: bool = False,
        keep: bool = False,
        context: str | None = None,
        term: str = "",
        rows: int = 0,
        cols: int = 0,
        cwd: str | None = None,
        env: tuple[tuple[str, str], ...] = (),
        resume_offset: int = 0,
        user: str | None = None,
        observe: bool = False,
    ) -> None:
        values = locals()
        for name in self.FIELDS:
            object.__setattr__(self, name, values[name])
        self.__post_init__()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ExecRequest is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"ExecRequest is immutable: cannot delete {name!r}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ExecRequest)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"ExecRequest({shown})"

    def __reduce__(self) -> tuple[type[ExecRequest], tuple[object, ...]]:
        # copy.copy and pickle, as a frozen dataclass allowed (slots, no __dict__).
        return (ExecRequest, self._values())

    def __post_init__(self) -> None:
        valid_session_id(self.session_id)
        if self.argv is not None:
            _check_argv(self.argv, self.shell)
        _check_text("context", self.context, MAX_CONTEXT_LENGTH, command_bytes=False)
        _check_text("cwd", self.cwd, MAX_PATH_LENGTH)
        _check_text("term", self.term, MAX_TERM_LENGTH, command_bytes=False)
        _check_env(self.env)
        _usage(check_cwd, self.cwd)
        _usage(check_user, self.user)
        for name, value in (("rows", self.rows), ("cols", self.cols)):
            if not 0 <= value <= MAX_TERMINAL_SIZE:
                raise UsageError(f"exec request: {name} {value} is outside 0-{MAX_TERMINAL_SIZE}")
        if self.resume_offset < 0:
            raise UsageError("exec request: the resume offset cannot be negative")
        if self.observe and self.creates:
            raise UsageError("exec request: a read-only attach cannot start a command")

    @classmethod
    def reattach(cls, session_id: str, offset: int = 0, *, observe: bool = False) -> ExecRequest:
        """Follow an existing session from output ``offset``; never starts a command.
        ``observe``: read-only, beside the attached client instead of taking over."""
        return cls(session_id=session_id, resume_offset=offset, observe=observe)

    @property
    def creates(self) -> bool:
        """Whether this request starts something (a reattach never does)."""
        return self.argv is not None or self.shell

    def to_fields(self) -> dict[str, object]:
        """The request as JSON-able fields (the keeper protocol carries it so)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_fields(cls, fields: object) -> ExecRequest:
        """The inverse of ``to_fields``, checked as any request is (``UsageError``)."""
        if not isinstance(fields, dict) or not set(fields) <= set(cls.FIELDS):
            raise UsageError("exec request: not a set of request fields")
        values = dict(fields)
        if values.get("argv") is not None:
            values["argv"] = tuple(str(arg) for arg in values["argv"])
        values["env"] = tuple((str(name), str(value)) for name, value in values.get("env") or ())
        try:
            return cls(**values)
        except TypeError as exc:
            raise UsageError(f"exec request: {exc}") from None

    def open_session(self) -> OpenSession:
        """The wire message (``flyvault.protocol.console``)."""
        from flyvault.protocol.console import OpenSession

        return OpenSession(
            session_id=self.session_id,
            argv=self.argv,
            pty=self.pty,
            shell=self.shell,
            keep=self.keep,
            context=self.context,
            term=self.term,
            rows=self.rows,
            cols=self.cols,
            cwd=self.cwd,
            env=self.env,
            resume_offset=self.resume_offset,
            user=self.user,
            observe=self.observe,
        )


def _check_argv(argv: tuple[str, ...], shell: bool) -> None:
    if not argv and not shell:
        raise UsageError("argv must not be empty")
    if len(argv) > MAX_ARGV:
        raise UsageError(f"exec request: {len(argv)} arguments, more than {MAX_ARGV}")
    for arg in argv:
        _check_text("an argument", arg, MAX_ARG_LENGTH)


def _check_env(env: tuple[tuple[str, str], ...]) -> None:
    for name, value in env:
        if not ENV_NAME_PATTERN.fullmatch(name):
            raise UsageError(
                f"exec request: invalid environment variable name {name[:40]!r}: use letters, "
                "digits and '_', not starting with a digit"
            )
        _check_text(f"environment variable name {name[:40]!r}", name, MAX_ENV_NAME_LENGTH)
        _check_text(f"environment variable {name[:40]}", value, MAX_ARG_LENGTH)
    _usage(check_env, env)


def _usage(check: Callable[[T], object], value: T | None) -> None:
    """Run a wire check of ``flyvault.protocol.console``; its refusal is a usage error."""
    if value is None:
        return
    try:
        check(value)
    except RemoteProtocolError as exc:
        raise UsageError(f"exec request: {exc.message}") from None


def _check_text(what: str, text: str | None, limit: int, *, command_bytes: bool = True) -> None:
    """Lengths as the wire counts them (UTF-8 bytes); a NUL would cut the string in exec.
    ``command_bytes``: a command line's field (an argument, the directory, a value), whose
    bytes need not be UTF-8; the others (a context label, TERM) are text."""
    if text is None:
        return
    if "\0" in text:
        raise UsageError(f"exec request: {what} contains a NUL byte")
    try:
        size = len(text.encode("utf-8", COMMAND_BYTES if command_bytes else "strict"))
    except UnicodeEncodeError:
        if not command_bytes:
            raise UsageError(
                f"exec request: {what} is not UTF-8 text",
                hint="give it in UTF-8 (a context is a label shown by list-exec)",
            ) from None
        raise UsageError(
            f"exec request: {what} holds a lone surrogate (U+D800-U+DFFF), which is not "
            "text and stands for no byte",
            hint="pass the text itself (a name's own bytes are carried as they are)",
        ) from None
    if size > limit:
        raise UsageError(f"exec request: {what} is {size} bytes, more than {limit}")


__all__ = [
    "CLIENT_FAILURE",
    "ExecRequest",
    "failure_status",
    "new_session_id",
    "valid_session_id",
]
