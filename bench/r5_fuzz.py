"""R5: fuzz the wire decoders with generated inputs; only documented exceptions may escape.

Targets (each is fed bytes exactly as the peer would send them):

| target            | what runs                                                             | expected exceptions    |
|-------------------|-----------------------------------------------------------------------|------------------------|
| codec             | ``FrameDecoder`` (random limit, random chunking, EOF) + ``PayloadReader`` reads | RemoteProtocolError |
| control_messages  | every control payload decoder in messages.py; errors ``to_exception()``  | RemoteProtocolError |
| control_server    | ``ControlServer`` driven like server/app.py (attest, token, upload, done) | RemoteProtocolError |
| control_client    | ``ControlClient`` driven like client/connection.py (attest, setup, upload) | RemoteProtocolError (VersionMismatch) |
| console_payloads  | every console/sessions/forward payload decoder in console.py          | RemoteProtocolError |
| console_streams   | a tagged stream (console, sessions, forward) through ``FrameChannel`` with each frame dispatched to its decoder, both directions | RemoteProtocolError |
| proxy_wire        | ``proxy.wire.decode``, ``destination_cid``, ``source_cid``, ``is_long_header`` | none (total functions) |

Two generators per target:

- a plain random fuzzer (seeded, reproducible): valid seeds built with the encoders, then
  1-3 mutations each: truncation, bit flips, byte sets, inserts, deletes, duplicated and
  many-times repeated slices, integer fields (u8/u16/u32/u64, both byte orders) set to
  extremes, the frame length field set to extremes, concatenation and splicing of inputs,
  and a few wholly random inputs. Mutants are recycled into a small pool so mutations stack.
- hypothesis (``derandomize``): structured seeds plus drawn mutations, and raw binaries.

Invariants are checked on every input as well (e.g. the frame decoder never holds more
than ``max_payload`` + header + the last chunk; a machine that raised is FAILED; the proxy
decoder's offsets are in range). Anything else that escapes, or a broken invariant, is a
failure and is reported with its input (hex).

Memory: RSS before/after each target's random inputs (and after its hypothesis run: the
first one imports hypothesis, ~35 MB), and ``tracemalloc`` peak over each target's first
``--traced`` inputs (tracing the whole run would double its time).

    .venv/bin/python bench/r5_fuzz.py                   # >= 1,000,000 inputs (~2-4 min)
    .venv/bin/python bench/r5_fuzz.py --per-target 3000 --hypothesis 100   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import random
import resource
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rel_common

from flyvault.errors import AuthError, ProvisionError, RemoteProtocolError
from flyvault.protocol.codec import FrameDecoder, PayloadReader, encode_frame
from flyvault.protocol.console import (
    ConsoleFrame,
    Exited,
    FrameChannel,
    KillSession,
    OpenSession,
    SessionsFrame,
    Started,
    decode_json,
    decode_resize,
    decode_signal,
    decode_stdin_ack,
    encode_json,
    encode_resize,
    encode_stdin_ack,
)
from flyvault.protocol.constants import (
    ERROR_FRAME,
    FRAME_HEADER_SIZE,
    MAX_PAYLOAD,
    MAX_PREAUTH_PAYLOAD,
    MAX_PROTOCOL_VERSION,
    MIN_PROTOCOL_VERSION,
    ControlFrame,
    ErrorCode,
    RuntimeStatus,
    StreamTag,
    VmState,
)
from flyvault.protocol.control import (
    AttestationReceived,
    AttestationRequested,
    ClientState,
    ControlClient,
    ControlServer,
    ErrorReceived,
    RootfsUploaded,
    ServerState,
    SetupCompleted,
    SetupRequested,
    UploadReady,
)
from flyvault.protocol.forward import ForwardFrame, ForwardOpen
from flyvault.protocol.limits import check_session_id
from flyvault.protocol.messages import (
    Attestation,
    ErrorMessage,
    Progress,
    RequestAttestation,
    RootfsEnd,
    RootfsInline,
    RootfsNone,
    RootfsOptions,
    RootfsUrl,
    SetupComplete,
    SetupRequest,
)
from flyvault.proxy import wire

MAX_INPUT = 1_200_000  # a little over MAX_PAYLOAD, so the authenticated limit is crossed
CHUNKINGS = (1, 2, 3, 7, 64, 1000, 65536, 1 << 30)


#: Final machine states per target (reset for each target): shows how deep inputs got.
STATES: collections.Counter[str] = collections.Counter()


class InvariantBroken(AssertionError):
    """A target's own check failed (reported like an unexpected exception)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantBroken(message)


def _chunks(data: bytes, size: int) -> list[bytes]:
    """``data`` in pieces of ``size`` bytes, but never more than 512 pieces (speed)."""
    size = max(size, len(data) // 512)
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


# Targets ------------------------------------------------------------------------------
# Each returns "accepted" (the input was taken as valid, completely or as far as it went) or
# "rejected" (a documented exception). Anything else propagates.


def _frames(*frames: tuple[int, bytes]) -> bytes:
    return b"".join(encode_frame(kind, payload) for kind, payload in frames)


def run_codec(data: bytes) -> str:
    """Mode byte: limit and chunking; then the stream. Frames found are read as fields."""
    if not data:
        return "accepted"
    mode, stream = data[0], data[1:]
    limit = (16, 1024, MAX_PREAUTH_PAYLOAD, MAX_PAYLOAD)[mode & 3]
    chunk = CHUNKINGS[(mode >> 2) & 7]
    decoder = FrameDecoder(limit)
    try:
        for piece in _chunks(stream, chunk):
            decoder.feed(piece)
            _check(
                decoder.buffered <= FRAME_HEADER_SIZE + limit + len(piece),
                f"decoder holds {decoder.buffered} bytes with limit {limit}",
            )
            while (item := decoder.next_frame()) is not None:
                _check(len(item.payload) <= limit, "frame over the limit returned")
                reader = PayloadReader(item.payload, "fuzz")
                reader.u8("a")
                reader.blob("b", 4096)
                reader.optional_text("c", 512)
                reader.u16("d")
                reader.u64("e")
                reader.text("f", 64)
                reader.end()
        if mode & 0x20:
            decoder.feed_eof()
            while decoder.next_frame() is not None:
                pass
            _check(decoder.finished, "decoder not finished after EOF and every frame")
    except RemoteProtocolError:
        return "rejected"
    return "accepted"


_CONTROL_DECODERS: tuple[Callable[[bytes], Any], ...] = (
    ErrorMessage.decode,
    RequestAttestation.decode,
    Attestation.decode,
    SetupRequest.decode,
    SetupComplete.decode,
    RootfsEnd.decode,
    Progress.decode,
)


def run_control_messages(data: bytes) -> str:
    if not data:
        return "accepted"
    decoder = _CONTROL_DECODERS[data[0] % len(_CONTROL_DECODERS)]
    try:
        value = decoder(data[1:])
    except RemoteProtocolError:
        return "rejected"
    if isinstance(value, ErrorMessage):
        _check(isinstance(value.to_exception(), Exception), "to_exception gave no exception")
    # What decodes must survive encode + decode unchanged (no field reinterpreted).
    if not isinstance(value, RootfsEnd):
        _check(decoder(value.encode()) == value, f"{type(value).__name__} does not round-trip")
    return "accepted"


def run_control_server(data: bytes) -> str:
    """Mode byte: bit 0 refuses the token, bit 1 fails the setup, bits 2-4 the chunking,
    bit 5 ends the stream. Driven as server/app.py drives it; it keeps feeding after the
    setup too, as a sans-I/O machine must cope with."""
    if not data:
        return "accepted"
    mode, stream = data[0], data[1:]
    server = ControlServer()
    try:
        pieces = _chunks(stream, CHUNKINGS[(mode >> 2) & 7])
        for index, piece in enumerate(pieces):
            server.receive_data(piece)
            if mode & 0x20 and index == len(pieces) - 1:
                server.receive_eof()
            while (event := server.next_event()) is not None:
                if isinstance(event, AttestationRequested):
                    server.send_attestation(VmState.READY, RuntimeStatus.HOST_MODE, "boot", "j.w.t")
                elif isinstance(event, SetupRequested):
                    if mode & 1:
                        server.refuse(AuthError("wrong token"))
                    else:
                        server.accept_token()
                        if server.state is ServerState.SETTING_UP:
                            _finish(server, mode)
                elif isinstance(event, RootfsUploaded):
                    _finish(server, mode)
            server.data_to_send()
    except RemoteProtocolError:
        _check(server.state is ServerState.FAILED, f"server raised in state {server.state}")
        STATES["raised in " + server.state.value] += 1
        return "rejected"
    STATES[server.state.value] += 1
    return "accepted"


def _finish(server: ControlServer, mode: int) -> None:
    if mode & 2:
        server.refuse(ProvisionError("setup failed"))
    else:
        server.send_progress(Progress("unpack", 1, 2))
        server.send_setup_complete(SetupComplete(VmState.READY, RuntimeStatus.HOST_MODE, "b2"))


def run_control_client(data: bytes) -> str:
    """Mode byte: bit 0 sends an inline rootfs (so UPLOAD_READY is legal), bits 2-4 the
    chunking, bit 5 ends the stream. Driven as client/connection.py drives it."""
    if not data:
        return "accepted"
    mode, stream = data[0], data[1:]
    client = ControlClient()
    client.request_attestation()
    upload = 40
    try:
        pieces = _chunks(stream, CHUNKINGS[(mode >> 2) & 7])
        for index, piece in enumerate(pieces):
            client.receive_data(piece)
            if mode & 0x20 and index == len(pieces) - 1:
                client.receive_eof()
            while (event := client.next_event()) is not None:
                if isinstance(event, AttestationReceived):
                    rootfs = RootfsInline(upload) if mode & 1 else RootfsNone()
                    client.send_setup(SetupRequest("token", rootfs))
                elif isinstance(event, UploadReady):
                    client.send_rootfs_chunk(b"r" * upload)
                    client.end_rootfs(hashlib.sha256(b"r" * upload).digest())
                elif isinstance(event, ErrorReceived):
                    _check(isinstance(event.error.to_exception(), Exception), "to_exception")
                elif isinstance(event, SetupCompleted):
                    _check(client.state is ClientState.COMPLETE, "completed but not COMPLETE")
            client.data_to_send()
    except RemoteProtocolError:
        _check(client.state is ClientState.FAILED, f"client raised in state {client.state}")
        STATES["raised in " + client.state.value] += 1
        return "rejected"
    STATES[client.state.value] += 1
    return "accepted"


_CONSOLE_DECODERS: tuple[Callable[[bytes], Any], ...] = (
    OpenSession.decode,
    Started.decode,
    Exited.decode,
    decode_resize,
    decode_stdin_ack,
    decode_signal,
    KillSession.decode,
    ForwardOpen.decode,
    lambda payload: decode_json(payload, "session list"),
    lambda payload: check_session_id(payload.decode("utf-8", "replace")),
)


def run_console_payloads(data: bytes) -> str:
    if not data:
        return "accepted"
    decoder = _CONSOLE_DECODERS[data[0] % len(_CONSOLE_DECODERS)]
    try:
        decoder(data[1:])
    except RemoteProtocolError:
        return "rejected"
    return "accepted"


def run_console_streams(data: bytes) -> str:
    """Tag byte (console, sessions, forward; as StreamTag), chunking byte, then frames.
    Each frame goes to the decoder the receiving side uses for its type."""
    if len(data) < 2:
        return "accepted"
    tag, mode, stream = data[0], data[1], data[2:]
    channel = FrameChannel()
    try:
        for piece in _chunks(stream, CHUNKINGS[mode & 7]) + ([b""] if mode & 8 else []):
            channel.feed(piece)
            while (item := channel.next_frame()) is not None:
                _dispatch(tag, item.type, item.payload)
    except RemoteProtocolError:
        return "rejected"
    return "accepted"


def _dispatch(tag: int, kind: int, payload: bytes) -> None:
    if kind == ERROR_FRAME:
        error = ErrorMessage.decode(payload)
        _check(isinstance(error.to_exception(), Exception), "to_exception")
        return
    if tag % 3 == 0:  # console: both directions share one type space
        if kind == ConsoleFrame.OPEN:
            OpenSession.decode(payload)
        elif kind == ConsoleFrame.RESIZE:
            decode_resize(payload)
        elif kind == ConsoleFrame.SIGNAL:
            decode_signal(payload)
        elif kind == ConsoleFrame.STARTED:
            Started.decode(payload)
        elif kind == ConsoleFrame.EXITED:
            Exited.decode(payload)
        elif kind == ConsoleFrame.STDIN_ACK:
            decode_stdin_ack(payload)
        elif kind == ConsoleFrame.DETACHED:
            payload.decode("utf-8", "replace")
    elif tag % 3 == 1:  # sessions
        if kind == SessionsFrame.KILL:
            KillSession.decode(payload)
        elif kind == SessionsFrame.LIST_RESULT:
            decode_json(payload, "session list")
    else:  # forward
        if kind == ForwardFrame.OPEN:
            ForwardOpen.decode(payload)


def run_proxy_wire(data: bytes) -> str:
    """Never raises, for any input: ``decode`` is documented as total."""
    result = wire.decode(data)
    for cid_length in (0, 8, 20):
        cid = wire.destination_cid(data, 0, cid_length)
        _check(cid is None or len(cid) <= max(cid_length, wire.MAX_CID_BYTES), "dcid too long")
    scid = wire.source_cid(data)
    _check(scid is None or len(scid) <= wire.MAX_CID_BYTES, "scid too long")
    wire.is_long_header(data, 0)
    if isinstance(result, wire.Drop):
        _check(result in wire.MALFORMED, f"decode gave non-malformed drop {result}")
        return "rejected"
    machine_id, offset = result
    _check(wire.HEADER_SIZE < offset < len(data), f"offset {offset} out of range")
    _check(wire.encode_header(machine_id) == data[:offset], "header does not round-trip")
    wire.destination_cid(data, offset, wire.DEFAULT_CID_LENGTH)
    wire.is_long_header(data, offset)
    return "accepted"


# Seeds --------------------------------------------------------------------------------


def _client_stream(inline: int | None = None, url: bool = False) -> bytes:
    rootfs: Any = RootfsNone()
    if inline is not None:
        rootfs = RootfsInline(inline)
    elif url:
        rootfs = RootfsUrl("https://example.invalid/r.tar.gz", "ab" * 32)
    frames = [
        (
            ControlFrame.REQUEST_ATTESTATION,
            RequestAttestation(MIN_PROTOCOL_VERSION, MAX_PROTOCOL_VERSION).encode(),
        ),
        (ControlFrame.SETUP_REQUEST, SetupRequest("tok-" + "x" * 20, rootfs).encode()),
    ]
    if inline:
        frames.append((ControlFrame.ROOTFS_CHUNK, b"z" * inline))
        frames.append((ControlFrame.ROOTFS_END, hashlib.sha256(b"z" * inline).digest()))
    return _frames(*frames)


def _server_stream(upload: bool = False, error: bool = False, legacy: bool = False) -> bytes:
    attestation = Attestation(
        MAX_PROTOCOL_VERSION, VmState.READY, RuntimeStatus.HOST_MODE, "boot-1", "a.b.c"
    )
    if legacy:
        return _frames((0x05, b"old"))
    frames: list[tuple[int, bytes]] = [(ControlFrame.ATTESTATION, attestation.encode())]
    if error:
        frames.append((ERROR_FRAME, ErrorMessage(ErrorCode.AUTH_FAILED, "no").encode()))
        return _frames(*frames)
    if upload:
        frames.append((ControlFrame.UPLOAD_READY, b""))
    frames.append((ControlFrame.PROGRESS, Progress("unpack", 3, 9).encode()))
    frames.append(
        (
            ControlFrame.SETUP_COMPLETE,
            SetupComplete(VmState.READY, RuntimeStatus.HOST_MODE, "boot-2").encode(),
        )
    )
    return _frames(*frames)


def _open(**kw: Any) -> OpenSession:
    base: dict[str, Any] = {"session_id": "sess-1"}
    base.update(kw)
    return OpenSession(**base)


CONSOLE_PAYLOADS: tuple[tuple[int, bytes], ...] = (
    (0, _open(argv=("sh", "-c", "echo hi"), keep=True, env=(("A", "b"),), cwd="/tmp").encode()),
    (0, _open(argv=None, resume_offset=123456).encode()),
    (0, _open(shell=True, pty=True, term="xterm", rows=24, cols=80, context="ctx").encode()),
    (1, Started("sess-1", True, 0, 0, 4242, False, 7).encode()),
    (2, Exited(0, None, 10_000_000).encode()),
    (2, Exited(None, 9, 5).encode()),
    *(  # protocol 3: EXITED may carry the reason the vault ended the session
        [(2, Exited(0, None, 5, "workload stopped").encode())]  # type: ignore[call-arg]
        if "reason" in {f.name for f in dataclasses.fields(Exited)}
        else []
    ),
    (3, encode_resize(50, 132)),
    (4, encode_stdin_ack(1 << 40)),
    (5, bytes((15,))),
    (6, KillSession("sess-1", 15).encode()),
    (7, ForwardOpen("127.0.0.1", 8080).encode()),
    (8, encode_json([{"session_id": "a", "argv": ["x", {"k": [1, 2, None]}], "bytes": 3}])),
    (9, b"good-session_id.1"),
)


def _first(decoder_index: int) -> bytes:
    """The first seed payload for the decoder at ``decoder_index`` of _CONSOLE_DECODERS."""
    return next(payload for index, payload in CONSOLE_PAYLOADS if index == decoder_index)


def _console_stream(tag: int, frames: list[tuple[int, bytes]]) -> bytes:
    return bytes((tag, 0x0E)) + _frames(*frames)


SEEDS: dict[str, list[bytes]] = {
    "codec": [
        bytes((mode,))
        + _frames(
            (
                1,
                b"\x07"
                + b"\x00\x00\x00\x03abc"
                + b"\x01\x00\x00\x00\x02hi"
                + b"\x00\x05"
                + b"\x00" * 8
                + b"\x00\x00\x00\x01z",
            ),
            (2, b""),
            (0xFF, ErrorMessage(1, "x").encode()),
        )
        for mode in (0x03, 0x07, 0x2A, 0x1D)
    ]
    + [bytes((0x03,)) + encode_frame(1, b"q" * 70000)],
    "control_messages": [
        bytes((i,)) + payload
        for i, payload in enumerate(
            (
                ErrorMessage(ErrorCode.BUSY, "busy now").encode(),
                RequestAttestation(MIN_PROTOCOL_VERSION, MAX_PROTOCOL_VERSION).encode(),
                Attestation(
                    MIN_PROTOCOL_VERSION, VmState.COLD, RuntimeStatus.NOT_STARTED, "b", "h.p.s"
                ).encode(),
                SetupRequest("token", RootfsUrl("https://x.invalid/a", "0f" * 32)).encode(),
                SetupComplete(VmState.READY, RuntimeStatus.SYSTEM_INIT, "boot").encode(),
                RootfsEnd(b"\x11" * 32).encode(),
                Progress("download", 5, 10).encode(),
            )
        )
    ]
    + [
        b"\x03" + SetupRequest("t", RootfsInline(99)).encode(),
        b"\x03" + SetupRequest("t", RootfsNone()).encode(),
        # The optional trailing blocks: rootfs options, setup notes.
        b"\x03" + SetupRequest("t", RootfsInline(9), RootfsOptions(True, 40)).encode(),
        b"\x04"
        + SetupComplete(VmState.READY, RuntimeStatus.SYSTEM_INIT, "b", ("note 1", "n2")).encode(),
    ],
    "control_server": [
        bytes((0x00,)) + _client_stream(),
        bytes((0x0C,)) + _client_stream(inline=32),
        bytes((0x18,)) + _client_stream(url=True),
        bytes((0x21,)) + _client_stream(),
        bytes((0x02,)) + _client_stream(inline=5) + _frames((ControlFrame.ROOTFS_CHUNK, b"x")),
        bytes((0x00,)) + _frames((ControlFrame.REQUEST_ATTESTATION, b"")),
    ],
    "control_client": [
        bytes((0x00,)) + _server_stream(),
        bytes((0x01,)) + _server_stream(upload=True),
        bytes((0x0C,)) + _server_stream(error=True),
        bytes((0x20,)) + _server_stream(legacy=True),
        bytes((0x14,)) + _server_stream() + _frames((ControlFrame.PROGRESS, b"")),
    ],
    "console_payloads": [bytes((index,)) + payload for index, payload in CONSOLE_PAYLOADS],
    "console_streams": [
        _console_stream(
            StreamTag.CONSOLE,
            [
                (ConsoleFrame.OPEN, _first(0)),
                (ConsoleFrame.STDIN, b"input"),
                (ConsoleFrame.RESIZE, encode_resize(30, 100)),
                (ConsoleFrame.SIGNAL, b"\x02"),
                (ConsoleFrame.STDIN_EOF, b""),
                (ConsoleFrame.EXIT_ACK, b""),
            ],
        ),
        _console_stream(
            StreamTag.CONSOLE,
            [
                (ConsoleFrame.STARTED, _first(1)),
                (ConsoleFrame.STDOUT, b"out" * 50),
                (ConsoleFrame.STDERR, b"err"),
                (ConsoleFrame.STDIN_ACK, encode_stdin_ack(5)),
                (ConsoleFrame.EXITED, _first(2)),
                (ConsoleFrame.DETACHED, b"another client"),
            ],
        ),
        _console_stream(
            StreamTag.EXEC_LIST,
            [(SessionsFrame.LIST, b""), (SessionsFrame.LIST_RESULT, _first(8))],
        ),
        _console_stream(
            StreamTag.EXEC_LIST,
            [(SessionsFrame.KILL, _first(6)), (SessionsFrame.KILLED, b"")],
        ),
        _console_stream(
            StreamTag.PORT_FORWARD,
            [(ForwardFrame.OPEN, _first(7)), (ForwardFrame.OPENED, b"")],
        ),
        _console_stream(
            StreamTag.CONSOLE, [(ERROR_FRAME, ErrorMessage(ErrorCode.NOT_FOUND, "gone").encode())]
        ),
    ],
    "proxy_wire": [
        wire.encode(
            "e784079b449483",
            b"\xc0\x00\x00\x00\x01\x08" + b"D" * 8 + b"\x08" + b"S" * 8 + b"\x00" * 1200,
        ),
        wire.encode("e784079b449483", b"\x40" + b"D" * 8 + b"payload" * 10),
        wire.encode("m", b"\x80"),
        wire.encode("ünïcødé", b"\x41\x00"),
    ],
}

TARGETS: dict[str, Callable[[bytes], str]] = {
    "codec": run_codec,
    "control_messages": run_control_messages,
    "control_server": run_control_server,
    "control_client": run_control_client,
    "console_payloads": run_console_payloads,
    "console_streams": run_console_streams,
    "proxy_wire": run_proxy_wire,
}

#: Where an input has a mode byte (or two) in front, mutations of the frame length field
#: look behind it.
FRAME_OFFSET = {
    "control_messages": 0,  # the selector byte: the payload starts right after it
    "console_payloads": 0,
    "codec": 1,
    "control_server": 1,
    "control_client": 1,
    "console_streams": 2,
}

# Mutations ----------------------------------------------------------------------------

EXTREMES = {
    1: (0, 1, 0x7F, 0x80, 0xFE, 0xFF),
    2: (0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF),
    4: (
        0,
        1,
        4,
        0x7FFFFFFF,
        0x80000000,
        0xFFFFFFFE,
        0xFFFFFFFF,
        MAX_PREAUTH_PAYLOAD,
        MAX_PREAUTH_PAYLOAD + 1,
        MAX_PAYLOAD,
        MAX_PAYLOAD + 1,
        4096,
        4097,
    ),
    8: (0, 1, 2**63 - 1, 2**63, 2**64 - 8, 2**64 - 1, 64, 65, 2**32),
}

#: Tokens the mutator inserts (AFL-style dictionary): JSON structure, UTF-8 edge cases
#: (surrogate, overlong, beyond U+10FFFF, BOM, NUL), numbers that overflow.
TOKENS = (
    b"[",
    b"{",
    b'{"k":',
    b'"',
    b"\\u0000",
    b"\\ud800",
    b"\xed\xa0\x80",
    b"\xc0\x80",
    b"\xf4\x90\x80\x80",
    b"\xef\xbb\xbf",
    b"\x00",
    b"\xff",
    b"9" * 20,
    b"1e99999",
    b"-",
    b"\r\n",
    b"\x1b[2J",
)


def mutate(data: bytes, rng: random.Random, pool: list[bytes], frame_offset: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(13)
        size = len(out)
        if op == 0:  # truncation
            del out[rng.randrange(size + 1) :]
        elif op == 1 and size:  # bit flips
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(size)] ^= 1 << rng.randrange(8)
        elif op == 2 and size:  # byte set
            out[rng.randrange(size)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 3:  # insert random bytes
            at = rng.randrange(size + 1)
            out[at:at] = rng.randbytes(rng.choice((1, 2, 4, 8, rng.randrange(64))))
        elif op == 4 and size:  # delete a slice
            at = rng.randrange(size)
            del out[at : at + rng.randint(1, 16)]
        elif op == 5 and size:  # duplicate a slice
            at = rng.randrange(size)
            piece = out[at : at + rng.randint(1, 32)]
            out[at:at] = piece
        elif op == 6:  # a slice or a dictionary token repeated (deep nesting, long runs)
            # A quarter of them where the first payload starts: a value is expected there.
            at = min(size, frame_offset + 1) if rng.random() < 0.25 else rng.randrange(size + 1)
            if size and rng.random() < 0.5:
                piece = bytes(out[at : at + rng.choice((1, 1, 2, 4))]) or b"\x00"
            else:
                piece = rng.choice(TOKENS)
            count = rng.choice((1, 16, 256, 2048, 20000))
            out[at:at] = piece * min(count, MAX_INPUT // len(piece) // 4)
        elif op in (7, 8) and size:  # an integer field set to an extreme value
            width = rng.choice((1, 2, 4, 4, 8))
            if size >= width:
                at = rng.randrange(size - width + 1)
                value = rng.choice(EXTREMES[width] + (size % 2 ** (8 * width),))
                order = "little" if rng.random() < 0.25 else "big"
                out[at : at + width] = value.to_bytes(width, order)
        elif op == 9 and size >= frame_offset + 5:  # the frame length field to an extreme
            value = rng.choice(EXTREMES[4] + ((size - frame_offset - 5) % 2**32,))
            delta = rng.choice((0, 0, -1, 1))
            out[frame_offset + 1 : frame_offset + 5] = ((value + delta) % 2**32).to_bytes(4, "big")
        elif op == 10:  # concatenation with another input
            out += rng.choice(pool)[frame_offset if rng.random() < 0.7 else 0 :]
        elif op == 11:  # splice: our prefix, another's suffix
            other = rng.choice(pool)
            out = out[: rng.randrange(size + 1)] + other[rng.randrange(len(other) + 1) :]
        elif op == 12 and rng.random() < 0.1:  # wholly random input
            out = bytearray(rng.randbytes(rng.choice((0, 1, 5, 9, 17, 64, 300, 5000))))
    if len(out) > MAX_INPUT:
        del out[MAX_INPUT:]
    return bytes(out)


# Running ------------------------------------------------------------------------------


@dataclass
class Failure:
    target: str
    generator: str
    exception: str
    where: str
    input_hex: str
    input_length: int
    count: int = 1

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TargetStats:
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    unexpected: int = 0
    hypothesis_examples: int = 0
    seconds: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    tracemalloc_peak: int = 0
    traced_inputs: int = 0
    largest_input: int = 0
    failures: dict[str, Failure] = field(default_factory=dict)


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _record(
    stats: TargetStats, target: str, generator: str, data: bytes, exc: BaseException
) -> None:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    where = f"{Path(last.filename).name}:{last.lineno} {last.name}" if last else "?"
    key = f"{type(exc).__name__} at {where}"
    stats.unexpected += 1
    known = stats.failures.get(key)
    if known is not None:
        known.count += 1
        if generator not in known.generator.split("+"):
            known.generator += "+" + generator
        if len(data) < known.input_length:  # keep the smallest reproducer
            known.input_hex, known.input_length = data[:4096].hex(), len(data)
        return
    stats.failures[key] = Failure(
        target,
        generator,
        f"{type(exc).__name__}: {str(exc)[:300]}",
        where,
        data[:4096].hex(),
        len(data),
    )


def fuzz_target(name: str, count: int, seed: int, traced: int) -> TargetStats:
    run = TARGETS[name]
    seeds = SEEDS[name]
    offset = FRAME_OFFSET.get(name, 0)
    rng = random.Random(f"{seed}:{name}")
    pool = list(seeds)
    stats = TargetStats(rss_before=_rss())
    started = time.perf_counter()
    tracing = traced > 0
    if tracing:
        tracemalloc.start()
    for index in range(count):  # bounded by ``count``
        if tracing and index >= traced:
            stats.tracemalloc_peak = tracemalloc.get_traced_memory()[1]
            stats.traced_inputs = index
            tracemalloc.stop()
            tracing = False
        if index < len(seeds):
            data = seeds[index]
        else:
            data = mutate(rng.choice(pool), rng, pool, offset)
            if len(data) <= 65536 and rng.random() < 0.02:  # let mutations stack
                if len(pool) < 256:
                    pool.append(data)
                else:
                    pool[rng.randrange(len(seeds), len(pool))] = data
        stats.largest_input = max(stats.largest_input, len(data))
        stats.inputs += 1
        try:
            outcome = run(data)
        except Exception as exc:  # the point: anything undocumented is recorded
            _record(stats, name, "random", data, exc)
            continue
        if outcome == "accepted":
            stats.accepted += 1
        else:
            stats.rejected += 1
    if tracing:
        stats.tracemalloc_peak = tracemalloc.get_traced_memory()[1]
        stats.traced_inputs = count
        tracemalloc.stop()
    stats.seconds = time.perf_counter() - started
    stats.rss_after = _rss()
    return stats


def hypothesis_target(name: str, examples: int, stats: TargetStats) -> None:
    """Structured seeds plus drawn mutations, and raw binaries; derandomized."""
    if examples <= 0:
        return
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    run = TARGETS[name]
    seeds = SEEDS[name]
    offset = FRAME_OFFSET.get(name, 0)
    last: list[bytes] = [b""]

    mutation = st.tuples(
        st.integers(min_value=0, max_value=12),  # op
        st.integers(min_value=0, max_value=2**32 - 1),  # position / choice
        st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF, MAX_PAYLOAD + 1, 2**64 - 1]),
        st.binary(max_size=16),
    )

    def apply(data: bytes, ops: list[tuple[int, int, int, bytes]]) -> bytes:
        out = bytearray(data)
        for op, position, value, blob in ops:
            size = len(out)
            at = position % (size + 1)
            if op == 0:
                del out[at:]
            elif op == 1 and size:
                out[at % size] ^= 1 << (position % 8)
            elif op == 2:
                out[at:at] = blob
            elif op == 3 and size:
                del out[at : at + 1 + position % 16]
            elif op == 4:
                width = (1, 2, 4, 8)[position % 4]
                if size >= width:
                    at = position % (size - width + 1)
                    out[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "big")
            elif op == 5 and size >= offset + 5:
                out[offset + 1 : offset + 5] = (value % 2**32).to_bytes(4, "big")
            elif op == 6:
                out += seeds[position % len(seeds)][offset:]
            elif op == 7 and size:
                piece = bytes(out[at % size : at % size + 1])
                out[at:at] = piece * (1 + value % 3000)
            else:
                out[at:at] = blob
        return bytes(out[:MAX_INPUT])

    inputs = st.one_of(
        st.builds(apply, st.sampled_from(seeds), st.lists(mutation, max_size=4)),
        st.binary(max_size=2048),
        st.builds(lambda s, tail: s[:1] + tail, st.sampled_from(seeds), st.binary(max_size=512)),
    )

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(inputs)
    def check(data: bytes) -> None:
        last[0] = data
        stats.hypothesis_examples += 1
        stats.inputs += 1
        stats.largest_input = max(stats.largest_input, len(data))
        outcome = run(data)
        if outcome == "accepted":
            stats.accepted += 1
        else:
            stats.rejected += 1

    try:
        check()
    except Exception as exc:  # hypothesis re-raises the (shrunk) failure
        _record(stats, name, "hypothesis", last[0], exc)


def fuzz(
    per_target: int,
    hypothesis_examples: int,
    seed: int = 5,
    traced: int = 20000,
    targets: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    total_started = time.perf_counter()
    rss_start = _rss()
    for name in targets or list(TARGETS):
        STATES.clear()
        stats = fuzz_target(name, per_target, seed, traced)
        hypothesis_target(name, hypothesis_examples, stats)
        rss_after_hypothesis = _rss()  # the first run imports hypothesis (~35 MB)
        report[name] = {
            "final_states": dict(STATES.most_common()),
            "inputs": stats.inputs,
            "random_inputs": stats.inputs - stats.hypothesis_examples,
            "hypothesis_examples": stats.hypothesis_examples,
            "accepted": stats.accepted,
            "rejected_with_documented_error": stats.rejected,
            "unexpected_exceptions": stats.unexpected,
            "failures": [f.public() for f in stats.failures.values()],
            "seconds": round(stats.seconds, 2),
            "inputs_per_s": round((stats.inputs - stats.hypothesis_examples) / stats.seconds)
            if stats.seconds
            else None,
            "largest_input": stats.largest_input,
            "rss_before": stats.rss_before,
            "rss_after": stats.rss_after,
            "rss_after_hypothesis": rss_after_hypothesis,
            "tracemalloc_peak": stats.tracemalloc_peak,
            "traced_inputs": stats.traced_inputs,
        }
        if progress:
            entry = report[name]
            progress(
                f"{name}: {entry['inputs']} inputs ({entry['accepted']} accepted, "
                f"{entry['rejected_with_documented_error']} rejected), "
                f"{entry['unexpected_exceptions']} unexpected, {entry['seconds']} s, "
                f"tracemalloc peak {entry['tracemalloc_peak'] / 1e6:.2f} MB"
            )
    return {
        "targets": report,
        "total_inputs": sum(t["inputs"] for t in report.values()),
        "total_unexpected": sum(t["unexpected_exceptions"] for t in report.values()),
        "rss_start": rss_start,
        "rss_end": _rss(),
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "elapsed_s": round(time.perf_counter() - total_started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--per-target",
        type=int,
        default=145_000,
        help="random-fuzzer inputs per target (7 targets)",
    )
    parser.add_argument(
        "--hypothesis", type=int, default=2000, help="hypothesis examples per target"
    )
    parser.add_argument(
        "--traced",
        type=int,
        default=20000,
        help="inputs per target run under tracemalloc (0: none)",
    )
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated targets")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    targets = [t for t in args.only.split(",") if t] or None
    for name in targets or ():
        if name not in TARGETS:
            parser.error(f"unknown target {name}; known: {', '.join(TARGETS)}")
    result = fuzz(
        args.per_target,
        args.hypothesis,
        args.seed,
        args.traced,
        targets,
        progress=lambda line: print(line, flush=True),
    )
    print(
        f"R5: {result['total_inputs']} inputs, {result['total_unexpected']} unexpected, "
        f"{result['elapsed_s']} s, RSS {result['rss_start'] / 1e6:.1f} -> "
        f"{result['rss_end'] / 1e6:.1f} MB (max {result['max_rss'] / 1e6:.1f} MB)"
    )
    path = rel_common.write_results(
        "r5",
        {"suite": "R5 decoder fuzzing", "args": vars(args), "note": args.note, **result},
        args.out,
    )
    print(f"results: {path}")
    return 0 if result["total_unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
