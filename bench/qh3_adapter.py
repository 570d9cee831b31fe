"""A measuring-only adapter: our ``QuicChannel`` and batched UDP transport over qh3's core.

Not product code. It answers "what would qh3's Rust core give under our asyncio glue?"
for ``transport_bulk.py --variants qh3-ours``. What it cannot keep, and why qh3 is not
behind the adapter in ``flyvault.transport``:

* receive windows that follow what the application consumed (``consume``): qh3's core
  advances a stream's window itself when data is handed over as an event, and its Python
  API has no call to hold it back, so a slow reader's queue would not be bounded;
* the TLS exporter is not offered by qh3 either (its TLS is Python, so the same capture
  as ``VaultQuicConnection`` would be possible, but on private names again).

``install()`` swaps the connection class that ``flyvault.transport.endpoint`` builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _qh3_configuration(config: Any) -> Any:
    from qh3.quic.configuration import QuicConfiguration
    from transport_bulk import _load_pem

    converted = QuicConfiguration(
        is_client=config.is_client,
        alpn_protocols=list(config.alpn_protocols or []),
        idle_timeout=config.idle_timeout,
        max_datagram_size=config.max_datagram_size,
        max_stream_data=config.max_stream_data,
        max_data=config.max_data,
        connection_id_length=config.connection_id_length,
        # Our datagram size is fixed (FLY_VAULT_DATAGRAM_SIZE): no probing above it.
        probe_datagram_size=False,
    )
    converted.verify_mode = config.verify_mode
    converted.server_name = config.server_name
    if config.certificate is not None:
        _load_pem(converted, config.certificate, config.private_key)
    return converted


_ORIGINAL: list[Any] = []


def uninstall() -> None:
    import flyvault.transport.endpoint as endpoint

    if _ORIGINAL:
        endpoint.VaultQuicConnection = _ORIGINAL.pop()  # type: ignore[misc]


def install() -> None:
    import aioquic.quic.events as aio_events
    from qh3.quic.connection import QuicConnection

    import flyvault.transport.endpoint as endpoint

    class Qh3Connection(QuicConnection):  # type: ignore[misc]
        def __init__(self, *, configuration: Any, **kwargs: Any) -> None:
            super().__init__(configuration=_qh3_configuration(configuration), **kwargs)
            self.handshake_complete = False

        def next_event(self) -> Any:
            event = super().next_event()
            if event is None:
                return None
            kind = getattr(aio_events, type(event).__name__, None)
            if kind is None:
                return event
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in vars(event).items() if k in names})

        def send_buffered(self, stream_id: int) -> int:
            return int(self.get_send_buffer_size(stream_id))

        def consume(self, stream_id: int, amount: int) -> bool:
            return False  # no hook: qh3 moves the window by itself

        def forget_stream(self, stream_id: int) -> None:
            pass

    if not _ORIGINAL:
        _ORIGINAL.append(endpoint.VaultQuicConnection)
    endpoint.VaultQuicConnection = Qh3Connection  # type: ignore[misc,assignment]
