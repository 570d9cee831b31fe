"""Console streams (exec sessions, shells) and the sessions stream (list, kill).

One console stream is one attachment, driven by an ``ExecServer`` machine
(``flyvault/protocol/exec_server.py``) that holds the wire rules: the OPEN and its deadline,
STARTED, output offsets, stdin offsets and acknowledgements, DETACHED, EXITED and the wait
for its acknowledgement. This module is the glue: the output pump feeds the session's log
to the machine, the input pump applies the machine's input events to the process, and the
attachment's coordinator services the machine's deadlines. Closing the stream detaches
without touching the process. Every refusal is an error frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from flyvault.errors import RemoteProtocolError, TransportError, Unsupported, VaultError
from flyvault.protocol.console import (
    Exited,
    FrameChannel,
    KillSession,
    OpenSession,
    SessionsFrame,
    Started,
    encode_json,
    frame,
    refusal,
)
from flyvault.protocol.constants import EXIT_REASON_VERSION
from flyvault.protocol.exec_server import ExecServer, ServerState
from flyvault.protocol.exec_session import (
    OPEN_TIMEOUT,
    ClientDetached,
    ExitAcknowledged,
    OutputChannel,
    ResizeRequested,
    ServerEvent,
    SessionOpenRequested,
    SignalRequested,
    StdinClosed,
    StdinReceived,
)

from .outputlog import STDERR
from .sessions import Attachment, Session, SessionRegistry

if TYPE_CHECKING:
    from flyvault.transport import QuicStream

    from .app import ServerConnection

log = logging.getLogger("flyvault.server.console")

CHUNK = 64 * 1024

Clock = Callable[[], float]


async def _first_frame(stream: QuicStream, channel: FrameChannel) -> tuple[int, bytes] | None:
    """The stream's first frame, or None if the client closed it without sending one."""
    while True:
        item = channel.next_frame()
        if item is not None:
            return item.type, item.payload
        if channel.finished:
            return None
        channel.feed(await asyncio.wait_for(stream.read(), OPEN_TIMEOUT))


def _feed(machine: ExecServer, data: bytes) -> None:
    if data:
        machine.receive_data(data)
    else:
        machine.receive_eof()


def _finish(stream: QuicStream, machine: ExecServer) -> None:
    """Write what the machine queued last, ending our side if the machine's side is over.
    (No drain: a displaced client's connection may be dead, and nothing waits on it.)"""
    with contextlib.suppress(TransportError):
        stream.write(machine.data_to_send(), end_stream=machine.sending_finished)


async def handle_console(
    connection: ServerConnection,
    stream: QuicStream,
    initial: bytes,
    *,
    clock: Clock | None = None,
) -> None:
    clock = clock or asyncio.get_running_loop().time
    machine = ExecServer(clock())
    if initial:
        machine.receive_data(initial)
    request = await _receive_open(machine, stream, clock)
    if request is None:
        _finish(stream, machine)
        return
    registry: SessionRegistry = connection.server.sessions
    opened = await _open_session(registry, request, machine)
    if opened is None:
        _finish(stream, machine)
        return
    session, created = opened
    reasons = connection.protocol_version >= EXIT_REASON_VERSION
    await _attach(registry, session, created, machine, stream, clock, reasons=reasons)


async def _receive_open(
    machine: ExecServer, stream: QuicStream, clock: Clock
) -> OpenSession | None:
    """The OPEN request, or None (closed before it, too late, or not an OPEN: the machine
    has queued the answer, if any)."""
    while True:
        try:
            event = machine.next_event()
        except RemoteProtocolError:
            return None
        if isinstance(event, SessionOpenRequested):
            return event.request
        if event is not None:
            return None
        deadline = machine.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - clock())
        try:
            _feed(machine, await asyncio.wait_for(stream.read(), timeout))
        except TimeoutError:
            machine.handle_timer(clock())


async def _open_session(
    registry: SessionRegistry, request: OpenSession, machine: ExecServer
) -> tuple[Session, bool] | None:
    try:
        return await registry.open(request)
    except VaultError as exc:  # the code is the one its class declares
        machine.refuse_with(exc)
    return None


def _started(session: Session, created: bool, offset: int, dropped: int) -> Started:
    assert session.process is not None
    return Started(
        session.id,
        created,
        offset,
        dropped,
        session.process.pid,
        session.pty,
        session.stdin_handled,
    )


async def _attach(
    registry: SessionRegistry,
    session: Session,
    created: bool,
    machine: ExecServer,
    stream: QuicStream,
    clock: Clock,
    *,
    reasons: bool = False,
) -> None:
    request = machine.request
    assert request is not None and session.process is not None
    # A session this OPEN created replays from 0: its output may already have begun, and an
    # offset the client kept from an earlier run of that name means nothing here.
    resume = 0 if created else min(request.resume_offset, session.log.end)
    start = session.first_held(resume)
    attach = session.observe if request.observe else session.attach
    attachment = attach(start, lambda: stream.unacknowledged)
    machine.start(_started(session, created, start, start - resume))
    stream.write(machine.data_to_send())
    if request.observe:
        pass  # a read-only attach changes nothing, not even the terminal's size
    elif not created and request.pty and session.pty and request.rows and request.cols:
        session.process.resize(request.rows, request.cols)
    output = asyncio.ensure_future(
        _pump_output(session, attachment, machine, stream, clock, reasons)
    )
    inputs = asyncio.ensure_future(_pump_input(registry, session, attachment, machine, stream))
    displaced = asyncio.ensure_future(attachment.displaced.wait())
    try:
        await asyncio.wait({output, inputs, displaced}, return_when=asyncio.FIRST_COMPLETED)
        if displaced.done() and machine.attached:
            machine.displace(attachment.reason)
        elif output.done() and not output.cancelled() and output.exception() is None:
            await _await_exit_ack(machine, inputs, clock)
        _finish(stream, machine)
    finally:
        # Measured before anything else can release the stream's send state.
        lost_at = (
            attachment.confirmed() if stream.connection_closed and not displaced.done() else None
        )
        for task in (output, inputs, displaced):
            task.cancel()
        await asyncio.gather(output, inputs, displaced, return_exceptions=True)
        session.detach(attachment, lost_at=lost_at)
        # Always finish our side (write_eof is a no-op when already done): a stream is only
        # released, and its credit given back to the client, once both sides have ended.
        with contextlib.suppress(TransportError):
            stream.write_eof()


async def _await_exit_ack(machine: ExecServer, inputs: asyncio.Future[None], clock: Clock) -> None:
    """EXITED went out: wait for the client's acknowledgement or close, until the
    machine's deadline."""
    while machine.state is ServerState.EXITED and not inputs.done():
        deadline = machine.next_deadline()
        assert deadline is not None
        await asyncio.wait({inputs}, timeout=max(0.0, deadline - clock()))
        machine.handle_timer(clock())


async def _pump_output(
    session: Session,
    attachment: Attachment,
    machine: ExecServer,
    stream: QuicStream,
    clock: Clock,
    reasons: bool = False,
) -> None:
    while machine.state is ServerState.ATTACHED:
        result = session.read(attachment.offset, CHUNK)
        if result.dropped:
            # Rare (output is paused for an attached client before it could be lost, but a
            # process's last burst is read whole): say where the stream resumes, so the
            # client's offset stays true and a later reattach neither repeats nor skips.
            machine.send_resume_notice(
                _started(session, False, result.start_offset, result.dropped)
            )
            stream.write(machine.data_to_send())
            session.sent(attachment, result.start_offset)
        if result.chunks:
            for channel_id, data in result.chunks:
                channel = OutputChannel.STDERR if channel_id == STDERR else OutputChannel.STDOUT
                machine.send_output(channel, data)
            stream.write(machine.data_to_send())
            await stream.drain()
            session.sent(attachment, result.next_offset)
            continue
        if session.exit is not None and attachment.offset >= session.log.end:
            reason = session.end_reason if reasons else None
            exited = Exited(session.exit.code, session.exit.signal, session.log.end, reason)
            machine.send_exited(exited, clock())
            await stream.send(machine.data_to_send())
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
    machine: ExecServer,
    stream: QuicStream,
) -> None:
    # Displaced: another client attached and was told how much input we have taken;
    # applying more from this (dead) stream would take bytes it is about to resend.
    while not attachment.displaced.is_set():
        event = machine.next_event()
        if event is None:
            if not machine.attached:
                return
            # The machine may have queued a STDIN_ACK (it lets the client drop what it
            # keeps for a resend). Our side may have ended already: then it is not sent.
            with contextlib.suppress(TransportError):
                stream.write(machine.data_to_send())
            _feed(machine, await stream.read())
        elif isinstance(event, ExitAcknowledged):
            if not attachment.observer:  # an onlooker's acknowledgement collects nothing
                registry.acknowledge_exit(session)
            return
        elif isinstance(event, ClientDetached):
            return  # the client closed its side: it detached
        else:
            await _apply_input(session, event)


async def _apply_input(session: Session, event: ServerEvent) -> None:
    process = session.process
    assert process is not None
    if isinstance(event, StdinReceived):
        session.stdin_handled += len(event.data)  # taken, even if the process is gone
        if session.running:
            process.write_stdin(event.data)
            await process.drain_stdin()
    elif not session.running:
        return
    elif isinstance(event, StdinClosed):
        process.close_stdin()
    elif isinstance(event, ResizeRequested):
        process.resize(event.rows, event.cols)
    elif isinstance(event, SignalRequested):
        process.send_signal(event.signal)


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
        elif kind == SessionsFrame.RESTART:
            await stream.send(await _restart(connection), end_stream=True)
        else:
            raise RemoteProtocolError(f"unexpected sessions frame type 0x{kind:02x}")
    except TimeoutError:
        late = RemoteProtocolError(f"no request within {OPEN_TIMEOUT:.0f} s")
        await _refuse_with(stream, late)
    except VaultError as exc:  # the code is the one its class declares
        await _refuse_with(stream, exc)


async def _restart(connection: ServerConnection) -> bytes:
    """The workload stopped (its sessions ended with the reason) and started again."""
    provisioner = connection.server.provisioner
    if provisioner is None:
        raise Unsupported("a host-mode vault has no workload to restart (commands run on its host)")
    state = connection.server.state
    old = state.boot_id
    log.info("workload restart requested by %s", connection.source)
    await provisioner.restart_workload()
    answer = {
        "old_boot_id": old,
        "new_boot_id": state.boot_id,
        "runtime": state.runtime_status().name.lower(),
    }
    return frame(SessionsFrame.RESTARTED, encode_json(answer))


async def _refuse_with(stream: QuicStream, exc: VaultError) -> None:
    with contextlib.suppress(TransportError):
        await stream.send(refusal(exc), end_stream=True)
