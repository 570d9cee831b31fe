"""Artifacts on this machine: their digest, the members of a tarball checked before
anything is uploaded, and the tarball as the pieces ``RemoteFiles.tar_put`` sends (the
vault extracts them as strictly as any archive, but a bad member is refused here first,
with the plan's line)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import posixpath
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from flyvault.errors import UsageError

CHUNK = 1024 * 1024


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as source:
        while data := source.read(CHUNK):
            sha.update(data)
    return sha.hexdigest()


def open_tar_stream(path: Path) -> IO[bytes]:
    """The uncompressed tar stream of ``path`` (gzip, bzip2, xz or plain)."""
    with open(path, "rb") as probe:
        magic = probe.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def check_members(path: Path, where: str) -> tuple[str, ...]:
    """The members' normalized names; refuses what could land outside the target: absolute
    names, ``..``, links that leave it, device nodes and fifos."""
    names: list[str] = []
    try:
        with open_tar_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                names.append(_checked(member, where))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UsageError(f"{where}: {path} is not a readable tar archive ({exc})") from None
    # The directories an extraction makes for a member even when the archive lists none.
    out: dict[str, None] = {}
    for name in names:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            out.setdefault("/".join(parts[:depth]))
        out.setdefault(name)
    out.pop(".", None)
    return tuple(out)


def _checked(member: tarfile.TarInfo, where: str) -> str:
    name = posixpath.normpath(member.name) if member.name else "."
    if name.startswith("/") or name == ".." or name.startswith("../"):
        raise UsageError(f"{where}: archive member {member.name!r} would land outside extract_to")
    if member.isdev() or member.isfifo():
        raise UsageError(f"{where}: archive member {member.name!r} is a device node or a fifo")
    if member.issym() or member.islnk():
        target = member.linkname
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise UsageError(
                f"{where}: archive member {member.name!r} links to {target!r}, outside extract_to"
            )
    return name


async def tar_pieces(path: Path) -> AsyncIterator[Any]:
    """The archive as ``tar_put`` pieces (headers, data, per-file digests)."""
    from flyvault.client.copy_source import stdin_tree_pieces
    from flyvault.client.files import MemberDigest

    with open_tar_stream(path) as stream:
        async for piece in stdin_tree_pieces(stream, MemberDigest, _ignore, _ignore):
            yield piece


async def file_chunks(path: Path) -> AsyncIterator[bytes]:
    import asyncio

    with open(path, "rb", buffering=0) as source:
        while data := await asyncio.to_thread(source.read, CHUNK):
            yield data


def _ignore(_: Any) -> None:
    return None
