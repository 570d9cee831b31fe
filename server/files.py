"""File streams (tag 0x05): one file operation per stream, run by a forked worker.

The wire rules (what may arrive when, deadlines, frame bounds) are the sans-I/O
``flyvault.protocol.files.FileServer``; this module is its glue. Once the REQUEST is in, a
worker is forked (``server.files_worker``): it enters the workload's mount namespace (VM
mode; it joins the workload's cgroups first, as exec's commands do, so its memory counts
against the workload's limits) or stays on the host (host mode), becomes the requested
account and performs the operation. Two pumps run until the worker answers: the client's validated frames go to the
worker, the worker's frames go through the machine to the client. Each side waits for the
other (QUIC flow control one way, the socketpair's buffer the other), so memory stays flat
whatever the file's size. If the client goes away during a write, the worker sees the end
of its input and keeps a resumable partial (or removes its temp file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from flyvault.errors import (
    ProvisionError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
    VaultError,
)
from flyvault.protocol.codec import Frame, FrameDecoder, encode_frame
from flyvault.protocol.constants import ERROR_FRAME
from flyvault.protocol.files import (
    MAX_FRAME,
    FileServer,
    RequestReceived,
    RequestTimedOut,
    ResumeRequested,
    UploadAbandoned,
    UploadEnded,
    UploadTimedOut,
    encode_offset,
)
from flyvault.protocol.files_messages import (
    READING_OPS,
    FileFrame,
    FileRequest,
    MemberDigest,
    WriteReady,
    decode_items,
    decode_result,
)
from flyvault.protocol.messages import ErrorMessage

from .files_worker import Target, child_main

if TYPE_CHECKING:
    from flyvault.transport import QuicStream

    from .app import ServerConnection

log = logging.getLogger("flyvault.server.files")

#: Upload frames go to the worker once this many bytes are queued (or the stream is idle).
UPLOAD_BATCH = 256 * 1024
#: The most one read from the worker takes.
RECEIVE_SIZE = 1024 * 1024
# READING_OPS (files_messages): when their client leaves, the worker is stopped
# (``_download``), and killed if it has not ended ``WORKER_EXIT_GRACE`` after its stream
# (blocked opening a FIFO, hashing a huge file). Any other operation runs to its end, as it
# would have without the client: a remove or a tar_put cut short by a kill would leave half
# a tree and temp files. Its exit is looked for every ``WORKER_EXIT_POLL``.
WORKER_EXIT_GRACE = 5.0
WORKER_EXIT_POLL = 0.01


async def handle_files(connection: ServerConnection, stream: QuicStream, initial: bytes) -> None:
    stream.use_bulk_buffers()  # before the first read: the next window update is wide
    loop = asyncio.get_running_loop()
    machine = FileServer(loop.time())
    if initial:
        machine.receive_data(initial)
    request = await _receive_request(machine, stream)
    if request is None:
        await _send(stream, machine)
        return
    try:
        target = _target(connection)
    except VaultError as exc:
        machine.refuse(exc)
        await _send(stream, machine)
        return
    worker = _Worker.fork(request, target)
    reading = request.op in READING_OPS
    try:
        await _serve(machine, stream, worker, reading)
    finally:
        await worker.close(kill_after=WORKER_EXIT_GRACE if reading else None)


async def _receive_request(machine: FileServer, stream: QuicStream) -> FileRequest | None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            event = machine.next_event(loop.time())
        except RemoteProtocolError as exc:
            log.debug("file stream refused: %s", exc)
            return None
        if isinstance(event, RequestReceived):
            return event.request
        if machine.finished:
            return None
        deadline = machine.next_deadline()
        try:
            async with asyncio.timeout_at(deadline):
                data = await stream.read()
        except TimeoutError:
            machine.handle_timer(loop.time())
            assert isinstance(machine.next_event(), RequestTimedOut)
            return None
        except TransportError:
            return None
        if data:
            machine.receive_data(data)
        else:
            machine.receive_eof()


def _target(connection: ServerConnection) -> Target:
    """The workload's mount namespace, root and cgroups (VM mode), or the host."""
    provisioner = connection.server.provisioner
    if provisioner is None:
        return Target(host_home=os.environ.get("HOME") or "/")
    # How exec enters now: the current init, and the cgroups its commands join (raises
    # ProvisionError while the workload is stopped or stopping).
    entry = provisioner.runtime.entry()
    flags = os.O_RDONLY | os.O_CLOEXEC
    opened: list[int] = []
    try:
        mount_ns = os.open(f"/proc/{entry.init_pid}/ns/mnt", flags)
        opened.append(mount_ns)
        root = os.open(f"/proc/{entry.init_pid}/root", flags | os.O_DIRECTORY)
        opened.append(root)
        signal.pidfd_send_signal(entry.pidfd, 0)  # the pid was not recycled meanwhile
        for path in entry.cgroup_files:
            opened.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
    except OSError:
        for fd in opened:
            os.close(fd)
        raise ProvisionError(
            "the vault's workload is not running",
            hint="it restarts by itself; if it keeps failing, reprovision the vault",
        ) from None
    return Target(mount_ns=mount_ns, root=root, cgroup_procs=tuple(opened[2:]))


class _Worker:
    """The forked worker, seen from the handler: frames over a socketpair, and its exit.

    The socket is used with the loop's ``sock_*`` calls, not asyncio streams: a stream
    copies every byte twice more on the way in (into its buffer, out of it), which for a
    large file is a good part of init's work."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        sock.setblocking(False)
        self.outbox: list[bytes] = []
        self.outbox_size = 0
        self.inbox = FrameDecoder(MAX_FRAME)
        self._input_ended = False

    @classmethod
    def fork(cls, request: FileRequest, target: Target) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - the child never returns
            ours.close()
            child_main(theirs, request, target)
        theirs.close()
        for fd in (target.mount_ns, target.root, *target.cgroup_procs):
            if fd is not None:
                os.close(fd)
        return cls(pid, ours)

    def queue(self, kind: int, payload: bytes = b"") -> None:
        """A frame for the worker, written by the next ``flush``."""
        self.pass_on(encode_frame(kind, payload, max_payload=MAX_FRAME))

    def pass_on(self, frames: bytes) -> None:
        """Frames already encoded (``FileServer.take_upload``), written by the next ``flush``."""
        self.outbox.append(frames)
        self.outbox_size += len(frames)

    async def flush(self) -> None:
        if self.outbox:
            data = b"".join(self.outbox)
            self.outbox, self.outbox_size = [], 0
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def end_input(self) -> None:
        """No more client data: the worker sees the end of its input (abandoned upload)."""
        if not self._input_ended:
            self._input_ended = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    async def receive(self, relayed: frozenset[int]) -> tuple[bytes, list[Frame]] | None:
        """What the worker has sent so far (waiting for something), or None once it ended:
        a run of frames of the ``relayed`` types still encoded, or else every frame decoded.

        Raises RemoteError for a frame larger than MAX_FRAME."""
        loop = asyncio.get_running_loop()
        while True:
            run = self.inbox.take_run(relayed, RECEIVE_SIZE) if relayed else b""
            if run:
                return run, []
            frames: list[Frame] = []
            try:
                while (frame := self.inbox.next_frame()) is not None:
                    frames.append(frame)
            except RemoteProtocolError:
                raise RemoteError("the file worker sent an oversized frame") from None
            if frames:
                return b"", frames
            try:
                data = await loop.sock_recv(self.sock, RECEIVE_SIZE)
            except ConnectionError:
                data = b""
            if not data:
                return None
            self.inbox.feed(data)

    async def close(self, *, kill_after: float | None) -> None:
        """Close the socket and reap the worker (polled: no thread waits on it). With
        ``kill_after``, one not ended by then is killed (see ``READING_OPS``)."""
        # No reader or writer may outlive the fd: its number goes to the next socket.
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        loop.remove_writer(self.sock.fileno())
        self.sock.close()
        if not await _exited(self.pid, kill_after):
            log.info("file worker %d did not end after its stream; killed", self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            await _exited(self.pid, None)


async def _exited(pid: int, timeout: float | None) -> bool:
    """Reap ``pid`` once it exits; False if it has not within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if deadline is not None and loop.time() >= deadline:
            return False
        await asyncio.sleep(WORKER_EXIT_POLL)


async def _send(stream: QuicStream, machine: FileServer) -> None:
    with contextlib.suppress(TransportError):
        await stream.send(machine.data_to_send(), end_stream=machine.finished)


async def _serve(machine: FileServer, stream: QuicStream, worker: _Worker, reading: bool) -> None:
    upload = asyncio.ensure_future(_upload(machine, stream, worker))
    try:
        await _download(machine, stream, worker, reading)
    finally:
        if not upload.done():
            upload.cancel()
            # Answered (or refused) before the client finished its upload: read no more,
            # so its sends fail at once instead of waiting on flow control forever.
            with contextlib.suppress(TransportError):
                stream.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await upload


async def _upload(machine: FileServer, stream: QuicStream, worker: _Worker) -> None:
    """Client -> worker, through the machine's checks. The frames of everything read from
    the stream so far go to the worker in one write (one per frame cost more than the bytes
    for a tree of small files); data and digests go still encoded (``take_upload``)."""
    loop = asyncio.get_running_loop()
    while True:
        run = machine.take_upload(loop.time())
        if run:
            worker.pass_on(run)
            if worker.outbox_size >= UPLOAD_BATCH:
                await worker.flush()
            continue
        try:
            event = machine.next_event(loop.time())
        except RemoteProtocolError as exc:
            log.debug("file stream: %s", exc)
            await worker.flush()
            worker.end_input()
            await _send(stream, machine)
            return
        if event is None:
            await worker.flush()
            if machine.finished or machine.input_ended:
                worker.end_input()
                return
            if not await _read_into(machine, stream, worker):
                return
        elif not await _pass_on(event, stream, machine, worker):
            return
        elif worker.outbox_size >= UPLOAD_BATCH:
            await worker.flush()


async def _read_into(machine: FileServer, stream: QuicStream, worker: _Worker) -> bool:
    """The next bytes from the client into the machine; False when the upload is over."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(machine.next_deadline()):
            data = await stream.read()
    except TimeoutError:
        machine.handle_timer(loop.time())
        worker.end_input()
        await _send(stream, machine)
        return False
    except TransportError:
        worker.end_input()
        return False
    if data:
        machine.receive_data(data)
    else:
        machine.receive_eof()
    return True


async def _pass_on(event: object, stream: QuicStream, machine: FileServer, worker: _Worker) -> bool:
    """One upload event to the worker; False when the upload is over. (Data and digests
    never come here: ``take_upload`` hands them over still encoded, before any event.)"""
    if isinstance(event, ResumeRequested):
        worker.queue(FileFrame.RESUME_AT, encode_offset(event.offset))
    elif isinstance(event, UploadEnded):
        worker.queue(FileFrame.END, bytes.fromhex(event.sha256) if event.sha256 else b"")
        await worker.flush()
    elif isinstance(event, (UploadAbandoned, UploadTimedOut)):
        await worker.flush()
        worker.end_input()
        if isinstance(event, UploadTimedOut):
            await _send(stream, machine)
        return False
    return True


async def _download(
    machine: FileServer, stream: QuicStream, worker: _Worker, reading: bool
) -> None:
    """Worker -> client, through the machine; ends when the answer went out. A ``reading``
    operation's also when its client stopped reading (it left: the worker, perhaps blocked
    on a FIFO's open or a long hash, is then stopped by ``close``); any other runs on until
    its worker answers, so what the client sent before it stopped reading still lands.
    Every frame that has arrived is handled before one write to the stream."""
    never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    stopped = asyncio.ensure_future(stream.wait_stopped()) if reading else never
    try:
        await _relay(machine, stream, worker, stopped)
    finally:
        stopped.cancel()


async def _relay(
    machine: FileServer, stream: QuicStream, worker: _Worker, stopped: asyncio.Future[Any]
) -> None:
    while not machine.finished:
        receiving = asyncio.ensure_future(worker.receive(machine.relayable()))
        try:
            await asyncio.wait((receiving, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receiving.done():  # the client left, or this handler was cancelled
                receiving.cancel()
                # Its sock_recv unregisters the socket's fd as the cancel lands: before
                # ``close`` frees the fd, which the next worker's socket may get.
                await asyncio.wait((receiving,))
        if receiving.cancelled():
            return
        try:
            received = receiving.result()
        except RemoteError as exc:
            received = None
            machine.refuse(exc)
        if received is None and not machine.finished:
            machine.refuse(RemoteError("the file worker ended without an answer (see init logs)"))
        run, frames = received or (b"", [])
        if run and not machine.finished:  # the upload side may have refused meanwhile
            machine.relay(run)
        for frame in frames:
            if machine.finished:
                break
            _hand_over(machine, frame.type, frame.payload)
        data = machine.data_to_send()
        if not data and not machine.finished:
            continue
        try:
            stream.write(data, end_stream=machine.finished)
            await stream.drain()
        except TransportError:
            return


def _hand_over(machine: FileServer, kind: int, payload: bytes) -> None:
    """One frame of the worker's into the machine (which checks what may follow what)."""
    if kind == FileFrame.DATA:
        machine.send_data(payload)
    elif kind == FileFrame.DIGEST:
        machine.send_digest(MemberDigest.decode(payload))
    elif kind == FileFrame.READY:
        ready = WriteReady.decode(payload)
        machine.ready(ready.have, ready.sha256, asyncio.get_running_loop().time())
    elif kind == FileFrame.ITEMS:
        machine.send_items(list(decode_items(payload)))
    elif kind == FileFrame.RESULT:
        machine.answer(decode_result(payload))
    elif kind == ERROR_FRAME:
        machine.refuse(ErrorMessage.decode(payload).to_exception())
    else:
        machine.refuse(RemoteError(f"the file worker sent frame 0x{kind:02x}"))
