"""Bulk throughput of our QUIC layer against the QUIC libraries' own asyncio streams and raw
loopback TCP, same run, at each datagram size asked for.

Two processes (server and client) per variant, one stream, N MB client -> server.
    .venv/bin/python bench/transport_bulk.py [--mb 50] [--sizes 1200,default]
        [--variants ours,aioquic,tcp,qh3,qh3-ours,base] [--base DIR] [--profile DIR]

``qh3`` (qh3's own asyncio streams) and ``qh3-ours`` (our channel and UDP transport over
qh3's core, ``bench/qh3_adapter.py``) need ``pip install qh3`` (not a dependency). ``--profile`` runs cProfile in both
processes and writes ``DIR/<size>/<variant>-{sender,receiver}.prof``. Results go to
``bench/results/bulk-<date>-<sha>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import multiprocessing
import os
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

CHUNK = 64 * 1024


def _profiled(path: str | None, run: Callable[[], T]) -> T:
    """Run ``run`` under cProfile when ``path`` is set (stats dumped there)."""
    if path is None:
        return run()
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(run)
    finally:
        profiler.dump_stats(path)


def _datagram_size() -> int:
    """The size our layer uses towards loopback, for the libraries' own stacks too."""
    from flyvault.transport.endpoint import LOOPBACK_DATAGRAM_SIZE, forced_datagram_size

    return forced_datagram_size() or LOOPBACK_DATAGRAM_SIZE


def _load_certificate(config: Any) -> None:
    """An ephemeral certificate, through PEM files (qh3 takes no cryptography objects)."""
    from flyvault.transport.tls import generate_self_signed

    _load_pem(config, *generate_self_signed())


def _load_pem(config: Any, cert: Any, key: Any) -> None:
    import tempfile

    from cryptography.hazmat.primitives import serialization

    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as out:
            out.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as out:
            out.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        config.load_cert_chain(cert_path, key_path)


def _server(
    kind: str, port_queue: multiprocessing.Queue, total: int, profile: str | None = None
) -> None:
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
        serve = importlib.import_module(f"{kind}.asyncio").serve
        configuration = importlib.import_module(f"{kind}.quic.configuration")
        config = configuration.QuicConfiguration(
            is_client=False, alpn_protocols=["x"], max_datagram_size=_datagram_size()
        )
        if hasattr(config, "probe_datagram_size"):  # qh3: keep the size asked for
            config.probe_datagram_size = False
        _load_certificate(config)
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

    async def tcp() -> None:
        done = asyncio.Event()

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got = 0
            while chunk := await reader.read(256 * 1024):
                got += len(chunk)
            writer.write(str(got).encode())
            await writer.drain()
            writer.close()
            done.set()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        await done.wait()
        await asyncio.sleep(0.5)

    if kind == "qh3-ours":
        import qh3_adapter

        qh3_adapter.install()
    main = {"ours": ours, "qh3-ours": ours, "tcp": tcp}.get(kind, plain)
    _profiled(profile, lambda: asyncio.run(main()))


async def _client(kind: str, port: int, total: int) -> float:
    payload = b"x" * CHUNK
    if kind == "qh3-ours":
        import qh3_adapter

        qh3_adapter.install()
    if kind in ("ours", "qh3-ours"):
        from flyvault.transport import connect

        try:
            channel = await connect("127.0.0.1", port)
        finally:
            if kind == "qh3-ours":
                qh3_adapter.uninstall()  # the next variant in this process is ours again
        stream = channel.open_stream()
        started = time.perf_counter()
        for _ in range(total // CHUNK):
            await stream.send(payload)
        stream.write_eof()
        answer = await stream.read()
        elapsed = time.perf_counter() - started
        channel.close_now()
    elif kind == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.perf_counter()
        for _ in range(total // CHUNK):
            writer.write(payload)
            await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        elapsed = time.perf_counter() - started
        writer.close()
    else:
        aconnect = importlib.import_module(f"{kind}.asyncio").connect
        configuration = importlib.import_module(f"{kind}.quic.configuration")
        config = configuration.QuicConfiguration(
            is_client=True, alpn_protocols=["x"], max_datagram_size=_datagram_size()
        )
        if hasattr(config, "probe_datagram_size"):
            config.probe_datagram_size = False
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


def _base_server(base: str, queue: multiprocessing.Queue, total: int) -> None:
    sys.path.insert(0, base)
    _server("ours", queue, total)


def _base_client(base: str, port: int, total: int, answer: multiprocessing.Queue) -> None:
    sys.path.insert(0, base)
    answer.put(asyncio.run(asyncio.wait_for(_client("ours", port, total), 300)))


def measure_base(base: str, total: int) -> float:
    """Our layer as another checkout has it (e.g. the commit before a change), both ends in
    fresh interpreters that import ``flyvault`` from ``base``."""
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()
    answer: multiprocessing.Queue = context.Queue()
    server = context.Process(target=_base_server, args=(base, queue, total))
    server.start()
    client = None
    try:
        port = queue.get(timeout=30)
        client = context.Process(target=_base_client, args=(base, port, total, answer))
        client.start()
        elapsed = answer.get(timeout=300)
    finally:
        for process in (client, server):
            if process is None:
                continue
            process.join(timeout=10)
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, 9)
    return total / elapsed / 1e6


def measure(kind: str, total: int, profile: str | None = None, base: str | None = None) -> float:
    if kind == "base":
        assert base is not None, "--base DIR is needed for the 'base' variant"
        return measure_base(base, total)
    queue: multiprocessing.Queue = multiprocessing.Queue()
    server_profile = f"{profile}/{kind}-receiver.prof" if profile else None
    server = multiprocessing.Process(target=_server, args=(kind, queue, total, server_profile))
    server.start()
    try:
        port = queue.get(timeout=20)
        elapsed = _profiled(
            f"{profile}/{kind}-sender.prof" if profile else None,
            lambda: asyncio.run(asyncio.wait_for(_client(kind, port, total), 300)),
        )
    finally:
        server.join(timeout=10)
        if server.is_alive():
            os.kill(server.pid, 9)
    return total / elapsed / 1e6


def _git_sha() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "nogit"
    except OSError:
        return "nogit"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--variants",
        default="ours,aioquic,tcp",
        help="comma list of ours (our layer), base (our layer from --base), aioquic / qh3 (the library's own asyncio "
        "streams, same datagram size), tcp (raw loopback TCP, the scale)",
    )
    parser.add_argument(
        "--sizes",
        default="1200,default",
        help="datagram sizes to run (FLY_VAULT_DATAGRAM_SIZE for both ends; 'default' unsets it)",
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="cProfile both ends into DIR (figures not comparable)"
    )
    parser.add_argument("--out", help="results JSON (default bench/results/bulk-<date>-<sha>.json)")
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--base",
        metavar="DIR",
        help="another checkout (e.g. a git worktree of the commit before a change): the "
        "'base' variant runs our layer from there, in the same run",
    )
    args = parser.parse_args()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    total = args.mb * 1024 * 1024
    variants = [v for v in args.variants.split(",") if v]
    report: dict[str, Any] = {
        "bench": "transport_bulk",
        "mb": args.mb,
        "rounds": args.rounds,
        "git": _git_sha(),
        "note": args.note,
        "base": args.base,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sizes": {},
    }
    for size in args.sizes.split(","):
        if size == "default":
            os.environ.pop("FLY_VAULT_DATAGRAM_SIZE", None)
        else:
            os.environ["FLY_VAULT_DATAGRAM_SIZE"] = size
        results: dict[str, list[float]] = {kind: [] for kind in variants}
        for _ in range(args.rounds):  # interleaved
            for kind in variants:
                profile = f"{args.profile}/{size}" if args.profile else None
                if profile:
                    os.makedirs(profile, exist_ok=True)
                results[kind].append(measure(kind, total, profile, args.base))
        summary: dict[str, Any] = {
            k: {"MB_s": sorted(round(x, 2) for x in v), "best": round(max(v), 2)}
            for k, v in results.items()
        }
        for baseline in ("base", "aioquic", "tcp", "qh3"):
            if "ours" in summary and baseline in summary and baseline != "ours":
                summary[f"ours_vs_{baseline}"] = round(
                    summary["ours"]["best"] / summary[baseline]["best"], 3
                )
        report["sizes"][size] = summary
    os.environ.pop("FLY_VAULT_DATAGRAM_SIZE", None)
    report["loadavg"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    out = args.out
    if out is None and not args.profile:
        here = os.path.dirname(os.path.abspath(__file__))
        out = os.path.join(
            here, "results", f"bulk-{time.strftime('%Y-%m-%d', time.gmtime())}-{_git_sha()}.json"
        )
        stem, n = out[: -len(".json")], 2
        while os.path.exists(out):
            out, n = f"{stem}-{n}.json", n + 1
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
