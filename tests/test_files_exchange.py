"""``RemoteFiles``' glue around the file machine (``flyvault.client.files._Exchange``): a
batch of events, and an error kept until the events before it were handed out. The machine
on the vault's side writes the frames; the stream is a recording of them (the glue's only
I/O), so that a refusal can be put in the same read as the data before it."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from flyvault.client.files import RemoteFiles, _Exchange
from flyvault.errors import ConnectionLost, FileOpError, RemoteProtocolError
from flyvault.protocol.codec import encode_frame
from flyvault.protocol.files import DataReceived, DigestReceived, FileClient, FileServer
from flyvault.protocol.files_messages import FileFrame, FileOp, FileRequest, MemberDigest


class RecordedStream:
    """A stream whose reads return ``chunks`` in turn, then the end once; a read after that
    is a bug of the glue (it would spin where a vault stream would wait forever)."""

    def __init__(self, chunks: list[bytes | Exception]) -> None:
        self.chunks = list(chunks)
        self.written: list[bytes] = []
        self.ended = False
        self.aborted = False

    def write(self, data: bytes, end_stream: bool = False) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    async def read(self) -> bytes:
        if self.chunks:
            chunk = self.chunks.pop(0)
            if isinstance(chunk, Exception):
                raise chunk
            return chunk
        assert not self.ended, "read again after the stream's end"
        self.ended = True
        return b""


class RecordedVault:
    """A vault whose connections open the recorded streams in turn (``RemoteFiles``' only
    use of the transport)."""

    def __init__(self, streams: list[RecordedStream]) -> None:
        self.streams = list(streams)
        self.invalidated = 0

    async def connection(self) -> RecordedVault:
        return self

    def open_stream(self, tag: int) -> RecordedStream:
        return self.streams.pop(0)

    def invalidate(self, connection: object) -> None:
        self.invalidated += 1


DIGEST = MemberDigest("srv/a", 3, hashlib.sha256(b"abc").hexdigest())


def vault_frames(
    refuse: bool = False, tail: bytes = b"", *, data: bool = True, answer: bool = False
) -> bytes:
    """What a vault answers a tar_get with: data and a digest (unless not ``data``), then a
    refusal or the answer if asked."""
    client = FileClient(FileRequest(FileOp.TAR_GET, paths=("/srv",)), 0.0)
    server = FileServer(0.0)
    server.receive_data(client.data_to_send())
    server.receive_eof()
    while server.next_event(0.0) is not None:
        pass
    if data:
        server.send_data(b"x" * 512)
        server.send_digest(DIGEST)
    if refuse:
        server.refuse(FileOpError("/srv/b: permission denied (EACCES)"))
    if answer:
        server.answer({"files": 1, "dirs": 0, "symlinks": 0, "bytes": 512})
    return server.data_to_send() + tail


async def exchange_over(chunks: list[bytes]) -> _Exchange:
    return _Exchange(RecordedStream(chunks), FileRequest(FileOp.TAR_GET, paths=("/srv",)))  # type: ignore[arg-type]


def test_the_events_before_a_refusal_come_first_then_it_is_raised() -> None:
    async def main() -> None:
        exchange = await exchange_over([vault_frames(refuse=True)])
        events = await exchange.next_events()
        assert [type(event) for event in events] == [DataReceived, DigestReceived]
        with pytest.raises(FileOpError, match="permission denied"):
            await exchange.next_events()

    asyncio.run(main())


def test_a_frame_breaking_the_protocol_is_raised_after_the_events_before_it() -> None:
    async def main() -> None:
        # READY belongs to a write: in a tar_get's answer it breaks the protocol.
        bad = encode_frame(FileFrame.READY, b'{"have":0,"sha256":""}')
        exchange = await exchange_over([vault_frames(tail=bad)])
        events = await exchange.next_events()
        assert [type(event) for event in events] == [DataReceived, DigestReceived]
        with pytest.raises(RemoteProtocolError, match="READY"):
            await exchange.next_events()

    asyncio.run(main())


def test_a_refusal_alone_is_raised_at_once() -> None:
    async def main() -> None:
        exchange = await exchange_over([vault_frames(refuse=True, data=False)])
        with pytest.raises(FileOpError, match="permission denied"):
            await exchange.next_events()

    asyncio.run(main())


def test_a_held_refusal_is_raised_by_next_event_too() -> None:
    async def main() -> None:
        exchange = await exchange_over([vault_frames(refuse=True)])
        await exchange.next_events()
        with pytest.raises(FileOpError):
            await exchange.next_event()

    asyncio.run(main())


def test_events_split_over_reads_come_in_more_than_one_batch() -> None:
    async def main() -> None:
        frames = vault_frames()
        exchange = await exchange_over([frames[:300], frames[300:-10], frames[-10:]])
        first = await exchange.next_events()  # two reads: the DATA frame whole
        second = await exchange.next_events()  # the digest's last bytes
        assert [type(event) for event in first] == [DataReceived]
        assert [type(event) for event in second] == [DigestReceived]
        assert first[0].data == b"x" * 512  # type: ignore[union-attr]

    asyncio.run(main())


def batches_of(vault: RecordedVault) -> list[list[object]]:
    async def main() -> list[list[object]]:
        return [batch async for batch in RemoteFiles(vault).tar_get_batches(["/srv"])]

    return asyncio.run(main())


def test_tar_get_batches_ends_with_the_answer_read_with_the_data() -> None:
    answered = RecordedStream([vault_frames(answer=True)])
    vault = RecordedVault([answered])
    assert batches_of(vault) == [[b"x" * 512, DIGEST]]
    assert vault.invalidated == 0
    assert not answered.aborted  # the vault ended it


def test_tar_get_batches_asks_again_when_the_connection_dropped_before_any_piece() -> None:
    lost = RecordedStream([ConnectionLost("the vault went away")])
    vault = RecordedVault([lost, RecordedStream([vault_frames(answer=True)])])
    assert batches_of(vault) == [[b"x" * 512, DIGEST]]
    assert vault.invalidated == 1
    assert lost.aborted


def test_tar_get_batches_stops_when_the_connection_dropped_after_a_piece() -> None:
    half = RecordedStream([vault_frames(), ConnectionLost("the vault went away")])
    vault = RecordedVault([half, RecordedStream([vault_frames(answer=True)])])
    with pytest.raises(ConnectionLost, match="arrived only in part"):
        batches_of(vault)
    assert vault.invalidated == 1 and len(vault.streams) == 1  # not asked again
    assert half.aborted


def test_tar_get_batches_left_early_aborts_its_stream() -> None:
    """The caller stops (it refused an entry, say): the vault must stop sending now."""
    stream = RecordedStream([vault_frames()])  # data, and no answer yet

    async def main() -> None:
        batches = RemoteFiles(RecordedVault([stream])).tar_get_batches(["/srv"])
        assert await batches.__anext__() == [b"x" * 512, DIGEST]
        assert not stream.aborted
        await batches.aclose()

    asyncio.run(main())
    assert stream.aborted
