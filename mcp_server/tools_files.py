"""File tools: read_file, write_file, edit_file, list_dir, copy_files.

They are thin: every byte goes through ``RemoteFiles`` (``Vault.files``), every copy
through the copy engine (``flyvault.client.copy_engine``), the same calls as ``fly-vault cp``;
the text rules are in ``file_text``. Every result is bounded:

- a read returns at most ``MAX_BYTES`` of content; a file up to ``FULL_READ`` is read whole
  (exact line numbers and total, SHA-256 computed here over the very bytes read); a bigger
  one is streamed only as far as the window needs, and its SHA-256 is computed by the vault;
- ``edit_file`` works on files up to ``FULL_READ`` and returns a diff of at most
  ``file_text.MAX_DIFF_CHARS``;
- ``list_dir`` returns at most ``limit`` entries.

Replacing a file goes through a temporary file and a rename, so the new file would get
default permissions and the caller's owner: the tools carry over the mode (unless one is
given) and, acting as root, the owner of the file they replace, as `cat > file` keeps
them. A symlink is written through (its target changes), never replaced by a file.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fnmatch
import hashlib
import os
import posixpath
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult
from pydantic import Field

from flyvault.client import CopyEndpoint, copy
from flyvault.errors import Conflict, NotFoundError, UsageError, file_error

from .file_text import (
    LineWindow,
    TextSniffer,
    apply_edit,
    count_lines,
    decode_text,
    first_character,
    numbered,
    short_diff,
    tail_lines,
    window_is_text,
)
from .models import CopyResult, DirEntry, DirListing, FileEdited, FileRead, FileWritten
from .progress import Reporter, human_bytes
from .registry import ToolRegistry
from .server import State, structured
from .tools_vault import VaultName

if TYPE_CHECKING:
    from flyvault.client import CopyProgress, FileInfo, ReadAnswer, RemoteFiles, WriteResult

#: Most content bytes one read_file result holds (before base64).
MAX_BYTES = 128 * 1024
#: Files up to this size are read whole by read_file and edit_file.
FULL_READ = 4 * 1024 * 1024
#: A text read of a bigger file stops after streaming this much without filling its window.
MAX_SCAN = 64 * 1024 * 1024
DEFAULT_LINES = 2000
#: Entries asked of the vault for one list_dir (the glob filters them here).
MAX_ENTRIES = 10_000
#: Symlinks followed before a write gives up, as the kernel does (ELOOP).
MAX_LINKS = 40

UserArg = str | None
PathArg = str


#: The file tools, in tools/list order; ``server.build_server`` registers them.
file_tools = ToolRegistry()


# read_file ----------------------------------------------------------------------------


@file_tools.tool("Read file", read_only=True, destructive=False, idempotent=True, open_world=True)
async def read_file(
    state: State,
    vault: VaultName,
    path: PathArg,
    offset: Annotated[
        int,
        Field(description="lines to skip (<0: the last lines); base64: bytes"),
    ] = 0,
    limit: Annotated[
        int | None,
        Field(ge=1, description=f"lines ({DEFAULT_LINES}; a tail: its own); base64: bytes"),
    ] = None,
    encoding: Literal["text", "base64"] = "text",
    user: UserArg = None,
) -> Annotated[CallToolResult, FileRead]:
    """Text with line numbers (not in the file), 128 KiB per call; binary as base64."""
    files = await _files(state, vault, user)
    info = await files.stat(path, follow=True)
    _must_be_file(info, path)
    if encoding == "base64":
        result = await _read_base64(files, vault, info, path, offset, limit)
    else:
        # A tail's lines are the ones it names (-50: 50) unless a limit says fewer.
        lines = limit or (-offset if offset < 0 else DEFAULT_LINES)
        result = await _read_text(files, vault, info, path, offset, lines)
    return structured(result, _read_text_view(result))


async def _read_text(
    files: RemoteFiles, vault: str, info: FileInfo, path: str, offset: int, limit: int
) -> FileRead:
    # Read at most one byte more than a whole read may take: a file that grew past it
    # since the stat (a log being written) goes the bounded way below.
    data, changed = b"", False
    if info.size <= FULL_READ:
        data, changed = await _read_settled(files, path, length=FULL_READ + 1)
    if info.size <= FULL_READ and len(data) <= FULL_READ:
        return _mixed(_read_whole(vault, path, data, offset, limit), changed)
    if info.size <= FULL_READ:  # it grew past a whole read since the stat: its size now
        info = await files.stat(path, follow=True)
    if offset < 0:
        return await _read_big_tail(files, vault, info, path, -offset, limit)
    return await _read_big_head(files, vault, info, path, offset, limit)


def _read_whole(vault: str, path: str, data: bytes, offset: int, limit: int) -> FileRead:
    """A window of a file read whole. A tail of more lines than ``limit`` is the window
    of ``limit`` lines where the tail starts (``offset=-50, limit=10``: 10 lines from the
    50th last)."""
    text = decode_text(data)
    digest = hashlib.sha256(data).hexdigest()
    if text is None:
        return _binary(vault, path, len(data), digest)
    total = count_lines(data)
    if offset < 0 and limit >= -offset:
        picked, cut = tail_lines(data, -offset, MAX_BYTES, from_start=True)
        skipped = total - len(picked)
        return _tail(vault, path, len(data), digest, picked, skipped, total, -offset, cut)
    if offset < 0:
        offset = max(0, total + offset)
    window = LineWindow(offset, limit, MAX_BYTES)
    window.feed(data)
    window.finish()
    cut_at = offset + len(window.lines) if window.cut_line else None
    return _text(vault, path, len(data), digest, window.lines, offset, total, cut_at)


#: Reads of a file that is being written (the vault says so) before the result says so.
SETTLE_READS = 2


async def _read_settled(
    files: RemoteFiles, path: str, *, offset: int = 0, length: int
) -> tuple[bytes, bool]:
    """The bytes, and whether the file was still being written while they were read
    (they may then mix two versions): a read the vault says changed is read again."""
    for _ in range(SETTLE_READS):
        answers: list[ReadAnswer] = []
        chunks = files.read(path, offset=offset, length=length, answers=answers)
        data = b"".join([chunk async for chunk in chunks])
        changed = any(answer.changed for answer in answers)
        if not changed:
            break
    return data, changed


def _mixed(result: FileRead, changed: bool) -> FileRead:
    """A result read while its file was being written says so first in ``next_step``."""
    if not changed:
        return result
    note = (
        "the file was being written while it was read (twice): this content may mix "
        "old and new bytes; read it again once it is quiet"
    )
    step = f"{note}; {result.next_step}" if result.next_step else note
    return result.model_copy(update={"next_step": step})


async def _read_big_head(
    files: RemoteFiles, vault: str, info: FileInfo, path: str, offset: int, limit: int
) -> FileRead:
    """Stream from the start only as far as the window needs (bounded by MAX_SCAN)."""
    window = LineWindow(offset, limit, MAX_BYTES)
    sniffer = TextSniffer()
    scanned = 0
    ended = False
    chunks = files.read(path)
    try:
        async for chunk in chunks:
            scanned += len(chunk)
            if sniffer.feed(chunk) or window.feed(chunk):
                break
            if scanned > MAX_SCAN:
                raise UsageError(
                    f"line offset {offset} of {path} lies beyond the first "
                    f"{MAX_SCAN // (1024 * 1024)} MiB read_file scans",
                    hint="read the tail with a negative offset, or fetch the file with copy_files",
                )
        else:
            ended = True
    finally:
        await _close(chunks)
    digest = await files.sha256(path)
    if sniffer.binary or (ended and sniffer.feed(b"", final=True)):
        return _binary(vault, path, info.size, digest)
    if ended:
        window.finish()
    total = window.seen if ended else None
    cut_at = offset + len(window.lines) if window.cut_line else None
    return _text(vault, path, info.size, digest, window.lines, offset, total, cut_at)


async def _read_big_tail(
    files: RemoteFiles, vault: str, info: FileInfo, path: str, count: int, limit: int
) -> FileRead:
    """The last lines of a file too big to count: read only its last MAX_BYTES."""
    start = max(0, info.size - MAX_BYTES)
    data, changed = await _read_settled(files, path, offset=start, length=MAX_BYTES)
    digest = await files.sha256(path)
    # The first line of the tail is partial (and may start inside a UTF-8 sequence).
    newline = data.find(b"\n")
    if start == 0:
        body = data
    elif newline >= 0:
        body = data[newline + 1 :]
    else:  # no line starts in it: it begins inside a line, maybe inside a character
        body = data[first_character(data) :]
    if decode_text(body) is None:
        return _binary(vault, path, info.size, digest)
    picked, cut = tail_lines(data, count, MAX_BYTES, from_start=start == 0)
    result = _tail(vault, path, info.size, digest, picked, None, None, count, cut, limit)
    return _mixed(result, changed)


async def _read_base64(
    files: RemoteFiles, vault: str, info: FileInfo, path: str, offset: int, limit: int | None
) -> FileRead:
    start = max(0, info.size + offset) if offset < 0 else offset
    length = min(limit or MAX_BYTES, MAX_BYTES)
    data, changed = await _read_settled(files, path, offset=start, length=length)
    whole = start == 0 and len(data) == info.size
    digest = hashlib.sha256(data).hexdigest() if whole else await files.sha256(path)
    end = start + len(data)
    truncated = end < info.size
    result = FileRead(
        vault=vault,
        path=path,
        size=info.size,
        sha256=digest,
        binary=not window_is_text(data, starts_inside=start > 0, ends_inside=end < info.size),
        encoding="base64",
        content=base64.b64encode(data).decode("ascii"),
        first_line=None,
        lines=0,
        total_lines=None,
        byte_offset=start,
        returned_bytes=len(data),
        truncated=truncated,
        next_offset=end if truncated else None,
        next_step=f'more: read_file(encoding="base64", offset={end})' if truncated else None,
    )
    return _mixed(result, changed)


def _binary(vault: str, path: str, size: int, digest: str) -> FileRead:
    return FileRead(
        vault=vault,
        path=path,
        size=size,
        sha256=digest,
        binary=True,
        encoding=None,
        content="",
        first_line=None,
        lines=0,
        total_lines=None,
        byte_offset=None,
        returned_bytes=0,
        truncated=size > 0,
        next_offset=None,
        next_step='binary (NUL bytes or not UTF-8), not shown: read it with encoding="base64", '
        "or fetch it with copy_files",
    )


def _tail(
    vault: str,
    path: str,
    size: int,
    digest: str,
    lines: list[bytes],
    skipped: int | None,
    total: int | None,
    asked: int,
    cut: bool,
    limit: int | None = None,
) -> FileRead:
    """A tail's result (``skipped`` None: a big file's, read from its last MAX_BYTES).
    ``cut``: its one line is only the end of a line longer than MAX_BYTES. Fewer lines
    than ``asked``, with lines before them: the result says where the rest is. More than
    ``limit``: the first ``limit`` of them, and where the later ones are."""
    if skipped is None and limit is not None and limit < asked and 0 < len(lines) < asked:
        # A big file's tail whose lines asked for begin before the last MAX_BYTES: the
        # window of ``limit`` from there is not in what was read. Say where it is instead
        # of showing later lines as if they were it.
        lines = []
    shown = lines if limit is None else lines[:limit]
    result = _text(vault, path, size, digest, shown, skipped, total)
    later = len(lines) - len(shown)
    if later and skipped is None:  # no line numbers: the rest is the last ``later`` lines
        result = result.model_copy(
            update={
                "truncated": True,
                "next_offset": -later,
                "next_step": f"more: read_file(offset={-later})",
            }
        )
    missing = asked - len(lines)
    if cut:
        where = f"line {skipped + 1}" if skipped is not None else "the line shown"
        step = (
            f"{where} is only the end of a line longer than {MAX_BYTES} bytes: read the "
            'line whole with encoding="base64" and byte offsets'
        )
    elif missing > 0 and skipped:
        earlier = min(missing, skipped)
        step = (
            f"the {earlier} lines before did not fit in {MAX_BYTES} bytes: "
            f"read_file(offset={skipped - earlier}, limit={earlier})"
        )
    elif missing > 0 and skipped is None and size > MAX_BYTES:
        step = (
            f"earlier lines lie before the last {MAX_BYTES} bytes this reads of a big file: "
            f"exec tail -n {asked} {path}"
            + (f" | head -n {limit}" if limit is not None and limit < asked else "")
            + ", or copy_files"
        )
    else:
        return result
    return result.model_copy(update={"truncated": True, "next_step": step})


def _text(
    vault: str,
    path: str,
    size: int,
    digest: str,
    lines: list[bytes],
    skipped: int | None,
    total: int | None,
    cut_at: int | None = None,
) -> FileRead:
    """A text result: ``skipped`` lines come before the window (None: unknown); line
    ``cut_at`` (the window's last) was longer than MAX_BYTES and is shown cut."""
    content = b"".join(lines).decode("utf-8")
    first = None if skipped is None else skipped + 1
    after = None if skipped is None else skipped + len(lines)
    truncated = (
        cut_at is not None
        or (total is None and skipped is not None)
        or (after is not None and total is not None and after < total)
    )
    next_step = None
    if cut_at is not None:
        next_step = (
            f"line {cut_at} is longer than {MAX_BYTES} bytes and was cut: "
            'read it with encoding="base64" and a byte offset'
        )
    elif truncated and after is not None:
        next_step = f"more: read_file(offset={after})"
    return FileRead(
        vault=vault,
        path=path,
        size=size,
        sha256=digest,
        binary=False,
        encoding="text",
        content=content,
        first_line=first if lines else None,
        lines=len(lines),
        total_lines=total,
        byte_offset=None,
        returned_bytes=len(content.encode()),
        truncated=truncated,
        next_offset=after if truncated else None,
        next_step=next_step,
    )


def _read_text_view(result: FileRead) -> str:
    """What the model reads: a status line, the content between ``-----`` lines, next."""
    where = f"{result.path} on {result.vault}: {result.size} bytes, sha256 {result.sha256}"
    if result.encoding == "base64":
        start = result.byte_offset or 0
        head = f"{where}; bytes {start}-{start + result.returned_bytes} (base64)"
        body = result.content
    elif result.binary:
        return f"{where}\nnext: {result.next_step}"
    else:
        total = "?" if result.total_lines is None else result.total_lines
        if result.lines and result.first_line is not None:
            span = f"lines {result.first_line}-{result.first_line + result.lines - 1} of {total}"
        elif result.lines:
            span = f"the last {result.lines} lines (line numbers unknown: file over 4 MiB)"
        else:
            span = f"no lines (the file has {total})"
        head = f"{where}; {span}"
        body = numbered(result.content, result.first_line)
    lines = [head, "-----", body, "-----"] if body else [head]
    if result.next_step:
        lines.append(f"next: {result.next_step}")
    return "\n".join(lines)


# write_file, edit_file ----------------------------------------------------------------


@file_tools.tool("Write file", read_only=False, destructive=True, idempotent=True, open_world=True)
async def write_file(
    state: State,
    vault: VaultName,
    path: PathArg,
    content: str,
    encoding: Literal["text", "base64"] = "text",
    mode: Annotated[
        str | None,
        Field(pattern=r"^0?[0-7]{3,4}$", description="octal; default: kept"),
    ] = None,
    make_parents: bool = False,
    user: UserArg = None,
) -> Annotated[CallToolResult, FileWritten]:
    """Create or replace a file atomically."""
    data = _decode_content(content, encoding)
    files = await _files(state, vault, user)
    target, previous = await _resolve(files, path)
    if previous is not None:
        _must_be_file(previous, path)
    new_mode = int(mode, 8) if mode is not None else None
    written = await _replace(files, target, data, previous, new_mode, make_parents, user)
    return structured(
        FileWritten(
            vault=vault,
            path=written.path,
            size=written.size,
            sha256=written.sha256,
            replaced=previous is not None,
        )
    )


@file_tools.tool("Edit file", read_only=False, destructive=True, idempotent=False, open_world=True)
async def edit_file(
    state: State,
    vault: VaultName,
    path: PathArg,
    old_string: str,
    new_string: str,
    replace_all: bool = False,
    user: UserArg = None,
) -> Annotated[CallToolResult, FileEdited]:
    """Replace old_string once (or all: replace_all), atomically."""
    files = await _files(state, vault, user)
    target, info = await _resolve(files, path)
    if info is None:
        raise file_error(path, errno.ENOENT)
    _must_be_file(info, path)
    if info.size > FULL_READ:
        raise UsageError(
            f"{path} is {info.size} bytes; edit_file edits files up to {FULL_READ} bytes",
            hint="change it with exec (sed, a script), or fetch it with copy_files",
        )
    data = await files.read_bytes(target, length=FULL_READ + 1)
    if len(data) > FULL_READ:  # it grew since the stat
        raise UsageError(
            f"{path} grew past {FULL_READ} bytes while edit_file read it; nothing was written",
            hint="change it with exec (sed, a script), or fetch it with copy_files",
        )
    text = decode_text(data)
    if text is None:
        raise UsageError(
            f"{path} is binary; edit_file changes text only",
            hint='replace it whole with write_file(encoding="base64")',
        )
    new_text, count = apply_edit(text, old_string, new_string, replace_all=replace_all, path=path)
    # Compare-and-swap: the vault renames the new text into place only if the file still
    # has the SHA-256 read here, so a change made since the read (by a build, an editor,
    # another agent) is never overwritten, with no window between a check and the write.
    read_digest = hashlib.sha256(data).hexdigest()
    try:
        written = await _replace(
            files, target, new_text.encode(), info, None, False, user, expect_sha256=read_digest
        )
    except Conflict:
        raise Conflict(
            f"{path} changed while edit_file was editing it; nothing was written",
            hint="read it again with read_file and redo the edit",
        ) from None
    result = FileEdited(
        vault=vault,
        path=written.path,
        replacements=count,
        size=written.size,
        sha256=written.sha256,
        diff=short_diff(text, new_text, path),
    )
    view = f"{path} on {vault}: {count} replacement{'s' if count > 1 else ''}, "
    view += f"{written.size} bytes, sha256 {written.sha256}\n{result.diff}"
    return structured(result, view.rstrip("\n"))


def _decode_content(content: str, encoding: str) -> bytes:
    if encoding == "text":
        return content.encode("utf-8")
    try:
        # Line breaks and spaces are dropped first: base64 is often wrapped at 76 columns
        # (base64(1), MIME), and they are never data. Anything else is still refused.
        return base64.b64decode("".join(content.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UsageError(
            f"content is not valid base64: {exc}",
            hint='send the bytes base64-encoded, or text with encoding="text"',
        ) from None


async def _replace(
    files: RemoteFiles,
    path: str,
    data: bytes,
    previous: FileInfo | None,
    mode: int | None,
    make_parents: bool,
    user: str | None,
    *,
    expect_sha256: str | None = None,
) -> WriteResult:
    """Write ``data`` atomically, verified by its SHA-256 on the vault, keeping the
    replaced file's mode and (acting as root) its owner."""
    if mode is None and previous is not None:
        mode = previous.mode
    written = await files.write(
        path,
        data,
        mode=mode,
        make_parents=make_parents,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        expect_sha256=expect_sha256,
    )
    if previous is not None and user in (None, "root"):
        now = await files.stat(path)
        if (now.uid, now.gid) != (previous.uid, previous.gid):
            await files.chown(path, previous.uid, previous.gid)
    return written


async def _resolve(files: RemoteFiles, path: str) -> tuple[str, FileInfo | None]:
    """The path a write lands on (symlinks followed, so a link stays a link) and what is
    there now (None: nothing yet)."""
    current = path
    for _ in range(MAX_LINKS):
        try:
            info = await files.stat(current)
        except NotFoundError:
            return current, None
        if info.kind != "symlink":
            return current, info
        target = info.target if info.target is not None else await files.readlink(current)
        current = posixpath.join(posixpath.dirname(info.path), target)
    raise file_error(path, errno.ELOOP)


# list_dir -----------------------------------------------------------------------------


@file_tools.tool(
    "List directory", read_only=True, destructive=False, idempotent=True, open_world=True
)
async def list_dir(
    state: State,
    vault: VaultName,
    path: PathArg,
    glob: str | None = None,
    limit: Annotated[int, Field(ge=1, le=MAX_ENTRIES)] = 200,
    user: UserArg = None,
) -> Annotated[CallToolResult, DirListing]:
    """Entries: kind, size, mode, mtime, link target."""
    files = await _files(state, vault, user)
    # One more than is searched: a directory of exactly MAX_ENTRIES is listed whole.
    entries = await files.list_dir(path, limit=MAX_ENTRIES + 1)
    listed_all = len(entries) <= MAX_ENTRIES
    entries = entries[:MAX_ENTRIES]
    if glob is not None:
        entries = [e for e in entries if fnmatch.fnmatchcase(e.name, glob)]
    shown = [_entry(e) for e in entries[:limit]]
    return structured(
        DirListing(
            vault=vault,
            path=path,
            entries=shown,
            total=len(entries),
            truncated=len(entries) > limit or not listed_all,
        )
    )


def _entry(info: FileInfo) -> DirEntry:
    mtime = datetime.fromtimestamp(info.mtime_ns / 1e9, UTC)
    return DirEntry(
        name=info.name,
        kind=info.kind,
        size=info.size,
        mode=f"{info.mode:04o}",
        mtime=mtime.isoformat(timespec="seconds").replace("+00:00", "Z"),
        target=info.target,
    )


# copy_files ---------------------------------------------------------------------------


@file_tools.tool("Copy files", read_only=False, destructive=True, idempotent=True, open_world=True)
async def copy_files(
    state: State,
    ctx: Context,
    vault: VaultName,
    source: str,
    destination: str,
    direction: Literal["upload", "download"] = "upload",
    recursive: bool = False,
    preserve: Annotated[bool, Field(description="modes, mtimes")] = False,
    user: UserArg = None,
) -> Annotated[CallToolResult, CopyResult]:
    """Copy files or trees to or from a vault, SHA-256 verified."""
    local_path, remote_path = (source, destination)
    if direction == "download":
        local_path, remote_path = destination, source
    local = _local_path(local_path)
    remote = CopyEndpoint(vault=vault, path=remote_path)
    here = CopyEndpoint(vault=None, path=local)
    src, dst = (here, remote) if direction == "upload" else (remote, here)
    connected = await state.pool.get(vault)
    async with Reporter(ctx) as reporter:

        def on_progress(progress: CopyProgress) -> None:
            reporter.update(progress.bytes_done, progress.bytes_total, _progress_text(progress))

        summary = await copy(
            lambda name: connected,
            [src],
            dst,
            recursive=recursive,
            preserve=preserve,
            user=user,
            on_progress=on_progress,
        )
    return structured(
        CopyResult(
            vault=vault,
            direction=direction,
            source=src.path,
            destination=dst.path,
            files=summary.files,
            dirs=summary.dirs,
            symlinks=summary.symlinks,
            bytes=summary.bytes,
            seconds=summary.seconds,
            resumed_bytes=summary.resumed_bytes,
            verified=summary.verified,
            skipped=list(summary.skipped),
        )
    )


def _local_path(path: str) -> str:
    # "-" is the CLI's stdin/stdout: here stdout is the MCP protocol itself.
    if path == "-" or not path:
        raise UsageError(
            f"local path {path!r} is not a file path",
            hint="give a local file or directory path; standard input and output are "
            "the MCP connection",
        )
    return os.path.abspath(os.path.expanduser(path))


def _progress_text(progress: CopyProgress) -> str:
    done = human_bytes(progress.bytes_done)
    text = f"copying: {done}"
    if progress.bytes_total:
        text += f" of {human_bytes(progress.bytes_total)}"
    if progress.files_total:
        text += f", {progress.files_done}/{progress.files_total} files"
    if progress.current:
        text += f", {progress.current}"
    return text


# shared -------------------------------------------------------------------------------


async def _files(state: State, vault: str, user: str | None) -> RemoteFiles:
    connected = await state.pool.get(vault)
    files: RemoteFiles = connected.files(user)
    return files


def _must_be_file(info: FileInfo, path: str) -> None:
    if info.kind == "dir":
        raise UsageError(f"{path} is a directory", hint="list it with list_dir")
    if info.kind != "file":
        raise UsageError(
            f"{path} is a {info.kind}, not a regular file",
            hint="read_file, write_file and edit_file handle regular files only",
        )


async def _close(chunks: Any) -> None:
    """Stop a read stream early (an async generator holds the vault's stream open)."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


__all__ = ["file_tools"]
