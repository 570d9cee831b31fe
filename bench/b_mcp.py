#!/usr/bin/env python3
"""The MCP server's own figures: warm exec latency through MCP and the tools/list size.

    .venv/bin/python bench/b_mcp.py [--samples N] [--out FILE] [--note TEXT]

- **warm exec** (target p50 <= 5 ms, issue 17): ``exec`` with ``argv=["true"]`` through
  ``mcp.Client`` connected in process (the SDK's default, modern direct dispatch), after
  warm-up calls, so the pooled vault connection is already open: one call costs one console
  stream on that connection, not a handshake. The same loop over ``mode="legacy"``
  (JSON-RPC framing over memory streams) and the bare client core (``ExecSession`` on the
  same pooled ``Vault``) are measured for comparison, so the MCP layer's own cost shows.
- **warm exec with ``--share-keeper``**: the same loop with the server reaching the vault
  through the connection keeper the CLI uses (each stream relayed by the keeper).
- **tools/list size**: the ``tools/list`` answer as JSON (what an agent loads into its
  context), approximate tokens = characters / 4, per tool as well; as a server without a
  Fly API token lists it (no ``tenant`` tool) and as one with the token does.

A host-mode local vault is started in a temporary XDG home (``flyvault.localvault.up``) and
stopped at the end; the user's own config is never touched. Samples are taken in batches of
at most 100 execs per server (a new MCP server, hence a new vault connection, per batch),
which keeps each connection under the vault's QUIC stream limit while the server's
stream-release bug is open (see test_mcp_exec.py::test_many_execs_on_one_connection).
Results go to ``bench/results/mcp-<UTC date>-<git short sha>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VAULT = "bench"
BATCH = 100
WARMUP = 10
TARGET_P50_MS = 5.0  # issue 17


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize_ms(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "unit": "ms",
        "n": len(ms),
        "p50": round(percentile(ms, 0.5), 3),
        "p90": round(percentile(ms, 0.9), 3),
        "p99": round(percentile(ms, 0.99), 3),
        "mean": round(statistics.fmean(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


async def mcp_exec_samples(n: int, mode: str, *, share_keeper: bool = False) -> list[float]:
    from mcp import Client

    from flyvault.mcp_server.server import build_server, make_state

    samples: list[float] = []
    while len(samples) < n:
        server = build_server(make_state(share_keeper=share_keeper))
        async with Client(server, mode=mode) as client:
            for i in range(WARMUP + min(BATCH, n - len(samples))):
                started = time.perf_counter()
                result = await client.call_tool("exec", {"vault": VAULT, "argv": ["true"]})
                elapsed = time.perf_counter() - started
                if result.is_error or result.structured_content["exit_code"] != 0:
                    raise RuntimeError(f"exec true failed: {result.content}")
                if i >= WARMUP:
                    samples.append(elapsed)
    return samples


async def bare_exec_samples(n: int) -> list[float]:
    from flyvault.client.vault import ExecHooks, ExecSession, Vault, new_session_id
    from flyvault.config import load_vault
    from flyvault.protocol.console import OpenSession

    samples: list[float] = []
    while len(samples) < n:
        vault = Vault(load_vault(VAULT))
        try:
            for i in range(WARMUP + min(BATCH, n - len(samples))):
                started = time.perf_counter()
                request = OpenSession(session_id=new_session_id("bench"), argv=("true",))
                session = ExecSession(vault, request, ExecHooks(lambda d: None, lambda d: None))
                session.close_stdin()
                exited = await session.run()
                elapsed = time.perf_counter() - started
                if exited.exit_status != 0:
                    raise RuntimeError("exec true failed")
                if i >= WARMUP:
                    samples.append(elapsed)
        finally:
            await vault.close()
    return samples


async def tools_list_size(*, tenant_tool: bool) -> dict[str, Any]:
    from mcp import Client

    from flyvault.mcp_server.server import build_server

    # Said explicitly: the server offers the tenant tool only when FLY_API_TOKEN is set.
    async with Client(build_server(tenant_tool=tenant_tool), mode="legacy") as client:
        listing = await client.list_tools()
    wire = listing.model_dump(mode="json", by_alias=True, exclude_none=True)
    text = json.dumps(wire, separators=(",", ":"), ensure_ascii=False)
    per_tool = {}
    for tool in wire["tools"]:
        chars = len(json.dumps(tool, separators=(",", ":"), ensure_ascii=False))
        per_tool[tool["name"]] = {
            "chars": chars,
            "approx_tokens": round(chars / 4),
            "description_chars": len(tool.get("description", "")),
            "input_schema_chars": len(json.dumps(tool["inputSchema"], separators=(",", ":"))),
            "output_schema_chars": len(json.dumps(tool.get("outputSchema"), separators=(",", ":"))),
        }
    return {
        "tools": len(wire["tools"]),
        "chars": len(text),
        "approx_tokens": round(len(text) / 4),
        "method": "json.dumps(tools/list result, compact) / 4 characters per token",
        "per_tool": per_tool,
    }


def stop_keepers(runtime: Path) -> None:
    """SIGTERM the keepers whose pid files are under ``runtime``, then remove it."""
    import shutil
    import signal

    pids = []
    for pid_file in (runtime / "fly-vault").glob("*.pid"):
        try:
            pid = int(json.loads(pid_file.read_text())["pid"])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError, KeyError):
            continue
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)  # each keeper removes its own files as it exits (reaped by us)
    shutil.rmtree(runtime, ignore_errors=True)


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "sha": git("rev-parse", "--short", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain")),
    }


async def measure(samples: int) -> dict[str, Any]:
    modern = await mcp_exec_samples(samples, "auto")
    legacy = await mcp_exec_samples(samples, "legacy")
    shared = await mcp_exec_samples(samples, "auto", share_keeper=True)
    bare = await bare_exec_samples(samples)
    p50 = summarize_ms(modern)["p50"]
    return {
        "warm_exec_true": {
            "mcp_in_process": summarize_ms(modern),
            "mcp_in_process_legacy_jsonrpc": summarize_ms(legacy),
            # fly-vault-mcp --share-keeper: every stream relayed by the CLI's keeper.
            "mcp_in_process_shared_keeper": summarize_ms(shared),
            "client_core_bare": summarize_ms(bare),
            "mcp_overhead_p50_ms": round(p50 - summarize_ms(bare)["p50"], 3),
            "target": f"p50 <= {TARGET_P50_MS:g} ms (mcp_in_process)",
            "met": p50 <= TARGET_P50_MS,
        },
        "tools_list": await tools_list_size(tenant_tool=False),
        "tools_list_with_tenant_tool": await tools_list_size(tenant_tool=True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300, help="execs per loop (default 300)")
    parser.add_argument("--out", type=Path, help="results file")
    parser.add_argument("--note", default="", help="free text stored with the results")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fvbench-mcp-") as tmp:
        for variable, sub in (
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_DATA_HOME", "data"),
            ("XDG_CACHE_HOME", "cache"),
            ("XDG_STATE_HOME", "state"),
        ):
            path = Path(tmp) / sub
            path.mkdir()
            os.environ[variable] = str(path)
        os.environ.pop("FLY_VAULT_CONFIG", None)
        os.environ.pop("FLY_VAULT_MUX", None)
        # The shared-keeper loop starts a keeper: its socket in a short runtime dir of our
        # own, and it is stopped (by its pid file) at the end.
        runtime = Path(tempfile.mkdtemp(prefix="fvbr-"))
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        from flyvault import localvault

        state, _ = localvault.up(name=VAULT)
        try:
            results = asyncio.run(measure(args.samples))
        finally:
            stop_keepers(runtime)
            localvault.down()

    stamp = dt.datetime.now(dt.UTC)
    git = git_info()
    document = {
        "bench": "bench/b_mcp.py",
        "started_at": stamp.isoformat(timespec="seconds"),
        "git": git,
        "note": args.note,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "mcp": importlib.metadata.version("mcp"),
            "aioquic": importlib.metadata.version("aioquic"),
        },
        "setup": {"vault": f"host-mode local vault at {state.host}:{state.port}"},
        "benchmarks": results,
    }
    out = args.out
    if out is None:
        name = f"mcp-{stamp:%Y-%m-%d}-{git['sha'] or 'nogit'}"
        out = REPO / "bench" / "results" / f"{name}.json"
        counter = 2
        while out.exists():
            out = out.with_name(f"{name}-{counter}.json")
            counter += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")

    exec_ = results["warm_exec_true"]
    for label, key in (
        ("MCP in process", "mcp_in_process"),
        ("MCP legacy JSON-RPC", "mcp_in_process_legacy_jsonrpc"),
        ("MCP --share-keeper", "mcp_in_process_shared_keeper"),
        ("client core (bare)", "client_core_bare"),
    ):
        s = exec_[key]
        print(
            f"warm exec true, {label:<22} p50 {s['p50']:7.2f} ms  p90 {s['p90']:7.2f}  p99 {s['p99']:7.2f}"
        )
    print(f"target {exec_['target']}: {'met' if exec_['met'] else 'NOT met'}")
    for label, key in (
        ("", "tools_list"),
        (" with the tenant tool", "tools_list_with_tenant_tool"),
    ):
        listing = results[key]
        print(
            f"tools/list{label}: {listing['tools']} tools, {listing['chars']} chars, "
            f"~{listing['approx_tokens']} tokens"
        )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
