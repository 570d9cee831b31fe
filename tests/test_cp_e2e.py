"""``fly-vault cp``'s engine end to end: real QUIC on 127.0.0.1 against a real init in host
mode (so the vault's files are this machine's): round trips, DST semantics, standard input
and output, resume from a verified partial, a dropped connection, a failed verification."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, on_vault

from flyvault.client import CopyEndpoint, CopyProgress, copy, parse_endpoint
from flyvault.errors import FileOpError, IntegrityError, UsageError
from flyvault.standins import OidcIssuer

MiB = 1024 * 1024


def cp(
    init_process: InitProcess, issuer: OidcIssuer, sources: list[str], dest: str, **options: Any
) -> Any:
    def endpoints(vault: Any) -> Awaitable[Any]:
        return copy(
            lambda name: vault,
            [parse_endpoint(text) for text in sources],
            parse_endpoint(dest),
            **options,
        )

    return on_vault(init_process, issuer, endpoints)


def test_a_file_round_trip_binary_empty_and_5_mb(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    payloads = {"bin": bytes(range(256)) * 9, "empty": b"", "big": os.urandom(5 * MiB)}
    for name, data in payloads.items():
        (here / name).write_bytes(data)
    sources = [str(here / name) for name in payloads]
    up = cp(init_process, issuer, sources, f"dev:{there}")  # an existing directory
    assert (up.files, up.bytes, up.verified) == (3, sum(map(len, payloads.values())), True)
    back = here / "back"
    back.mkdir()
    down = cp(init_process, issuer, [f"dev:{there}/{name}" for name in payloads], str(back))
    for name, data in payloads.items():
        assert (there / name).read_bytes() == data
        assert (back / name).read_bytes() == data
    assert down.files == 3 and down.resumed_bytes == 0
    assert not [name for name in os.listdir(back) if name.startswith(".fv-part-")]


def test_files_that_end_in_zero_blocks_keep_their_length_both_ways(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """A download of a file ending in aligned zero blocks (a disk image, a database) lost
    that tail, and said "verified": the digest is of the bytes received, and the writer's
    trailing hole never got its length. A large one in a tree failed every time."""
    here, there = sides
    tree = there / "images"
    tree.mkdir()
    payloads = {
        "tail": os.urandom(60 * 1024) + bytes(8192),
        "zeros": bytes(MiB),
        "large": os.urandom(MiB) + bytes(9 * MiB),  # over LARGE_FILE: goes on its own
    }
    for name, data in payloads.items():
        (tree / name).write_bytes(data)
    single = cp(init_process, issuer, [f"dev:{tree}/tail"], str(here / "tail"))
    assert single.verified and (here / "tail").read_bytes() == payloads["tail"]
    whole = cp(init_process, issuer, [f"dev:{tree}"], str(here), recursive=True)
    assert whole.verified and whole.files == 3
    for name, data in payloads.items():
        copied = here / "images" / name
        assert copied.stat().st_size == len(data), name
        assert copied.read_bytes() == data, name
    back = cp(init_process, issuer, [str(here / "images")], f"dev:{there}/back", recursive=True)
    assert back.verified
    for name, data in payloads.items():
        assert (there / "back" / name).read_bytes() == data, name


def test_a_sparse_file_stays_sparse_on_the_vault(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """An upload wrote every zero: a 100 MiB sparse image became 100 MiB on the vault's
    disk, alone or as a large file of a tree (a download kept its holes)."""
    here, there = sides
    image = here / "images" / "disk.img"
    image.parent.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(40 * MiB)
        handle.seek(20 * MiB)
        handle.write(b"data")
    if image.stat().st_blocks * 512 > MiB:
        pytest.skip("this file system does not keep holes")
    cp(init_process, issuer, [str(image)], f"dev:{there}/single.img")
    cp(init_process, issuer, [str(image.parent)], f"dev:{there}", recursive=True)
    for copied in (there / "single.img", there / "images" / "disk.img"):
        assert copied.stat().st_size == 40 * MiB
        assert copied.stat().st_blocks * 512 < MiB, "the zero blocks became holes"
        with open(copied, "rb") as handle:
            handle.seek(20 * MiB)
            assert handle.read(4) == b"data"


def test_a_file_onto_a_directory_of_its_name_names_that_directory(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """The error named the vault's temporary file (".flyvault-partial-...: is a
    directory"), after the whole file had been sent."""
    here, there = sides
    (here / "f").write_bytes(b"x" * 1000)
    (there / "f").mkdir()
    with pytest.raises(FileOpError) as caught:
        cp(init_process, issuer, [str(here / "f")], f"dev:{there}")
    assert caught.value.message == f"{there}/f: is a directory (EISDIR)"
    assert [p.name for p in there.iterdir()] == ["f"]


def test_a_named_fifo_or_device_is_refused_not_read(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """Without -r, a FIFO blocked the copy for ever and /dev/zero was read until memory
    ran out (a tree skips them with a notice; a named one is an error, as scp's)."""
    here, there = sides
    fifo = here / "fifo"
    os.mkfifo(fifo)
    (here / "ok").write_bytes(b"ok")
    for sources in ([str(fifo)], ["/dev/zero"], [str(here / "ok"), str(fifo)]):
        with pytest.raises(FileOpError, match=r"not a regular file: .*nothing was copied"):
            cp(init_process, issuer, sources, f"dev:{there}")
    assert list(there.iterdir()) == []


def test_a_new_name_and_preserve(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    source = here / "tool"
    source.write_bytes(b"#!/bin/sh\necho hi\n")
    source.chmod(0o751)
    os.utime(source, ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    cp(init_process, issuer, [str(source)], f"dev:{there}/renamed", preserve=True)
    landed = (there / "renamed").stat()
    assert stat.S_IMODE(landed.st_mode) == 0o751
    assert landed.st_mtime_ns == 1_500_000_000_123_456_789
    cp(init_process, issuer, [f"dev:{there}/renamed"], str(here / "again"), preserve=True)
    again = (here / "again").stat()
    assert stat.S_IMODE(again.st_mode) == 0o751
    assert again.st_mtime_ns == 1_500_000_000_123_456_789


def test_remote_dst_semantics(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    (here / "a").write_bytes(b"a")
    (here / "b").write_bytes(b"b")
    with pytest.raises(UsageError, match="several sources need an existing directory"):
        cp(init_process, issuer, [str(here / "a"), str(here / "b")], f"dev:{there}/nodir")
    with pytest.raises(Exception, match="no such directory on the vault"):
        cp(init_process, issuer, [str(here / "a")], f"dev:{there}/nodir/")
    assert os.listdir(there) == []
    (there / "file").write_bytes(b"f")  # a file named as a directory: the kernel's ENOTDIR
    with pytest.raises(FileOpError, match=r"file/: not a directory on the vault \(ENOTDIR\)"):
        cp(init_process, issuer, [str(here / "a")], f"dev:{there}/file/")
    assert os.listdir(there) == ["file"]


def test_standard_input_and_output(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    _, there = sides
    data = os.urandom(MiB + 17)
    cp(init_process, issuer, ["-"], f"dev:{there}/from-stdin", stdin=io.BytesIO(data))
    assert (there / "from-stdin").read_bytes() == data
    out = io.BytesIO()
    summary = cp(init_process, issuer, [f"dev:{there}/from-stdin"], "-", stdout=out)
    assert out.getvalue() == data and summary.bytes == len(data)


def test_a_download_resumes_from_a_verified_partial(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """What an interrupted run left behind is kept when the vault's prefix matches."""
    from flyvault.client.copy_engine import _partial_name

    here, there = sides
    data = os.urandom(3 * MiB)
    (there / "big").write_bytes(data)
    info = os.stat(there / "big")
    dest = here / "big"

    class Info:
        size, mtime_ns = info.st_size, info.st_mtime_ns

    partial = Path(_partial_name(str(there / "big"), Info, str(dest)))
    partial.write_bytes(data[: 2 * MiB])
    summary = cp(init_process, issuer, [f"dev:{there}/big"], str(dest))
    assert dest.read_bytes() == data and not partial.exists()
    assert summary.resumed_bytes == 2 * MiB
    # A partial that does not match the vault's prefix is thrown away, not trusted.
    partial.write_bytes(b"x" * MiB)
    dest.unlink()
    summary = cp(init_process, issuer, [f"dev:{there}/big"], str(dest))
    assert dest.read_bytes() == data and summary.resumed_bytes == 0


def test_a_dropped_connection_mid_file_continues(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    data = os.urandom(6 * MiB)
    (here / "big").write_bytes(data)
    (there / "big").write_bytes(data[::-1])

    async def body(vault: Any) -> list[Any]:
        connection = await vault.connection()
        cut: list[bool] = []

        def progress(state: CopyProgress) -> None:
            if state.bytes_done > 2 * MiB and not cut:
                cut.append(True)
                connection.channel.close_now(reason="test: drop mid-copy")

        summaries = [
            await copy(
                lambda name: vault,
                [CopyEndpoint(None, str(here / "big"))],
                CopyEndpoint("dev", str(there / "up")),
                on_progress=progress,
            )
        ]
        cut.clear()
        connection = await vault.connection()
        summaries.append(
            await copy(
                lambda name: vault,
                [CopyEndpoint("dev", str(there / "big"))],
                CopyEndpoint(None, str(here / "down")),
                on_progress=progress,
            )
        )
        assert cut
        return summaries

    on_vault(init_process, issuer, body)
    assert (there / "up").read_bytes() == data
    assert (here / "down").read_bytes() == data[::-1]


def test_a_failed_verification_keeps_nothing(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """The file changes on the vault while it is copied: the vault says so at the end of
    its read (its size and times moved), so nothing lands and no partial stays."""
    here, there = sides
    source = there / "moving"
    # Far more than every buffer between the vault's reader and this side: the vault is
    # still reading when the change is made.
    source.write_bytes(os.urandom(32 * MiB))
    changed: list[bool] = []

    def progress(state: CopyProgress) -> None:
        if state.bytes_done >= MiB and not changed:
            changed.append(True)
            with open(source, "r+b") as handle:
                handle.seek(0)  # already received: the copy no longer matches
                handle.write(hashlib.sha256(b"other").digest())

    with pytest.raises(IntegrityError, match="changed on the vault while it was copied"):
        cp(init_process, issuer, [f"dev:{source}"], str(here / "moving"), on_progress=progress)
    assert os.listdir(here) == []


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real ENOSPC, not a patched one."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a disk that really fills up) needs root")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tiny)], check=True)
    yield tiny
    subprocess.run(["umount", str(tiny)], check=True)


def test_a_full_local_disk_is_an_error_naming_the_file_and_leaves_no_partial(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path], full_disk: Path
) -> None:
    """It was an OSError's traceback, naming nothing; in a tree, it names the entry."""
    _, there = sides
    (there / "tree").mkdir()
    (there / "tree" / "big").write_bytes(os.urandom(3 * MiB))
    for source, dest, named, options in (
        (f"dev:{there}/tree/big", str(full_disk / "big"), f"{full_disk}/big", {}),
        (f"dev:{there}/tree", str(full_disk), "tree/big", {"recursive": True}),
    ):
        with pytest.raises(FileOpError) as caught:
            cp(init_process, issuer, [source], dest, **options)
        assert caught.value.message == f"{named}: the local disk is full (ENOSPC)"
        assert caught.value.hint is not None and "free some space" in caught.value.hint
        assert not [p for p in full_disk.rglob("*") if p.name.startswith(".fv-part-")]
    assert not (full_disk / "big").exists() and not (full_disk / "tree" / "big").exists()
