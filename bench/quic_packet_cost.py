"""What one QUIC packet costs in the sans-I/O core alone: no sockets, no event loop.

A client and a server ``VaultQuicConnection`` handshake in memory, then the client sends
N MB on one stream; the datagrams go straight into the server. The time spent building
(``datagrams_to_send`` on the sender), parsing (``receive_datagram`` + events on the
receiver) and handling ACKs is measured apart, per packet, at each datagram size. This is
the floor under any asyncio glue: the per-packet budget at 45 MB/s and 1200-byte
datagrams is ~26 µs for everything on each end.

    .venv/bin/python bench/quic_packet_cost.py [--mb 20] [--sizes 1200,16000] [--cores aioquic,qh3]

``--cores qh3`` measures qh3's core (Rust) the same way (``pip install qh3``; it has no
hook for our receive windows, so its windows are simply large there).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import ssl
import sys
import time
from typing import Any

from flyvault.transport.connection import VaultQuicConnection

ADDR = ("127.0.0.1", 4433)


def _pair(core: str, size: int, window: int = 64 * 1024 * 1024) -> tuple[Any, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from transport_bulk import _load_certificate

    configuration = importlib.import_module(f"{core}.quic.configuration")
    if core == "aioquic":
        make: Any = VaultQuicConnection
    else:
        make = importlib.import_module(f"{core}.quic.connection").QuicConnection
    options = dict(
        alpn_protocols=["x"], max_datagram_size=size, max_stream_data=window, max_data=window
    )
    server_config = configuration.QuicConfiguration(is_client=False, **options)
    _load_certificate(server_config)
    client_config = configuration.QuicConfiguration(is_client=True, **options)
    client_config.verify_mode = ssl.CERT_NONE
    client = make(configuration=client_config)
    client.connect(ADDR, now=0.0)
    server = make(
        configuration=server_config,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    now = 0.0
    for _ in range(20):
        now += 0.001
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, ADDR, now)
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, ADDR, now)
    return client, server


def measure(core: str, size: int, total: int) -> dict[str, Any]:
    events = importlib.import_module(f"{core}.quic.events")
    client, server = _pair(core, size)
    consume = getattr(server, "consume", None)
    buffered = getattr(client, "send_buffered", None)
    in_buffer = 0
    stream_id = client.get_next_available_stream_id()
    payload = b"x" * (64 * 1024)
    sent = 0
    build = parse = acks = 0.0
    packets = ack_packets = 0
    received = 0
    now = 1.0
    clock = time.perf_counter
    while received < total:
        # Keep ~4 MB queued (qh3 has no send_buffered: count what was received instead).
        in_buffer = buffered(stream_id) if buffered else sent - received
        while sent < total and in_buffer < 4 * 1024 * 1024:
            client.send_stream_data(stream_id, payload)
            sent += len(payload)
            in_buffer += len(payload)
        now += 0.0005
        t0 = clock()
        datagrams = client.datagrams_to_send(now)
        t1 = clock()
        for data, _ in datagrams:
            server.receive_datagram(data, ADDR, now)
        while (event := server.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                received += len(event.data)
                if consume is not None:
                    consume(event.stream_id, len(event.data))
        t2 = clock()
        # The receiver answers once per batch (as QuicChannel does since the batched transport).
        now += 0.0015
        answers = server.datagrams_to_send(now)
        for data, _ in answers:
            client.receive_datagram(data, ADDR, now)
        t3 = clock()
        build += t1 - t0
        parse += t2 - t1
        acks += t3 - t2
        packets += len(datagrams)
        ack_packets += len(answers)
        if not datagrams and not answers:
            now += 0.01  # let a timer (pacing, loss) fire
            client.handle_timer(now)
    return {
        "core": core,
        "datagram_size": size,
        "packets": packets,
        "sender_build_us_per_packet": round(build / packets * 1e6, 2),
        "receiver_parse_us_per_packet": round(parse / packets * 1e6, 2),
        "ack_round_us_per_data_packet": round(acks / packets * 1e6, 2),
        "ack_packets": ack_packets,
        "core_only_MB_s_sender_bound": round(total / build / 1e6, 1),
        "core_only_MB_s_receiver_bound": round(total / (parse + acks) / 1e6, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--sizes", default="1200,16000")
    parser.add_argument("--cores", default="aioquic")
    args = parser.parse_args()
    results = [
        measure(core, int(size), args.mb * 1024 * 1024)
        for size in args.sizes.split(",")
        for core in args.cores.split(",")
    ]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
