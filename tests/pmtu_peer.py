"""One end of the path MTU tests and benchmark over network namespaces: our real QUIC
transport, run as a process inside a namespace (``ip netns exec NS python pmtu_peer.py``).

  pmtu_peer.py server HOST         listens on HOST:0, prints ``READY <port>``, then serves:
                                   a stream starting with ``E`` is echoed back; one with
                                   ``S`` is answered with the server's view of the search
                                   (JSON) once it completed (bounded wait).
  pmtu_peer.py client HOST PORT N  echoes N random bytes (while the search runs), waits for
                                   the search, echoes N bytes again (timed), asks the
                                   server, prints one JSON line and exits 0 if all arrived.

Every wait is bounded; a peer that runs too long exits by itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

from flyvault.transport import QuicChannel, QuicStream, TransportSettings, connect, listen

SEARCH_WAIT = 30.0
LIFETIME = 120.0


def search_view(channel: QuicChannel) -> dict[str, Any]:
    driver = channel.pmtu
    return {
        "size": channel.datagram_size,
        "searching": driver is not None,
        "complete": driver is not None and driver.search_complete,
        "probes": driver.machine.probes_sent if driver is not None else 0,
        "black_holes": driver.machine.black_holes if driver is not None else 0,
    }


async def wait_search(channel: QuicChannel) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SEARCH_WAIT
    while channel.pmtu is not None and not channel.pmtu.search_complete:
        if loop.time() > deadline or channel.is_closed:
            return
        await asyncio.sleep(0.02)


async def serve(host: str) -> None:
    async def handle(channel: QuicChannel, stream: QuicStream) -> None:
        kind = b""
        while not kind:
            kind = await stream.read(1)
        if kind == b"S":
            await wait_search(channel)
            await stream.send(json.dumps(search_view(channel)).encode(), end_stream=True)
            return
        while data := await stream.read():
            await stream.send(data)
        stream.write_eof()

    def on_channel(channel: QuicChannel) -> None:
        channel.on_stream = lambda s: asyncio.ensure_future(handle(channel, s))

    listener = await listen(host, 0, on_channel)
    print(f"READY {listener.address[1]}", flush=True)
    await asyncio.sleep(LIFETIME)


async def echo(client: QuicChannel, size: int) -> tuple[bool, float]:
    payload = os.urandom(size)
    stream = client.open_stream()
    started = time.monotonic()

    async def writer() -> None:
        await stream.send(b"E")
        for i in range(0, len(payload), 65536):
            await stream.send(payload[i : i + 65536])
        stream.write_eof()

    task = asyncio.ensure_future(writer())
    digest = hashlib.sha256()
    received = 0
    while chunk := await stream.read():
        digest.update(chunk)
        received += len(chunk)
    await task
    elapsed = time.monotonic() - started
    return received == size and digest.digest() == hashlib.sha256(payload).digest(), elapsed


async def ask_server(client: QuicChannel) -> Any:
    stream = client.open_stream()
    await stream.send(b"S", end_stream=True)
    answer = b""
    while chunk := await stream.read():
        answer += chunk
    return json.loads(answer)


async def run_client(host: str, port: int, size: int) -> int:
    client = await connect(host, port, TransportSettings(idle_timeout=30.0))
    first_ok, _ = await echo(client, size)
    await wait_search(client)
    second_ok, elapsed = await echo(client, size)
    server = await ask_server(client)
    print(
        json.dumps(
            {
                "client": search_view(client),
                "server": server,
                "intact": first_ok and second_ok,
                "echo_bytes": size,
                "echo_seconds": elapsed,
                "mb_per_s": 2 * size / elapsed / 1e6,
            }
        ),
        flush=True,
    )
    client.close_now()
    return 0 if first_ok and second_ok else 1


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    role = sys.argv[1]
    if role == "server":
        asyncio.run(asyncio.wait_for(serve(sys.argv[2]), LIFETIME + 5))
        return 0
    host, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    return asyncio.run(asyncio.wait_for(run_client(host, port, size), LIFETIME))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TimeoutError:
        sys.exit(0 if sys.argv[1] == "server" else 3)
