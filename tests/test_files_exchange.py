"""``RemoteFiles``' glue around the file machine (``flyvault.client.files._Exchange``): a
batch of events, and an error kept until the events before it were handed out. The machine
on the vault's side writes the frames; the stream is a recording of them (the glue's only
I/O), so that a refusal can be put in the same read as the data before it."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from flyvault.client.files import _Exchange
from flyvault.errors import FileOpError, RemoteProtocolError
from flyvault.protocol.codec import encode_frame
from flyvault.protocol.files import DataReceived, DigestReceived, FileClient, FileServer
from flyvault.protocol.files_messages import FileFrame, FileOp, FileRequest, MemberDigest


class RecordedStream:
    """A stream whose reads return ``chunks`` in turn, then the end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.written: list[bytes] = []

    def write(self, data: bytes, end_stream: bool = False) -> None:
        self.written.append(data)

    async def read(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def vault_frames(refuse: bool = False, tail: bytes = b"") -> bytes:
    """What a vault answers a tar_get with: data, a digest, then a refusal if asked."""
    client = FileClient(FileRequest(FileOp.TAR_GET, paths=("/srv",)), 0.0)
    server = FileServer(0.0)
    server.receive_data(client.data_to_send())
    server.receive_eof()
    while server.next_event(0.0) is not None:
        pass
    server.send_data(b"x" * 512)
    server.send_digest(MemberDigest("srv/a", 3, hashlib.sha256(b"abc").hexdigest()))
    if refuse:
        server.refuse(FileOpError("/srv/b: permission denied (EACCES)"))
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


def test_a_refusal_alone_is_raised_at_once_and_next_event_sees_a_held_one() -> None:
    async def main() -> None:
        frames = vault_frames(refuse=True)
        exchange = await exchange_over([frames])
        await exchange.next_events()
        with pytest.raises(FileOpError):
            await exchange.next_event()  # the held refusal, also through next_event

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
