"""A UDP datagram transport that reads and writes in batches.

aioquic's cost is per packet, and asyncio's own datagram transport adds to it: one
``recvfrom`` per event-loop iteration, and one ``sendto`` system call per datagram. At the
1200-byte datagrams of an internet path that is ~40,000 loop iterations and syscalls per
second for 45 MB/s. This transport:

* reads every datagram waiting on the socket (up to ``READ_BATCH``) in one loop callback,
  so the QUIC channel can process them all and answer once (``QuicChannel`` defers its
  transmit to the end of the batch);
* sends a run of equal-sized datagrams to one address with a single ``sendmsg`` carrying
  the ``UDP_SEGMENT`` control message (Linux UDP GSO, kernel 4.18+): the kernel cuts the
  buffer into datagrams. When the kernel refuses it (an old kernel, a device without
  checksum offload, another OS) GSO is switched off for the socket and the run is sent
  one datagram at a time; nothing is lost;
* asks for ``UDP_GRO`` on receive, so the kernel may hand over a run of datagrams from
  one sender as one buffer (with the segment size as control data), which is split here.

The interface is the part of ``asyncio.DatagramTransport`` that the channels use:
``sendto``, ``send_batch``, ``close``, ``abort``, ``is_closing``, ``get_extra_info``.
When the socket buffer is full, datagrams wait in a bounded queue (as asyncio's transport
would, but bounded: UDP may drop, and QUIC retransmits).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

log = logging.getLogger("flyvault.transport")

#: Linux's ``UDP_SEGMENT`` / ``UDP_GRO`` socket options (``SOL_UDP`` level); the socket
#: module does not name them.
UDP_SEGMENT = 103
UDP_GRO = 104
#: The kernel's limit on segments per GSO send (UDP_MAX_SEGMENTS).
GSO_MAX_SEGMENTS = 64
#: The largest UDP payload of one send (IPv4: 65535 - 20 - 8).
GSO_MAX_BYTES = 65507
#: Datagrams handled per loop callback (a GRO read may bring up to 64 at once): enough to
#: amortize the callback and the transmit after it, few enough that ACKs and window
#: updates go out promptly and one busy socket cannot starve the loop's other work.
READ_BATCH = 64
#: ... and at most this many bytes: with loopback's 65 KB datagrams, 64 of them are 4 MB,
#: the whole of a bulk stream's receive window, so the sender would wait for each batch's
#: ACKs and window update with nothing in flight (a 1 GB download: ~6.5 s against ~5).
READ_BATCH_BYTES = 256 * 1024
RECEIVE_BUFFER = 65536
#: Socket buffers asked of the kernel (it caps them at net.core.{r,w}mem_max): the default
#: 208 KiB holds only a dozen loopback-size datagrams, and a burst beyond that is loss.
SOCKET_BUFFER = 4 * 1024 * 1024
#: The receive buffer the kernel must grant (it reports twice what it keeps for data)
#: before a loopback connection's datagrams grow to 65 KB (``transport.endpoint``): with
#: ``net.core.rmem_max`` at its default 208 KiB the socket would hold only three of them,
#: and a burst beyond that is loss. Both ends of a loopback path are on one host, under
#: one limit, so our own socket stands for the peer's.
BULK_RECEIVE_BUFFER = 2 * 1024 * 1024
#: Bytes that may wait for a full socket buffer to drain before datagrams are dropped.
MAX_QUEUED_BYTES = 4 * 1024 * 1024
#: errno values meaning "this socket or device cannot do GSO" (not a transient failure).
GSO_REFUSALS = frozenset(
    {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP}
)
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0


def enlarge_buffers(sock: Any) -> None:
    """``sock``: a socket, or asyncio's wrapper of one (it has ``setsockopt`` too)."""
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def holds_bulk(sock: Any) -> bool:
    """Whether the kernel granted ``sock`` a receive buffer of ``BULK_RECEIVE_BUFFER``."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= BULK_RECEIVE_BUFFER)
    except OSError:
        return False


def segment_runs(
    datagrams: Sequence[bytes], *, max_segments: int = GSO_MAX_SEGMENTS
) -> list[tuple[list[bytes], int]]:
    """Split ``datagrams`` into GSO runs, order kept: ``(run, segment_size)`` pairs.

    In a run every datagram but the last has ``segment_size`` bytes and the last has at
    most that (the kernel's rule), the run holds at most ``max_segments`` datagrams and
    at most ``GSO_MAX_BYTES`` bytes.
    """
    runs: list[tuple[list[bytes], int]] = []
    run: list[bytes] = []
    size = 0
    total = 0
    for datagram in datagrams:
        length = len(datagram)
        if (
            run
            and length <= size
            and len(run) < max_segments
            and total + length <= GSO_MAX_BYTES
            and len(run[-1]) == size
        ):
            run.append(datagram)
            total += length
            continue
        if run:
            runs.append((run, size))
        run, size, total = [datagram], length, length
    if run:
        runs.append((run, size))
    return runs


def split_segments(data: bytes, segment_size: int) -> list[bytes]:
    """The datagrams of a GRO buffer: ``segment_size`` bytes each, the last maybe fewer."""
    if segment_size <= 0 or len(data) <= segment_size:
        return [data]
    view = memoryview(data)
    return [bytes(view[i : i + segment_size]) for i in range(0, len(data), segment_size)]


def _gro_segment_size(ancillary: Iterable[tuple[int, int, bytes]]) -> int:
    for level, kind, value in ancillary:
        if level == socket.SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            size: int = struct.unpack("=i", value[:4])[0]
            return size
    return 0


class BatchedDatagramTransport(asyncio.DatagramTransport):
    """UDP transport over a non-blocking socket; see the module docstring."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        *,
        connected: bool = False,
        gso: bool | None = None,
        gro: bool | None = None,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._connected = connected
        self._closing = False
        self._queue: collections.deque[tuple[bytes, int, Any]] = collections.deque()
        self._queued_bytes = 0
        self._extra: dict[str, Any] = {"socket": sock}
        with _suppress_os_error():
            self._extra["sockname"] = sock.getsockname()
        if connected:
            with _suppress_os_error():
                self._extra["peername"] = sock.getpeername()
        linux = sys.platform.startswith("linux")
        #: Whether a GSO send is still worth trying on this socket.
        self.gso = linux if gso is None else gso
        self.gro = False
        if (linux if gro is None else gro) and _GRO_CMSG_SPACE:
            try:
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        #: Counters for benchmarks and tests.
        self.stats = {"sends": 0, "gso_sends": 0, "datagrams_out": 0, "reads": 0, "dropped": 0}
        sock.setblocking(False)
        protocol.connection_made(self)
        loop.add_reader(sock.fileno(), self._read_ready)

    # asyncio.BaseTransport ----------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._queue.clear()
        self._loop.remove_writer(self._sock.fileno())
        self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return self._queued_bytes

    def _finish(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    # Receiving ----------------------------------------------------------------------------

    def _read_ready(self) -> None:
        protocol = self._protocol
        delivered = 0
        received = 0
        while delivered < READ_BATCH and received < READ_BATCH_BYTES:
            if self._closing:
                return
            try:
                if self.gro:
                    data, ancillary, _, addr = self._sock.recvmsg(RECEIVE_BUFFER, _GRO_CMSG_SPACE)
                    segment_size = _gro_segment_size(ancillary)
                else:
                    data, addr = self._sock.recvfrom(RECEIVE_BUFFER)
                    segment_size = 0
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ICMP errors on a connected socket (ECONNREFUSED ...), as asyncio reports.
                protocol.error_received(exc)
                return
            self.stats["reads"] += 1
            received += len(data)
            if segment_size and len(data) > segment_size:
                datagrams = split_segments(data, segment_size)
                for datagram in datagrams:
                    protocol.datagram_received(datagram, addr)
                delivered += len(datagrams)
            else:
                protocol.datagram_received(data, addr)
                delivered += 1

    # Sending ------------------------------------------------------------------------------

    def sendto(self, data: bytes, addr: Any = None) -> None:  # type: ignore[override]
        self.send_batch([data], addr)

    def send_batch(self, datagrams: Sequence[bytes], addr: Any = None) -> None:
        """Send ``datagrams`` to ``addr`` in order, GSO runs where the kernel allows."""
        if self._closing or not datagrams:
            return
        if self._connected:
            addr = None
        if self.gso and len(datagrams) > 1:
            for run, size in segment_runs(datagrams):
                if len(run) == 1:
                    self._send(run[0], 0, addr)
                else:
                    self._send(b"".join(run), size, addr, run)
        else:
            for datagram in datagrams:
                self._send(datagram, 0, addr)

    def send_now(self, data: bytes, addr: Any = None) -> OSError | None:
        """Send one datagram on its own (never in a GSO run) and return EMSGSIZE instead
        of reporting it: a path MTU probe needs to know that the kernel refused it, and a
        probe larger than the interface allows inside a GSO run would make the whole run
        fail. Any other error (ECONNREFUSED from a pending ICMP on a connected socket ...)
        goes to the protocol's ``error_received`` as on every other send, and None is
        returned: the datagram is as lost as any other that could not be sent."""
        if self._closing:
            return None
        if self._connected:
            addr = None
        if self._queue:
            self._enqueue(data, 0, addr)
            return None
        try:
            self._syscall(data, 0, addr)
        except (BlockingIOError, InterruptedError):
            self._enqueue(data, 0, addr)
            self._loop.add_writer(self._sock.fileno(), self._write_ready)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return exc
            self._protocol.error_received(exc)
        return None

    def _send(
        self, payload: bytes, segment_size: int, addr: Any, run: list[bytes] | None = None
    ) -> None:
        if self._queue:
            self._enqueue(payload, segment_size, addr)
            return
        try:
            self._syscall(payload, segment_size, addr)
        except (BlockingIOError, InterruptedError):
            self._enqueue(payload, segment_size, addr)
            self._loop.add_writer(self._sock.fileno(), self._write_ready)
        except OSError as exc:
            if segment_size and exc.errno in GSO_REFUSALS and run is not None:
                self._refuse_gso(exc)
                for datagram in run:
                    self._send(datagram, 0, addr)
                return
            self._protocol.error_received(exc)

    def _syscall(self, payload: bytes, segment_size: int, addr: Any) -> None:
        sock = self._sock
        if segment_size:
            cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment_size))]
            if addr is None:
                sock.sendmsg([payload], cmsg)
            else:
                sock.sendmsg([payload], cmsg, 0, addr)
            self.stats["gso_sends"] += 1
            self.stats["datagrams_out"] += -(-len(payload) // segment_size)
        else:
            if addr is None:
                sock.send(payload)
            else:
                sock.sendto(payload, addr)
            self.stats["datagrams_out"] += 1
        self.stats["sends"] += 1

    def _refuse_gso(self, exc: OSError) -> None:
        if self.gso:
            log.debug("UDP GSO refused by the kernel (%s); sending datagrams one by one", exc)
        self.gso = False

    def _enqueue(self, payload: bytes, segment_size: int, addr: Any) -> None:
        if self._queued_bytes + len(payload) > MAX_QUEUED_BYTES:
            self.stats["dropped"] += 1  # QUIC retransmits it, as after any loss
            return
        self._queue.append((payload, segment_size, addr))
        self._queued_bytes += len(payload)

    def _write_ready(self) -> None:
        while self._queue:
            payload, segment_size, addr = self._queue[0]
            try:
                self._syscall(payload, segment_size, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._queue.popleft()
                self._queued_bytes -= len(payload)
                if segment_size and exc.errno in GSO_REFUSALS:
                    self._refuse_gso(exc)
                    for datagram in reversed(split_segments(payload, segment_size)):
                        self._queue.appendleft((datagram, 0, addr))
                        self._queued_bytes += len(datagram)
                    continue
                self._protocol.error_received(exc)
                continue
            self._queue.popleft()
            self._queued_bytes -= len(payload)
        self._loop.remove_writer(self._sock.fileno())


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


def supports_readers(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    """Whether ``loop`` can watch a socket (selector loops, uvloop); Windows' proactor
    loop cannot, and gets asyncio's own datagram transport instead."""
    try:
        loop.add_reader(sock.fileno(), _nothing)
    except NotImplementedError:
        return False
    loop.remove_reader(sock.fileno())
    return True


def _nothing() -> None:
    return None


async def open_transport(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol_factory: Callable[[], asyncio.DatagramProtocol],
    *,
    connected: bool = False,
) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
    """Wrap a bound (and, for a client, connected) socket; the protocol's
    ``connection_made`` has run when this returns. The batched transport where the loop
    allows it, else asyncio's (one datagram per call; the channels handle both)."""
    if not supports_readers(loop, sock):
        return await loop.create_datagram_endpoint(protocol_factory, sock=sock)
    protocol = protocol_factory()
    transport = BatchedDatagramTransport(loop, sock, protocol, connected=connected)
    return transport, protocol
