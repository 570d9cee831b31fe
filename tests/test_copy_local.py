"""The local side of ``fly-vault cp`` from a vault: real tar streams, hand-crafted to be
malicious, fed through the copy engine into DST. Each must be refused naming the entry,
with nothing written outside DST; honest trees land with links, modes, times and holes.

The vault side here is a stand-in that serves the tar bytes it is given, with a digest
after each regular file's data, exactly as ``RemoteFiles.tar_get`` yields them; everything
on this side (``copy``, the parser, the extractor) is the real code.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flyvault.client import CopyEndpoint, copy, parse_endpoint
from flyvault.errors import (
    ConnectionLost,
    FileOpError,
    IntegrityError,
    NotFoundError,
    UnsafeEntry,
    UsageError,
)
from flyvault.protocol.tar_stream import TarReader, TarStreamError
from flyvault.sparse import HOLD, SPARSE_BLOCK, SparseWriter

Member = tuple[tarfile.TarInfo, bytes | None]


@dataclass(frozen=True)
class Digest:
    name: str
    size: int
    sha256: str


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: Any) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = fields.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = fields.pop("mtime", 1_600_000_000)
    for key, value in fields.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def tar_bytes(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def pieces(raw: bytes, *, chunk: int = 700, tamper: str | None = None) -> list[Any]:
    """``raw`` cut into ``chunk``-byte pieces with a digest right after each file's data."""
    out: list[Any] = []
    position = 0
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
        cuts = [
            (info.offset_data + info.size, info) for info in archive.getmembers() if info.isreg()
        ]
    for end, info in cuts:
        while position < end:
            step = min(chunk, end - position)
            out.append(raw[position : position + step])
            position += step
        data = raw[info.offset_data : end]
        digest = hashlib.sha256(data).hexdigest()
        if info.name == tamper:
            digest = hashlib.sha256(data + b"x").hexdigest()
        out.append(Digest(info.name, info.size, digest))
    while position < len(raw):
        out.append(raw[position : position + chunk])
        position += chunk
    return out


class TarVault:
    """Serves one tar stream (and the files in it) as a vault's ``RemoteFiles`` would."""

    def __init__(
        self,
        raw: bytes,
        *,
        tamper: str | None = None,
        kinds: dict[str, str] | None = None,
        cut: int | None = None,
        drop_at: int | None = None,
    ) -> None:
        self.raw = raw
        self.cut = len(raw) if cut is None else cut
        #: The first stream is lost (``ConnectionLost``) after this many bytes.
        self.drop_at = drop_at
        self.tamper = tamper
        self.kinds = kinds or {}
        self.asked: list[list[str]] = []

    def files(self, user: str | None = None) -> TarVault:
        return self

    async def stat(self, path: str, *, follow: bool = False) -> Any:
        kind = self.kinds.get(path)
        if kind is None:
            raise NotFoundError(f"{path}: no such file or directory (ENOENT)")
        return _Info(kind)

    async def tar_get(
        self,
        paths: list[str],
        *,
        follow_symlinks: bool = False,
        defer_above: int | None = None,
        exact_mtimes: bool = False,
    ) -> AsyncIterator[Any]:
        self.asked.append(list(paths))
        sent = 0
        drop_at, self.drop_at = self.drop_at, None
        for piece in pieces(self.raw, tamper=self.tamper):
            if drop_at is not None and sent >= drop_at:
                raise ConnectionLost("test: the connection dropped mid-stream")
            if isinstance(piece, bytes):
                piece = piece[: max(self.cut - sent, 0)]
                sent += len(piece)
            if sent >= self.cut and not piece:
                return
            yield piece

    async def tar_get_batches(self, paths: list[str], **options: Any) -> AsyncIterator[Any]:
        """``tar_get``'s pieces in lists of up to three, as the stream's batches come."""
        batch: list[Any] = []
        async for piece in self.tar_get(paths, **options):
            batch.append(piece)
            if len(batch) == 3:
                yield batch
                batch = []
        if batch:
            yield batch


@dataclass
class _Info:
    kind: str


def fetch(raw: bytes, src: str, dest: Path, **options: Any) -> Any:
    vault = TarVault(
        raw,
        tamper=options.pop("tamper", None),
        kinds=options.pop("kinds", None),
        cut=options.pop("cut", None),
        drop_at=options.pop("drop_at", None),
    )
    return asyncio.run(
        copy(
            lambda name: vault,
            [parse_endpoint(f"dev:{src}")],
            CopyEndpoint(None, str(dest)),
            recursive=True,
            **options,
        )
    )


def listing(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


@pytest.fixture
def area(tmp_path: Path) -> tuple[Path, Path]:
    """DST, and a sibling directory that must stay untouched."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    return dest, outside


# -- malicious streams ------------------------------------------------------------------------


def _refused(raw: bytes, area: tuple[Path, Path], entry: str, words: str, **options: Any) -> None:
    dest, outside = area
    with pytest.raises(UnsafeEntry) as caught:
        fetch(raw, "/srv/app", dest, **options)
    assert repr(entry) in caught.value.message and words in caught.value.message
    assert caught.value.exit_code == 7
    assert listing(outside) == set()
    assert not any(".fv-part-" in name for name in listing(dest))


def test_dotdot_is_refused(area: tuple[Path, Path]) -> None:
    raw = tar_bytes([member("app", tarfile.DIRTYPE), member("app/../outside/evil", data=b"x")])
    _refused(raw, area, "app/../outside/evil", "'..'")


def test_absolute_name_is_refused(area: tuple[Path, Path]) -> None:
    target = str(area[1] / "evil")
    raw = tar_bytes([member(target, data=b"x")])
    # tarfile strips nothing: the header really holds the absolute name.
    _refused(raw, area, target, "absolute")


def test_symlink_then_a_file_through_it_is_refused(area: tuple[Path, Path]) -> None:
    raw = tar_bytes(
        [
            member("app", tarfile.DIRTYPE),
            member("app/link", tarfile.SYMTYPE, linkname=str(area[1])),
            member("app/link/evil", data=b"pwned"),
        ]
    )
    _refused(raw, area, "app/link/evil", "symlink")
    assert os.readlink(area[0] / "app" / "link") == str(area[1])  # kept, never followed


def test_an_existing_symlink_in_dst_is_not_followed(area: tuple[Path, Path]) -> None:
    dest, outside = area
    (dest / "app").symlink_to(outside)
    raw = tar_bytes([member("app/evil", data=b"pwned")])
    _refused(raw, area, "app/evil", "symlink")


def test_a_file_over_an_existing_symlink_replaces_the_link_not_its_target(
    area: tuple[Path, Path],
) -> None:
    dest, outside = area
    (dest / "app").mkdir()
    (outside / "victim").write_text("safe")
    (dest / "app" / "file").symlink_to(outside / "victim")
    fetch(tar_bytes([member("app/file", data=b"new")]), "/srv/app", dest)
    assert (outside / "victim").read_text() == "safe"
    assert not (dest / "app" / "file").is_symlink()
    assert (dest / "app" / "file").read_bytes() == b"new"


def test_a_file_over_an_existing_directory_is_refused_and_the_directory_kept(
    area: tuple[Path, Path],
) -> None:
    dest, _ = area
    (dest / "app" / "data").mkdir(parents=True)
    (dest / "app" / "data" / "keep").write_text("mine")
    # A conflict with what is here, not a hostile vault: exit 10 naming the local path.
    for incoming, raw in (
        ("file", tar_bytes([member("app", tarfile.DIRTYPE), member("app/data", data=b"file")])),
        (
            "symlink",
            tar_bytes([member("app", tarfile.DIRTYPE), member("app/data", tarfile.SYMTYPE)]),
        ),
    ):
        with pytest.raises(FileOpError) as caught:
            fetch(raw, "/srv/app", dest)
        assert caught.value.message == (
            f"{dest}/app/data: a directory of that name is here, and the vault's {incoming} "
            "would replace it; nothing was removed"
        )
        assert caught.value.exit_code == 10
        assert (dest / "app" / "data" / "keep").read_text() == "mine"
        assert not any(".fv-part-" in name for name in listing(dest))


def test_a_name_sent_twice_is_the_vaults_doing_not_a_local_conflict(
    area: tuple[Path, Path],
) -> None:
    """A symlink, then a directory of the same name: refused as unsafe (exit 7), as before
    a local entry in the way became a conflict of its own (exit 10)."""
    dest, _ = area
    for first, second in (
        (member("app/x", tarfile.SYMTYPE, linkname="/outside"), member("app/x", tarfile.DIRTYPE)),
        (member("app/x", tarfile.DIRTYPE), member("app/x", data=b"file")),
    ):
        shutil.rmtree(dest / "app", ignore_errors=True)
        raw = tar_bytes([member("app", tarfile.DIRTYPE), first, second])
        _refused(raw, area, "app/x", "this copy made again")


def test_an_entry_a_thousand_levels_below_anything_listed_is_no_recursion_error(
    area: tuple[Path, Path],
) -> None:
    dest, _ = area
    deep = "app/" + "/".join(["d"] * 1500) + "/f"
    try:
        fetch(
            tar_bytes([member("app", tarfile.DIRTYPE), member(deep, data=b"x")]), "/srv/app", dest
        )
        assert (dest / deep).read_bytes() == b"x"
    finally:
        subprocess.run(["rm", "-rf", str(dest / "app")], check=True, timeout=60)


def test_device_node_is_refused(area: tuple[Path, Path]) -> None:
    raw = tar_bytes(
        [
            member("app", tarfile.DIRTYPE),
            member("app/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        ]
    )
    _refused(raw, area, "app/null", "device node")


def test_fifo_is_refused(area: tuple[Path, Path]) -> None:
    raw = tar_bytes([member("app", tarfile.DIRTYPE), member("app/pipe", tarfile.FIFOTYPE)])
    _refused(raw, area, "app/pipe", "FIFO")


def test_setuid_is_refused_without_preserve_as_root(area: tuple[Path, Path]) -> None:
    raw = tar_bytes([member("app", tarfile.DIRTYPE), member("app/su", data=b"#!", mode=0o4755)])
    _refused(raw, area, "app/su", "setuid")
    _refused(tar_bytes([member("app/sg", data=b"#!", mode=0o2755)]), area, "app/sg", "setgid")


@pytest.mark.skipif(os.geteuid() != 0, reason="keeping a setuid bit needs root")
def test_setuid_is_kept_with_preserve_as_root(area: tuple[Path, Path]) -> None:
    raw = tar_bytes([member("app", tarfile.DIRTYPE), member("app/su", data=b"#!", mode=0o4755)])
    fetch(raw, "/srv/app", area[0], preserve=True)
    assert stat.S_IMODE((area[0] / "app" / "su").stat().st_mode) == 0o4755


@pytest.mark.parametrize(
    ("linkname", "words"),
    [
        ("/etc/passwd", "absolute"),
        ("app/../../etc/passwd", "'..'"),
        ("app/never-sent", "not a file of this copy"),
    ],
)
def test_hardlink_outside_the_copy_is_refused(
    area: tuple[Path, Path], linkname: str, words: str
) -> None:
    raw = tar_bytes(
        [member("app", tarfile.DIRTYPE), member("app/h", tarfile.LNKTYPE, linkname=linkname)]
    )
    _refused(raw, area, "app/h", words)


def test_a_top_that_was_not_asked_for_is_refused(area: tuple[Path, Path]) -> None:
    raw = tar_bytes([member("app", tarfile.DIRTYPE), member(".bashrc", data=b"evil")])
    _refused(raw, area, ".bashrc", "not under what was asked for")


def test_a_digest_mismatch_keeps_nothing(area: tuple[Path, Path]) -> None:
    dest, _ = area
    raw = tar_bytes([member("app", tarfile.DIRTYPE), member("app/f", data=b"payload" * 100)])
    with pytest.raises(IntegrityError) as caught:
        fetch(raw, "/srv/app", dest, tamper="app/f")
    assert "app/f" in caught.value.message
    assert listing(dest) == {"app"}  # no file, no temporary


def test_a_truncated_stream_is_refused(area: tuple[Path, Path]) -> None:
    raw = tar_bytes([member("app", tarfile.DIRTYPE), member("app/f", data=b"payload" * 100)])
    with pytest.raises(TarStreamError, match="cut short"):
        fetch(raw, "/srv/app", area[0], cut=raw.index(b"payload") + 300)
    assert not (area[0] / "app" / "f").exists()


def test_a_stream_lost_mid_file_is_asked_again_and_leaves_no_partial_file(
    area: tuple[Path, Path],
) -> None:
    """The file cut off by the loss was being written under a temporary name: the retry
    must remove it, not leave it beside the tree that lands from the second stream."""
    dest, _ = area
    files = [member(f"app/f{n}", data=bytes([n]) * 3000) for n in range(4)]
    raw = tar_bytes([member("app", tarfile.DIRTYPE), *files])
    summary = fetch(raw, "/srv/app", dest, drop_at=raw.index(bytes([2]) * 3000) + 1500)
    assert summary.files == 4
    assert listing(dest) == {"app", "app/f0", "app/f1", "app/f2", "app/f3"}
    assert (dest / "app" / "f2").read_bytes() == bytes([2]) * 3000


def test_a_file_without_its_digest_is_refused() -> None:
    reader = TarReader(expect_digests=True)
    raw = tar_bytes([member("app/f", data=b"x" * 10)])
    reader.feed(raw)
    with pytest.raises(TarStreamError, match="no digest"):
        reader.feed(b"\0" * (5 * 1024 * 1024))
    with pytest.raises(TarStreamError, match="where none was due"):
        TarReader(expect_digests=True).digest("app/f", 1, "0" * 64)


# -- honest trees ---------------------------------------------------------------------------


def _tree() -> list[Member]:
    sparse = b"head" + bytes(3 * 1024 * 1024) + b"tail"
    return [
        member("app", tarfile.DIRTYPE, mode=0o750, mtime=1_500_000_000),
        member("app/empty", data=b""),
        member("app/bin", data=bytes(range(256)) * 40, mode=0o755, mtime=1_400_000_000),
        member("app/sub", tarfile.DIRTYPE, mode=0o700),
        member("app/sub/emptydir", tarfile.DIRTYPE),
        member("app/sub/link", tarfile.SYMTYPE, linkname="../bin"),
        member("app/sub/abs", tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("app/hard", tarfile.LNKTYPE, linkname="app/bin"),
        member("app/sparse", data=sparse),
    ]


def test_a_tree_lands_with_links_modes_times_and_holes(area: tuple[Path, Path]) -> None:
    dest, outside = area
    summary = fetch(tar_bytes(_tree()), "/srv/app", dest, preserve=True)
    app = dest / "app"
    assert (app / "bin").read_bytes() == bytes(range(256)) * 40
    assert (app / "empty").read_bytes() == b""
    assert os.readlink(app / "sub" / "link") == "../bin"
    assert os.readlink(app / "sub" / "abs") == "/etc/passwd"
    assert (app / "hard").stat().st_ino == (app / "bin").stat().st_ino
    assert (app / "sub" / "emptydir").is_dir()
    assert stat.S_IMODE(app.stat().st_mode) == 0o750
    assert stat.S_IMODE((app / "sub").stat().st_mode) == 0o700
    assert (app / "bin").stat().st_mtime == 1_400_000_000
    assert app.stat().st_mtime == 1_500_000_000
    sparse = app / "sparse"
    assert sparse.stat().st_size == 3 * 1024 * 1024 + 8
    assert sparse.read_bytes().endswith(b"tail")
    assert sparse.stat().st_blocks * 512 < 1024 * 1024, "the zero blocks became holes"
    assert (summary.files, summary.dirs, summary.symlinks) == (4, 3, 2)
    assert summary.verified and listing(outside) == set()


def test_without_preserve_modes_follow_the_umask_and_times_are_now(
    area: tuple[Path, Path],
) -> None:
    dest, _ = area
    fetch(tar_bytes(_tree()), "/srv/app", dest)
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((dest / "app" / "bin").stat().st_mode) == 0o755 & ~mask
    assert (dest / "app" / "bin").stat().st_mtime > 1_600_000_000


# -- scp's DST semantics --------------------------------------------------------------------


def test_an_existing_directory_receives_the_tree_under_its_name(area: tuple[Path, Path]) -> None:
    dest, _ = area
    fetch(tar_bytes(_tree()), "/srv/app/", dest)
    assert (dest / "app" / "bin").is_file()


def test_a_new_name_renames_the_top(area: tuple[Path, Path]) -> None:
    dest, _ = area
    fetch(tar_bytes(_tree()), "/srv/app", dest / "renamed")
    assert (dest / "renamed" / "bin").is_file() and not (dest / "app").exists()
    assert os.readlink(dest / "renamed" / "sub" / "link") == "../bin"
    assert (dest / "renamed" / "hard").stat().st_ino == (dest / "renamed" / "bin").stat().st_ino


def test_a_missing_parent_or_trailing_slash_is_refused_before_connecting(tmp_path: Path) -> None:
    asked: list[str] = []

    def vaults(name: str) -> Any:
        asked.append(name)
        raise AssertionError("connected")

    def run(dest: str, count: int = 1) -> None:
        sources = [parse_endpoint(f"dev:/f{index}") for index in range(count)]
        asyncio.run(copy(vaults, sources, parse_endpoint(dest)))

    with pytest.raises(NotFoundError, match="no such directory"):
        run(str(tmp_path / "nope") + "/")
    with pytest.raises(NotFoundError, match="no such directory"):
        run(str(tmp_path / "a" / "b"))
    with pytest.raises(UsageError, match="several sources need an existing directory"):
        run(str(tmp_path / "file"), count=2)
    assert asked == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a", "b"], "neither SRC nor DST is on a vault"),
        (["dev:a", "prod:b"], "copying between vault paths is not supported"),
        (["-", "x", "dev:b"], "'-' (standard input) must be the only SRC"),
        (["dev:a", "prod:b", "."], "same vault"),
        (["dev:a", "dev:b", "-"], "'-' as DST takes one SRC"),
    ],
)
def test_endpoint_errors(argv: list[str], message: str) -> None:
    from flyvault.client import check_endpoints

    endpoints = [parse_endpoint(text) for text in argv]
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_endpoints(endpoints[:-1], endpoints[-1], recursive=False)


@pytest.mark.parametrize(
    ("text", "vault", "path"),
    [
        ("dev:/srv/x", "dev", "/srv/x"),
        ("dev:", "dev", "."),
        ("./a:b", None, "./a:b"),
        ("/abs/a:b", None, "/abs/a:b"),
        ("-", None, "-"),
        ("plain", None, "plain"),
    ],
)
def test_parse_endpoint(text: str, vault: str | None, path: str) -> None:
    assert parse_endpoint(text) == CopyEndpoint(vault, path)


def test_a_bad_vault_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not a vault name"):
        parse_endpoint("b@d:/x")
    with pytest.raises(UsageError, match="not a vault name"):
        parse_endpoint(":/x")


# -- the sparse writer ------------------------------------------------------------------------


@st.composite
def _sparse_cases(draw: st.DrawFn) -> tuple[int, bytes, list[int]]:
    """A starting length, data made of zero and non-zero runs, and a way to cut it."""
    # Whole blocks as often as odd sizes: a file whose end is a run of aligned zero blocks
    # (a disk image, a database) is the case a hole at the end must be kept for.
    sizes = st.integers(1, 3 * SPARSE_BLOCK) | st.integers(1, 24).map(lambda n: n * SPARSE_BLOCK)
    runs = draw(st.lists(st.tuples(st.booleans(), sizes), min_size=0, max_size=40))
    data = b"".join(bytes(size) if zero else b"\x07" * size for zero, size in runs)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return draw(st.sampled_from([0, 1, SPARSE_BLOCK, 5000])), data, cuts


@settings(max_examples=300, deadline=None)
@given(_sparse_cases())
@example((0, b"\x07" * (15 * SPARSE_BLOCK) + bytes(2 * SPARSE_BLOCK), []))  # was cut short
@example((0, bytes(256 * SPARSE_BLOCK), [HOLD]))  # all zeros: was empty
def test_the_sparse_writer_writes_exactly_the_data_in_any_pieces(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[int, bytes, list[int]]
) -> None:
    start, data, cuts = case
    path = tmp_path_factory.mktemp("sparse") / "file"
    prefix = b"p" * start
    path.write_bytes(prefix)
    fd = os.open(path, os.O_RDWR)
    try:
        writer = SparseWriter(fd, start)
        for begin, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            writer.write(data[begin:end])
        assert writer.size == start + len(data)
        writer.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == prefix + data


def _pieces_of(top: Path, name: str) -> list[Any]:
    """``tree_pieces`` of the tree at ``top``; a digest is ("digest", name, size, sha256)."""
    from flyvault.client.copy_source import scan, tree_pieces

    tree = scan([(str(top), name)], recursive=True, follow_symlinks=False, preserve=False)

    async def collect() -> list[Any]:
        return [
            piece
            async for piece in tree_pieces(
                tree, lambda *a: ("digest", *a), lambda n: None, lambda n: None
            )
        ]

    return asyncio.run(collect())


def test_a_long_run_of_links_goes_in_bounded_pieces(tmp_path: Path) -> None:
    """Headers without data between files are sent once they fill a piece: no piece grows
    with the length of the run (it was rebuilt for every header, quadratic in it)."""
    import tarfile as tarfile_module

    from flyvault.client.copy_source import CHUNK

    top = tmp_path / "links"
    top.mkdir()
    for index in range(1500):
        (top / f"l{index:04d}").symlink_to(f"target-{index}")
    (top / "zz-file").write_bytes(b"data")
    pieces = _pieces_of(top, "links")
    data = [piece for piece in pieces if isinstance(piece, bytes)]
    assert max(len(piece) for piece in data) < CHUNK + 4096
    assert [piece for piece in pieces if not isinstance(piece, bytes)] == [
        ("digest", "links/zz-file", 4, hashlib.sha256(b"data").hexdigest())
    ]
    with tarfile_module.open(fileobj=io.BytesIO(b"".join(data))) as archive:
        names = archive.getnames()
    assert len(names) == 1502 and names[-1] == "links/zz-file"


def test_small_files_go_several_to_a_piece_with_their_digests_after(tmp_path: Path) -> None:
    """A tree of small files costs about a frame per file (its digest), not two: the bytes
    go in pieces of about CHUNK, each followed by the digests of the files it ended, and a
    strict reader verifies every file from them."""
    from flyvault.client.copy_source import CHUNK
    from flyvault.protocol.tar_stream import TarReader, Verified

    top = tmp_path / "small"
    top.mkdir()
    for index in range(400):
        (top / f"f{index:03d}").write_bytes(os.urandom(1000 + index))
    pieces = _pieces_of(top, "small")
    data = [piece for piece in pieces if isinstance(piece, bytes)]
    total = sum(len(piece) for piece in data)  # pax headers too, where a uid needs them
    assert len(data) <= total // CHUNK + 2 and max(len(piece) for piece in data) <= CHUNK
    reader = TarReader(expect_digests=True, sender="the test")
    verified = []
    for piece in pieces:
        events = reader.feed(piece) if isinstance(piece, bytes) else reader.digest(*piece[1:])
        verified += [event.name for event in events if isinstance(event, Verified)]
    reader.close()
    assert verified == [f"small/f{index:03d}" for index in range(400)]
