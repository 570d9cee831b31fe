"""Bulk throughput of our QUIC layer against aioquic's own asyncio streams, same run.

Two processes (server and client) per variant, one stream, N MB client -> server.
    .venv/bin/python bench/transport_bulk.py [--mb 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import ssl
import sys
import time

CHUNK = 64 * 1024


def _server(kind: str, port_queue: multiprocessing.Queue, total: int) -> None:
    async def ours() -> None:
        from flyvault.transport import listen

        done = asyncio.Event()

        async def sink(stream) -> None:  # type: ignore[no-untyped-def]
            got = 0
            while chunk := await stream.read():
                got += len(chunk)
            await stream.send(str(got).encode(), end_stream=True)
            done.set()

        def on_channel(channel) -> None:  # type: ignore[no-untyped-def]
            channel.on_stream = lambda s: asyncio.ensure_future(sink(s))

        listener = await listen("127.0.0.1", 0, on_channel)
        port_queue.put(listener.address[1])
        await done.wait()
        await asyncio.sleep(0.5)

    async def plain() -> None:
        from aioquic.asyncio import serve
        from aioquic.quic.configuration import QuicConfiguration

        from flyvault.transport.tls import generate_self_signed

        cert, key = generate_self_signed()
        config = QuicConfiguration(is_client=False, alpn_protocols=["x"])
        config.certificate, config.private_key = cert, key
        done = asyncio.Event()
        tasks: set[asyncio.Future[None]] = set()

        def handler(reader, writer) -> None:  # type: ignore[no-untyped-def]
            async def run() -> None:
                got = 0
                while chunk := await reader.read(CHUNK):
                    got += len(chunk)
                writer.write(str(got).encode())
                writer.write_eof()
                done.set()

            tasks.add(asyncio.ensure_future(run()))

        server = await serve("127.0.0.1", 0, configuration=config, stream_handler=handler)
        port_queue.put(server._transport.get_extra_info("sockname")[1])
        await done.wait()
        await asyncio.sleep(0.5)

    asyncio.run(ours() if kind == "ours" else plain())


async def _client(kind: str, port: int, total: int) -> float:
    payload = b"x" * CHUNK
    if kind == "ours":
        from flyvault.transport import connect

        channel = await connect("127.0.0.1", port)
        stream = channel.open_stream()
        started = time.perf_counter()
        for _ in range(total // CHUNK):
            await stream.send(payload)
        stream.write_eof()
        answer = await stream.read()
        elapsed = time.perf_counter() - started
        channel.close_now()
    else:
        from aioquic.asyncio import connect as aconnect
        from aioquic.quic.configuration import QuicConfiguration

        config = QuicConfiguration(is_client=True, alpn_protocols=["x"])
        config.verify_mode = ssl.CERT_NONE
        async with aconnect("127.0.0.1", port, configuration=config) as client:
            reader, writer = await client.create_stream()
            started = time.perf_counter()
            for _ in range(total // CHUNK):
                writer.write(payload)
                await asyncio.sleep(0)  # aioquic's writer has no drain of its own
            writer.write_eof()
            answer = await reader.read()
            elapsed = time.perf_counter() - started
    assert int(answer) == total // CHUNK * CHUNK, answer
    return elapsed


def measure(kind: str, total: int) -> float:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_server, args=(kind, queue, total))
    server.start()
    try:
        port = queue.get(timeout=20)
        elapsed = asyncio.run(asyncio.wait_for(_client(kind, port, total), 300))
    finally:
        server.join(timeout=10)
        if server.is_alive():
            os.kill(server.pid, 9)
    return total / elapsed / 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    total = args.mb * 1024 * 1024
    results: dict[str, list[float]] = {"ours": [], "aioquic": []}
    for _ in range(args.rounds):  # interleaved
        for kind in ("ours", "aioquic"):
            results[kind].append(measure(kind, total))
    summary = {k: {"MB_s": sorted(v), "best": max(v)} for k, v in results.items()}
    summary["ratio_best"] = summary["ours"]["best"] / summary["aioquic"]["best"]  # type: ignore[index]
    summary["loadavg"] = os.getloadavg()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
