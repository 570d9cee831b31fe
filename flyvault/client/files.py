"""``RemoteFiles``: file operations on a vault, one file stream (tag 0x05) per operation.

The wire rules are the sans-I/O ``flyvault.protocol.files.FileClient``; this module is its
glue: it opens a stream on the vault's current connection, writes what the machine queues,
feeds it what the stream delivers and turns its events into return values, iterators and
exceptions (an ERROR frame becomes the class its code declares: ``PathNotFound`` (a
``NotFoundError``), ``FileOpError``, ``IntegrityError``...).

Reconnects: a lost connection is retried (through ``Vault.connection()``) only where that
is safe: read-only operations, a read that resumes after the bytes already yielded, and a
write with a ``resume_key`` (the vault kept the partial; the source is read again and the
verified prefix skipped). Everything else raises ``ConnectionLost``: a rename must not run
twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flyvault.errors import (
    ConnectionLost,
    IntegrityError,
    RemoteProtocolError,
    Timeout,
    TransportError,
    Unsupported,
    UsageError,
)
from flyvault.protocol.constants import (
    END_DIGEST_VERSION,
    FILES_VERSION,
    PROTOCOL_VERSION,
    StreamTag,
)
from flyvault.protocol.files import (
    Answered,
    AnswerTimedOut,
    DataReceived,
    DigestReceived,
    FileClient,
    FileEvent,
    FileState,
    ItemsReceived,
    Ready,
    Refused,
)
from flyvault.protocol.files_messages import (
    EXPECT_ABSENT,
    MAX_DATA,
    MAX_LIST_LIMIT,
    MAX_PATH,
    MAX_RESUME_KEY,
    READING_OPS,
    FileInfo,
    FileKind,
    FileOp,
    FileRequest,
    MemberDigest,
    request_problem,
    result_digest,
    result_int,
    result_str,
    valid_digest,
)

if TYPE_CHECKING:
    from flyvault.transport import QuicStream

    from .vault import Vault

TarPiece = bytes | MemberDigest
#: tar_put hands its queued frames to the stream once per this many bytes: a frame per
#: write cost more than the bytes for a tree of small files.
BATCH = 64 * 1024

__all__ = [
    "EXPECT_ABSENT",
    "FileInfo",
    "FileKind",
    "MemberDigest",
    "ReadAnswer",
    "RemoteFiles",
    "TarPiece",
    "TreeResult",
    "WriteResult",
]


@dataclass(frozen=True)
class WriteResult:
    path: str
    size: int
    #: Hex, computed by the vault over what it stored.
    sha256: str
    #: Bytes not sent because the vault held them verified from an interrupted write
    #: with the same resume key (its READY frame); 0 for a fresh write.
    resumed: int = 0


@dataclass(frozen=True)
class ReadAnswer:
    """What the vault said at the end of one read request (a read that resumes after a
    dropped connection makes one request per connection)."""

    offset: int
    size: int
    #: Hex, of the bytes this request sent; None from a vault before it said so.
    sha256: str | None
    #: The file was written while it was read: what arrived may be a mixture.
    changed: bool


@dataclass(frozen=True)
class TreeResult:
    files: int
    dirs: int
    symlinks: int
    bytes: int


def _loop_time() -> float:
    import asyncio

    return asyncio.get_running_loop().time()


class _Exchange:
    """One operation on one stream: the machine plus the stream."""

    def __init__(self, stream: QuicStream, request: FileRequest) -> None:
        self.stream = stream
        self.machine = FileClient(request, _loop_time())
        self._ended = False
        #: An error kept back by ``next_events`` behind the events before it.
        self._held: Exception | None = None
        #: The vault refused the operation (its ERROR ended the stream).
        self.refused = False
        self.flush()

    def flush(self) -> None:
        data = self.machine.data_to_send()
        end = self.machine.sending_finished and not self._ended
        if not (data or end):
            return
        try:
            self.stream.write(data, end_stream=end)
        except TransportError:
            # The vault answered and stopped reading: only its answer matters now.
            if not data and self.machine.state in (FileState.DONE, FileState.FAILED):
                return
            raise
        finally:
            self._ended = self._ended or end

    async def next_event(self) -> FileEvent:
        self._raise_held()
        while True:
            event = self.machine.next_event(_loop_time())
            if event is not None:
                self.flush()
                if type(event) in _FAILURES:
                    self.refused = type(event) is Refused
                    raise _failure(event)
                return event
            await self._receive()

    async def next_events(self) -> list[FileEvent]:
        """Every event the machine has now, at least one: one clock read and one flush per
        batch (a tree's stream has some 10,000 events). An error (the vault's refusal or
        silence, a frame breaking the protocol) is raised once the events before it were
        returned, so that nothing they finished is lost."""
        self._raise_held()
        while True:
            events: list[FileEvent] = []
            now = _loop_time()
            try:
                while (event := self.machine.next_event(now)) is not None:
                    if type(event) in _FAILURES:
                        self.refused = type(event) is Refused
                        raise _failure(event)
                    events.append(event)
            except Exception as exc:
                if not events:
                    self.flush()
                    raise
                self._held = exc
            if events:
                self.flush()
                return events
            await self._receive()

    def _raise_held(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            raise held

    async def _receive(self) -> None:
        """More of the stream into the machine (or its end), or the machine's timer."""
        import asyncio

        machine = self.machine
        try:
            async with asyncio.timeout_at(machine.next_deadline()):
                data = await self.stream.read()
        except TimeoutError:
            machine.handle_timer(_loop_time())
            return
        if data:
            machine.receive_data(data)
        else:
            machine.receive_eof()

    async def answer(self) -> dict[str, Any]:
        event = await self.next_event()
        if not isinstance(event, Answered):
            raise RemoteProtocolError(f"unexpected {type(event).__name__} in a file answer")
        return event.result

    async def send(self, piece: bytes | MemberDigest) -> None:
        if isinstance(piece, MemberDigest):
            self.machine.send_digest(piece)
        else:
            self.machine.send_data(piece)
        self.flush()
        await self.stream.drain()

    async def send_queued(self) -> None:
        self.flush()
        await self.stream.drain()

    async def refusal_after(self, lost: TransportError) -> Exception:
        """A send failed: the vault may have answered (refused) and stopped reading."""
        try:
            await self.answer()
        except TransportError:
            return lost
        except Exception as exc:
            return exc
        return lost


#: The events that end an exchange with an exception (``_failure``).
_FAILURES = (Refused, AnswerTimedOut)


def _failure(event: FileEvent) -> Exception:
    if isinstance(event, Refused):
        return event.error.to_exception()
    assert isinstance(event, AnswerTimedOut)
    return Timeout(f"the vault did not answer a file operation in {event.seconds:g} s")


def _check_path(path: str, what: str = "path") -> None:
    if not isinstance(path, str) or not path:
        raise UsageError(f"the {what} is empty; name a file on the vault")
    if "\0" in path:
        raise UsageError(f"the {what} {path!r} contains a NUL byte")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise UsageError(f"the {what} is longer than {MAX_PATH} bytes")


def _check_range(offset: int, length: int | None) -> None:
    if offset < 0:
        raise UsageError(f"offset {offset} is negative")
    if length is not None and length < 0:
        raise UsageError(f"length {length} is negative")


def _check_mode(mode: int | None) -> None:
    if mode is not None and not 0 <= mode <= 0o7777:
        raise UsageError(f"mode {mode:o} is not a file mode (0-7777 octal)")


class RemoteFiles:
    """File operations on one vault, acting as root or as ``user`` (see the module doc)."""

    def __init__(self, vault: Vault, user: str | None = None) -> None:
        if user is not None and (not user or "\0" in user or "/" in user or ":" in user):
            raise UsageError(f"invalid user name {user!r}")
        self.vault = vault
        self.user = user

    # The exchange ------------------------------------------------------------------------

    async def _open(self, request: FileRequest) -> tuple[Any, _Exchange]:
        problem = request_problem(request)
        if problem:
            raise UsageError(f"{request.op.value}: {problem}")
        connection = await self.vault.connection()
        version = getattr(connection, "protocol_version", FILES_VERSION)
        if version < FILES_VERSION:
            raise Unsupported(
                f"this vault's init speaks protocol {version}, which has no file stream (file "
                f"operations need protocol {FILES_VERSION}); update the vault's image "
                "(fly-vault-admin tenant update-image)"
            )
        stream = connection.open_stream(StreamTag.FILES)
        return connection, _Exchange(stream, request)

    async def _simple(self, request: FileRequest) -> dict[str, Any]:
        """One request, one answer; read-only ones are retried on a lost connection."""
        while True:
            connection, exchange = await self._open(request)
            answer: dict[str, Any] | None = None
            try:
                answer = await exchange.answer()
                return answer
            except TransportError as exc:
                self.vault.invalidate(connection)
                if request.op not in READING_OPS:
                    raise ConnectionLost(
                        f"the connection was lost during {request.op.value} of "
                        f"{request.path!r}; check the result before repeating it"
                    ) from exc
            finally:
                if answer is None:  # cancelled (a hash of a large file, say), refused, lost
                    _leave(exchange)

    def _request(self, op: FileOp, path: str = "", **fields: Any) -> FileRequest:
        return FileRequest(op, path=path, user=self.user, **fields)

    # Queries -----------------------------------------------------------------------------

    async def stat(self, path: str, *, follow: bool = False) -> FileInfo:
        _check_path(path)
        result = await self._simple(self._request(FileOp.STAT, path, follow=follow))
        return FileInfo.from_json(result.get("info"))

    async def list_dir(self, path: str, *, limit: int = 10_000) -> list[FileInfo]:
        """The directory's entries sorted by name (at most ``limit``)."""
        _check_path(path)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise UsageError(f"limit {limit} is outside 1-{MAX_LIST_LIMIT}")
        request = self._request(FileOp.LIST, path, limit=limit)
        while True:
            connection, exchange = await self._open(request)
            items: list[FileInfo] = []
            answered = False
            try:
                while True:
                    event = await exchange.next_event()
                    if isinstance(event, ItemsReceived):
                        items.extend(event.items)
                        if len(items) > limit:
                            raise RemoteProtocolError(f"the vault listed more than {limit}")
                    elif isinstance(event, Answered):
                        answered = True
                        return items
            except TransportError:
                self.vault.invalidate(connection)
            finally:
                if not answered:
                    _leave(exchange)

    async def read(
        self,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        answers: list[ReadAnswer] | None = None,
    ) -> AsyncIterator[bytes]:
        """The bytes of ``path`` from ``offset`` (at most ``length``), chunk by chunk;
        ``answers`` gets each request's ``ReadAnswer`` once its bytes are all yielded."""
        _check_path(path)
        _check_range(offset, length)
        while True:
            request = self._request(FileOp.READ, path, offset=offset, length=length)
            start = offset
            connection, exchange = await self._open(request)
            answered = False
            try:
                while True:
                    event = await exchange.next_event()
                    if isinstance(event, DataReceived):
                        if length is not None and len(event.data) > length:
                            raise RemoteProtocolError("the vault sent more than was asked")
                        offset += len(event.data)
                        if length is not None:
                            length -= len(event.data)
                        yield event.data
                    elif isinstance(event, Answered):
                        answered = True
                        if answers is not None:
                            answers.append(_read_answer(event.result, start, offset))
                        return
            except TransportError:
                # Resumes after what was yielded: the next request starts there.
                self.vault.invalidate(connection)
            finally:
                if not answered:
                    _leave(exchange)

    async def read_bytes(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        return b"".join([chunk async for chunk in self.read(path, offset=offset, length=length)])

    async def sha256(self, path: str, *, offset: int = 0, length: int | None = None) -> str:
        _check_path(path)
        _check_range(offset, length)
        request = self._request(FileOp.SHA256, path, offset=offset, length=length)
        return result_digest(await self._simple(request))

    async def readlink(self, path: str) -> str:
        _check_path(path)
        return result_str(await self._simple(self._request(FileOp.READLINK, path)), "target")

    # Changes -----------------------------------------------------------------------------

    async def mkdir(
        self, path: str, *, mode: int = 0o755, parents: bool = False, exist_ok: bool = False
    ) -> None:
        _check_path(path)
        _check_mode(mode)
        request = self._request(FileOp.MKDIR, path, mode=mode, parents=parents, exist_ok=exist_ok)
        await self._simple(request)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        _check_path(path)
        await self._simple(self._request(FileOp.REMOVE, path, recursive=recursive))

    async def rename(self, src: str, dst: str) -> None:
        _check_path(src, "source")
        _check_path(dst, "destination")
        await self._simple(self._request(FileOp.RENAME, src, target=dst))

    async def chmod(self, path: str, mode: int) -> None:
        _check_path(path)
        _check_mode(mode)
        await self._simple(self._request(FileOp.CHMOD, path, mode=mode))

    async def chown(self, path: str, uid: int | None = None, gid: int | None = None) -> None:
        _check_path(path)
        for what, value in (("uid", uid), ("gid", gid)):
            if value is not None and not 0 <= value < 2**32 - 1:
                raise UsageError(f"{what} {value} is out of range")
        if uid is None and gid is None:
            raise UsageError("chown needs a uid or a gid")
        await self._simple(self._request(FileOp.CHOWN, path, uid=uid, gid=gid))

    async def set_mtime(self, path: str, mtime_ns: int) -> None:
        _check_path(path)
        if not -(2**63) <= mtime_ns < 2**63:
            raise UsageError(f"mtime {mtime_ns} is out of range")
        await self._simple(self._request(FileOp.SET_MTIME, path, mtime_ns=mtime_ns))

    async def symlink(self, target: str, path: str) -> None:
        _check_path(path)
        _check_path(target, "symlink target")
        await self._simple(self._request(FileOp.SYMLINK, path, target=target))

    # Writing -----------------------------------------------------------------------------

    async def write(
        self,
        path: str,
        source: bytes | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        fsync: bool = False,
        make_parents: bool = False,
        size: int | None = None,
        sha256: str | None = None,
        resume_key: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        expect_sha256: str | None = None,
    ) -> WriteResult:
        """Write ``path`` atomically; see the contract in the module of the copy engine.

        ``expect_sha256`` makes it a compare-and-swap: the SHA-256 ``path`` must have right
        now (``EXPECT_ABSENT``: it must not exist). The vault checks it before the data is
        sent and again right before the rename; otherwise it raises ``Conflict`` and leaves
        the file as it is."""
        _check_path(path)
        _check_mode(mode)
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = bytes(source)
            if size is not None and size != len(source):
                raise UsageError(f"size {size} does not match the {len(source)} bytes given")
            size = len(source)
        if size is not None and size < 0:
            raise UsageError(f"size {size} is negative")
        if sha256 is not None and not valid_digest(sha256):
            raise UsageError("sha256 must be 64 lower-case hex digits")
        if resume_key is not None and not 0 < len(resume_key) <= MAX_RESUME_KEY:
            raise UsageError(f"the resume key must have 1-{MAX_RESUME_KEY} characters")
        if expect_sha256 not in (None, EXPECT_ABSENT) and not valid_digest(str(expect_sha256)):
            raise UsageError(f"expect_sha256 must be 64 lower-case hex digits or {EXPECT_ABSENT!r}")
        request = self._request(
            FileOp.WRITE,
            path,
            mode=mode,
            fsync=fsync,
            parents=make_parents,
            size=size,
            sha256=sha256,
            resume_key=resume_key,
            expect_sha256=expect_sha256,
        )
        while True:
            connection, exchange = await self._open(request)
            try:
                return await self._write_once(
                    exchange, source, path, on_progress, sha256, _end_digest(connection)
                )
            except TransportError as exc:
                self.vault.invalidate(connection)
                if resume_key is None:
                    raise ConnectionLost(
                        f"the connection was lost while writing {path!r}; nothing was stored "
                        "(pass a resume key to continue where it stopped)"
                    ) from exc

    async def _write_once(
        self,
        exchange: _Exchange,
        source: bytes | AsyncIterable[bytes],
        path: str,
        on_progress: Callable[[int], None] | None,
        known: str | None = None,
        end_digest: bool = False,
    ) -> WriteResult:
        """``known``: the caller's SHA-256 of the whole source, which the vault checks the
        bytes against before the rename; then the data is not hashed a second time here.
        Otherwise the data is hashed as it goes, and with ``end_digest`` (a version 7 vault)
        that digest goes with END, so the vault checks it before the rename all the same."""
        event = await exchange.next_event()
        if not isinstance(event, Ready):
            raise RemoteProtocolError(f"expected READY, got {type(event).__name__}")
        have = event.ready.have
        digest = hashlib.sha256()
        try:
            chunks = _chunks(source)
            skipped, rest = await _skip(chunks, have, digest)
        except Exception:
            await _abandon(exchange)
            raise
        start = have if skipped == have and digest.hexdigest() == event.ready.sha256 else 0
        if start == 0 and have:
            digest = hashlib.sha256()
            chunks, rest = _chunks(source), b""
        exchange.machine.resume_at(start, _loop_time())
        exchange.flush()
        done = start
        try:
            hash_sent = digest.update if known is None else _ignore
            if rest:
                await exchange.send(rest)
                hash_sent(rest)
                done += len(rest)
            async for chunk in chunks:
                if not chunk:
                    continue
                await exchange.send(chunk)
                hash_sent(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done)
            trailing = digest.hexdigest() if known is None and end_digest else None
            exchange.machine.finish(_loop_time(), trailing)
            exchange.flush()
        except TransportError as lost:
            raise await exchange.refusal_after(lost) from None
        except Exception:
            await _abandon(exchange)  # the source failed (a local file changed, say)
            raise
        result = await exchange.answer()
        written = WriteResult(
            result_str(result, "path"), result_int(result, "size"), result_digest(result), start
        )
        sent = digest.hexdigest() if known is None else known
        if written.sha256 != sent:
            raise IntegrityError(
                f"{path}: the vault stored data whose SHA-256 ({written.sha256}) differs from "
                f"what was sent ({sent})"
            )
        return written

    def for_bulk(self) -> RemoteFiles:
        """The same operations over a connection of their own when this vault's go through a
        keeper (``Vault.bulk``): for one large file's bytes."""
        bulk = getattr(self.vault, "bulk", None)
        return self if bulk is None else RemoteFiles(bulk(), self.user)

    async def checks_end_digest(self) -> bool:
        """Whether a write without ``sha256`` is still checked by the vault before the
        rename (a version 7 vault takes the digest with END); connects if need be."""
        return _end_digest(await self.vault.connection())

    # Trees -------------------------------------------------------------------------------

    async def tar_get(
        self,
        paths: Sequence[str],
        *,
        follow_symlinks: bool = False,
        defer_above: int | None = None,
        exact_mtimes: bool = False,
    ) -> AsyncIterator[TarPiece]:
        """A pax tar stream of the trees, a MemberDigest after each regular file's data.
        Files above ``defer_above`` bytes come as headers only (``DEFERRED_RECORD``).
        ``exact_mtimes``: nanosecond mtimes in pax records (otherwise whole seconds)."""
        from contextlib import aclosing

        batches = self.tar_get_batches(
            paths,
            follow_symlinks=follow_symlinks,
            defer_above=defer_above,
            exact_mtimes=exact_mtimes,
        )
        async with aclosing(batches):
            async for batch in batches:
                for piece in batch:
                    yield piece

    async def tar_get_batches(
        self,
        paths: Sequence[str],
        *,
        follow_symlinks: bool = False,
        defer_above: int | None = None,
        exact_mtimes: bool = False,
    ) -> AsyncGenerator[list[TarPiece], None]:
        """``tar_get``'s pieces in the lists the stream delivered them in: one step of the
        iterator per batch rather than per piece (a tree of 10,000 small files has a digest
        for each, and a DATA piece per 256 KiB)."""
        if isinstance(paths, str) or not paths:
            raise UsageError("tar_get needs a list of paths")
        for path in paths:
            _check_path(path)
        request = FileRequest(
            FileOp.TAR_GET,
            paths=tuple(paths),
            user=self.user,
            follow=follow_symlinks,
            defer_above=defer_above,
            preserve=exact_mtimes,
        )
        yielded = False
        while True:
            connection, exchange = await self._open(request)
            answered = False
            try:
                while True:
                    pieces: list[TarPiece] = []
                    for event in await exchange.next_events():
                        if type(event) is DataReceived:
                            pieces.append(event.data)
                        elif type(event) is DigestReceived:
                            pieces.append(event.digest)
                        elif type(event) is Answered:
                            answered = True
                    if pieces:
                        yielded = True
                        yield pieces
                    if answered:
                        return
            except Timeout:
                raise
            except TransportError as exc:
                self.vault.invalidate(connection)
                if yielded:  # a tar stream cannot continue half-way: the caller restarts
                    raise ConnectionLost(
                        f"the connection was lost during tar_get of {', '.join(paths)}; the "
                        "tree arrived only in part: fetch it again"
                    ) from exc
                # Nothing was passed on yet: asking again on a new connection is safe.
            finally:
                if not answered:
                    _leave(exchange)

    async def tar_put(
        self,
        dest_dir: str,
        pieces: AsyncIterable[TarPiece],
        *,
        preserve: bool = False,
        fsync: bool = False,
    ) -> TreeResult:
        _check_path(dest_dir, "destination directory")
        request = self._request(FileOp.TAR_PUT, dest_dir, preserve=preserve, fsync=fsync)
        connection, exchange = await self._open(request)
        try:
            try:
                machine = exchange.machine
                async for piece in pieces:
                    if isinstance(piece, MemberDigest):
                        machine.send_digest(piece)
                    else:
                        machine.send_data(piece)  # split into MAX_DATA frames
                    if machine.queued >= BATCH:
                        await exchange.send_queued()
                exchange.machine.finish(_loop_time())
                exchange.flush()
            except TransportError as lost:
                raise await exchange.refusal_after(lost) from None
            except Exception:
                await _abandon(exchange)  # the source failed: what it sent before still lands
                raise
            except BaseException:  # cancelled: nothing awaited, the vault's worker freed now
                exchange.stream.abort()
                raise
            result = await exchange.answer()
        except Timeout:
            exchange.stream.abort()  # the caller may send the tree again: not beside this one
            raise
        except TransportError as exc:
            # Not retried: ``pieces`` cannot be read again from here.
            self.vault.invalidate(connection)
            raise ConnectionLost(
                f"the connection was lost during tar_put into {dest_dir!r}; the files whose "
                "data and digest had arrived are in place, the one in flight was not stored: "
                "send the tree again (files already there are replaced)"
            ) from exc
        return TreeResult(*(result_int(result, n) for n in ("files", "dirs", "symlinks", "bytes")))


def _leave(exchange: _Exchange) -> None:
    """A stream left before its answer (the caller refused an entry, failed, was cancelled
    or closed the iterator; or the stream failed): aborted, so the vault stops sending and
    its worker ends now, not when the connection closes. A long-lived client (the MCP
    server) would otherwise keep one worker and stream per abandoned request. A stream the
    vault ended (its refusal) is left alone: there is nothing to stop."""
    if not exchange.refused:
        exchange.stream.abort()


#: How long a write whose source failed waits for the vault to refuse what it received.
ABANDON_WAIT = 10.0


async def _abandon(exchange: _Exchange) -> None:
    """The source failed in the middle of a write. With a size declared, END now makes the
    vault refuse the short file and remove what it received (a partial left behind would
    never be resumed: the source changed, and so did its resume key). In a tar_put, END
    lands the files whose data and digest were sent, and the vault refuses the rest (the
    stream has no end-of-archive marker). Otherwise the stream is reset (an upload without
    a resume key then leaves nothing either)."""
    import asyncio

    machine = exchange.machine
    ends = machine.request.size is not None or machine.request.op is FileOp.TAR_PUT
    try:
        if machine.may_send and ends:
            machine.finish(_loop_time())
            exchange.flush()
            async with asyncio.timeout(ABANDON_WAIT):
                await exchange.answer()
        else:
            exchange.stream.abort()
    except Exception:  # the refusal expected, or the connection gone: either way, done
        exchange.stream.abort()


def _end_digest(connection: Any) -> bool:
    return bool(getattr(connection, "protocol_version", PROTOCOL_VERSION) >= END_DIGEST_VERSION)


def _read_answer(result: dict[str, Any], start: int, end: int) -> ReadAnswer:
    size = result_int(result, "size")
    if size != end - start:
        raise RemoteProtocolError(f"the vault sent {end - start} bytes and counted {size}")
    digest = result.get("sha256")
    return ReadAnswer(
        start,
        size,
        result_digest(result) if digest is not None else None,
        result.get("changed") is True,
    )


def _ignore(data: bytes) -> None:
    pass


async def _chunks(source: bytes | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), MAX_DATA):
            yield source[start : start + MAX_DATA]
        return
    async for chunk in source:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise UsageError(f"the write source gave {type(chunk).__name__}, not bytes")
        for start in range(0, len(chunk), MAX_DATA):
            yield bytes(chunk[start : start + MAX_DATA])


async def _skip(chunks: AsyncIterator[bytes], count: int, digest: Any) -> tuple[int, bytes]:
    """Consume ``count`` bytes of ``chunks`` into ``digest``; return how many were there
    and what of the last chunk lies past them."""
    seen = 0
    while seen < count:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return seen, b""
        take = min(len(chunk), count - seen)
        digest.update(chunk[:take])
        seen += take
        if take < len(chunk):
            return seen, chunk[take:]
    return seen, b""
