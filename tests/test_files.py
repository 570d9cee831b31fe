"""The file stream end to end (issue 14 item 1): real QUIC on 127.0.0.1 against a real init
in host mode (every op, errors in words, digests, resume); VM mode is in
test_files_vm.py, tree streams in test_files_tar.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, on_vault

from flyvault.errors import (
    ConnectionLost,
    FileOpError,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from flyvault.server.files_worker import RECENT
from flyvault.standins import OidcIssuer


def test_stat_list_read_sha256_and_errors_in_words(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    data = os.urandom(700_000) + bytes(range(256)) * 4  # binary, several DATA frames
    (tree / "blob.bin").write_bytes(data)
    (tree / "b-dir").mkdir(mode=0o750)
    (tree / "a-link").symlink_to("blob.bin")
    os.chmod(tree / "blob.bin", 0o4640)
    locked = tree / "locked"
    locked.write_text("secret")

    async def body(vault: Any) -> dict[str, Any]:
        files = vault.files()
        out: dict[str, Any] = {}
        out["stat"] = await files.stat(str(tree / "blob.bin"))
        out["link"] = await files.stat(str(tree / "a-link"))
        out["followed"] = await files.stat(str(tree / "a-link"), follow=True)
        out["list"] = await files.list_dir(str(tree))
        out["limited"] = await files.list_dir(str(tree), limit=2)
        out["all"] = await files.read_bytes(str(tree / "blob.bin"))
        out["range"] = await files.read_bytes(str(tree / "blob.bin"), offset=5, length=300_000)
        out["sha"] = await files.sha256(str(tree / "blob.bin"))
        out["sha_range"] = await files.sha256(str(tree / "blob.bin"), offset=10, length=20)
        out["readlink"] = await files.readlink(str(tree / "a-link"))
        for name, call in {
            "missing": files.stat(str(tree / "nope")),
            "isdir": files.read_bytes(str(tree)),
            "notdir": files.list_dir(str(tree / "blob.bin")),
        }.items():
            try:
                await call
            except Exception as exc:
                out[name] = exc
        return out

    out = on_vault(init_process, issuer, body)
    info = out["stat"]
    assert (info.kind, info.size, info.mode, info.name) == ("file", len(data), 0o4640, "blob.bin")
    assert info.path == str(tree / "blob.bin") and info.owner == "root" and info.target is None
    assert info.mtime_ns == (tree / "blob.bin").stat().st_mtime_ns
    assert (out["link"].kind, out["link"].target) == ("symlink", "blob.bin")
    assert out["followed"].kind == "file"
    assert [i.name for i in out["list"]] == ["a-link", "b-dir", "blob.bin", "locked"]
    assert [i.kind for i in out["list"]] == ["symlink", "dir", "file", "file"]
    assert out["list"][1].mode == 0o750
    assert [i.name for i in out["limited"]] == ["a-link", "b-dir"]
    assert out["all"] == data
    assert out["range"] == data[5:300_005]
    assert out["sha"] == hashlib.sha256(data).hexdigest()
    assert out["sha_range"] == hashlib.sha256(data[10:30]).hexdigest()
    assert out["readlink"] == "blob.bin"
    assert isinstance(out["missing"], NotFoundError)
    assert str(out["missing"]) == f"{tree / 'nope'}: no such file or directory (ENOENT)"
    assert isinstance(out["isdir"], FileOpError) and "(EISDIR)" in str(out["isdir"])
    assert str(out["notdir"]) == f"{tree / 'blob.bin'}: not a directory (ENOTDIR)"


def test_a_read_ends_with_the_digest_of_what_it_sent_and_whether_the_file_changed(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    """The READ answer carries the SHA-256 of the bytes sent (so a whole-file copy needs no
    second pass over the file) and says when the file was written while it was read."""
    # Far more than the stream's window and every buffer on the way: when the first chunk
    # arrives here, the vault is still reading.
    data = os.urandom(64 * 1024 * 1024)
    path = tmp_path / "blob"
    path.write_bytes(data)
    # Only a file older than a clock tick or two gets a digest (younger, the reader asks):
    # see RECENT. Waiting for time to pass is what makes it old; nothing is raced here.
    time.sleep(2 * RECENT)

    async def body(vault: Any) -> dict[str, Any]:
        files = vault.files()
        out: dict[str, Any] = {"whole": [], "range": [], "moving": [], "fresh": []}
        got = [c async for c in files.read(str(path), answers=out["whole"])]
        out["bytes"] = b"".join(got)
        await files.read_bytes(str(path))  # no answers asked: nothing to collect
        async for _ in files.read(str(path), offset=7, length=1000, answers=out["range"]):
            pass
        async for _ in files.read(str(path), answers=out["moving"]):
            if not out.get("written"):
                with open(path, "r+b") as handle:  # while the vault is still reading
                    handle.write(b"new")
                out["written"] = True
        fresh = tmp_path / "fresh"
        fresh.write_bytes(b"fresh")
        # Younger than RECENT whatever the machine's load: an mtime a minute ahead.
        ahead = time.time() + 60
        os.utime(fresh, (ahead, ahead))
        async for _ in files.read(str(fresh), answers=out["fresh"]):
            pass
        return out

    out = on_vault(init_process, issuer, body)
    assert out["bytes"] == data
    [whole] = out["whole"]
    assert (whole.offset, whole.size, whole.changed) == (0, len(data), False)
    assert whole.sha256 == hashlib.sha256(data).hexdigest()
    [part] = out["range"]
    assert (part.offset, part.size, part.changed) == (7, 1000, False)
    assert part.sha256 == hashlib.sha256(data[7:1007]).hexdigest()
    [moving] = out["moving"]
    assert moving.changed and moving.size == len(data)
    [fresh] = out["fresh"]
    assert fresh.sha256 is None and not fresh.changed and fresh.size == 5  # "just written"


def test_changes_mkdir_remove_rename_chmod_chown_mtime_symlink(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    base = tmp_path / "work"
    base.mkdir()

    async def body(vault: Any) -> dict[str, Any]:
        files = vault.files()
        out: dict[str, Any] = {}
        await files.mkdir(str(base / "a/b/c"), parents=True, mode=0o700)
        await files.mkdir(str(base / "a/b/c"), parents=True, exist_ok=True)
        try:
            await files.mkdir(str(base / "a"))
        except FileOpError as exc:
            out["exists"] = exc
        await files.write(str(base / "a/b/c/f.txt"), b"hello")
        await files.rename(str(base / "a/b/c/f.txt"), str(base / "g.txt"))
        await files.chmod(str(base / "g.txt"), 0o600)
        await files.chown(str(base / "g.txt"), 1234, 5678)
        await files.set_mtime(str(base / "g.txt"), 1_500_000_000_123_456_789)
        await files.symlink("g.txt", str(base / "link"))
        try:
            await files.remove(str(base / "a"))
        except FileOpError as exc:
            out["notempty"] = exc
        await files.remove(str(base / "a"), recursive=True)
        await files.remove(str(base / "link"))
        return out

    out = on_vault(init_process, issuer, body)
    assert "(EEXIST)" in str(out["exists"]) and "file exists" in str(out["exists"])
    assert "directory not empty (ENOTEMPTY)" in str(out["notempty"])
    assert not (base / "a").exists() and not (base / "link").is_symlink()
    info = (base / "g.txt").stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert (info.st_uid, info.st_gid) == (1234, 5678)
    assert info.st_mtime_ns == 1_500_000_000_123_456_789
    assert (base / "g.txt").read_bytes() == b"hello"


def test_write_is_atomic_verified_and_reports_progress(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "big.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    progress: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]

    async def body(vault: Any) -> dict[str, Any]:
        files = vault.files()
        out: dict[str, Any] = {}
        out["written"] = await files.write(
            str(target),
            source(),
            mode=0o640,
            fsync=True,
            make_parents=True,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            on_progress=progress.append,
        )
        try:
            await files.write(str(target), b"other", sha256="0" * 64)
        except IntegrityError as exc:
            out["mismatch"] = exc
        try:
            await files.write(str(tmp_path / "nodir" / "x"), b"x")
        except NotFoundError as exc:
            out["noparent"] = exc
        return out

    out = on_vault(init_process, issuer, body)
    written = out["written"]
    assert written.size == len(data) and written.sha256 == hashlib.sha256(data).hexdigest()
    assert written.path == str(target)
    assert target.read_bytes() == data  # the refused write left the file as it was
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert progress[-1] == len(data) and progress == sorted(progress)
    assert "SHA-256 mismatch" in str(out["mismatch"]) and "not stored" in str(out["mismatch"])
    assert isinstance(out["noparent"], NotFoundError)
    assert os.listdir(target.parent) == ["big.bin"]  # no temp file left behind


def test_a_write_hashed_as_it_goes_is_checked_by_the_vault_before_the_rename(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    """Version 7: without a digest up front, the client sends the SHA-256 of what it sent
    with END and the vault refuses a mismatch before anything lands. A client that lies in
    END (driven here through the real machine and stream) stores nothing."""
    from flyvault.protocol.constants import StreamTag
    from flyvault.protocol.files import FileClient, Ready, Refused
    from flyvault.protocol.files_messages import FileOp, FileRequest

    (tmp_path / "w").mkdir()
    target = tmp_path / "w" / "t.bin"
    data = os.urandom(600_000)

    async def lying_write(vault: Any) -> Refused:
        connection = await vault.connection()
        stream = connection.open_stream(StreamTag.FILES)
        machine = FileClient(FileRequest(FileOp.WRITE, str(target), size=len(data)), 0.0)
        stream.write(machine.data_to_send())
        events: list[Any] = []
        while not events or not isinstance(events[-1], Ready | Refused):
            machine.receive_data(await stream.read())
            while (event := machine.next_event(0.0)) is not None:
                events.append(event)
        machine.resume_at(0, 0.0)
        machine.send_data(data)
        machine.finish(0.0, hashlib.sha256(b"something else").hexdigest())
        stream.write(machine.data_to_send(), end_stream=True)
        while not isinstance(events[-1], Refused):
            chunk = await stream.read()
            machine.receive_data(chunk) if chunk else machine.receive_eof()
            while (event := machine.next_event(0.0)) is not None:
                events.append(event)
        return events[-1]

    async def body(vault: Any) -> dict[str, Any]:
        files = vault.files()
        out = {"checks": await files.checks_end_digest()}
        out["written"] = await files.write(str(target), data)  # no sha256 given
        out["refused"] = await lying_write(vault)
        return out

    out = on_vault(init_process, issuer, body)
    assert out["checks"] is True
    assert out["written"].sha256 == hashlib.sha256(data).hexdigest()
    error = out["refused"].error.to_exception()
    assert isinstance(error, IntegrityError) and "SHA-256 mismatch" in str(error)
    assert target.read_bytes() == data  # the lying write changed nothing
    assert os.listdir(target.parent) == ["t.bin"]  # and left no temp file


def test_an_upload_to_a_version_6_vault_is_hashed_first_and_a_moving_source_is_refused(
    init_process: InitProcess, issuer: OidcIssuer, sides: tuple[Path, Path]
) -> None:
    """A version 6 init refuses a payload in END: the client then hashes the file before it
    sends it (the digest goes in the request). Hashed as it is sent instead, a source that
    changes meanwhile is refused here, since a mixture would verify."""
    from flyvault.client.copy_engine import CopyEndpoint, CopyProgress, copy

    here, there = sides
    source = here / "big"
    source.write_bytes(os.urandom(24 * 1024 * 1024))

    class Version6:
        """A real connection that reports protocol 6 (what an older init negotiates)."""

        protocol_version = 6

        def __init__(self, real: Any) -> None:
            self.real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    class OldVault:
        def __init__(self, vault: Any) -> None:
            self.vault = vault

        async def connection(self) -> Version6:
            return Version6(await self.vault.connection())

        def __getattr__(self, name: str) -> Any:
            return getattr(self.vault, name)

        def files(self, user: str | None = None) -> Any:
            from flyvault.client.files import RemoteFiles

            return RemoteFiles(self, user)  # type: ignore[arg-type]

    touched: list[bool] = []

    def touch(state: CopyProgress) -> None:
        if state.bytes_done >= 2 * 1024 * 1024 and not touched:
            touched.append(True)
            with open(source, "r+b") as handle:
                handle.write(b"moved")

    async def body(vault: Any) -> dict[str, Any]:
        old = OldVault(vault)
        out: dict[str, Any] = {"checks": await old.files().checks_end_digest()}
        up = [CopyEndpoint(None, str(source))]
        out["old"] = await copy(lambda name: old, up, CopyEndpoint("dev", str(there / "a")))
        try:
            await copy(
                lambda name: vault, up, CopyEndpoint("dev", str(there / "b")), on_progress=touch
            )
        except FileOpError as exc:
            out["moving"] = exc
        return out

    out = on_vault(init_process, issuer, body)
    assert out["checks"] is False
    assert out["old"].files == 1 and out["old"].verified
    assert touched and "changed while it was being copied" in str(out["moving"])
    assert os.listdir(there) == ["a"]  # no partial of "b" left behind: the vault removed it
    assert (there / "a").read_bytes() != source.read_bytes()  # it was copied before the touch


def test_bad_arguments_are_usage_errors_before_anything_is_sent(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    async def body(vault: Any) -> list[str]:
        files = vault.files()
        messages = []
        for call in (
            files.stat(""),
            files.read_bytes("/x", offset=-1),
            files.chmod("/x", 0o17777),
            files.write("/x", b"abc", size=4),
            files.write("/x", b"abc", sha256="XYZ"),
            files.list_dir("/", limit=0),
            files.chown("/x"),
        ):
            with pytest.raises(UsageError) as caught:
                await call
            messages.append(caught.value.message)
        assert vault.current is None  # nothing connected for any of them
        return messages

    messages = on_vault(init_process, issuer, body)
    assert "empty" in messages[0] and "negative" in messages[1]
    assert "not a file mode" in messages[2] and "does not match" in messages[3]


def test_a_write_resumes_after_the_connection_dropped(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    target = tmp_path / "resumed.bin"
    data = os.urandom(4 * 1024 * 1024)
    progress: list[int] = []
    dropped: list[bool] = []
    chunk = 256 * 1024

    async def body(vault: Any) -> Any:
        files = vault.files()
        connection = await vault.connection()

        async def dropping() -> AsyncIterator[bytes]:
            for start in range(0, len(data), chunk):
                if start == 2 * 1024 * 1024 and not dropped:
                    dropped.append(True)
                    await _delivered(connection)
                    connection.channel.close_now(reason="test: drop mid-write")
                yield data[start : start + chunk]

        class Source:
            """Re-iterable: the first pass drops the connection half-way."""

            def __aiter__(self) -> AsyncIterator[bytes]:
                return dropping()

        return await files.write(
            str(target), Source(), size=len(data), resume_key="job-1", on_progress=progress.append
        )

    written = on_vault(init_process, issuer, body)
    assert target.read_bytes() == data and written.size == len(data)
    assert dropped
    # The first pass reported 8 chunks before the drop; the second skipped what the
    # vault kept (a full pass would report 16 chunks from the first).
    second = progress[8:]
    assert 0 < len(second) < 16 and second[0] > chunk, progress
    assert progress[-1] == len(data)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".flyvault")] == []


async def _delivered(connection: Any) -> None:
    """Wait until the stream's bytes reached init (so its partial holds them)."""
    for stream in list(getattr(connection.channel, "_streams", {}).values()):
        await stream.wait_delivered()


def test_a_write_without_a_resume_key_fails_cleanly_when_the_connection_drops(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    async def body(vault: Any) -> Exception:
        files = vault.files()
        connection = await vault.connection()

        async def dropping() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            connection.channel.close_now(reason="test")
            yield b"y" * 1000

        with pytest.raises(ConnectionLost) as caught:
            await files.write(str(tmp_path / "lost.bin"), dropping())
        return caught.value

    error = on_vault(init_process, issuer, body)
    assert "nothing was stored" in str(error)
    assert not (tmp_path / "lost.bin").exists()


def test_an_older_init_is_refused_before_the_file_stream_is_opened() -> None:
    """A protocol 3 init would reset the unknown stream: the client says what to update."""
    from flyvault.client.files import RemoteFiles
    from flyvault.errors import Unsupported

    class OldConnection:
        protocol_version = 3

        def open_stream(self, tag: int) -> None:
            raise AssertionError("no stream may be opened on a protocol 3 connection")

    class OldVault:
        async def connection(self) -> OldConnection:
            return OldConnection()

    files = RemoteFiles(OldVault())  # type: ignore[arg-type]
    with pytest.raises(Unsupported, match="protocol 3, which has no file stream") as caught:
        asyncio.run(files.stat("/etc/hostname"))
    assert caught.value.exit_code == 10


def test_a_source_replaced_after_the_copy_began_is_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    from flyvault.client.copy_up import FileSource

    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    source = FileSource(str(path), os.stat(path))
    # An editor's save: a new file of the same size and mtime renamed over it.
    (tmp_path / "f.new").write_bytes(b"y" * 1000)
    os.utime(tmp_path / "f.new", ns=(source.info.st_atime_ns, source.info.st_mtime_ns))
    os.replace(tmp_path / "f.new", path)

    async def first() -> bytes:
        async for chunk in source:
            return chunk
        return b""

    with pytest.raises(FileOpError, match="changed while it was being copied"):
        asyncio.run(first())


def test_a_file_stream_has_bulk_buffers_on_both_ends(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    """A large file stalled on the default stream buffers: the client's file stream writes
    with bulk watermarks, and init grants it the bulk receive window."""
    from flyvault.protocol.constants import StreamTag
    from flyvault.protocol.files import FileClient
    from flyvault.protocol.files_messages import FileOp, FileRequest
    from flyvault.transport.channel import (
        BULK_HIGH_WATER,
        BULK_RECEIVE_WINDOW,
        DEFAULT_HIGH_WATER,
    )
    from flyvault.transport.endpoint import STREAM_WINDOW

    async def body(vault: Any) -> tuple[int, int, int]:
        connection = await vault.connection()
        stream = connection.open_stream(StreamTag.FILES)
        machine = FileClient(FileRequest(FileOp.STAT, str(tmp_path)), 0.0)
        stream.write(machine.data_to_send())  # the request; the stream stays open
        assert await stream.read()  # init's handler ran, and announced its window
        quic_stream = connection.channel.quic._streams[stream.stream_id]
        # The announcement goes before the answer, but a datagram lost on a loaded host
        # makes it arrive after (resent on loss): wait for it, up to a bound.
        deadline = asyncio.get_running_loop().time() + 10
        while quic_stream.max_stream_data_remote < BULK_RECEIVE_WINDOW:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        return stream.high_water, quic_stream.max_stream_data_remote

    high_water, granted = on_vault(init_process, issuer, body)
    assert high_water == BULK_HIGH_WATER > DEFAULT_HIGH_WATER
    assert granted >= BULK_RECEIVE_WINDOW > STREAM_WINDOW


def test_file_operations_on_one_connection_leave_no_stream_behind(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    """A file operation's reader stops at the answer; the stream is still released, with
    its window state (a long-lived connection would otherwise grow with every operation)."""
    (tmp_path / "f").write_bytes(b"x" * 1000)

    async def body(vault: Any) -> tuple[int, int]:
        files = vault.files()
        for _ in range(25):  # bounded
            await files.stat(str(tmp_path / "f"))
            assert await files.read_bytes(str(tmp_path / "f")) == b"x" * 1000
        channel = (await vault.connection()).channel
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while channel.open_streams:
            assert loop.time() < deadline, f"{channel.open_streams} streams still open"
            await asyncio.sleep(0.01)
        return channel.open_streams, len(channel.quic._windows)

    assert on_vault(init_process, issuer, body) == (0, 0)


def test_worker_data_arriving_after_a_refusal_is_dropped_not_relayed() -> None:
    """Init's download pump waits for the worker with the frame types it may relay; if the
    upload side refuses the stream meanwhile (a stray frame from the client), the worker's
    next data must not be relayed behind the ERROR. Driven with a real FileServer and a
    real socketpair standing for the worker; the QUIC stream is a recorder."""
    import socket

    from flyvault.errors import RemoteProtocolError
    from flyvault.protocol.codec import FrameDecoder, encode_frame
    from flyvault.protocol.constants import ERROR_FRAME
    from flyvault.protocol.files import FileClient, FileServer, RequestReceived
    from flyvault.protocol.files_messages import FileFrame, FileOp, FileRequest
    from flyvault.server.files import _download, _Worker

    class Recorder:
        def __init__(self) -> None:
            self.sent = b""
            self.ended = False

        def write(self, data: bytes, end_stream: bool = False) -> None:
            self.sent += data
            self.ended = self.ended or end_stream

        async def drain(self) -> None:
            return None

        async def wait_stopped(self) -> BaseException:
            await asyncio.Future()  # the client keeps reading
            raise AssertionError("unreachable")

    async def scenario() -> tuple[bytes, bool]:
        machine = FileServer(0.0)
        machine.receive_data(FileClient(FileRequest(FileOp.READ, "/f"), 0.0).data_to_send())
        assert isinstance(machine.next_event(0.0), RequestReceived)
        ours, theirs = socket.socketpair()
        worker = _Worker(os.getpid(), ours)
        stream = Recorder()
        pump = asyncio.ensure_future(_download(machine, stream, worker, True))  # type: ignore[arg-type]
        try:
            for _ in range(5):
                await asyncio.sleep(0)  # the pump now waits in worker.receive
            assert not pump.done()
            machine.refuse(RemoteProtocolError("file stream: frame DATA is not allowed"))
            theirs.sendall(encode_frame(FileFrame.DATA, b"late"))
            await asyncio.wait_for(pump, 10)  # the old code raised LocalProtocolError here
        finally:
            ours.close()
            theirs.close()
        return stream.sent, stream.ended

    sent, ended = asyncio.run(scenario())
    decoder = FrameDecoder(1 << 20)
    decoder.feed(sent)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame.type)
    assert frames == [ERROR_FRAME] and ended
