"""R8: many concurrent clients running execs against one init.

Each client is one ``Vault`` (one QUIC connection) that connects, then runs ``--execs``
``true`` commands one after another (a new ``ExecSession`` each, stdin closed at once as
the CLI does). All clients run concurrently in one asyncio loop in this process; the
client side is therefore one Python process on one core (``--procs 2`` splits the clients
over two processes when this process is the bottleneck).

Measured: failures (by kind: connect, exec, exit status), exec latency (p50/p90/p99 from
the start of an ``ExecSession.run`` to its ``EXITED``, connection already up), connect
latency, wall time, and init's memory from ``/proc/PID/status``: VmRSS before any client,
the peak (sampled every 0.1 s by a thread, and VmHWM), and after every client closed
(plus a settle pause).

Source addresses: init's pre-auth admission limits are per source IP. ``--sources N``
spreads the clients over 127.0.0.2 .. 127.0.0.(N+1) (``TransportSettings.local_host``);
the default 0 lets the kernel pick (127.0.0.1 for all).

    .venv/bin/python bench/r8_concurrency.py                      # 200 clients x 20 execs
    .venv/bin/python bench/r8_concurrency.py --clients 20 --execs 5
    .venv/bin/python bench/r8_concurrency.py --sources 8          # 25 clients per source

Bounded: every client has ``--budget`` seconds in all; init is started and stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rel_common


class RssSampler:
    """A thread reading VmRSS of ``pid`` every ``interval`` seconds (the loop may be busy)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(rel_common.rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int | None:
        return max(self.samples, default=None)


def settings_for(source: str | None) -> tuple[Any, str]:
    """Transport settings sending from ``source``; says what was used."""
    from flyvault.transport import TransportSettings

    if source is None:
        return None, "kernel default (127.0.0.1)"
    names = {f.name for f in dataclasses.fields(TransportSettings)}
    if "local_host" not in names:
        return None, "kernel default (127.0.0.1): TransportSettings has no local_host"
    return TransportSettings(local_host=source), source


async def run_clients(
    config: Any,
    *,
    clients: int,
    execs: int,
    sources: int = 0,
    budget: float = 300.0,
    first_client: int = 0,
) -> dict[str, Any]:
    """``clients`` concurrent clients, ``execs`` sequential ``true`` execs each."""
    from flyvault.client.vault import ExecHooks, ExecSession, Vault, new_session_id
    from flyvault.protocol.console import OpenSession

    connect_latency: list[float] = []
    exec_latency: list[float] = []
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    used_sources: Counter[str] = Counter()
    ok_execs = 0
    deadline = time.monotonic() + budget

    def fail(kind: str, exc: BaseException | str) -> None:
        failures[kind] += 1
        examples.setdefault(kind, exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}")

    async def client(index: int) -> None:
        nonlocal ok_execs
        number = first_client + index
        source = f"127.0.0.{2 + number % sources}" if sources else None
        settings, described = settings_for(source)
        used_sources[described] += 1
        vault = Vault(config, settings=settings, reconnect_timeout=30)
        try:
            started = time.perf_counter()
            try:
                await asyncio.wait_for(vault.connection(), max(1.0, deadline - time.monotonic()))
            except Exception as exc:
                fail("connect", exc)
                return
            connect_latency.append(time.perf_counter() - started)
            for _ in range(execs):  # bounded by ``execs`` and the budget
                left = deadline - time.monotonic()
                if left <= 0:
                    fail("budget", "run budget used up")
                    return
                session = ExecSession(
                    vault,
                    OpenSession(new_session_id("r8"), ("true",)),
                    ExecHooks(stdout=lambda data: None, stderr=lambda data: None),
                )
                session.close_stdin()
                started = time.perf_counter()
                try:
                    exited = await asyncio.wait_for(session.run(), left)
                except Exception as exc:
                    fail("exec", exc)
                    continue
                exec_latency.append(time.perf_counter() - started)
                if exited.exit_status != 0:
                    fail("exit_status", f"exit status {exited.exit_status}")
                else:
                    ok_execs += 1
        finally:
            await vault.close()

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return {
        "clients": clients,
        "execs_per_client": execs,
        "execs_ok": ok_execs,
        "failures": sum(failures.values()),
        "failures_by_kind": dict(failures),
        "failure_examples": examples,
        "sources": dict(used_sources),
        "exec_latency_ms": rel_common.summary_ms(exec_latency),
        "connect_latency_ms": rel_common.summary_ms(connect_latency),
        "elapsed_s": round(time.monotonic() - started, 3),
        "raw_exec_latency_s": exec_latency,
        "raw_connect_latency_s": connect_latency,
    }


def _worker(args: tuple[Any, ...]) -> dict[str, Any]:
    port, issuer_url, xdg, kwargs = args
    os.environ.update(xdg)
    config = rel_common.vault_config(port, issuer_url)
    return asyncio.run(run_clients(config, **kwargs))


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    exec_latency = [x for p in parts for x in p["raw_exec_latency_s"]]
    connect_latency = [x for p in parts for x in p["raw_connect_latency_s"]]
    failures: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for part in parts:
        failures.update(part["failures_by_kind"])
        sources.update(part["sources"])
        for key, value in part["failure_examples"].items():
            examples.setdefault(key, value)
    return {
        "clients": sum(p["clients"] for p in parts),
        "execs_per_client": parts[0]["execs_per_client"],
        "execs_ok": sum(p["execs_ok"] for p in parts),
        "failures": sum(failures.values()),
        "failures_by_kind": dict(failures),
        "failure_examples": examples,
        "sources": dict(sources),
        "exec_latency_ms": rel_common.summary_ms(exec_latency),
        "connect_latency_ms": rel_common.summary_ms(connect_latency),
        "elapsed_s": max(p["elapsed_s"] for p in parts),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--execs", type=int, default=20)
    parser.add_argument(
        "--sources",
        type=int,
        default=0,
        help="spread clients over this many 127.0.0.x addresses (0: kernel's)",
    )
    parser.add_argument("--procs", type=int, default=1, help="client processes (1 or 2)")
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help="init's --max-sessions (default: init's own)",
    )
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the run")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds to wait before the 'after' RSS reading"
    )
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args()
    with rel_common.harness(keep=args.keep_tmp) as h:
        extra = ["--max-sessions", str(args.max_sessions)] if args.max_sessions else []
        init = rel_common.start_init(h.workdir, h.api_socket, extra_args=extra)
        try:
            time.sleep(1.0)  # let init finish importing and settle
            cold = rel_common.proc_status(init.pid)
            # One client first, as a machine that used this vault before: the OIDC
            # discovery and JWKS are then in the client's cache file, and 200 clients do
            # not all fetch them from the stand-in issuer (a thread of this process).
            warm = asyncio.run(
                run_clients(
                    rel_common.vault_config(init.port, h.issuer_url), clients=1, execs=1, budget=30
                )
            )
            if warm["failures"]:
                raise RuntimeError(f"warm-up client failed: {warm['failure_examples']}")
            time.sleep(0.5)
            before = rel_common.proc_status(init.pid)
            init_cpu = rel_common.cpu_seconds(init.pid)
            own_cpu = time.process_time()
            children_cpu = _children_cpu()
            with RssSampler(init.pid) as sampler:
                kwargs = {
                    "clients": args.clients,
                    "execs": args.execs,
                    "sources": args.sources,
                    "budget": args.budget,
                }
                if args.procs <= 1:
                    config = rel_common.vault_config(init.port, h.issuer_url)
                    result = asyncio.run(run_clients(config, **kwargs))
                    result.pop("raw_exec_latency_s")
                    result.pop("raw_connect_latency_s")
                else:
                    share = args.clients // args.procs
                    xdg = {k: v for k, v in os.environ.items() if k.startswith("XDG_")}
                    jobs = []
                    for n in range(args.procs):
                        count = share + (args.clients % args.procs if n == 0 else 0)
                        jobs.append(
                            (
                                init.port,
                                h.issuer_url,
                                xdg,
                                dict(kwargs, clients=count, first_client=n * share),
                            )
                        )
                    context = multiprocessing.get_context("spawn")
                    with context.Pool(args.procs) as pool:
                        result = merge(pool.map(_worker, jobs))
                init_cpu = rel_common.cpu_seconds(init.pid) - init_cpu
                client_cpu = time.process_time() - own_cpu + _children_cpu() - children_cpu
                time.sleep(args.settle)
            after = rel_common.proc_status(init.pid)
            alive = init.process.poll() is None
        finally:
            exit_status = init.stop()
        log_tail = init.log.read_text(errors="replace").splitlines()[-30:]
    result.update(
        {
            "client_processes": max(1, args.procs),
            "cpu_s": {
                "init": round(init_cpu, 2),
                "clients": round(client_cpu, 2),
                "note": "init's own CPU (its exec children not included); clients: "
                "this process (+ worker processes with --procs 2)",
            },
            "max_sessions": args.max_sessions or "init default",
            "init_alive_at_end": alive,
            "init_exit_status": exit_status,
            "memory": {
                "init_rss_cold": cold["VmRSS"],
                "init_rss_before": before["VmRSS"],
                "init_rss_peak_sampled": sampler.peak,
                "init_vmhwm_after": after["VmHWM"],
                "init_rss_after": after["VmRSS"],
                "init_threads_after": after.get("Threads"),
                "samples": len(sampler.samples),
            },
            "init_log_tail": log_tail,
        }
    )
    mem = result["memory"]
    print(
        f"R8: {result['clients']} clients x {result['execs_per_client']} execs, "
        f"{result['failures']} failures {result['failures_by_kind']}, exec p50 "
        f"{result['exec_latency_ms'].get('p50')} ms p99 {result['exec_latency_ms'].get('p99')} ms, "
        f"init RSS {mem['init_rss_before'] / 1e6:.1f} -> peak "
        f"{(mem['init_rss_peak_sampled'] or 0) / 1e6:.1f} -> {mem['init_rss_after'] / 1e6:.1f} MB, "
        f"{result['elapsed_s']} s, sources {result['sources']}, CPU {result['cpu_s']}"
    )
    path = rel_common.write_results(
        "r8",
        {"suite": "R8 concurrency", "args": vars(args), "note": args.note, **result},
        args.out,
    )
    print(f"results: {path}")
    print(json.dumps(result["failure_examples"], indent=1)[:2000])
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
