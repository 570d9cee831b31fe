"""A TCP flow through our transport's relay, as a port forward carries it, without the CLI.

Three processes: the "vault" (listen; each stream is relayed to a TCP sink it runs), the
"client" (a local TCP port; each connection opens a stream and is relayed), and this one,
which pushes N MB into the client's port and waits for the sink's byte count. This is B4's
upload path minus the forward protocol's open exchange and the CLI, so both ends can be
profiled (``--profile DIR``).

    .venv/bin/python bench/forward_bulk.py [--mb 100] [--sizes 1200,default] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transport_bulk import _profiled

CHUNK = 256 * 1024


def _vault(ports: multiprocessing.Queue, profile: str | None) -> None:
    async def main() -> None:
        from flyvault.transport import listen
        from flyvault.transport.relay import relay

        done = asyncio.Event()
        got = 0

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal got
            while chunk := await reader.read(CHUNK):
                got += len(chunk)
            writer.write(str(got).encode())
            await writer.drain()
            writer.close()

        sink_server = await asyncio.start_server(sink, "127.0.0.1", 0)
        sink_port = sink_server.sockets[0].getsockname()[1]

        async def forward(stream: Any) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", sink_port)
            await relay(stream, reader, writer)
            done.set()

        def on_channel(channel: Any) -> None:
            channel.on_stream = lambda s: asyncio.ensure_future(forward(s))

        listener = await listen("127.0.0.1", 0, on_channel)
        ports.put(listener.address[1])
        await done.wait()
        await asyncio.sleep(0.3)
        listener.close()

    _profiled(profile, lambda: asyncio.run(main()))


def _client(vault_port: int, ports: multiprocessing.Queue, profile: str | None) -> None:
    async def main() -> None:
        from flyvault.transport import connect
        from flyvault.transport.relay import relay

        channel = await connect("127.0.0.1", vault_port)
        done = asyncio.Event()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await relay(channel.open_stream(), reader, writer)
            done.set()

        server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await done.wait()
        channel.close_now()

    _profiled(profile, lambda: asyncio.run(main()))


async def _push(port: int, total: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b"y" * CHUNK
    started = time.perf_counter()
    for _ in range(total // CHUNK):
        writer.write(payload)
        await writer.drain()
    writer.write_eof()
    answer = await reader.read()
    elapsed = time.perf_counter() - started
    writer.close()
    assert int(answer) == total // CHUNK * CHUNK, answer
    return elapsed


def measure(total: int, profile: str | None) -> float:
    ports: multiprocessing.Queue = multiprocessing.Queue()
    vault = multiprocessing.Process(
        target=_vault, args=(ports, f"{profile}/vault.prof" if profile else None)
    )
    vault.start()
    client = None
    try:
        vault_port = ports.get(timeout=20)
        client = multiprocessing.Process(
            target=_client,
            args=(vault_port, ports, f"{profile}/client.prof" if profile else None),
        )
        client.start()
        local_port = ports.get(timeout=20)
        elapsed = asyncio.run(asyncio.wait_for(_push(local_port, total), 300))
    finally:
        for process in (client, vault):
            if process is None:
                continue
            process.join(timeout=10)
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, 9)
    return total / elapsed / 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default="1200,default")
    parser.add_argument("--profile", metavar="DIR")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for size in args.sizes.split(","):
        if size == "default":
            os.environ.pop("FLY_VAULT_DATAGRAM_SIZE", None)
        else:
            os.environ["FLY_VAULT_DATAGRAM_SIZE"] = size
        profile = f"{args.profile}/{size}" if args.profile else None
        if profile:
            os.makedirs(profile, exist_ok=True)
        rates = [measure(args.mb * 1024 * 1024, profile) for _ in range(args.rounds)]
        report[size] = {"MB_s": sorted(round(r, 1) for r in rates)}
    report["loadavg"] = os.getloadavg()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
