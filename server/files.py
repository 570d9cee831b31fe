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
import struct
from typing import TYPE_CHECKING

from flyvault.errors import (
    ProvisionError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
    VaultError,
)
from flyvault.protocol.constants import ERROR_FRAME
from flyvault.protocol.files import (
    MAX_FRAME,
    DataReceived,
    DigestReceived,
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

_HEADER = struct.Struct(">BI")


async def handle_files(connection: ServerConnection, stream: QuicStream, initial: bytes) -> None:
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
    try:
        await _serve(machine, stream, worker)
    finally:
        await worker.close()


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
    """The forked worker, seen from the handler: frames over a socketpair, and its exit."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

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

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)

    async def send(self, kind: int, payload: bytes = b"") -> None:
        assert self.writer is not None
        self.writer.write(_HEADER.pack(kind, len(payload)) + payload)
        await self.writer.drain()

    def end_input(self) -> None:
        """No more client data: the worker sees the end of its input (abandoned upload)."""
        if self.writer is not None and not self.writer.is_closing():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    async def receive(self) -> tuple[int, bytes] | None:
        assert self.reader is not None
        try:
            header = await self.reader.readexactly(_HEADER.size)
            kind, length = _HEADER.unpack(header)
            if length > MAX_FRAME:
                raise RemoteError("the file worker sent an oversized frame")
            return kind, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()
        with contextlib.suppress(ChildProcessError):
            await asyncio.to_thread(os.waitpid, self.pid, 0)


async def _send(stream: QuicStream, machine: FileServer) -> None:
    with contextlib.suppress(TransportError):
        await stream.send(machine.data_to_send(), end_stream=machine.finished)


async def _serve(machine: FileServer, stream: QuicStream, worker: _Worker) -> None:
    await worker.open()
    upload = asyncio.ensure_future(_upload(machine, stream, worker))
    try:
        await _download(machine, stream, worker)
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
    """Client -> worker, through the machine's checks."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            event = machine.next_event(loop.time())
        except RemoteProtocolError as exc:
            log.debug("file stream: %s", exc)
            worker.end_input()
            await _send(stream, machine)
            return
        if event is None:
            if machine.finished or machine.input_ended:
                worker.end_input()
                return
            try:
                async with asyncio.timeout_at(machine.next_deadline()):
                    data = await stream.read()
            except TimeoutError:
                machine.handle_timer(loop.time())
                worker.end_input()
                await _send(stream, machine)
                return
            except TransportError:
                worker.end_input()
                return
            if data:
                machine.receive_data(data)
            else:
                machine.receive_eof()
            continue
        if isinstance(event, ResumeRequested):
            await worker.send(FileFrame.RESUME_AT, encode_offset(event.offset))
        elif isinstance(event, DataReceived):
            await worker.send(FileFrame.DATA, event.data)
        elif isinstance(event, DigestReceived):
            await worker.send(FileFrame.DIGEST, event.digest.encode())
        elif isinstance(event, UploadEnded):
            await worker.send(FileFrame.END)
        elif isinstance(event, (UploadAbandoned, UploadTimedOut)):
            worker.end_input()
            if isinstance(event, UploadTimedOut):
                await _send(stream, machine)
            return


async def _download(machine: FileServer, stream: QuicStream, worker: _Worker) -> None:
    """Worker -> client, through the machine; ends when the answer went out."""
    loop = asyncio.get_running_loop()
    while not machine.finished:
        frame = await worker.receive()
        if machine.finished:
            break
        if frame is None:
            machine.refuse(RemoteError("the file worker ended without an answer (see init logs)"))
        else:
            kind, payload = frame
            if kind == FileFrame.READY:
                ready = WriteReady.decode(payload)
                machine.ready(ready.have, ready.sha256, loop.time())
            elif kind == FileFrame.DATA:
                machine.send_data(payload)
            elif kind == FileFrame.DIGEST:
                machine.send_digest(MemberDigest.decode(payload))
            elif kind == FileFrame.ITEMS:
                machine.send_items(list(decode_items(payload)))
            elif kind == FileFrame.RESULT:
                machine.answer(decode_result(payload))
            elif kind == ERROR_FRAME:
                machine.refuse(ErrorMessage.decode(payload).to_exception())
            else:
                machine.refuse(RemoteError(f"the file worker sent frame 0x{kind:02x}"))
        data = machine.data_to_send()
        try:
            stream.write(data, end_stream=machine.finished)
            await stream.drain()
        except TransportError:
            return
