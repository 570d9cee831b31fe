"""aioquic glue: the one place that touches the QUIC library's internals.

``VaultQuicConnection`` extends aioquic's sans-I/O ``QuicConnection`` with the two things it
lacks and we need:

* the TLS exporter (RFC 8446 §7.5). aioquic has no exporter API, so we capture the
  ``exporter_master_secret`` when the first 1-RTT traffic key is installed. On both sides
  that is the moment the key schedule holds the master secret and the transcript runs
  through the server Finished, which is exactly what "exp master" is derived from. The
  value is only handed out once the handshake has completed (a quiche PR shows the trap of
  exposing it earlier).
* receive windows that follow what the application consumed. aioquic doubles a stream's
  window whenever the peer has used half of it, whatever the application has read, so a
  slow reader lets memory grow without bound. Here the window is ``consumed + window``:
  the peer can never have more than ``window`` bytes in our receive queue per stream.

``QuicChannel`` (in ``transport.channel``) drives it from asyncio.
"""

from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStream as _AioStream
from cryptography.hazmat.primitives import hashes

from flyvault.errors import LocalProtocolError
from flyvault.transport.tls import export_keying_material

#: Bytes the pacer lets go back to back: what one GSO send carries (see ``transport.udp``).
PACING_BURST = 64 * 1024
_MAX_STREAM_DATA_FRAME = 0x11
_MAX_STREAM_DATA_FRAME_CAPACITY = 1 + 8 + 8


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer with a larger burst: it lets at most 16 datagrams go back to back,
    which at 1200 bytes is 19 KB, so a bulk sender needs a loop iteration and a timer per
    16 packets. A burst of ``PACING_BURST`` (what one GSO send carries anyway) keeps the
    pacing rate and costs a quarter of those wake-ups; large datagrams are unchanged."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._burst = max(16 * max_datagram_size, PACING_BURST)
        self._datagram_size = max_datagram_size

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
        self.handshake_complete = False

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
        window = self._configuration.max_stream_data
        return consumed + window - stream.max_stream_data_local >= window // 4

    def forget_stream(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)

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
        window = self._configuration.max_stream_data
        if stream.max_stream_data_local:
            target = self._consumed.get(stream.stream_id, 0) + window
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
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local
