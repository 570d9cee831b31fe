"""aioquic glue: the one place that touches the QUIC library's internals.

``VaultQuicConnection`` extends aioquic's sans-I/O ``QuicConnection`` with the two things it
lacks and we need:

* the TLS exporter (RFC 8446 §7.5). aioquic has no exporter API, so we capture the
  ``exporter_master_secret`` when the first 1-RTT traffic key is installed. On both sides
  that is the moment the key schedule holds the master secret and the transcript runs
  through the server Finished, which is exactly what "exp master" is derived from. The
  value is only handed out once the handshake has completed (a quiche PR shows the trap of
  exposing it earlier).
* path MTU probes (``build_pmtu_probe``) and a way to change the datagram size while the
  connection runs (``set_max_datagram_size``): aioquic fixes it at creation. The search
  itself is ``flyvault.protocol.pmtu``, driven by ``transport.pmtu``. On loopback the size
  grows to ``bulk_datagram_size`` once the handshake is confirmed, and STREAM frames carry
  their length in as many bytes as it needs (``_write_stream_frame``), not aioquic's 2.
* receive windows that follow what the application consumed. aioquic doubles a stream's
  window whenever the peer has used half of it, whatever the application has read, so a
  slow reader lets memory grow without bound. Here the window is ``consumed + window``:
  the peer can never have more than ``window`` bytes in our receive queue per stream.

``QuicChannel`` (in ``transport.channel``) drives it from asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from aioquic import tls
from aioquic.buffer import size_uint_var
from aioquic.quic.connection import END_STATES, QuicConnection
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder, QuicSentPacket
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStream as _AioStream
from cryptography.hazmat.primitives import hashes

from flyvault.errors import LocalProtocolError
from flyvault.transport.tls import export_keying_material

#: Bytes the pacer lets go back to back: what one GSO send carries (see ``transport.udp``).
PACING_BURST = 64 * 1024
_MAX_STREAM_DATA_FRAME = 0x11
_MAX_STREAM_DATA_FRAME_CAPACITY = 1 + 8 + 8
#: The largest value a 2-byte variable-length integer holds (RFC 9000 §16).
_TWO_BYTE_VARINT_MAX = 16383


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer with a larger burst: it lets at most 16 datagrams go back to back,
    which at 1200 bytes is 19 KB, so a bulk sender needs a loop iteration and a timer per
    16 packets. A burst of ``PACING_BURST`` (what one GSO send carries anyway) keeps the
    pacing rate and costs a quarter of those wake-ups; large datagrams are unchanged."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._burst = max(16 * max_datagram_size, PACING_BURST)
        self._datagram_size = max_datagram_size

    def set_datagram_size(self, size: int) -> None:
        self._max_datagram_size = size  # what aioquic's own rate computation reads
        self._datagram_size = size
        self._burst = max(16 * size, PACING_BURST)

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        pacing_rate = congestion_window / max(smoothed_rtt, 1e-6)
        burst = max(2 * self._datagram_size, min(congestion_window // 4, self._burst))
        self.bucket_max = burst / pacing_rate
        self.bucket_time = min(self.bucket_time, self.bucket_max)


class VaultQuicConnection(QuicConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss._pacer = BurstPacer(max_datagram_size=self._max_datagram_size)
        self._exporter_secret: bytes | None = None
        self._exporter_algorithm: hashes.HashAlgorithm | None = None
        self._consumed: dict[int, int] = {}
        #: Streams whose receive window is not the configuration's (``set_receive_window``).
        self._windows: dict[int, int] = {}
        self.handshake_complete = False
        #: Packet numbers of path MTU probes not yet acknowledged or lost.
        self._pmtu_probes: set[int] = set()
        #: ``(probe_id, acked)`` for each probe's fate (set by ``transport.pmtu``).
        self.on_pmtu_probe: Callable[[int, bool], None] | None = None
        #: The congestion controller's own ``on_packets_expired`` (before
        #: ``watch_packet_fates`` wraps it): takes packets out of bytes in flight.
        self._expire_packets: Callable[..., None] | None = None
        #: The datagram size to take once the handshake is confirmed (set on loopback,
        #: see ``transport.endpoint.LOOPBACK_BULK_SIZE``); None: the size stays.
        self.bulk_datagram_size: int | None = None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        if self.bulk_datagram_size is not None and self._handshake_confirmed:
            # Confirmed: the Initial and Handshake keys are gone, so every packet from now
            # on is a 1-RTT one, whose short header has no 2-byte Length field to outgrow.
            self.set_max_datagram_size(self.bulk_datagram_size)
            self.bulk_datagram_size = None
        return super().datagrams_to_send(now)

    # TLS exporter --------------------------------------------------------------------

    def _update_traffic_key(
        self,
        direction: tls.Direction,
        epoch: tls.Epoch,
        cipher_suite: tls.CipherSuite,
        secret: bytes,
    ) -> None:
        if epoch == tls.Epoch.ONE_RTT and self._exporter_secret is None:
            schedule = self.tls.key_schedule
            assert schedule is not None
            self._exporter_secret = schedule.derive_secret(b"exp master")
            self._exporter_algorithm = schedule.algorithm
        super()._update_traffic_key(direction, epoch, cipher_suite, secret)

    def export_keying_material(self, label: bytes, length: int, context: bytes = b"") -> bytes:
        if not self.handshake_complete or self._exporter_secret is None:
            raise LocalProtocolError("the TLS exporter is only available after the handshake")
        assert self._exporter_algorithm is not None
        return export_keying_material(
            self._exporter_secret, self._exporter_algorithm, label, length, context
        )

    def peer_certificate_der(self) -> bytes | None:
        from cryptography.hazmat.primitives import serialization

        certificate = getattr(self.tls, "_peer_certificate", None)
        if certificate is None:
            return None
        der: bytes = certificate.public_bytes(serialization.Encoding.DER)
        return der

    @property
    def negotiated_alpn(self) -> str | None:
        return self.tls.alpn_negotiated if self.tls is not None else None

    # Path MTU ------------------------------------------------------------------------

    @property
    def max_datagram_size(self) -> int:
        return int(self._max_datagram_size)

    def set_max_datagram_size(self, size: int) -> None:
        """Use ``size`` for every packet built from now on. aioquic reads the size at
        creation into the connection, the pacer and the congestion controller (Reno and
        CUBIC keep it for their window arithmetic); each copy is updated here. Packets
        already sent keep their size: their frames are rebuilt at the new size if lost."""
        self._max_datagram_size = size
        pacer = self._loss._pacer
        if isinstance(pacer, BurstPacer):
            pacer.set_datagram_size(size)
        else:
            pacer._max_datagram_size = size
        cc = self._loss._cc
        if hasattr(cc, "_max_datagram_size"):
            cc._max_datagram_size = size
        if hasattr(cc, "additive_increase_factor"):
            cc.additive_increase_factor = size

    def pmtu_ready(self) -> bool:
        """Whether a probe can be sent: 1-RTT keys and a confirmed handshake (before it,
        aioquic arms no loss timer for 1-RTT packets, so a lost probe would go unseen)."""
        return (
            self._state not in END_STATES
            and self._handshake_confirmed
            and self._cryptos[tls.Epoch.ONE_RTT].send.is_valid()
        )

    def build_pmtu_probe(self, probe_id: int, size: int, now: float) -> tuple[int, bytes] | None:
        """``(packet_number, datagram)``: a datagram of exactly ``size`` bytes, one 1-RTT
        packet holding a PING (so it is acknowledged) and PADDING. Its fate reaches
        ``on_pmtu_probe``; its loss is no congestion signal (RFC 9000 §14.4), see
        ``watch_packet_fates``. The packet is registered with loss recovery as sent: if it
        cannot be sent after all, the caller must ``abandon_pmtu_probe`` it."""
        if not self.pmtu_ready():
            return None
        assert self._version is not None
        builder = QuicPacketBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token,
            quic_logger=self._quic_logger,
            spin_bit=self._spin_bit,
            version=self._version,
        )
        builder.start_packet(QuicPacketType.ONE_RTT, self._cryptos[tls.Epoch.ONE_RTT])
        packet_number = builder.packet_number
        buf = builder.start_frame(
            QuicFrameType.PING, handler=self._on_pmtu_probe_delivery, handler_args=(probe_id,)
        )
        buf.push_bytes(bytes(builder.remaining_buffer_space))  # PADDING frames are zeros
        self._pmtu_probes.add(packet_number)
        datagrams = self._flush_builder(
            builder=builder,
            network_path=self._network_paths[0],
            peer_cid=self._peer_cid.cid,
            now=now,
        )
        if len(datagrams) != 1 or len(datagrams[0][0]) != size:
            self.abandon_pmtu_probe(packet_number)
            return None
        return packet_number, datagrams[0][0]

    def abandon_pmtu_probe(self, packet_number: int) -> None:
        """Forget a probe that never left (the kernel refused it, or it was built at the
        wrong size): ``_flush_builder`` registered it with loss recovery as sent, which
        put its bytes in flight and armed the PTO. Undone here as aioquic's own
        ``discard_space`` does, without a loss or any fate being reported."""
        self._pmtu_probes.discard(packet_number)
        space = self._spaces[tls.Epoch.ONE_RTT]
        packet = space.sent_packets.pop(packet_number, None)
        if packet is None:
            return
        if packet.is_ack_eliciting:
            space.ack_eliciting_in_flight = max(0, space.ack_eliciting_in_flight - 1)
        if packet.in_flight:
            expire = self._expire_packets or self._loss._cc.on_packets_expired
            expire(packets=[packet])

    def _on_pmtu_probe_delivery(self, delivery: QuicDeliveryState, probe_id: int) -> None:
        if self.on_pmtu_probe is not None:
            self.on_pmtu_probe(probe_id, delivery == QuicDeliveryState.ACKED)

    def watch_packet_fates(self, callback: Callable[[int, float, bool], None]) -> None:
        """Report ``(size, sent_time, acked)`` for every packet the congestion controller
        learns the fate of (the black-hole signal), and keep lost probes out of it.

        The congestion controller is the one place that sees each in-flight packet's
        acknowledgement or loss with its size; its methods are wrapped on this instance
        only. Lost probes are passed as expired (removed from bytes in flight) instead of
        lost, so that probing never shrinks the congestion window."""
        cc = self._loss._cc
        acked, lost, expired = cc.on_packet_acked, cc.on_packets_lost, cc.on_packets_expired
        self._expire_packets = expired
        probes = self._pmtu_probes

        def on_packet_acked(*, now: float, packet: QuicSentPacket) -> None:
            acked(now=now, packet=packet)
            probes.discard(packet.packet_number)
            callback(packet.sent_bytes, packet.sent_time or now, True)

        def on_packets_lost(*, now: float, packets: Iterable[QuicSentPacket]) -> None:
            real = [p for p in packets if p.packet_number not in probes]
            probed = [p for p in packets if p.packet_number in probes]
            probes.difference_update(p.packet_number for p in probed)
            if probed:
                expired(packets=probed)
            if real:
                lost(now=now, packets=real)
            for packet in real:
                callback(packet.sent_bytes, packet.sent_time or now, False)

        def on_packets_expired(*, packets: Iterable[QuicSentPacket]) -> None:
            # A PTO gave up on these (aioquic's "expired"): also the only loss signal
            # when a black hole swallows every large packet and no ACK comes back.
            packets = list(packets)
            expired(packets=packets)
            for packet in packets:
                if packet.packet_number not in probes:
                    callback(packet.sent_bytes, packet.sent_time or 0.0, False)
                probes.discard(packet.packet_number)

        cc.on_packet_acked = on_packet_acked  # type: ignore[method-assign]
        cc.on_packets_lost = on_packets_lost  # type: ignore[method-assign]
        cc.on_packets_expired = on_packets_expired  # type: ignore[method-assign]

    # Flow control --------------------------------------------------------------------

    def consume(self, stream_id: int, amount: int) -> bool:
        """The application took ``amount`` bytes of ``stream_id`` out of our queue.

        Returns True when that earns the peer a window update worth sending now.
        """
        consumed = self._consumed.get(stream_id, 0) + amount
        self._consumed[stream_id] = consumed
        stream = self._streams.get(stream_id)
        if stream is None or not stream.max_stream_data_local:
            return False
        window = self._window(stream_id)
        return consumed + window - stream.max_stream_data_local >= window // 4

    def set_receive_window(self, stream_id: int, window: int) -> None:
        """Let the peer have up to ``window`` bytes of ``stream_id`` in our queue, never
        fewer than the configuration's ``max_stream_data`` (every other stream's). It is
        announced in the next packet built; a limit once announced is never taken back."""
        self._windows[stream_id] = max(window, self._configuration.max_stream_data)

    def _window(self, stream_id: int) -> int:
        return self._windows.get(stream_id, self._configuration.max_stream_data)

    def forget_stream(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)
        self._windows.pop(stream_id, None)

    def send_buffered(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` that the peer has not acknowledged yet."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: Any, stream: _AioStream
    ) -> None:
        stream_id = stream.stream_id
        assert stream_id is not None  # aioquic types it optional; a data stream has one
        window = self._window(stream_id)
        if stream.max_stream_data_local:
            target = self._consumed.get(stream_id, 0) + window
            # Announce in steps of a quarter window, not on every read.
            if target - stream.max_stream_data_local >= window // 4:
                stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                _MAX_STREAM_DATA_FRAME,
                capacity=_MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_stream_frame(
        self, builder: QuicPacketBuilder, space: Any, stream: _AioStream, max_offset: int
    ) -> int:
        """aioquic's STREAM frame, with its length as a variable-length integer of the size
        the frame needs. aioquic always writes 2 bytes, which caps a frame, and so a packet
        (one frame per stream per packet), at 16383 bytes of data: loopback's bulk
        datagrams (``transport.endpoint.LOOPBACK_BULK_SIZE``) carry more."""
        sender = stream.sender
        stream_id = stream.stream_id
        assert stream_id is not None  # aioquic types it optional; a data stream has one
        head = 1 + size_uint_var(stream_id)
        if sender.next_offset:
            head += size_uint_var(sender.next_offset)
        room = builder.remaining_flight_space - head
        length_size = 2 if room - 2 <= _TWO_BYTE_VARINT_MAX else 4
        previous_highest = sender.highest_offset
        frame = sender.get_frame(room - length_size, max_offset)
        if frame is None:
            return 0
        frame_type = QuicFrameType.STREAM_BASE | 2  # the LEN bit: a length follows
        if frame.offset:
            frame_type |= 4
        if frame.fin:
            frame_type |= 1
        buf = builder.start_frame(
            frame_type,
            capacity=head + length_size,
            handler=sender.on_data_delivery,
            handler_args=(frame.offset, frame.offset + len(frame.data), frame.fin),
        )
        buf.push_uint_var(stream_id)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint_var(len(frame.data))
        buf.push_bytes(frame.data)
        if self._quic_logger is not None:
            builder.quic_logger_frames.append(
                self._quic_logger.encode_stream_frame(frame, stream_id=stream_id)
            )
        return int(sender.highest_offset - previous_highest)
