"""Console streams (exec sessions, shells) and the sessions stream (list, kill).

One console stream is one attachment: the output pump sends the session's log from the
client's offset onward, then EXITED once the process ended and every byte was sent; the
input pump applies stdin, EOF, resize, signals and the exit acknowledgement. Closing the
stream detaches without touching the process. Every refusal is an error frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from flyvault.errors import RemoteProtocolError, TransportError, VaultError
from flyvault.protocol.console import (
    ConsoleFrame,
    Exited,
    FrameChannel,
    KillSession,
    OpenSession,
    SessionsFrame,
    Started,
    decode_resize,
    decode_signal,
    encode_json,
    encode_stdin_ack,
    error_frame,
    frame,
    refusal,
)
from flyvault.protocol.constants import EXIT_REASON_VERSION, REQUEST_TIMEOUT, ErrorCode

from .outputlog import STDERR
from .sessions import Attachment, Session, SessionRegistry

if TYPE_CHECKING:
    from flyvault.transport import QuicStream

    from .app import ServerConnection

log = logging.getLogger("flyvault.server.console")

OPEN_TIMEOUT = REQUEST_TIMEOUT
CHUNK = 64 * 1024
#: How long the server waits for the client's exit acknowledgement after EXITED.
ACK_TIMEOUT = 30.0


async def _first_frame(stream: QuicStream, channel: FrameChannel) -> tuple[int, bytes] | None:
    """The stream's first frame, or None if the client closed it without sending one."""
    while True:
        item = channel.next_frame()
        if item is not None:
            return item.type, item.payload
        if channel.finished:
            return None
        channel.feed(await asyncio.wait_for(stream.read(), OPEN_TIMEOUT))


async def handle_console(connection: ServerConnection, stream: QuicStream, initial: bytes) -> None:
    registry: SessionRegistry = connection.server.sessions
    channel = FrameChannel()
    if initial:
        channel.feed(initial)
    try:
        first = await _first_frame(stream, channel)
        if first is None:
            return
        frame_type, payload = first
        if frame_type != ConsoleFrame.OPEN:
            raise RemoteProtocolError(f"expected a console open frame, got type 0x{frame_type:02x}")
        request = OpenSession.decode(payload)
    except (RemoteProtocolError, TimeoutError) as exc:
        message = str(exc) or "no console open frame within 10 s"
        await _refuse(stream, ErrorCode.PROTOCOL, message)
        return
    try:
        session, created = await registry.open(request)
    except VaultError as exc:  # the code is the one its class declares
        await _refuse_with(stream, exc)
        return
    reasons = connection.protocol_version >= EXIT_REASON_VERSION
    await _attach(registry, session, created, request, stream, channel, reasons=reasons)


async def _attach(
    registry: SessionRegistry,
    session: Session,
    created: bool,
    request: OpenSession,
    stream: QuicStream,
    channel: FrameChannel,
    *,
    reasons: bool = False,
) -> None:
    resume = min(request.resume_offset, session.log.end)
    start = max(resume, session.log.start)
    attachment = session.attach(start, lambda: stream.unacknowledged)
    assert session.process is not None
    started = Started(
        session.id,
        created,
        start,
        start - resume,
        session.process.pid,
        session.pty,
        session.stdin_handled,
    )
    stream.write(frame(ConsoleFrame.STARTED, started.encode()))
    if not created and request.pty and session.pty and request.rows and request.cols:
        session.process.resize(request.rows, request.cols)
    output = asyncio.ensure_future(_pump_output(session, attachment, stream, reasons))
    inputs = asyncio.ensure_future(_pump_input(registry, session, attachment, stream, channel))
    displaced = asyncio.ensure_future(attachment.displaced.wait())
    try:
        await asyncio.wait({output, inputs, displaced}, return_when=asyncio.FIRST_COMPLETED)
        if displaced.done():
            with contextlib.suppress(TransportError):
                stream.write(
                    frame(ConsoleFrame.DETACHED, attachment.reason.encode("utf-8")), end_stream=True
                )
        elif output.done() and not output.cancelled() and output.exception() is None:
            # EXITED was sent: wait (bounded) for the client's acknowledgement or its close.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(inputs), ACK_TIMEOUT)
        if inputs.done() and not inputs.cancelled():
            error = inputs.exception()
            if isinstance(error, RemoteProtocolError):
                await _refuse(stream, ErrorCode.PROTOCOL, error.message)
    finally:
        # Measured before anything else can release the stream's send state.
        lost_at = (
            attachment.confirmed()
            if stream.connection_closed and not displaced.done()
            else None
        )
        for task in (output, inputs, displaced):
            task.cancel()
        await asyncio.gather(output, inputs, displaced, return_exceptions=True)
        session.detach(attachment, lost_at=lost_at)
        # Always finish our side (write_eof is a no-op when already done): a stream is only
        # released, and its credit given back to the client, once both sides have ended.
        with contextlib.suppress(TransportError):
            stream.write_eof()


async def _pump_output(
    session: Session, attachment: Attachment, stream: QuicStream, reasons: bool = False
) -> None:
    while True:
        result = session.log.read(attachment.offset, CHUNK)
        if result.dropped:
            # Rare (output is paused for an attached client before it could be lost, but a
            # process's last burst is read whole): say where the stream resumes, so the
            # client's offset stays true and a later reattach neither repeats nor skips.
            assert session.process is not None
            notice = Started(
                session.id,
                False,
                result.start_offset,
                result.dropped,
                session.process.pid,
                session.pty,
                session.stdin_handled,
            )
            stream.write(frame(ConsoleFrame.STARTED, notice.encode()))
            session.sent(attachment, result.start_offset)
        if result.chunks:
            for channel_id, data in result.chunks:
                kind = ConsoleFrame.STDERR if channel_id == STDERR else ConsoleFrame.STDOUT
                stream.write(frame(kind, data))
            await stream.drain()
            session.sent(attachment, result.next_offset)
            continue
        if session.exit is not None and attachment.offset >= session.log.end:
            reason = session.end_reason if reasons else None
            exited = Exited(session.exit.code, session.exit.signal, session.log.end, reason)
            await stream.send(frame(ConsoleFrame.EXITED, exited.encode()))
            return
        changed = session.change_event()
        # Re-check after taking the event: output may have arrived in between.
        if session.log.end > attachment.offset or session.exit is not None:
            continue
        if session.output_held:
            # Held for bytes the client has not acknowledged yet: their acknowledgements,
            # not new output, are what lets the process go on. (A connection that died
            # silently fails this wait once it is declared dead.)
            await stream.wait_delivered()
            session.sent(attachment, attachment.offset)
            continue
        await changed.wait()


async def _pump_input(
    registry: SessionRegistry,
    session: Session,
    attachment: Attachment,
    stream: QuicStream,
    channel: FrameChannel,
) -> None:
    process = session.process
    assert process is not None
    acknowledged = session.stdin_handled
    while True:
        if attachment.displaced.is_set():
            # Another client attached and was told how much input we have taken: applying
            # more from this (dead) stream would take bytes it is about to resend.
            return
        item = channel.next_frame()
        if item is None:
            if channel.finished:
                return  # the client closed its side: it detached
            if session.stdin_handled != acknowledged:
                # Lets the client drop what it keeps for a resend after a loss.
                acknowledged = session.stdin_handled
                # Our side may have ended already (EXITED went out): the EXIT_ACK must
                # still be read, so a late acknowledgement is simply not sent.
                with contextlib.suppress(TransportError):
                    stream.write(frame(ConsoleFrame.STDIN_ACK, encode_stdin_ack(acknowledged)))
            channel.feed(await stream.read())
            continue
        kind, payload = item.type, item.payload
        if kind == ConsoleFrame.STDIN:
            session.stdin_handled += len(payload)  # taken, even if the process is gone
            if session.running:
                process.write_stdin(payload)
                await process.drain_stdin()
        elif kind == ConsoleFrame.STDIN_EOF:
            if session.running:
                process.close_stdin()
        elif kind == ConsoleFrame.RESIZE:
            rows, cols = decode_resize(payload)
            if session.running:
                process.resize(rows, cols)
        elif kind == ConsoleFrame.SIGNAL:
            signo = decode_signal(payload)
            if session.running:
                process.send_signal(signo)
        elif kind == ConsoleFrame.EXIT_ACK:
            registry.acknowledge_exit(session)
            return
        else:
            raise RemoteProtocolError(f"unexpected console frame type 0x{kind:02x}")


async def handle_sessions(connection: ServerConnection, stream: QuicStream, initial: bytes) -> None:
    registry: SessionRegistry = connection.server.sessions
    channel = FrameChannel()
    if initial:
        channel.feed(initial)
    try:
        first = await _first_frame(stream, channel)
        if first is None:
            return
        kind, payload = first
        if kind == SessionsFrame.LIST:
            registry.collect()
            await stream.send(
                frame(SessionsFrame.LIST_RESULT, encode_json(registry.list())), end_stream=True
            )
        elif kind == SessionsFrame.KILL:
            request = KillSession.decode(payload)
            session = registry.kill(request.session_id, request.signal)
            log.info("session %s sent signal %d by request", session.id, request.signal)
            await stream.send(frame(SessionsFrame.KILLED), end_stream=True)
        else:
            raise RemoteProtocolError(f"unexpected sessions frame type 0x{kind:02x}")
    except (RemoteProtocolError, TimeoutError) as exc:
        await _refuse(stream, ErrorCode.PROTOCOL, str(exc) or "no request within 10 s")
    except VaultError as exc:
        await _refuse_with(stream, exc)


async def _refuse(stream: QuicStream, code: ErrorCode, message: str) -> None:
    with contextlib.suppress(TransportError):
        await stream.send(error_frame(code, message), end_stream=True)


async def _refuse_with(stream: QuicStream, exc: VaultError) -> None:
    with contextlib.suppress(TransportError):
        await stream.send(refusal(exc), end_stream=True)
