"""R4: forced connection drops during exec sessions that print 10 MB each.

Every session is a named (kept) exec session running a seeded generator: ``python -c`` with
``random.Random(seed).randbytes`` in 64 KiB chunks, optionally paced to ``--rate`` bytes/s.
The bench computes the same stream locally and compares every received byte at its offset,
so a lost or doubled byte is found at the offset where it happens, and the SHA-256 of the
whole output is checked against the expected one.

Each session has its own ``Vault`` (one connection at a time). Cut points are drawn at
random byte offsets (seeded) in the first 90% of the output and at least 512 KB before
its end; when the received offset passes the next cut point the connection is cut (what
the client had received but not read yet goes with it), and the client's own reconnect and
resume-by-offset path (``ExecSession.run``: reattach with the offset it has seen) takes
over. Two kinds of cut:

- ``close``: the client closes the connection (CONNECTION_CLOSE reaches init, which
  detaches the session at once: the process is no longer paused for this client);
- ``silent``: the client's connection dies without a word to init (socket closed, no
  CONNECTION_CLOSE): like a laptop losing the network. Init keeps the old attachment until
  the reattach displaces it, and the old connection until its idle timeout (60 s).

``--cut mixed`` (the default) picks one of the two at random for each drop.

The generator is paced (``--rate``, default 125 kB/s, so 10 MB take 80 s): a silent cut
leaves init's old connection until its 60 s idle timeout, and 1000 silent cuts in a minute
would fill init's connection table (256) with dead connections. ``--rate 0`` runs the
generator as fast as it can: then bytes can be lost at a drop (announced, see
bench/README.md), which the run reports.

Figures: drops performed (by kind), sessions, bytes, hash matches, first mismatch offset,
bytes lost and announced by init (``STARTED.dropped``; the following bytes are compared at
their true offsets), bytes lost without an announcement, extra bytes, outage time per drop
(cut until the reattach's STARTED), wall time, and init's RSS before/peak/after.

    .venv/bin/python bench/r4_drops.py               # 10 sessions x 100 drops x 10 MB, ~7 min
    .venv/bin/python bench/r4_drops.py --sessions 2 --drops 10 --mb 2     # a quick look
    .venv/bin/python bench/r4_drops.py --datagram-size 1200 --sessions 4  # remote-sized datagrams
    .venv/bin/python bench/r4_drops.py --rate 0 --cut silent --sessions 3 --drops 30

Bounded: every session has a wall-clock budget (``--budget`` for the whole run); init is
started and stopped by PID; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rel_common

CHUNK = 65536

#: The generator run inside the vault: argv seed, size, rate (bytes/s, 0 = unpaced).
GENERATOR = (
    "import random, sys, time\n"
    "seed, size, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])\n"
    "r = random.Random(seed)\n"
    "out = sys.stdout.buffer\n"
    "sent = 0\n"
    "start = time.monotonic()\n"
    "while sent < size:\n"
    f"    n = min({CHUNK}, size - sent)\n"
    "    out.write(r.randbytes(n))\n"
    "    out.flush()\n"
    "    sent += n\n"
    "    if rate:\n"
    "        ahead = start + sent / rate - time.monotonic()\n"
    "        if ahead > 0:\n"
    "            time.sleep(ahead)\n"
)


class ExpectedStream:
    """The generator's output, produced lazily in the same chunk sequence."""

    def __init__(self, seed: int, size: int) -> None:
        self._random = random.Random(seed)
        self._left = size
        self._buffer = bytearray()

    def take(self, count: int) -> bytes:
        while len(self._buffer) < count and self._left:
            n = min(CHUNK, self._left)
            self._buffer += self._random.randbytes(n)
            self._left -= n
        chunk = bytes(self._buffer[:count])
        del self._buffer[:count]
        return chunk


def expected_sha256(seed: int, size: int) -> str:
    stream = ExpectedStream(seed, size)
    digest = hashlib.sha256()
    left = size
    while left:
        chunk = stream.take(min(1 << 20, left))
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


#: Twice the most one read of the exec stream returns (``QuicStream.read``'s default).
TAIL_MARGIN = 512 * 1024


def silent_cut(connection: Any) -> None:
    """Kill the client's side of the connection without telling the server: no
    CONNECTION_CLOSE is sent, the UDP socket is just closed (the network went away)."""
    channel = connection.channel
    # The QUIC state machine is not closed (nothing may reach the server), so keep it from
    # ever transmitting again: a pending transmit or timer would re-arm aioquic's timers
    # and write to the closed socket until the idle timeout (asyncio then logs
    # "socket.send() raised exception.").
    channel.transmit = lambda: None
    for name in ("_timer", "_transmit_task"):
        handle = getattr(channel, name, None)
        if handle is not None:
            handle.cancel()
            setattr(channel, name, None)
    channel._terminate("r4: silent cut (network gone)")
    transport = getattr(channel, "_transport", None)
    if transport is not None:
        transport.close()


def unread_by_client(connection: Any) -> int:
    """Received (and so acknowledged) by the client's QUIC stack but not read by it: what
    waits in its streams, and what aioquic holds past the first gap (counted whole, gaps
    included, so this is an upper bound)."""
    channel = connection.channel
    total = 0
    for stream_id, stream in channel._streams.items():
        total += sum(len(chunk) for chunk in stream._chunks)
        aio = channel.quic._streams.get(stream_id)
        if aio is not None:
            total += max(0, aio.receiver.highest_offset - aio.receiver._buffer_start)
    return total


@dataclass
class SessionResult:
    name: str
    seed: int
    size: int
    received: int = 0
    sha256: str = ""
    expected_sha256: str = ""
    hash_ok: bool = False
    first_mismatch: int | None = None
    exit_status: int | None = None
    drops: int = 0
    drops_by_kind: dict[str, int] = field(default_factory=lambda: {"close": 0, "silent": 0})
    cut_points_planned: int = 0
    reported_dropped: int = 0
    #: Bytes the client's QUIC stack had acknowledged but the client had not read when a
    #: connection was cut (they die with it): the most the vault may have had to drop.
    unread_at_cuts: int = 0
    stderr_bytes: int = 0
    connects: int = 0
    outages: list[float] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def public(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["outage_ms"] = rel_common.summary_ms(self.outages)
        del data["outages"]
        return data


async def run_session(
    config: Any,
    name: str,
    *,
    seed: int,
    size: int,
    drops: int,
    cut: str,
    rate: float,
    timeout: float,
) -> SessionResult:
    from flyvault.client.vault import ExecHooks, ExecSession, Vault
    from flyvault.protocol.console import OpenSession

    result = SessionResult(name, seed, size)
    result.expected_sha256 = expected_sha256(seed, size)
    plan = random.Random(seed ^ 0x5EED)
    # A cut too near the end may find the rest of the output and the exit in the read that
    # crossed it (a read returns up to 256 KB of what arrived): then the session ends
    # without the reconnect this run counts. So cuts stay TAIL_MARGIN before the end.
    last = max(2, min(size * 9 // 10, size - TAIL_MARGIN))
    points = sorted(plan.randrange(1, last) for _ in range(drops))
    kinds = [plan.choice(("close", "silent")) if cut == "mixed" else cut for _ in range(drops)]
    result.cut_points_planned = len(points)
    expected = ExpectedStream(seed, size)
    digest = hashlib.sha256()
    vault = Vault(config, reconnect_timeout=60)
    cut_at: list[float] = []  # monotonic time of the last cut, until the next STARTED

    def cut_now() -> None:
        connection = vault.current
        if connection is None:
            return  # already down: this chunk came from the old stream's buffer
        kind = kinds[result.drops]
        result.unread_at_cuts += unread_by_client(connection)  # before the cut changes it
        if kind == "silent":
            silent_cut(connection)
        else:
            connection.close()
        # What the client had received but not read yet goes with the connection, as it
        # would with a dead process: the transport hands a reader everything queued since
        # its last wake-up (up to the stream window), and reading that old backlog after
        # the cut would carry the session past later cut points, or to its end, without
        # the reconnect this run is about. The session must get it replayed instead.
        for stream in list(connection.channel._streams.values()):
            stream._chunks.clear()
        result.drops += 1
        result.drops_by_kind[kind] += 1
        cut_at.append(time.monotonic())

    def on_stdout(data: bytes) -> None:
        if result.first_mismatch is None:
            want = expected.take(len(data))
            if want != data:
                index = next(
                    (i for i, (a, b) in enumerate(zip(want, data, strict=False)) if a != b),
                    min(len(want), len(data)),
                )
                # The absolute output offset of the first wrong byte.
                result.first_mismatch = result.received + result.reported_dropped + index
        digest.update(data)
        result.received += len(data)
        if result.drops < len(points) and result.received >= points[result.drops]:
            cut_now()

    def on_stderr(data: bytes) -> None:
        result.stderr_bytes += len(data)

    def on_started(started: Any) -> None:
        if started.dropped:
            # Announced loss (the vault's buffer no longer held these bytes): the following
            # bytes are compared at their true offsets.
            result.reported_dropped += started.dropped
            expected.take(started.dropped)
        if cut_at:
            result.outages.append(time.monotonic() - cut_at.pop())

    session = ExecSession(
        vault,
        OpenSession(
            name, (sys.executable, "-c", GENERATOR, str(seed), str(size), str(rate)), keep=True
        ),
        ExecHooks(stdout=on_stdout, stderr=on_stderr, started=on_started),
    )
    started = time.monotonic()
    try:
        exited = await asyncio.wait_for(session.run(), timeout)
        result.exit_status = exited.exit_status
    except Exception as exc:  # recorded, not raised: the run reports every session
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = round(time.monotonic() - started, 3)
        result.connects = vault.connects
        await vault.close()
    result.sha256 = digest.hexdigest()
    result.hash_ok = result.sha256 == result.expected_sha256 and result.received == size
    return result


async def run_drops(
    config: Any,
    *,
    sessions: int,
    concurrency: int,
    size: int,
    drops: int,
    cut: str = "mixed",
    rate: float = 0.0,
    seed: int = 4,
    budget: float = 600.0,
    prefix: str = "r4",
    init_pid: int | None = None,
) -> dict[str, Any]:
    """Run ``sessions`` sessions (``concurrency`` at a time); return the figures."""
    gate = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + budget
    rss_samples: list[int] = []
    rss_before = rel_common.rss(init_pid) if init_pid else None

    async def one(index: int) -> SessionResult:
        async with gate:
            left = deadline - time.monotonic()
            if left <= 1:
                return SessionResult(
                    f"{prefix}-{index}", seed + index, size, error="not started: run budget used up"
                )
            return await run_session(
                config,
                f"{prefix}-{index}",
                seed=seed + index,
                size=size,
                drops=drops,
                cut=cut,
                rate=rate,
                timeout=left,
            )

    async def sample_rss() -> None:
        while init_pid:  # cancelled at the end
            with contextlib.suppress(OSError):
                rss_samples.append(rel_common.rss(init_pid))
            await asyncio.sleep(0.5)

    sampler = asyncio.ensure_future(sample_rss())
    started = time.monotonic()
    try:
        results = await asyncio.gather(*(one(i) for i in range(sessions)))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    elapsed = time.monotonic() - started
    outages = [o for r in results for o in r.outages]
    total_drops = sum(r.drops for r in results)
    memory: dict[str, Any] = {}
    if init_pid:
        status = rel_common.proc_status(init_pid)
        memory = {
            "init_rss_before": rss_before,
            "init_rss_peak_sampled": max(rss_samples, default=None),
            "init_rss_after": status["VmRSS"],
            "init_vmhwm": status["VmHWM"],
        }
    return {
        "sessions": sessions,
        "concurrency": concurrency,
        "bytes_per_session": size,
        "drops_per_session_planned": drops,
        "cut_mode": cut,
        "rate_bytes_per_s": rate,
        "drops": total_drops,
        "drops_by_kind": {
            kind: sum(r.drops_by_kind[kind] for r in results) for kind in ("close", "silent")
        },
        "bytes_received": sum(r.received for r in results),
        "bytes_expected": size * sessions,
        "hash_ok": sum(r.hash_ok for r in results),
        "mismatches": sum(not r.hash_ok for r in results),
        # Received bytes that differ from the expected ones at their offset (corruption,
        # duplication or reordering), whatever the loss.
        "sessions_with_byte_mismatch": sum(r.first_mismatch is not None for r in results),
        # Loss the vault announced (STARTED.dropped: its buffer no longer held the bytes),
        # loss nobody announced, and bytes beyond the output (duplicates).
        "bytes_lost_announced": sum(r.reported_dropped for r in results),
        "bytes_lost_unannounced": sum(
            max(0, size - r.received - r.reported_dropped) for r in results if r.error is None
        ),
        "bytes_extra": sum(max(0, r.received + r.reported_dropped - size) for r in results),
        "errors": sum(r.error is not None for r in results),
        "stderr_bytes": sum(r.stderr_bytes for r in results),
        "exit_status_nonzero": sum(r.exit_status not in (0,) for r in results),
        "connects": sum(r.connects for r in results),
        "outage_ms": rel_common.summary_ms(outages),
        "elapsed_s": round(elapsed, 3),
        "memory": memory,
        "per_session": [r.public() for r in results],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--drops", type=int, default=100, help="drops per session")
    parser.add_argument("--mb", type=float, default=10.0, help="output per session, MB (10^6)")
    parser.add_argument("--concurrency", type=int, default=2, help="sessions at a time")
    parser.add_argument("--cut", choices=("mixed", "close", "silent"), default="mixed")
    parser.add_argument(
        "--rate",
        type=float,
        default=125_000.0,
        help="pace each generator to this many bytes/s (0: as fast as it can)",
    )
    parser.add_argument(
        "--session-buffer",
        type=int,
        default=None,
        help="init's --session-buffer (default: init's own, 1 MiB)",
    )
    parser.add_argument(
        "--datagram-size",
        type=int,
        default=None,
        help="FLY_VAULT_DATAGRAM_SIZE for both ends (e.g. 1200)",
    )
    parser.add_argument(
        "--also-1200",
        action="store_true",
        help="after the main run, run again with 1200-byte datagrams",
    )
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for each run")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    size = int(args.mb * 1_000_000)
    runs: list[dict[str, Any]] = []
    sizes = [args.datagram_size] + ([1200] if args.also_1200 else [])
    for datagram in sizes:
        runs.append(_one_run(args, size, datagram))
        print(_line(runs[-1]), flush=True)
    ok = all(r.get("mismatches") == 0 and r.get("errors") == 0 for r in runs)
    path = rel_common.write_results(
        "r4",
        {"suite": "R4 forced drops", "args": vars(args), "note": args.note, "ok": ok, "runs": runs},
        args.out,
    )
    print(f"results: {path}")
    return 0 if ok else 1


def _one_run(args: Any, size: int, datagram: int | None) -> dict[str, Any]:
    saved = os.environ.get("FLY_VAULT_DATAGRAM_SIZE")
    if datagram:
        os.environ["FLY_VAULT_DATAGRAM_SIZE"] = str(datagram)  # this process and the init
    else:
        os.environ.pop("FLY_VAULT_DATAGRAM_SIZE", None)
    try:
        with rel_common.harness(keep=args.keep_tmp) as h:
            extra = ["--session-buffer", str(args.session_buffer)] if args.session_buffer else []
            init = rel_common.start_init(h.workdir, h.api_socket, extra_args=extra)
            try:
                config = rel_common.vault_config(init.port, h.issuer_url)
                figures = asyncio.run(
                    run_drops(
                        config,
                        sessions=args.sessions,
                        concurrency=args.concurrency,
                        size=size,
                        drops=args.drops,
                        cut=args.cut,
                        rate=args.rate,
                        seed=args.seed,
                        budget=args.budget,
                        init_pid=init.pid,
                    )
                )
            finally:
                figures_exit = init.stop()
            figures["datagram_size"] = datagram or "default (16000 on loopback)"
            figures["session_buffer"] = args.session_buffer or "init default (1 MiB)"
            figures["init_exit_status"] = figures_exit
            log_tail = init.log.read_text(errors="replace").splitlines()[-20:]
            figures["init_log_tail"] = log_tail
            return figures
    finally:
        if saved is None:
            os.environ.pop("FLY_VAULT_DATAGRAM_SIZE", None)
        else:
            os.environ["FLY_VAULT_DATAGRAM_SIZE"] = saved


def _line(run: dict[str, Any]) -> str:
    return (
        f"R4 datagram={run['datagram_size']}: {run['drops']} drops {run['drops_by_kind']} over "
        f"{run['sessions']} sessions, {run['bytes_received']}/{run['bytes_expected']} bytes, "
        f"hash ok {run['hash_ok']}/{run['sessions']}, mismatches {run['mismatches']}, "
        f"lost (announced) {run['bytes_lost_announced']}, lost (unannounced) "
        f"{run['bytes_lost_unannounced']}, extra {run['bytes_extra']}, errors {run['errors']}, "
        f"outage p50 {run['outage_ms'].get('p50')} ms p99 {run['outage_ms'].get('p99')} ms, "
        f"{run['elapsed_s']} s"
    )


if __name__ == "__main__":
    sys.exit(main())
