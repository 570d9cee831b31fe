"""Reaching a connection keeper (``flyvault.client.keeper``) from a short-lived CLI process.

This is the thin path: it imports no asyncio, QUIC or crypto, and it does not even parse
the config. A keeper's socket is named by a digest of everything its connection was built
from: the config file's bytes, the vault's name and the ``FLY_VAULT_*`` variables. A keeper
exists under that name only if a CLI call validated exactly that config and started it, so
editing the config (or changing a variable) leads the next call to a new keeper, and the old
one idles out.

Where the sockets live: ``$XDG_RUNTIME_DIR/fly-vault`` (a per-user tmpfs on systemd
systems), else ``/tmp/fly-vault-<uid>``. Either directory must be a real directory (not a
symlink) owned by this user with mode 0700; otherwise the keeper is not used and the reason
is kept for ``fly-vault mux status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flyvault.errors import RemoteProtocolError, VaultError
from flyvault.protocol.mux import (
    MUX_VERSION,
    STDIN_IN_FLIGHT,
    MuxDecoder,
    MuxFrame,
    MuxKind,
    encode,
    encode_json,
)

try:  # CPython's built-in SHA-256: hashlib would load OpenSSL (~3 ms of the thin path)
    from _sha2 import sha256 as _sha256  # type: ignore[import-not-found]  # 3.12+
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from _sha256 import sha256 as _sha256  # type: ignore[import-not-found,no-redef]
    except ImportError:
        from hashlib import sha256 as _sha256  # type: ignore[assignment]

#: AF_UNIX paths are limited to 108 bytes on Linux (104 on macOS), NUL included.
MAX_SOCKET_PATH = 100
#: Secrets of other tools (the MCP server's HTTP bearer token, the admin's tokens): a
#: keeper never needs them, so it is not given them (``keeper_start.spawn``), and they do
#: not name it (an MCP server run with one shares the keeper of a shell without it).
NOT_FOR_KEEPERS = (
    "FLY_VAULT_MCP_TOKEN",
    "FLY_VAULT_ACCESS_TOKEN",
    "FLY_VAULT_USAGE_BEARER_TOKEN",
    "FLY_API_TOKEN",
)
#: Variables that never change what a keeper connects to (they choose whether to use one).
_NOT_KEYED = ("FLY_VAULT_MUX", "FLY_VAULT_MUX_IDLE", *NOT_FOR_KEEPERS)


#: Connecting to a keeper's socket: a live keeper answers at once (a full backlog would
#: block a blocking connect for good).
CONNECT_TIMEOUT = 2.0
#: A keeper accepts (or refuses) a request as soon as it reads it, before acting on it.
#: One that says nothing for this long is hung: an error, not a fallback, because a late
#: ACCEPTED would have the request run twice.
ACCEPT_TIMEOUT = 30.0


class KeeperUnavailable(Exception):
    """No keeper took the request (none runs, it is gone, or it closed before accepting).
    Nothing was done: the caller may start a keeper or connect directly."""


class KeeperPaths:
    """A keeper's files, named by one stem: the socket, its pid file, its log, and the
    ``.off`` mark left when its config says ``mux = false``."""

    __slots__ = ("log", "off", "pid", "socket")

    socket: Path
    pid: Path
    log: Path
    off: Path

    def __init__(self, stem: str) -> None:
        self.socket = Path(f"{stem}.sock")
        self.pid = Path(f"{stem}.pid")
        self.log = Path(f"{stem}.log")
        self.off = Path(f"{stem}.off")

    def __repr__(self) -> str:
        return f"KeeperPaths(socket={self.socket!r})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


def runtime_dir(*, create: bool = True) -> Path:
    """The directory for keeper sockets, created (unless ``create`` is false: then a missing
    one is ``FileNotFoundError``) and checked; ``OSError`` with the reason when it is
    unsafe (then no keeper is used)."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    path = (
        Path(base) / "fly-vault" if os.path.isabs(base) else Path(f"/tmp/fly-vault-{os.getuid()}")
    )
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise OSError(f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise OSError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0700")
    return path


def keeper_key(vault_name: str, config_path: Path, config_bytes: bytes) -> str:
    from flyvault import __version__

    digest = _sha256()
    for part in (f"{__version__}/{MUX_VERSION}", vault_name, str(config_path)):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(config_bytes + b"\0")
    for name in sorted(os.environ):
        if name.startswith("FLY_VAULT_") and name not in _NOT_KEYED:
            digest.update(f"{name}={os.environ[name]}\0".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


def keeper_paths(directory: Path, vault_name: str, key: str) -> KeeperPaths:
    paths = KeeperPaths(f"{directory / vault_name[:40]}-{key}")
    if len(str(paths.socket)) > MAX_SOCKET_PATH:
        raise OSError(
            f"the keeper's socket path {paths.socket} is longer than {MAX_SOCKET_PATH} bytes"
        )
    return paths


class KeeperLink:
    """One request to a keeper over its unix socket (blocking I/O, no asyncio)."""

    def __init__(self, sock: socket.socket, path: Path | None = None) -> None:
        self.sock = sock
        #: The keeper's socket: where a further request about this one goes.
        self.path = path
        self._decoder = MuxDecoder()
        self._frames: list[MuxFrame] = []

    @classmethod
    def open(
        cls, path: Path, op: str, *, answer_timeout: float | None = None, **fields: Any
    ) -> KeeperLink:
        """Connect and have the request accepted; ``KeeperUnavailable`` if nothing took it.
        ``answer_timeout`` bounds the wait for ACCEPTED (``ACCEPT_TIMEOUT`` by default) and
        then each read of the answer (``TimeoutError``); by default those wait for good."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise KeeperUnavailable(f"no keeper at {path}: {exc.strerror or exc}") from None
        link = cls(sock, path)
        try:
            hello = encode_json(MuxKind.HELLO, {"version": MUX_VERSION, "op": op, **fields})
        except VaultError as exc:  # too big for the keeper's frames: go direct
            link.close()
            raise KeeperUnavailable(exc.message) from None
        try:
            sock.settimeout(ACCEPT_TIMEOUT if answer_timeout is None else answer_timeout)
            link.send(hello)
            first = link.receive()
        except TimeoutError:
            link.close()
            raise keeper_silent(
                path, ACCEPT_TIMEOUT if answer_timeout is None else answer_timeout
            ) from None
        except (OSError, RemoteProtocolError) as exc:
            link.close()
            raise KeeperUnavailable(f"the keeper at {path} went away: {exc}") from None
        sock.settimeout(answer_timeout)
        try:
            check_accepted(first, path)
        except BaseException:
            link.close()
            raise
        return link

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def receive(self) -> MuxFrame | None:
        """The next frame; None when the keeper closed its end."""
        while not self._frames:
            data = self.sock.recv(256 * 1024)
            if not data:
                if self._decoder.pending:
                    raise RemoteProtocolError("keeper protocol: the keeper closed mid-frame")
                return None
            self._frames = self._decoder.feed(data)
        return self._frames.pop(0)

    def result(self, on_notice: Callable[[str], None] | None = None) -> Any:
        """Wait for the request's RESULT (its ``value``); its ERROR is raised. Notices on
        the way (a reconnect, the development issuer) go to ``on_notice``."""
        while True:
            frame = self.receive()
            if frame is None:
                raise keeper_lost()
            if frame.kind is MuxKind.ERROR:
                raise error_from(frame)
            if frame.kind is MuxKind.RESULT:
                return frame.json().get("value")
            if frame.kind is MuxKind.NOTICE:
                if on_notice is not None:
                    on_notice(str(frame.json().get("message", "")))
            elif frame.kind is not MuxKind.PROGRESS:
                raise RemoteProtocolError(f"keeper protocol: {frame.kind.name} instead of RESULT")

    def close(self) -> None:
        self.sock.close()


class KeeperOutput:
    """Session output for the CLI's stdout (``fd`` 1) or stderr (``fd`` 2)."""

    __slots__ = ("data", "fd")

    fd: int
    data: bytes

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.data = data

    def __repr__(self) -> str:
        return f"KeeperOutput(fd={self.fd!r}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


class KeeperNotice:
    __slots__ = ("message",)

    message: str

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"KeeperNotice(message={self.message!r})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


class KeeperRaw:
    """Put the terminal in raw mode (``on``) or back."""

    __slots__ = ("on",)

    on: bool

    def __init__(self, on: bool) -> None:
        self.on = on

    def __repr__(self) -> str:
        return f"KeeperRaw(on={self.on!r})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


class KeeperProgress:
    __slots__ = ("done", "phase", "total")

    phase: str
    done: int
    total: int

    def __init__(self, phase: str, done: int, total: int) -> None:
        self.phase = phase
        self.done = done
        self.total = total

    def __repr__(self) -> str:
        return f"KeeperProgress(phase={self.phase!r}, done={self.done!r}, total={self.total!r})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


class KeeperResult:
    __slots__ = ("value",)

    value: Any

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"KeeperResult(value={self.value!r})"

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]


class KeeperStdinTaken:
    """The keeper handed one stdin chunk on: one more may be sent."""

    __slots__ = ()


STDIN_TAKEN = KeeperStdinTaken()

KeeperEvent = (
    KeeperOutput | KeeperNotice | KeeperRaw | KeeperProgress | KeeperResult | KeeperStdinTaken
)


def next_event(link: KeeperLink) -> KeeperEvent | None:
    """What the keeper sent next, for the CLI; None when it is gone. Its ERROR is raised."""
    try:
        frame = link.receive()
    except OSError:
        return None
    if frame is None:
        return None
    kind = frame.kind
    if kind is MuxKind.STDOUT or kind is MuxKind.STDERR:
        return KeeperOutput(1 if kind is MuxKind.STDOUT else 2, frame.payload)
    if kind is MuxKind.NOTICE:
        return KeeperNotice(str(frame.json().get("message", "")))
    if kind is MuxKind.RAW:
        return KeeperRaw(bool(frame.json().get("on")))
    if kind is MuxKind.PROGRESS:
        value = frame.json()
        return KeeperProgress(str(value["phase"]), int(value["done"]), int(value["total"]))
    if kind is MuxKind.RESULT:
        return KeeperResult(frame.json().get("value"))
    if kind is MuxKind.STDIN_TAKEN:
        return STDIN_TAKEN
    if kind is MuxKind.ERROR:
        raise error_from(frame)
    raise RemoteProtocolError(f"keeper protocol: unexpected {kind.name}")


def stdin_frame(data: bytes) -> bytes:
    return encode(MuxKind.STDIN, data)


def stdin_eof_frame() -> bytes:
    return encode(MuxKind.STDIN_EOF)


def resize_frame(rows: int, cols: int) -> bytes:
    return encode_json(MuxKind.RESIZE, {"rows": rows, "cols": cols})


def call(
    path: Path,
    op: str,
    on_notice: Callable[[str], None] | None = None,
    *,
    answer_timeout: float | None = None,
    **fields: Any,
) -> Any:
    """One request and its result (``list``, ``kill``, ``status``, ``stop``, ``ping``).
    With ``answer_timeout``, a keeper silent that long is an error (``keeper_silent``
    before it accepted, ``TimeoutError`` after)."""
    link = KeeperLink.open(path, op, answer_timeout=answer_timeout, **fields)
    try:
        return link.result(on_notice)
    finally:
        link.close()


def check_accepted(first: MuxFrame | None, path: Path) -> None:
    """The keeper's first answer to a HELLO must be ACCEPTED. Nothing (it closed), or a
    refusal of our protocol version (a keeper of another release), is ``KeeperUnavailable``:
    nothing was done, go elsewhere. Any other refusal is raised as the keeper's error."""
    if first is None:
        raise KeeperUnavailable(f"the keeper at {path} closed before accepting")
    if first.kind is MuxKind.ERROR:
        error = error_from(first)
        if "keeper protocol: version" in error.message:
            raise KeeperUnavailable(error.message)
        raise error
    if first.kind is not MuxKind.ACCEPTED:
        raise RemoteProtocolError(f"keeper protocol: {first.kind.name} before ACCEPTED")


def error_from(frame: MuxFrame) -> VaultError:
    """The keeper's ERROR frame as the error the CLI reports (message, hint, exit code)."""
    detail = frame.json()
    error = VaultError(str(detail.get("message") or "the connection keeper failed"))
    error.hint = detail.get("hint")
    error.exit_code = int(detail.get("exit_code") or 1)
    return error


def keeper_silent(path: Path, timeout: float = ACCEPT_TIMEOUT) -> VaultError:
    return VaultError(
        f"the connection keeper at {path} did not answer within {timeout:g} s",
        hint="fly-vault mux stop (it is ended by its PID if it does not answer), or "
        "--no-mux to connect directly",
    )


def keeper_lost() -> VaultError:
    from flyvault.errors import ConnectionLost

    return ConnectionLost(
        "the connection keeper ended in the middle of the request",
        hint="run the command again (a new keeper starts); fly-vault mux status shows keepers",
    )


def keeper_paths_at(socket_path: Path) -> KeeperPaths:
    """The paths of the keeper whose socket is ``socket_path`` (``STEM.sock``)."""
    return KeeperPaths(str(socket_path)[: -len(".sock")])


def keepers(directory: Path) -> Iterator[tuple[KeeperPaths, dict[str, Any]]]:
    """The keepers with a pid file in ``directory``: paths and what the pid file says."""
    for pid_file in sorted(directory.glob("*.pid")):
        paths = KeeperPaths(str(pid_file)[: -len(".pid")])
        try:
            info = json.loads(pid_file.read_text())
        except (OSError, ValueError):
            info = {}
        yield paths, info if isinstance(info, dict) else {}


__all__ = [
    "ACCEPT_TIMEOUT",
    "CONNECT_TIMEOUT",
    "STDIN_IN_FLIGHT",
    "KeeperEvent",
    "KeeperLink",
    "KeeperNotice",
    "KeeperOutput",
    "KeeperPaths",
    "KeeperProgress",
    "KeeperRaw",
    "KeeperResult",
    "KeeperStdinTaken",
    "KeeperUnavailable",
    "call",
    "check_accepted",
    "error_from",
    "keeper_key",
    "keeper_lost",
    "keeper_paths",
    "keeper_paths_at",
    "keeper_silent",
    "keepers",
    "next_event",
    "resize_frame",
    "runtime_dir",
    "stdin_eof_frame",
    "stdin_frame",
]
