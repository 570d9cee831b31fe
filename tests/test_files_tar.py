"""Tree streams over real QUIC against a host-mode init: tar_get/tar_put round trip of a tree
with symlinks, hardlinks, modes, mtimes, an empty dir and a sparse file; and tar_put refusing
'..', absolute names, symlink escapes, devices and a digest mismatch."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, on_vault

from flyvault.client import MemberDigest
from flyvault.errors import FileOpError, IntegrityError, VaultError
from flyvault.standins import OidcIssuer


def make_tree(root: Path) -> None:
    (root / "app/empty").mkdir(parents=True)
    (root / "app/sub").mkdir()
    (root / "app/sub/data.txt").write_bytes(b"hello tree\n")
    os.chmod(root / "app/sub/data.txt", 0o640)
    os.link(root / "app/sub/data.txt", root / "app/hard.txt")
    (root / "app/link").symlink_to("sub/data.txt")
    with open(root / "app/sparse.bin", "wb") as file:
        file.truncate(8 * 1024 * 1024)
        file.seek(4 * 1024 * 1024)
        file.write(b"middle")
    os.utime(root / "app/sub/data.txt", ns=(1_600_000_000_000_000_000,) * 2)
    os.utime(root / "app/empty", ns=(1_500_000_000_000_000_000,) * 2)


def _round_trip(top: Path, dest: Path, preserve: bool) -> Any:
    """A body for ``on_vault``: tar_get of ``top``, its pieces kept and put into ``dest``."""

    async def body(vault: Any) -> Any:
        files = vault.files()
        pieces = [piece async for piece in files.tar_get([str(top)])]

        async def replay() -> AsyncIterator[Any]:
            for piece in pieces:
                yield piece

        return pieces, await files.tar_put(str(dest), replay(), preserve=preserve)

    return body


def test_tar_get_then_tar_put_round_trips_a_tree(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    source, dest = tmp_path / "src", tmp_path / "dst"
    source.mkdir()
    dest.mkdir()
    make_tree(source)

    pieces, result = on_vault(init_process, issuer, _round_trip(source / "app", dest, True))
    digests = [p for p in pieces if isinstance(p, MemberDigest)]
    assert {d.name for d in digests} == {"app/hard.txt", "app/sparse.bin"}  # first name wins
    assert (result.files, result.symlinks) == (3, 1) and result.dirs == 3  # a hardlink counts
    out = dest / "app"
    assert (out / "sub/data.txt").read_bytes() == b"hello tree\n"
    assert stat.S_IMODE((out / "sub/data.txt").stat().st_mode) == 0o640
    assert (out / "sub/data.txt").stat().st_mtime_ns == 1_600_000_000_000_000_000
    assert (out / "empty").is_dir() and not os.listdir(out / "empty")
    assert (out / "empty").stat().st_mtime_ns == 1_500_000_000_000_000_000
    assert os.readlink(out / "link") == "sub/data.txt"
    assert (out / "hard.txt").stat().st_ino == (out / "sub/data.txt").stat().st_ino
    sparse = (out / "sparse.bin").stat()
    assert sparse.st_size == 8 * 1024 * 1024
    assert sparse.st_blocks * 512 < 1024 * 1024  # holes stayed holes
    assert (source / "app/sparse.bin").read_bytes() == (out / "sparse.bin").read_bytes()


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> list[Any]:
    pieces: list[Any] = []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
            pieces.append(
                buffer.getvalue()[len(b"".join(p for p in pieces if isinstance(p, bytes))) :]
            )
            if info.isreg():
                pieces.append(MemberDigest(info.name, len(data), hashlib.sha256(data).hexdigest()))
    pieces.append(buffer.getvalue()[len(b"".join(p for p in pieces if isinstance(p, bytes))) :])
    return pieces


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info, data


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([_member("../escape.txt")], "'..' component"),
        ([_member("/abs.txt")], "absolute name"),
        (
            [_member("esc", tarfile.SYMTYPE, link="/"), _member("esc/x.txt")],
            "symlink or not a directory",
        ),
        ([_member("null", tarfile.CHRTYPE)], "device node"),
    ],
)
def test_tar_put_refuses_escapes_and_devices(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path, members: list[Any], message: str
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()

    async def body(vault: Any) -> Exception:
        async def pieces() -> AsyncIterator[Any]:
            for piece in _tar(*members):
                yield piece

        with pytest.raises(FileOpError) as caught:
            await vault.files().tar_put(str(dest), pieces())
        return caught.value

    error = on_vault(init_process, issuer, body)
    assert message in str(error)
    assert not (tmp_path / "escape.txt").exists() and not Path("/x.txt").exists()
    assert not Path("/abs.txt").exists()


def _refused_tar_put(
    init_process: InitProcess,
    issuer: OidcIssuer,
    dest: Path,
    pieces: list[Any],
    expected: type[Exception],
) -> Exception:
    """tar_put of ``pieces`` into ``dest``, which must fail with ``expected``."""

    async def body(vault: Any) -> Exception:
        async def source() -> AsyncIterator[Any]:
            for piece in pieces:
                yield piece

        with pytest.raises(expected) as caught:
            await vault.files().tar_put(str(dest), source())
        return caught.value

    return on_vault(init_process, issuer, body)


def test_tar_put_refuses_a_member_whose_digest_does_not_match(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    pieces = _tar(_member("ok.txt", data=b"fine"), _member("bad.txt", data=b"evil"))
    pieces = [
        MemberDigest("bad.txt", 4, "0" * 64)
        if isinstance(p, MemberDigest) and p.name == "bad.txt"
        else p
        for p in pieces
    ]

    error = _refused_tar_put(init_process, issuer, dest, pieces, IntegrityError)
    assert "bad.txt: SHA-256 mismatch" in str(error) and "not stored" in str(error)
    assert (dest / "ok.txt").read_bytes() == b"fine"
    assert sorted(os.listdir(dest)) == ["ok.txt"]  # no temp file, no bad.txt


def test_tar_put_refuses_a_digest_frame_that_is_not_a_member_digest(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    """Init passes a tree's digest frames to the worker still encoded; the worker's strict
    decoding refuses a bad one, and the member it was for is not stored."""
    dest = tmp_path / "dest"
    dest.mkdir()

    class NotADigest(MemberDigest):
        def encode(self) -> bytes:
            return b'{"name": "bad.txt", "size": "four"}'

    pieces = [
        NotADigest(p.name, p.size, p.sha256)
        if isinstance(p, MemberDigest) and p.name == "bad.txt"
        else p
        for p in _tar(_member("ok.txt", data=b"fine"), _member("bad.txt", data=b"evil"))
    ]

    error = _refused_tar_put(init_process, issuer, dest, pieces, VaultError)
    assert "member digest" in str(error), error
    assert (dest / "ok.txt").read_bytes() == b"fine"
    assert sorted(os.listdir(dest)) == ["ok.txt"]


def test_small_files_share_frames_and_their_digests_follow(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    """Small files go several to a DATA frame, each frame followed by the digests of the
    files that ended in it (a frame per file less than a flush after each), and the stream
    still lands every file verified."""
    source, dest = tmp_path / "src", tmp_path / "dst"
    (source / "many").mkdir(parents=True)
    dest.mkdir()
    for index in range(300):
        (source / "many" / f"f{index:03d}").write_bytes(os.urandom(700 + index))

    pieces, result = on_vault(init_process, issuer, _round_trip(source / "many", dest, False))
    data = [piece for piece in pieces if not isinstance(piece, MemberDigest)]
    digests = [piece for piece in pieces if isinstance(piece, MemberDigest)]
    total = sum(len(piece) for piece in data)
    assert len(digests) == 300 and len(data) <= 2 * (total // (256 * 1024) + 1)
    ended = 0  # each digest comes after the data of its file, never before
    with tarfile.open(fileobj=io.BytesIO(b"".join(data))) as archive:
        offsets = {m.name: m.offset_data + m.size for m in archive.getmembers()}
    for piece in pieces:
        if isinstance(piece, MemberDigest):
            assert offsets[piece.name] <= ended
        else:
            ended += len(piece)
    assert result.files == 300
    for index in range(300):
        name = f"many/f{index:03d}"
        assert (dest / name).read_bytes() == (source / name).read_bytes()


def test_files_finished_before_an_error_still_get_their_digests(tmp_path: Path) -> None:
    """tar_get holds the digests of small files for their frame: an error on a later entry
    (a dangling symlink followed) sends what was finished first, so those files land."""
    from flyvault.protocol.files_messages import FileFrame
    from flyvault.server.files_tar import tar_get

    top = tmp_path / "top"
    top.mkdir()
    (top / "a").write_bytes(b"first")
    (top / "b").write_bytes(b"second")
    (top / "c").symlink_to("missing")
    sent: list[tuple[int, bytes]] = []

    class Recorder:  # the worker's channel, as the handler would receive its frames
        def send(self, kind: int, payload: bytes = b"") -> None:
            sent.append((kind, bytes(payload)))

        def result(self, result: dict[str, object]) -> None:
            raise AssertionError("no result after an error")

    with pytest.raises(FileNotFoundError):
        tar_get(Recorder(), [str(top)], follow=True)
    kinds = [kind for kind, _ in sent]
    assert kinds == [FileFrame.DATA, FileFrame.DIGEST, FileFrame.DIGEST]
    names = [MemberDigest.decode(payload).name for kind, payload in sent[1:]]
    assert names == ["top/a", "top/b"]
    with tarfile.open(fileobj=io.BytesIO(sent[0][1]), mode="r|") as archive:
        assert [member.name for member in archive] == ["top", "top/a", "top/b"]


def test_a_local_file_gone_mid_tree_keeps_the_files_sent_before_it(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    """A source file that vanished after the scan stops the upload with its name; the small
    files before it, whose digests were still held for their piece, land all the same (the
    stream is ended, not reset), and nothing of it or after it is stored."""
    from flyvault.client.copy_source import scan, tree_pieces

    top, dest = tmp_path / "tree", tmp_path / "dst"
    top.mkdir()
    dest.mkdir()
    for index in range(20):
        (top / f"a{index:02d}").write_bytes(os.urandom(900))
    (top / "m-gone").write_bytes(b"soon gone")
    (top / "z-after").write_bytes(b"never sent")
    tree = scan([(str(top), "tree")], recursive=True, follow_symlinks=False, preserve=False)
    (top / "m-gone").unlink()

    async def body(vault: Any) -> Any:
        pieces = tree_pieces(tree, MemberDigest, lambda n: None, lambda n: None)
        with pytest.raises(FileOpError, match="m-gone"):
            await vault.files().tar_put(str(dest), pieces)

    on_vault(init_process, issuer, body)
    landed = sorted(path.name for path in (dest / "tree").iterdir())
    assert landed == [f"a{index:02d}" for index in range(20)]
    for index in range(20):
        name = f"a{index:02d}"
        assert (dest / "tree" / name).read_bytes() == (top / name).read_bytes()


class _RecordedChannel:
    """The worker's channel to init, replaying frames (then the handler's end, None)."""

    def __init__(self, pieces: list[Any], *, end: bool) -> None:
        from flyvault.protocol.files_messages import FileFrame

        self.frames: list[tuple[int, bytes]] = [
            (FileFrame.DIGEST, p.encode()) if isinstance(p, MemberDigest) else (FileFrame.DATA, p)
            for p in pieces
        ]
        if end:
            self.frames.append((FileFrame.END, b""))
        self.answers: list[Any] = []

    def receive(self) -> tuple[int, bytes] | None:
        return self.frames.pop(0) if self.frames else None

    def send(self, kind: int, payload: bytes = b"") -> None:
        pass

    def result(self, result: Any) -> None:
        self.answers.append(result)

    def error(self, exc: VaultError) -> None:
        self.answers.append(exc)


def _read_only_dir_tree() -> list[Any]:
    top = tarfile.TarInfo("app")
    top.type, top.mode = tarfile.DIRTYPE, 0o555
    return _tar((top, b""), _member("app/f", data=b"payload"))


@pytest.mark.parametrize("whole", [True, False])
def test_directory_modes_are_set_only_once_the_stream_is_whole(tmp_path: Path, whole: bool) -> None:
    """A stream cut off leaves its directories as made (writable): the same tree sent
    again as a user must not meet a 0555 it set on its way out (EACCES on every file)."""
    from flyvault.protocol.files_messages import FileOp, FileRequest
    from flyvault.server.files_tar import ClientGone, tar_put

    pieces = _read_only_dir_tree()
    channel = _RecordedChannel(pieces if whole else pieces[:2], end=whole)
    request = FileRequest(FileOp.TAR_PUT, path=str(tmp_path))
    if whole:
        tar_put(channel, request, str(tmp_path))
        assert channel.answers[0]["files"] == 1
    else:
        with pytest.raises(ClientGone):
            tar_put(channel, request, str(tmp_path))
    mode = stat.S_IMODE((tmp_path / "app").stat().st_mode)
    assert mode == (0o555 if whole else 0o700)
    # Cut off before its digest, the file was not kept (nor its temp file).
    assert [p.name for p in (tmp_path / "app").iterdir()] == (["f"] if whole else [])


def test_a_file_system_error_names_the_member_not_a_temp_name(tmp_path: Path) -> None:
    from flyvault.protocol.files_messages import FileOp, FileRequest
    from flyvault.server.files_worker import Accounts, Worker

    long = "n" * 300  # over NAME_MAX: the rename from the temp name fails
    channel = _RecordedChannel(
        _tar(_member("app", tarfile.DIRTYPE, b""), _member(f"app/{long}")), end=True
    )
    Worker(channel, FileRequest(FileOp.TAR_PUT, path=str(tmp_path)), Accounts()).run()  # type: ignore[arg-type]
    (error,) = channel.answers
    assert isinstance(error, FileOpError)
    assert error.message == f"{tmp_path}/app/{long}: file name too long (ENAMETOOLONG)"
    assert [p.name for p in (tmp_path / "app").iterdir()] == []  # no temp file left
