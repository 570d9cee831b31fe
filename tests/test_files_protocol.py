"""The file stream's sans-I/O machines: a client and a server driven against each other in
memory with arbitrary cut points, illegal frames per state, bounds and deadlines."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.errors import (
    FileOpError,
    LocalProtocolError,
    PathNotFound,
    RemoteProtocolError,
)
from flyvault.protocol.codec import FrameDecoder, encode_frame
from flyvault.protocol.constants import ERROR_FRAME, MAX_PAYLOAD
from flyvault.protocol.files import (
    Answered,
    AnswerTimedOut,
    DataReceived,
    DigestReceived,
    FileClient,
    FileEvent,
    FileServer,
    FileState,
    Ready,
    Refused,
    RequestReceived,
    RequestTimedOut,
    ResumeRequested,
    UploadAbandoned,
    UploadEnded,
    client_accepts,
    encode_offset,
    server_accepts,
)
from flyvault.protocol.files_messages import (
    MAX_DATA,
    FileFrame,
    FileInfo,
    FileOp,
    FileRequest,
    MemberDigest,
)

ALL_FRAMES = [*FileFrame, ERROR_FRAME, 0x42]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    pieces, last = [], 0
    for mark in [*marks, len(data)]:
        pieces.append(data[last:mark])
        last = mark
    return [p for p in pieces if p]


def drain(machine: FileServer | FileClient, pieces: list[bytes], eof: bool) -> list[FileEvent]:
    events: list[FileEvent] = []
    for piece in pieces:
        machine.receive_data(piece)
        while (event := machine.next_event(0.0)) is not None:
            events.append(event)
    if eof:
        machine.receive_eof()
        while (event := machine.next_event(0.0)) is not None:
            events.append(event)
    return events


def started_tar_get() -> tuple[FileClient, FileServer]:
    """A tar_get's two machines, its request read: the server is working."""
    client = FileClient(FileRequest(FileOp.TAR_GET, paths=("/srv",)), 0.0)
    server = FileServer(0.0)
    drain(server, [client.data_to_send()], eof=True)
    return client, server


def tree_pieces(events: list[FileEvent]) -> list[object]:
    """A tree download's data and digests, in the order they came."""
    return [
        e.data if isinstance(e, DataReceived) else e.digest
        for e in events
        if isinstance(e, DataReceived | DigestReceived)
    ]


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=3 * MAX_DATA // 2),
    have=st.integers(0, 50),
    cuts=st.lists(st.integers(0, 10**7), max_size=12),
    back=st.lists(st.integers(0, 10**7), max_size=6),
    end_digest=st.booleans(),
)
def test_a_write_round_trips_through_both_machines_whatever_the_cuts(
    data: bytes, have: int, cuts: list[int], back: list[int], end_digest: bool
) -> None:
    have = min(have, len(data))
    request = FileRequest(FileOp.WRITE, "/srv/f", size=len(data), resume_key="k")
    client = FileClient(request, 0.0)
    server = FileServer(0.0)
    [event] = drain(server, cut(client.data_to_send(), cuts), eof=False)
    assert event == RequestReceived(request)
    assert server.state is FileState.PREPARING
    server.ready(have, hashlib.sha256(data[:have]).hexdigest(), 0.0)
    [ready] = drain(client, cut(server.data_to_send(), back), eof=False)
    assert isinstance(ready, Ready) and ready.ready.have == have
    client.resume_at(have, 0.0)
    client.send_data(data[have:])
    digest = hashlib.sha256(data).hexdigest() if end_digest else None
    client.finish(0.0, digest)
    assert client.sending_finished
    events = drain(server, cut(client.data_to_send(), cuts), eof=True)
    assert events[0] == ResumeRequested(have)
    assert events[-1] == UploadEnded(digest)
    received = b"".join(e.data for e in events if isinstance(e, DataReceived))
    assert received == data[have:]
    server.answer({"path": "/srv/f", "size": len(data), "sha256": "0" * 64})
    assert server.finished
    [answer] = drain(client, cut(server.data_to_send(), back), eof=True)
    assert isinstance(answer, Answered) and answer.result["size"] == len(data)


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=5000), max_size=5),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_a_tree_download_keeps_data_and_digests_in_order(
    chunks: list[bytes], cuts: list[int]
) -> None:
    client, server = started_tar_get()
    expected: list[object] = []
    for index, chunk in enumerate(chunks):
        if chunk:
            server.send_data(chunk)
            expected.append(chunk)
        digest = MemberDigest(f"srv/{index}", len(chunk), hashlib.sha256(chunk).hexdigest())
        server.send_digest(digest)
        expected.append(digest)
    server.answer({"files": len(chunks), "dirs": 1, "symlinks": 0, "bytes": 0})
    events = drain(client, cut(server.data_to_send(), cuts), eof=True)
    assert tree_pieces(events) == expected and isinstance(events[-1], Answered)


def test_a_listing_arrives_in_batches_then_the_result() -> None:
    client = FileClient(FileRequest(FileOp.LIST, "/"), 0.0)
    server = FileServer(0.0)
    drain(server, [client.data_to_send()], eof=True)
    info = FileInfo("/a", "a", "file", 1, 0o644, 0, 0, "root", None, 5, None)
    server.send_items([info, info])
    server.answer({"count": 2, "truncated": False})
    events = drain(client, [server.data_to_send()], eof=True)
    assert [type(e).__name__ for e in events] == ["ItemsReceived", "Answered"]


@pytest.mark.parametrize(
    ("op", "state"),
    [
        (FileOp.WRITE, FileState.AWAIT_RESUME),
        (FileOp.WRITE, FileState.RECEIVING),
        (FileOp.TAR_PUT, FileState.RECEIVING),
        (FileOp.STAT, FileState.WORKING),
        (None, FileState.AWAIT_REQUEST),
    ],
)
def test_the_server_refuses_every_frame_its_state_does_not_accept(
    op: FileOp | None, state: FileState
) -> None:
    for kind in ALL_FRAMES:
        if kind in server_accepts(state, op):
            continue
        server = _server_in(op, state)
        server.receive_data(encode_frame(kind, b""))
        with pytest.raises(RemoteProtocolError):
            server.next_event(0.0)
        assert server.state is FileState.FAILED
        if state is not FileState.WORKING:
            frames = _frames(server.data_to_send())
            assert frames[-1][0] == ERROR_FRAME  # never a silent close


def _server_in(op: FileOp | None, state: FileState) -> FileServer:
    server = FileServer(0.0)
    if op is None:
        return server
    request = FileRequest(op, "/x")
    server.receive_data(encode_frame(FileFrame.REQUEST, request.encode()))
    assert isinstance(server.next_event(0.0), RequestReceived)
    if op is FileOp.WRITE:
        server.ready(0, hashlib.sha256().hexdigest(), 0.0)
        if state is FileState.RECEIVING:
            server.receive_data(encode_frame(FileFrame.RESUME_AT, encode_offset(0)))
            assert server.next_event(0.0) == ResumeRequested(0)
    server.data_to_send()
    assert server.state is state
    return server


@pytest.mark.parametrize(
    ("op", "state"),
    [
        (FileOp.WRITE, FileState.AWAIT_READY),
        (FileOp.READ, FileState.RECEIVING),
        (FileOp.TAR_GET, FileState.RECEIVING),
        (FileOp.LIST, FileState.RECEIVING),
        (FileOp.STAT, FileState.AWAIT_RESULT),
        (FileOp.TAR_PUT, FileState.SENDING),
    ],
)
def test_the_client_refuses_every_frame_its_state_does_not_accept(
    op: FileOp, state: FileState
) -> None:
    request = FileRequest(op, "/x", paths=("/x",) if op is FileOp.TAR_GET else ())
    for kind in ALL_FRAMES:
        if kind in client_accepts(state, op):
            continue
        client = FileClient(request, 0.0)
        assert client.state is state
        client.receive_data(encode_frame(kind, b"{}"))
        with pytest.raises(RemoteProtocolError):
            client.next_event(0.0)
        assert client.state is FileState.FAILED


def test_only_a_writes_end_carries_a_digest_and_only_a_whole_one() -> None:
    """Version 7: a write's END may carry the file's raw SHA-256; anything else in an END
    is refused with an ERROR frame, and the client will not send it."""
    good = hashlib.sha256(b"x").digest()

    def write_server(request: FileRequest) -> FileServer:
        server = FileServer(0.0)
        drain(server, [encode_frame(FileFrame.REQUEST, request.encode())], eof=False)
        server.ready(0, hashlib.sha256(b"").hexdigest(), 0.0)
        drain(server, [encode_frame(FileFrame.RESUME_AT, encode_offset(0))], eof=False)
        server.data_to_send()  # READY
        return server

    cases = {
        "not a 32-byte SHA-256": (FileRequest(FileOp.WRITE, "/f"), good[:31]),
        "contradicts the request": (
            FileRequest(FileOp.WRITE, "/f", sha256=hashlib.sha256(b"y").hexdigest()),
            good,
        ),
    }
    for message, (request, payload) in cases.items():
        server = write_server(request)
        with pytest.raises(RemoteProtocolError, match=message):
            drain(server, [encode_frame(FileFrame.END, payload)], eof=False)
        assert server.state is FileState.FAILED
        assert server.data_to_send()[:1] == bytes([ERROR_FRAME])
    tree = FileServer(0.0)
    drain(
        tree, [encode_frame(FileFrame.REQUEST, FileRequest(FileOp.TAR_PUT, "/d").encode())], False
    )
    with pytest.raises(RemoteProtocolError, match="a tree's END carries no payload"):
        drain(tree, [encode_frame(FileFrame.END, good)], eof=False)
    same = write_server(FileRequest(FileOp.WRITE, "/f", sha256=good.hex()))
    assert drain(same, [encode_frame(FileFrame.END, good)], eof=False) == [UploadEnded(good.hex())]
    client = FileClient(FileRequest(FileOp.TAR_PUT, "/d"), 0.0)
    with pytest.raises(LocalProtocolError, match="a write's SHA-256 only"):
        client.finish(0.0, good.hex())
    writer = FileClient(FileRequest(FileOp.WRITE, "/f"), 0.0)
    drain(writer, [_ready_frame()], eof=False)
    writer.resume_at(0, 0.0)
    with pytest.raises(LocalProtocolError, match="64 hex digits"):
        writer.finish(0.0, "ABC")


def _ready_frame() -> bytes:
    from flyvault.protocol.files_messages import WriteReady

    return encode_frame(FileFrame.READY, WriteReady(0, hashlib.sha256(b"").hexdigest()).encode())


def test_resume_past_what_the_vault_holds_is_refused() -> None:
    server = _server_in(FileOp.WRITE, FileState.AWAIT_RESUME)
    server.receive_data(encode_frame(FileFrame.RESUME_AT, encode_offset(1)))
    with pytest.raises(RemoteProtocolError, match="past the 0 bytes"):
        server.next_event(0.0)
    client = FileClient(FileRequest(FileOp.WRITE, "/x"), 0.0)
    client.receive_data(encode_frame(FileFrame.READY, b'{"have":3,"sha256":"' + b"0" * 64 + b'"}'))
    assert isinstance(client.next_event(0.0), Ready)
    with pytest.raises(LocalProtocolError):
        client.resume_at(4, 0.0)


def test_an_upload_cut_short_is_abandoned_and_an_error_is_refused() -> None:
    server = _server_in(FileOp.WRITE, FileState.RECEIVING)
    server.receive_data(encode_frame(FileFrame.DATA, b"abc"))
    server.receive_eof()
    assert server.next_event(0.0) == DataReceived(b"abc")
    assert server.next_event(0.0) == UploadAbandoned()
    client = FileClient(FileRequest(FileOp.STAT, "/x"), 0.0)
    server = _server_in(FileOp.STAT, FileState.WORKING)
    server.refuse(FileOpError("/x: permission denied (EACCES)"))
    [event] = drain(client, [server.data_to_send()], eof=True)
    assert isinstance(event, Refused)
    assert type(event.error.to_exception()) is FileOpError
    server = _server_in(FileOp.STAT, FileState.WORKING)
    server.refuse(PathNotFound("/x: no such file or directory (ENOENT)"))
    client = FileClient(FileRequest(FileOp.STAT, "/x"), 0.0)
    [event] = drain(client, [server.data_to_send()], eof=True)
    assert isinstance(event, Refused) and type(event.error.to_exception()) is PathNotFound


def test_deadlines_are_data() -> None:
    server = FileServer(100.0, request_timeout=10.0)
    assert server.next_deadline() == 110.0
    server.handle_timer(109.9)
    assert server.next_event(109.9) is None
    server.handle_timer(110.0)
    assert server.next_event(110.0) == RequestTimedOut(10.0)
    assert _frames(server.data_to_send())[-1][0] == ERROR_FRAME
    client = FileClient(FileRequest(FileOp.STAT, "/x"), 5.0, idle_timeout=30.0)
    assert client.next_deadline() == 35.0
    client.handle_timer(35.0)
    assert client.next_event(35.0) == AnswerTimedOut(30.0)


def test_frames_are_bounded_and_requests_strict() -> None:
    server = FileServer(0.0)
    server.receive_data(bytes([FileFrame.REQUEST]) + (MAX_PAYLOAD * 4).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="declares"):
        server.next_event(0.0)
    for payload in (b"[]", b'{"op":"nope"}', b'{"op":"stat"}', b'{"op":"stat","path":"/","x":1}'):
        server = FileServer(0.0)
        server.receive_data(encode_frame(FileFrame.REQUEST, payload))
        with pytest.raises(RemoteProtocolError):
            server.next_event(0.0)
    with pytest.raises(LocalProtocolError):
        FileClient(FileRequest(FileOp.STAT, ""), 0.0)
    request = FileRequest(FileOp.WRITE, "/a", mode=0o644, size=3, sha256="a" * 64, fsync=True)
    assert FileRequest.decode(request.encode()) == request


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    decoder = FrameDecoder(MAX_PAYLOAD)
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append((frame.type, frame.payload))
    return out


# Frames passed on still encoded (init's relay between the client and the worker) --------

frame_lists = st.lists(
    st.tuples(st.sampled_from([1, 2, 3, 0x42]), st.binary(max_size=300)), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(
    frames=frame_lists, cuts=st.lists(st.integers(0, 10**5), max_size=8), limit=st.integers(1, 2000)
)
def test_take_run_and_next_frame_together_read_every_frame_in_order(
    frames: list[tuple[int, bytes]], cuts: list[int], limit: int
) -> None:
    """Whatever the cuts and the run limit: the runs are the wire bytes of a prefix of
    relayed frames, never cut inside one, and with next_frame for the others every frame
    comes out once, in order."""
    wire = b"".join(encode_frame(kind, payload) for kind, payload in frames)
    relayed = frozenset({1, 2})
    decoder = FrameDecoder(MAX_PAYLOAD)
    out: list[tuple[int, bytes]] = []
    for piece in [*cut(wire, cuts), b""]:
        decoder.feed(piece)
        while True:
            run = decoder.take_run(relayed, limit)
            if run:
                assert len(run) < limit + 5 + 300  # the limit is checked between frames
                inner = FrameDecoder(MAX_PAYLOAD)
                inner.feed(run)
                while (frame := inner.next_frame()) is not None:
                    assert frame.type in relayed
                    out.append((frame.type, frame.payload))
                assert inner.at_frame_boundary  # whole frames only
                continue
            frame = decoder.next_frame()
            if frame is None:
                break
            assert frame.type not in relayed  # a relayed frame first is always taken
            out.append((frame.type, frame.payload))
    assert out == frames
    assert decoder.at_frame_boundary


def test_take_run_stops_before_an_oversized_declaration_which_next_frame_reports() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(encode_frame(1, b"a" * 10) + bytes([1]) + (101).to_bytes(4, "big"))
    assert decoder.take_run(frozenset({1}), 10**6) == encode_frame(1, b"a" * 10)
    assert decoder.take_run(frozenset({1}), 10**6) == b""
    with pytest.raises(RemoteProtocolError, match="declares 101 bytes"):
        decoder.next_frame()


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=3000), max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_an_uploads_frames_taken_encoded_are_what_next_event_would_pass_on(
    chunks: list[bytes], cuts: list[int]
) -> None:
    """tar_put through take_upload: the worker gets the same frames as through next_event
    (data and digests in order), END still comes as an event, and each run moves the idle
    deadline."""
    client = FileClient(FileRequest(FileOp.TAR_PUT, "/srv"), 0.0)
    sent: list[tuple[int, bytes]] = []
    for index, chunk in enumerate(chunks):
        if chunk:
            client.send_data(chunk)
            sent.append((FileFrame.DATA, chunk))
        digest = MemberDigest(f"srv/{index}", len(chunk), hashlib.sha256(chunk).hexdigest())
        client.send_digest(digest)
        sent.append((FileFrame.DIGEST, digest.encode()))
    client.finish(0.0)
    server = FileServer(0.0, idle_timeout=10.0)
    passed = FrameDecoder(MAX_PAYLOAD)  # what the worker reads
    events: list[FileEvent] = []
    now = 0.0
    for piece in [*cut(client.data_to_send(), cuts)]:
        server.receive_data(piece)
        now += 1.0
        while True:
            run = server.take_upload(now)
            if run:
                passed.feed(run)
                assert server.next_deadline() == now + 10.0
                continue
            event = server.next_event(now)
            if event is None:
                break
            events.append(event)
    assert isinstance(events[0], RequestReceived)
    assert events[1:] == [UploadEnded(None)]
    got = []
    while (frame := passed.next_frame()) is not None:
        got.append((frame.type, frame.payload))
    assert got == sent


def test_take_upload_takes_nothing_outside_an_upload() -> None:
    server = FileServer(0.0)
    write = FileClient(FileRequest(FileOp.WRITE, "/srv/f", size=3), 0.0)
    server.receive_data(write.data_to_send())
    assert server.take_upload(1.0) == b""  # the request is not read yet
    assert isinstance(server.next_event(1.0), RequestReceived)
    server.receive_data(encode_frame(FileFrame.DATA, b"abc"))
    assert server.take_upload(1.0) == b""  # preparing: nothing is read
    server.ready(0, hashlib.sha256(b"").hexdigest(), 1.0)
    assert server.take_upload(1.0) == b""  # awaiting RESUME_AT: this DATA is an error
    with pytest.raises(RemoteProtocolError, match="DATA is not allowed while awaiting resume"):
        server.next_event(1.0)


@settings(max_examples=40, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=3000), max_size=5),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_relayed_worker_frames_reach_the_client_as_sent_ones_would(
    chunks: list[bytes], cuts: list[int]
) -> None:
    """tar_get: the worker's frames relayed still encoded give the client the same events
    as send_data / send_digest; a READ relays DATA only, other operations nothing."""
    client, server = started_tar_get()
    assert server.relayable() == frozenset({FileFrame.DATA, FileFrame.DIGEST})
    worker_wire = b""
    expected: list[object] = []
    for index, chunk in enumerate(chunks):
        digest = MemberDigest(f"srv/{index}", len(chunk), hashlib.sha256(chunk).hexdigest())
        worker_wire += encode_frame(FileFrame.DATA, chunk) + encode_frame(
            FileFrame.DIGEST, digest.encode()
        )
        expected += [chunk, digest]
    inbox = FrameDecoder(MAX_PAYLOAD)
    for piece in cut(worker_wire, cuts):
        inbox.feed(piece)
        while run := inbox.take_run(server.relayable(), 4096):
            server.relay(run)
    server.answer({"files": len(chunks), "dirs": 1, "symlinks": 0, "bytes": 0})
    assert server.relayable() == frozenset()  # answered: nothing more passes
    events = drain(client, cut(server.data_to_send(), cuts), eof=True)
    assert tree_pieces(events) == expected and isinstance(events[-1], Answered)
    read = FileServer(0.0)
    drain(read, [FileClient(FileRequest(FileOp.READ, "/srv/f"), 0.0).data_to_send()], eof=True)
    assert read.relayable() == frozenset({FileFrame.DATA})
    stat = FileServer(0.0)
    drain(stat, [FileClient(FileRequest(FileOp.STAT, "/srv/f"), 0.0).data_to_send()], eof=True)
    assert stat.relayable() == frozenset()
    with pytest.raises(LocalProtocolError, match="cannot relay frames for a stat"):
        stat.relay(encode_frame(FileFrame.DATA, b"x"))
