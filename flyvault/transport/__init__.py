"""QUIC transport: the only package that imports aioquic."""

from flyvault.transport.channel import QuicChannel, QuicStream, StreamReset
from flyvault.transport.endpoint import QuicListener, TransportSettings, connect, listen

__all__ = [
    "QuicChannel",
    "QuicListener",
    "QuicStream",
    "StreamReset",
    "TransportSettings",
    "connect",
    "listen",
]
