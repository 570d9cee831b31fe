"""QUIC transport: the only package that imports aioquic."""

from flyvault.transport import _deferred

_deferred.install()  # before aioquic is imported: see _deferred

from flyvault.transport.channel import QuicChannel, QuicStream  # noqa: E402
from flyvault.transport.endpoint import (  # noqa: E402
    QuicListener,
    TransportSettings,
    connect,
    listen,
)

__all__ = [
    "QuicChannel",
    "QuicListener",
    "QuicStream",
    "TransportSettings",
    "connect",
    "listen",
]
