"""P7: init's memory per idle authenticated connection.

Init's VmRSS (``/proc/PID/status``) is read with 1 idle authenticated connection and with
``--connections`` (200) of them; the per-connection cost is the difference over the
connections added: ``(RSS_N - RSS_1) / (N - 1)``. Each reading is the median of several
samples taken after a settle pause. Connections are opened ``--batch`` at a time (init's
pre-auth admission caps what one source may have in flight), each is a ``Vault`` that has
authenticated and then stays idle (the client's keepalive PINGs keep it open).

``--cycles`` (3) repeats the open-and-close round with the same number of connections: RSS
that stays up after a close but does not grow in the next rounds is memory the allocator
kept for reuse, not a leak.

A warm-up client (connect, one ``true``, close) runs first, so that the one-time costs of
the first connection and first exec (imports, caches) are not charged to the connections.

    .venv/bin/python bench/p7_conn_memory.py                     # 1 vs 200
    .venv/bin/python bench/p7_conn_memory.py --connections 20

Bounded: connects have a timeout, the number of connections is fixed, init is started and
stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rel_common


async def _median_rss(pid: int, samples: int = 5, interval: float = 0.2) -> int:
    values = []
    for _ in range(samples):  # bounded
        values.append(rel_common.rss(pid))
        await asyncio.sleep(interval)
    return int(statistics.median(values))


async def measure(
    config: Any,
    init_pid: int,
    *,
    connections: int,
    batch: int = 10,
    settle: float = 2.0,
    connect_timeout: float = 60.0,
    exec_once: bool = False,
    cycles: int = 1,
) -> dict[str, Any]:
    """RSS of init with 1 and with ``connections`` idle authenticated connections."""
    from flyvault.client.vault import ExecHooks, ExecSession, Vault, new_session_id
    from flyvault.protocol.console import OpenSession

    async def run_true(vault: Any) -> None:
        session = ExecSession(
            vault,
            OpenSession(new_session_id("p7"), ("true",)),
            ExecHooks(stdout=lambda data: None, stderr=lambda data: None),
        )
        session.close_stdin()
        exited = await asyncio.wait_for(session.run(), connect_timeout)
        if exited.exit_status != 0:
            raise RuntimeError(f"true exited with {exited.exit_status}")

    async def open_one() -> Any:
        vault = Vault(config)
        await asyncio.wait_for(vault.connection(), connect_timeout)
        if exec_once:
            await run_true(vault)
        return vault

    warm = await open_one()
    await run_true(warm)
    await warm.close()
    await asyncio.sleep(settle)
    rss_zero = await _median_rss(init_pid)
    vaults = [await open_one()]
    await asyncio.sleep(settle)
    rss_one = await _median_rss(init_pid)
    started = time.monotonic()
    try:
        while len(vaults) < connections:  # bounded by ``connections``
            count = min(batch, connections - len(vaults))
            vaults += await asyncio.gather(*(open_one() for _ in range(count)))
        opened_in = time.monotonic() - started
        await asyncio.sleep(settle)
        rss_n = await _median_rss(init_pid)
        status_n = rel_common.proc_status(init_pid)
        alive = sum(1 for vault in vaults if vault.current is not None)
    finally:
        for vault in vaults:
            await vault.close()
    await asyncio.sleep(settle)
    rss_closed = await _median_rss(init_pid)
    # Further rounds: open and close the same number again. RSS that does not come back
    # down after a close may be the allocator keeping freed memory; a leak grows again.
    repeat_n: list[int] = []
    repeat_closed: list[int] = []
    for _ in range(max(0, cycles - 1)):  # bounded by ``cycles``
        again: list[Any] = []
        try:
            while len(again) < connections:  # bounded by ``connections``
                count = min(batch, connections - len(again))
                again += await asyncio.gather(*(open_one() for _ in range(count)))
            await asyncio.sleep(settle)
            repeat_n.append(await _median_rss(init_pid))
        finally:
            for vault in again:
                await vault.close()
        await asyncio.sleep(settle)
        repeat_closed.append(await _median_rss(init_pid))
    per_connection = (rss_n - rss_one) / max(1, connections - 1)
    return {
        "connections": connections,
        "connections_alive_at_reading": alive,
        "exec_once_per_connection": exec_once,
        "init_rss_warm_no_connection": rss_zero,
        "init_rss_1": rss_one,
        "init_rss_n": rss_n,
        "init_rss_after_close": rss_closed,
        "init_vmhwm": status_n["VmHWM"],
        "init_rss_anon_n": status_n.get("RssAnon"),
        "per_connection_bytes": round(per_connection),
        "open_seconds": round(opened_in, 2),
        "repeat_rounds_rss_n": repeat_n,
        "repeat_rounds_rss_after_close": repeat_closed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="connections opened at once")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument(
        "--exec-once", action="store_true", help="run one `true` on each connection before it idles"
    )
    parser.add_argument(
        "--cycles", type=int, default=3, help="rounds of opening and closing the connections"
    )
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    with rel_common.harness(keep=args.keep_tmp) as h:
        init = rel_common.start_init(h.workdir, h.api_socket)
        try:
            time.sleep(1.0)
            config = rel_common.vault_config(init.port, h.issuer_url)
            result = asyncio.run(
                measure(
                    config,
                    init.pid,
                    connections=args.connections,
                    batch=args.batch,
                    settle=args.settle,
                    exec_once=args.exec_once,
                    cycles=args.cycles,
                )
            )
        finally:
            exit_status = init.stop()
    result["init_exit_status"] = exit_status
    print(
        f"P7: init RSS {result['init_rss_1'] / 1e6:.2f} MB with 1 connection, "
        f"{result['init_rss_n'] / 1e6:.2f} MB with {result['connections']} "
        f"({result['connections_alive_at_reading']} alive): "
        f"{result['per_connection_bytes'] / 1024:.1f} KiB per idle authenticated connection; "
        f"{result['init_rss_after_close'] / 1e6:.2f} MB after closing them; later rounds "
        f"{[round(x / 1e6, 2) for x in result['repeat_rounds_rss_n']]} MB open, "
        f"{[round(x / 1e6, 2) for x in result['repeat_rounds_rss_after_close']]} MB closed"
    )
    path = rel_common.write_results(
        "p7",
        {"suite": "P7 memory per connection", "args": vars(args), "note": args.note, **result},
        args.out,
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
