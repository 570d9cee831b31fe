"""``fly-vault cp -r`` end to end: real QUIC on 127.0.0.1 against a real init in host mode
(the vault's files are this machine's). Trees both ways with symlinks, hardlinks, modes,
mtimes, owners, empty directories and sparse files; many small files as one stream (counted
on the client's QUIC connection); large files inside a tree resumed after a dropped
connection; tar streams on standard input and output; DST semantics; the CLI's progress
bar on a real PTY and its JSON summary."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pty
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, InitProcess, on_vault, start_init

from flyvault.client import CopyEndpoint, CopyProgress, check_endpoints, copy, parse_endpoint
from flyvault.client.copy_engine import LARGE_FILE
from flyvault.errors import FileOpError, UsageError
from flyvault.standins import FlyApiSocket, OidcIssuer

MiB = 1024 * 1024
NS = 1_500_000_000_123_456_789
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="owners are kept only as root")


def streams_opened(vault: Any) -> int:
    """Client-initiated bidirectional QUIC streams so far on the vault's connection."""
    connection = vault.current
    return 0 if connection is None else connection.channel.quic.get_next_available_stream_id() // 4


def cp_counting(
    init_process: InitProcess, issuer: OidcIssuer, sources: list[str], dest: str, **options: Any
) -> tuple[Any, int]:
    """The summary, and how many streams the copy opened (after the connection is up)."""

    async def body(vault: Any) -> tuple[Any, int]:
        await vault.connection()
        before = streams_opened(vault)
        summary = await copy(
            lambda name: vault,
            [parse_endpoint(text) for text in sources],
            parse_endpoint(dest),
            **options,
        )
        return summary, streams_opened(vault) - before

    result: tuple[Any, int] = on_vault(init_process, issuer, body)
    return result


def cp(
    init_process: InitProcess, issuer: OidcIssuer, sources: list[str], dest: str, **options: Any
) -> Any:
    return cp_counting(init_process, issuer, sources, dest, **options)[0]


def make_tree(root: Path, *, small_files: int = 0) -> Path:
    """A tree with a bit of everything; mtimes and modes set last."""
    tree = root / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "sub" / "data.bin").write_bytes(bytes(range(256)) * 100)
    (tree / "script").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "script").chmod(0o750)
    (tree / "secret").write_bytes(b"s")
    (tree / "secret").chmod(0o600)
    os.link(tree / "sub" / "data.bin", tree / "hardlink")
    os.symlink("sub/data.bin", tree / "link")
    os.symlink("/nowhere/at/all", tree / "dangling")
    with open(tree / "sub" / "sparse", "wb") as handle:
        handle.write(b"head")
        handle.seek(4 * MiB)
        handle.write(b"tail")
    for index in range(small_files):
        (tree / "sub" / "deeper" / f"f{index:04d}").write_bytes(f"{index}\n".encode())
    (tree / "sub").chmod(0o751)
    for path in [*sorted(tree.rglob("*"), key=lambda p: -len(p.parts)), tree]:
        os.utime(path, ns=(NS, NS), follow_symlinks=False)
    return tree


def describe(tree: Path) -> dict[str, tuple[Any, ...]]:
    """What -p must keep, for comparing two trees."""
    out: dict[str, tuple[Any, ...]] = {}
    for path in sorted(tree.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(tree))
        if stat.S_ISLNK(info.st_mode):
            out[name] = ("link", os.readlink(path), info.st_mtime_ns)
        elif stat.S_ISDIR(info.st_mode):
            out[name] = ("dir", stat.S_IMODE(info.st_mode), info.st_mtime_ns)
        else:
            digest = path.read_bytes()
            out[name] = ("file", stat.S_IMODE(info.st_mode), info.st_mtime_ns, digest)
    return out


def micro(description: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {
        name: (*values[:2], values[2] // 1000, *values[3:]) for name, values in description.items()
    }


def check_tree(source: Path, copied: Path) -> None:
    assert describe(copied) == describe(source)
    assert copied.stat().st_mtime_ns == NS
    # Hardlinks within the copy stay one inode; the sparse file stays sparse.
    assert (copied / "hardlink").stat().st_ino == (copied / "sub" / "data.bin").stat().st_ino
    assert (copied / "sub" / "sparse").stat().st_blocks * 512 < MiB
    assert (copied / "empty").is_dir() and not any((copied / "empty").iterdir())


def test_a_tree_round_trip_keeps_links_modes_mtimes_and_holes_in_one_stream(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    tree = make_tree(here, small_files=300)
    assert (tree / "sub" / "sparse").stat().st_blocks * 512 < MiB  # the filesystem allows it
    up, streams = cp_counting(
        init_process, issuer, [str(tree)], f"dev:{there}", recursive=True, preserve=True
    )
    check_tree(tree, there / "tree")
    assert (up.files, up.dirs, up.symlinks, up.verified) == (305, 4, 2, True)
    # 305 files as one tar stream: a stat of DST and the stream, not a round trip each.
    assert streams <= 3, streams
    back = here / "back"  # a new name: the tree lands as it
    down, streams = cp_counting(
        init_process, issuer, [f"dev:{there}/tree"], str(back), recursive=True, preserve=True
    )
    check_tree(tree, back)
    assert (down.files, down.symlinks) == (305, 2)
    assert streams <= 2, streams
    assert not list(back.rglob(".fv-part-*"))


def test_follow_symlinks_copies_what_they_point_to(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    tree = make_tree(here)
    (tree / "dangling").unlink()
    cp(init_process, issuer, [str(tree)], f"dev:{there}", recursive=True, follow_symlinks=True)
    assert not (there / "tree" / "link").is_symlink()
    assert (there / "tree" / "link").read_bytes() == (tree / "sub" / "data.bin").read_bytes()
    os.symlink("sub/data.bin", there / "tree" / "link2")
    cp(init_process, issuer, [f"dev:{there}/tree"], str(here / "L"), recursive=True)
    assert (here / "L" / "link2").is_symlink()  # without -L: a symlink stays one
    cp(
        init_process,
        issuer,
        [f"dev:{there}/tree"],
        str(here / "F"),
        recursive=True,
        follow_symlinks=True,
    )
    assert not (here / "F" / "link2").is_symlink()
    assert (here / "F" / "link2").read_bytes() == (tree / "sub" / "data.bin").read_bytes()


def test_a_named_symlink_is_followed_and_a_loop_under_l_is_kept_as_a_symlink(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """A download of a symlink named as SRC copied the symlink (an upload follows it, as
    cp -r and scp -r do), and -L walked a symlink back to a directory above it 40 levels
    deep, then failed with ELOOP."""
    here, there = sides
    (there / "L" / "real").mkdir(parents=True)
    (there / "L" / "real" / "f").write_bytes(b"f")
    os.symlink("real", there / "L" / "link")
    os.symlink("..", there / "L" / "real" / "loop")
    cp(init_process, issuer, [f"dev:{there}/L/link"], str(here / "named"), recursive=True)
    assert not (here / "named").is_symlink()
    assert (here / "named" / "f").read_bytes() == b"f"
    assert os.readlink(here / "named" / "loop") == ".."  # not followed without -L
    summary = cp(
        init_process,
        issuer,
        [f"dev:{there}/L"],
        str(here / "F"),
        recursive=True,
        follow_symlinks=True,
    )
    assert (here / "F" / "link" / "f").read_bytes() == b"f"  # followed once
    assert os.readlink(here / "F" / "real" / "loop") == ".."  # the loop: kept as a link
    assert os.readlink(here / "F" / "link" / "loop") == ".."
    assert summary.symlinks == 2


def test_the_vaults_home_as_dot_arrives_under_its_own_name(
    tmp_path: Path,
    fly_api: FlyApiSocket,
    issuer: OidcIssuer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``cp -r VAULT:. DST`` (and ``VAULT:``) was refused as a hostile tree: the client
    named the top "." while the vault sent its entries under "."."""
    home = tmp_path / "home" / "someone"
    (home / "proj").mkdir(parents=True)
    (home / "proj" / "f").write_bytes(b"f")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))  # the vault's user's home: where "." is
    init = start_init(tmp_path, fly_api.path)
    try:
        cp(init, issuer, ["dev:."], str(here), recursive=True)
        assert (here / "someone" / "proj" / "f").read_bytes() == b"f"
        cp(init, issuer, ["dev:"], str(here / "new"), recursive=True)
        assert (here / "new" / "proj" / "f").read_bytes() == b"f"
        cp(init, issuer, ["dev:.."], str(here / "up"), recursive=True)  # home's parent
        assert (here / "up" / "someone" / "proj" / "f").read_bytes() == b"f"
    finally:
        init.stop()
    with pytest.raises(UsageError, match="whole / is not supported"):
        check_endpoints([parse_endpoint("dev:/")], parse_endpoint(str(here)), recursive=True)


def test_a_tree_deeper_than_the_recursion_limit_goes_both_ways(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """A chain of 1,100 directories (2,200 characters, well under PATH_MAX) was a
    RecursionError traceback up, and an "internal error" after 973 directories down."""
    here, there = sides
    depth = 1100
    (here / "deep").mkdir()
    fd = os.open(here / "deep", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):  # pathlib's mkdir(parents=True) recurses too far itself
        os.mkdir("a", dir_fd=fd)
        fd, parent = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(parent)
    os.close(fd)
    (here / "deep" / "/".join(["a"] * depth) / "f").write_bytes(b"bottom")
    try:
        cp(init_process, issuer, [str(here / "deep")], f"dev:{there}", recursive=True)
        landed = there / "deep" / "/".join(["a"] * depth) / "f"
        assert landed.read_bytes() == b"bottom"
        back = here / "back"
        summary = cp(init_process, issuer, [f"dev:{there}/deep"], str(back), recursive=True)
        assert summary.dirs == depth + 1
        assert (back / "/".join(["a"] * depth) / "f").read_bytes() == b"bottom"
    finally:
        # Removed here, by rm (fts walks without recursion): pytest's own clean-up of old
        # temporary directories (shutil.rmtree) fails on such a chain at the next session.
        for chain in (here / "deep", there / "deep", here / "back"):
            subprocess.run(["rm", "-rf", str(chain)], check=True, timeout=60)


def test_tree_dst_semantics_both_ways(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    tree = here / "src"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"f")
    # A new name: the tree is created as it; an existing directory: the tree goes inside.
    cp(init_process, issuer, [str(tree)], f"dev:{there}/new", recursive=True)
    assert (there / "new" / "d" / "f").read_bytes() == b"f"
    cp(init_process, issuer, [str(tree)], f"dev:{there}/new", recursive=True)
    assert (there / "new" / "src" / "d" / "f").read_bytes() == b"f"
    cp(init_process, issuer, [f"dev:{there}/new"], str(here / "down"), recursive=True)
    assert (here / "down" / "d" / "f").read_bytes() == b"f"
    cp(init_process, issuer, [f"dev:{there}/new"], str(here / "down"), recursive=True)
    assert (here / "down" / "new" / "src" / "d" / "f").read_bytes() == b"f"
    # A file where the tree's directory would go is refused both ways, and kept: a
    # download deleted it and put the directory in its place.
    (here / "precious").write_bytes(b"mine")
    with pytest.raises(FileOpError, match="precious: a file of that name is here"):
        cp(init_process, issuer, [f"dev:{there}/new"], str(here / "precious"), recursive=True)
    assert (here / "precious").read_bytes() == b"mine"
    (there / "precious").write_bytes(b"theirs")
    with pytest.raises(FileOpError, match="would replace a file with a directory"):
        cp(init_process, issuer, [str(tree)], f"dev:{there}/precious", recursive=True)
    assert (there / "precious").read_bytes() == b"theirs"


def test_a_tar_stream_on_standard_input_and_output(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    tree = make_tree(here, small_files=20)
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(tree, arcname="tree")
    summary = cp(
        init_process,
        issuer,
        ["-"],
        f"dev:{there}/unpacked",
        recursive=True,
        preserve=True,
        stdin=io.BytesIO(packed.getvalue()),
    )
    assert summary.files == 25
    # Python's tarfile wrote the mtimes as floats: compared to the microsecond.
    assert micro(describe(there / "unpacked" / "tree")) == micro(describe(tree))
    # `tar -C DIR -c .` names its members "./x": accepted as "x".
    dotted = subprocess.run(
        ["tar", "-C", str(tree / "sub"), "-c", "."], capture_output=True, check=True
    ).stdout
    cp(init_process, issuer, ["-"], f"dev:{there}/dotted", recursive=True, stdin=io.BytesIO(dotted))
    assert (there / "dotted" / "deeper" / "f0007").read_bytes() == b"7\n"
    assert (there / "dotted" / "sparse").stat().st_size == 4 * MiB + 4
    out = io.BytesIO()
    cp(init_process, issuer, [f"dev:{there}/unpacked/tree"], "-", recursive=True, stdout=out)
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:") as archive:
        archive.extractall(here / "from-stdout", filter="tar")
    assert (here / "from-stdout" / "tree" / "sub" / "deeper" / "f0019").read_bytes() == b"19\n"
    assert os.readlink(here / "from-stdout" / "tree" / "link") == "sub/data.bin"


def big_tree(root: Path) -> tuple[Path, bytes]:
    tree = root / "big"
    (tree / "inner").mkdir(parents=True)
    for index in range(50):
        (tree / f"small{index:02d}").write_bytes(os.urandom(1000))
    data = os.urandom(LARGE_FILE + 3 * MiB)
    (tree / "inner" / "large").write_bytes(data)
    (tree / "inner" / "large").chmod(0o750)  # fetched apart from the stream: its mode too
    return tree, data


def test_a_large_file_in_a_tree_resumes_after_a_dropped_connection(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """The large file leaves the tar stream: after the drop, the vault (up) or this side
    (down) keeps the verified prefix and only the rest crosses the wire again."""
    here, there = sides
    tree, data = big_tree(here)

    async def body(vault: Any) -> list[Any]:
        summaries = []
        for sources, dest in (
            ([CopyEndpoint(None, str(tree))], CopyEndpoint("dev", str(there))),
            ([CopyEndpoint("dev", str(there / "big"))], CopyEndpoint(None, str(here / "down"))),
        ):
            connection = await vault.connection()
            cut: list[int] = []

            def progress(
                state: CopyProgress, connection: Any = connection, cut: list[int] = cut
            ) -> None:
                if state.bytes_done > 50_000 + 4 * MiB and not cut:
                    cut.append(state.bytes_done)
                    connection.channel.close_now(reason="test: drop mid-copy")

            summaries.append(
                await copy(lambda name: vault, sources, dest, recursive=True, on_progress=progress)
            )
            assert cut
        return summaries

    up, down = on_vault(init_process, issuer, body)
    umask = os.umask(0)
    os.umask(umask)
    for copied in (there / "big", here / "down"):
        assert (copied / "inner" / "large").read_bytes() == data
        assert stat.S_IMODE((copied / "inner" / "large").stat().st_mode) == 0o750 & ~umask
        assert len(list(copied.iterdir())) == 51
        assert not [p for p in copied.rglob(".fv-part-*")]
        assert not [p for p in copied.rglob(".flyvault-partial-*")]
    for summary in (up, down):
        assert summary.files == 51 and summary.verified
        assert 0 < summary.resumed_bytes < len(data), summary


def test_a_second_run_resumes_a_large_file_of_a_tree(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """The first run is interrupted mid-file (Ctrl-C cancels the copy's task); the second
    run continues from the partial file the first left beside the final name."""
    here, there = sides
    tree, data = big_tree(there)
    dest = here / "big"  # DST `here` exists in both runs: the same names, the same partial

    async def interrupted(vault: Any) -> None:
        task: asyncio.Task[Any] | None = None

        def interrupt(state: CopyProgress) -> None:
            if state.bytes_done > 50_000 + 5 * MiB and task is not None:
                task.cancel()

        task = asyncio.ensure_future(
            copy(
                lambda name: vault,
                [CopyEndpoint("dev", str(tree))],
                CopyEndpoint(None, str(here)),
                recursive=True,
                on_progress=interrupt,
            )
        )
        with pytest.raises(asyncio.CancelledError):
            await task

    on_vault(init_process, issuer, interrupted)
    assert not (dest / "inner" / "large").exists()
    assert next((dest / "inner").iterdir()).name.startswith(".fv-part-")
    summary = cp(init_process, issuer, [f"dev:{tree}"], str(here), recursive=True)
    assert (dest / "inner" / "large").read_bytes() == data
    assert 5 * MiB <= summary.resumed_bytes < len(data)
    assert not list(dest.rglob(".fv-part-*"))


@root_only
def test_owners_with_p_as_root_both_ways(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    tree = make_tree(here)
    for path in [tree, *tree.rglob("*")]:
        os.chown(path, 1234, 1234, follow_symlinks=False)
    (tree / "single").write_bytes(b"one")
    os.chown(tree / "single", 1235, 1236)
    cp(init_process, issuer, [str(tree)], f"dev:{there}", recursive=True, preserve=True)
    cp(init_process, issuer, [str(tree / "single")], f"dev:{there}/single", preserve=True)

    async def owners(vault: Any) -> dict[str, tuple[int, int]]:
        files = vault.files()
        names = ["tree", "tree/sub/data.bin", "tree/link", "tree/empty", "single"]
        infos = {name: await files.stat(f"{there}/{name}") for name in names}
        return {name: (info.uid, info.gid) for name, info in infos.items()}

    seen = on_vault(init_process, issuer, owners)
    assert seen == {
        "tree": (1234, 1234),
        "tree/sub/data.bin": (1234, 1234),
        "tree/link": (1234, 1234),
        "tree/empty": (1234, 1234),
        "single": (1235, 1236),
    }
    # The reverse: owned by others on the vault, kept here with -p, not without.
    os.chown(there / "tree" / "secret", 2345, 2346)
    os.chown(there / "single", 2347, 2348)
    cp(init_process, issuer, [f"dev:{there}/tree"], str(here / "p"), recursive=True, preserve=True)
    cp(init_process, issuer, [f"dev:{there}/single"], str(here / "p1"), preserve=True)
    assert (here / "p" / "secret").stat().st_uid == 2345
    assert (here / "p" / "secret").stat().st_gid == 2346
    assert (here / "p" / "sub" / "data.bin").stat().st_uid == 1234
    assert os.lstat(here / "p" / "link").st_uid == 1234
    assert ((here / "p1").stat().st_uid, (here / "p1").stat().st_gid) == (2347, 2348)
    cp(init_process, issuer, [f"dev:{there}/tree"], str(here / "nop"), recursive=True)
    assert (here / "nop" / "secret").stat().st_uid == os.geteuid()


# -- the command line ----------------------------------------------------------------------


def write_config(port: int, issuer: OidcIssuer) -> None:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "fly-vault" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[vault.dev]\naddress = "127.0.0.1:{port}"\norg = "test-org"\napp = "test-app"\n'
        f'access_token = "{TOKEN}"\noidc_issuer_url = "{issuer.base_url}"\n'
    )


def test_cli_progress_on_a_terminal_none_when_piped_and_the_json_summary(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    here, there = sides
    write_config(init_process.port, issuer)
    tree = make_tree(here, small_files=10)
    command = [sys.executable, "-m", "flyvault.cli.main", "cp", "-r", "-p"]
    # Standard error on a real terminal: the bar is drawn, then its line ended.
    master, slave = pty.openpty()
    try:
        process = subprocess.run(
            [*command, str(tree), f"dev:{there}/t1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=60,
            check=False,
        )
        os.close(slave)
        slave = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert process.returncode == 0, drawn
    text = drawn.decode()
    assert "\r\x1b[K" in text and "MB" in text and "files 15/15" in text, text
    assert process.stdout == b""
    # Piped: no bar at all; --json prints one summary line.
    piped = subprocess.run(
        [*command, "--json", str(tree), f"dev:{there}/t2"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert b"\r" not in piped.stderr and b"MB" not in piped.stderr, piped.stderr
    record = json.loads(piped.stdout)
    assert record == {
        "files": 15,
        "dirs": 4,
        "symlinks": 2,
        "bytes": record["bytes"],
        "seconds": record["seconds"],
        "resumed_bytes": 0,
        "verified": True,
        "skipped": [],
    }
    assert (
        record["bytes"]
        == sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
        - (tree / "hardlink").stat().st_size
    )
    assert isinstance(record["seconds"], float)
    assert describe(there / "t2") == describe(tree)


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found |= {int(child) for child in listing.read().split()}
    return found


async def _settles(check: Any, seconds: float = 10.0) -> bool:
    """``check()`` becomes true within ``seconds`` of the loop's clock (polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_an_abandoned_read_frees_the_vaults_worker_and_stream(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """A tree refused part-way (a FIFO, sorted first, then 48 MiB the vault cannot send
    before the client reads it) and a file read left after its first chunk: both streams
    are aborted at once, so the vault's worker ends, instead of waiting, blocked on flow
    control, until the connection closes (a long-lived client keeps it for hours)."""
    here, there = sides
    tree = there / "tree"
    (tree / "a").mkdir(parents=True)
    os.mkfifo(tree / "a" / "fifo")
    for n in range(12):
        (tree / f"f{n:02d}").write_bytes(os.urandom(4 * MiB))
    large = there / "large"  # more than any window: its worker waits for the reader
    large.write_bytes(os.urandom(48 * MiB))
    init_pid = init_process.process.pid

    async def body(vault: Any) -> list[str]:
        from flyvault.errors import UnsafeEntry

        await vault.connection()
        workers = _children(init_pid)
        streams = vault.current.channel._streams
        failures = []
        with pytest.raises(UnsafeEntry, match="FIFO"):
            await copy(
                lambda name: vault,
                [parse_endpoint(f"dev:{tree}")],
                CopyEndpoint(None, str(here)),
                recursive=True,
            )
        if not await _settles(lambda: not streams and _children(init_pid) == workers):
            failures.append(f"tree: streams {list(streams)}, workers {_children(init_pid)}")
        chunks = vault.files().read(str(large))
        assert len(await chunks.__anext__()) > 0
        assert _children(init_pid) != workers  # the read's worker, serving
        await chunks.aclose()
        if not await _settles(lambda: not streams and _children(init_pid) == workers):
            failures.append(f"read: streams {list(streams)}, workers {_children(init_pid)}")
        return failures

    assert on_vault(init_process, issuer, body) == []
    assert not list(here.rglob(".fv-part-*"))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory a user other than root may write into (tmp_path's parents are 0700)."""
    import pwd
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("acting as another user (nobody) needs root")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("needs the user nobody")
    path = Path(tempfile.mkdtemp(prefix="fv-shared-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_users_upload_error_names_the_entry_not_a_temp_name_or_a_later_error(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path], shared_dir: Path
) -> None:
    """nobody may not write into root's ``tree``: the error names the file it could not
    create. It named the directory's bare leaf with the EPERM of the mode set on the way
    out, which hid the EACCES (and a temp file's name where that did not happen)."""
    here, _ = sides
    (here / "tree").mkdir()
    (here / "tree" / "f").write_bytes(b"x" * 100)
    (shared_dir / "tree").mkdir(mode=0o755)
    with pytest.raises(FileOpError) as caught:
        cp(
            init_process,
            issuer,
            [str(here / "tree")],
            f"dev:{shared_dir}",
            recursive=True,
            user="nobody",
        )
    assert caught.value.message == f"{shared_dir}/tree/f: permission denied (EACCES)"


def test_a_users_tree_sent_again_after_a_drop_lands_under_its_read_only_directory(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path], shared_dir: Path
) -> None:
    """A user's tree cut off mid-stream is sent again and lands whole, its directory
    read-only only at the end. (Whether the cut-off stream's worker or the new one runs
    first is the vault's timing; ``test_files_tar``'s directory mode test pins the rule
    that keeps the order from mattering: a cut-off stream sets no directory modes.)"""
    here, _ = sides
    tree = here / "tree"
    tree.mkdir()
    for n in range(40):
        (tree / f"f{n:02d}").write_bytes(os.urandom(64 * 1024))
    tree.chmod(0o555)

    async def body(vault: Any) -> Any:
        connection = await vault.connection()
        cut: list[int] = []

        def progress(state: CopyProgress) -> None:
            if state.bytes_done > MiB and not cut:
                cut.append(state.bytes_done)
                connection.channel.close_now(reason="test: drop mid-copy")

        summary = await copy(
            lambda name: vault,
            [CopyEndpoint(None, str(tree))],
            CopyEndpoint("dev", str(shared_dir)),
            recursive=True,
            user="nobody",
            on_progress=progress,
        )
        assert cut
        return summary

    try:
        summary = on_vault(init_process, issuer, body)
    finally:
        tree.chmod(0o755)
    assert summary.files == 40
    landed = shared_dir / "tree"
    assert stat.S_IMODE(landed.stat().st_mode) == 0o555
    assert sorted(p.name for p in landed.iterdir()) == [f"f{n:02d}" for n in range(40)]


@root_only
def test_a_users_large_file_lands_under_its_read_only_directory(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path], shared_dir: Path
) -> None:
    """The stream set ``ro``'s 0555 before the large file went, so nobody's copy of it was
    refused (EACCES), and every retry too."""
    here, _ = sides
    tree = here / "P"
    (tree / "ro" / "deeper").mkdir(parents=True)
    data = os.urandom(LARGE_FILE + 1)
    (tree / "ro" / "big").write_bytes(data)
    (tree / "ro" / "deeper" / "big2").write_bytes(data)
    (tree / "ro" / "small").write_bytes(b"s")
    for directory in (tree / "ro" / "deeper", tree / "ro"):
        directory.chmod(0o555)
    try:
        for preserve in (False, True):
            dest = f"dev:{shared_dir}/{'p' if preserve else 'n'}"
            summary = cp(
                init_process,
                issuer,
                [str(tree)],
                dest,
                recursive=True,
                user="nobody",
                preserve=preserve,
            )
            landed = shared_dir / ("p" if preserve else "n")
            assert summary.files == 3
            assert (landed / "ro" / "big").read_bytes() == data
            assert (landed / "ro" / "deeper" / "big2").read_bytes() == data
            for directory in (landed / "ro", landed / "ro" / "deeper"):
                assert stat.S_IMODE(directory.stat().st_mode) == 0o555
        # A large file that fails (a directory where it goes) leaves the modes restored.
        (shared_dir / "f" / "P" / "ro" / "big").mkdir(parents=True)
        with pytest.raises(FileOpError, match="is a directory"):
            cp(init_process, issuer, [str(tree)], f"dev:{shared_dir}/f", recursive=True)
        for directory in (shared_dir / "f" / "P" / "ro", shared_dir / "f" / "P" / "ro" / "deeper"):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o555
    finally:
        for directory in (tree / "ro", tree / "ro" / "deeper"):
            directory.chmod(0o755)


def test_a_request_given_up_while_the_vaults_worker_is_blocked_ends_that_worker(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """A hash of a FIFO without a writer blocks the worker in open(2), where it sends
    nothing. The client gives up (an MCP call cancelled, a timeout): init must notice the
    aborted stream and stop the worker, not keep it, and a thread waiting for it, for ever."""
    _, there = sides
    os.mkfifo(there / "fifo")
    init_pid = init_process.process.pid

    async def body(vault: Any) -> list[str]:
        await vault.connection()
        workers = _children(init_pid)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(vault.files().sha256(str(there / "fifo")), 0.5)
        failures = []
        if not await _settles(lambda: _children(init_pid) == workers, seconds=15.0):
            failures.append(f"workers left: {_children(init_pid) - workers}")
        (there / "after").write_bytes(b"still serving")
        digest = await vault.files().sha256(str(there / "after"))
        if digest != hashlib.sha256(b"still serving").hexdigest():
            failures.append(f"a later hash: {digest}")
        return failures

    assert on_vault(init_process, issuer, body) == []
