"""Echo round trip on one QUIC stream: our transport against aioquic's own asyncio streams.

The floor under B3 (PTY echo through a vault): whatever a keystroke costs beyond this is
ours (framing, sessions, the PTY); this part is aioquic's per-packet processing on both
ends. Two processes per variant (echo server, client), interleaved rounds, results as JSON.

    .venv/bin/python bench/transport_echo.py [--count 3000] [--rounds 2]
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 200


def _server(kind: str, port_queue: multiprocessing.Queue, lifetime: float) -> None:
    async def ours() -> None:
        from flyvault.transport import QuicChannel, QuicStream, listen

        async def echo(stream: QuicStream) -> None:
            while data := await stream.read():
                stream.write(data)

        def on_channel(channel: QuicChannel) -> None:
            channel.on_stream = lambda s: asyncio.ensure_future(echo(s))

        listener = await listen("127.0.0.1", 0, on_channel)
        port_queue.put(listener.address[1])
        await asyncio.sleep(lifetime)

    async def plain() -> None:
        from aioquic.asyncio import serve
        from aioquic.quic.configuration import QuicConfiguration

        from flyvault.transport.tls import generate_self_signed

        certificate, key = generate_self_signed()
        config = QuicConfiguration(is_client=False, alpn_protocols=["x"])
        config.certificate, config.private_key = certificate, key
        tasks: set[asyncio.Future[None]] = set()

        def handler(reader: Any, writer: Any) -> None:
            async def run() -> None:
                while data := await reader.read(65536):
                    writer.write(data)

            tasks.add(asyncio.ensure_future(run()))

        server = await serve("127.0.0.1", 0, configuration=config, stream_handler=handler)
        port_queue.put(server._transport.get_extra_info("sockname")[1])
        await asyncio.sleep(lifetime)

    asyncio.run(ours() if kind == "ours" else plain())


async def _client(kind: str, port: int, count: int) -> list[float]:
    rtts: list[float] = []
    if kind == "ours":
        from flyvault.transport import connect

        channel = await connect("127.0.0.1", port)
        stream = channel.open_stream()
        for _ in range(count):  # bounded by count
            started = time.perf_counter()
            stream.write(b"x")
            await stream.read()
            rtts.append(time.perf_counter() - started)
        channel.close_now()
    else:
        from aioquic.asyncio import connect as aconnect
        from aioquic.quic.configuration import QuicConfiguration

        config = QuicConfiguration(is_client=True, alpn_protocols=["x"])
        config.verify_mode = ssl.CERT_NONE
        async with aconnect("127.0.0.1", port, configuration=config) as client:
            reader, writer = await client.create_stream()
            for _ in range(count):
                started = time.perf_counter()
                writer.write(b"x")
                await reader.read(1)
                rtts.append(time.perf_counter() - started)
    return rtts[WARMUP:]


def measure(kind: str, count: int) -> list[float]:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_server, args=(kind, queue, 120.0))
    server.start()
    try:
        port = queue.get(timeout=20)
        return asyncio.run(asyncio.wait_for(_client(kind, port, count), 120))
    finally:
        if server.pid is not None and server.is_alive():
            os.kill(server.pid, 9)
        server.join(timeout=10)


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1e6, 1)

    return {"n": len(ordered), "p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3000, help="echoes per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="results file (default bench/results/echo-<time>.json)")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"ours": [], "aioquic": []}
    for round_ in range(args.rounds):  # interleaved, order alternating
        for kind in ("ours", "aioquic") if round_ % 2 == 0 else ("aioquic", "ours"):
            samples[kind] += measure(kind, args.count + WARMUP)
    results: dict[str, Any] = {kind: _summary(values) for kind, values in samples.items()}
    results["ratio_p50"] = round(results["ours"]["p50_us"] / results["aioquic"]["p50_us"], 3)
    results["loadavg"] = os.getloadavg()
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench/results" / time.strftime("echo-%Y-%m-%dT%H%M%S.json", time.gmtime())
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
