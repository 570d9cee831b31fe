"""Bulk throughput over a routed namespace path with path MTU discovery on, against the
fixed 1200-byte datagrams of ``FLY_VAULT_DATAGRAM_SIZE=1200`` (root only).

    sudo .venv/bin/python bench/pmtu_netns.py [--mb 32] [--rounds 3] [--hop-mtu 1500,1400]
        [--fixed 1200,1368]

The path is tests/netns_path.py's: client ns -- veth 1500 -- router ns -- veth HOP -- server
ns. Per round and variant a fresh server and client (tests/pmtu_peer.py): the client
echoes N MB once while the search runs, waits for the search, then echoes N MB again,
timed (bytes both ways / seconds). Variants alternate within a round: ``discovery`` and
``fixed-N`` for each ``--fixed`` size (``FLY_VAULT_DATAGRAM_SIZE=N``, no search; a size the
path carries isolates what the search itself costs). Results in
``bench/results/pmtu-<date>-<sha>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from netns_path import SERVER_ADDRESS, netns_path, netns_skip_reason  # noqa: E402

PEER = str(ROOT / "tests" / "pmtu_peer.py")


def one_run(path: Any, env: dict[str, str], size: int) -> dict[str, Any]:
    server = subprocess.Popen(
        path.exec_argv(path.server_ns, sys.executable, PEER, "server", SERVER_ADDRESS),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        port = server.stdout.readline().split()[1]
        client = subprocess.run(
            path.exec_argv(
                path.client_ns, sys.executable, PEER, "client", SERVER_ADDRESS, port, str(size)
            ),
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        if client.returncode != 0:
            raise RuntimeError(client.stderr[-2000:])
        result: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
        return result
    finally:
        server.kill()
        server.wait(timeout=20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hop-mtu", default="1500,1400")
    parser.add_argument("--fixed", default="1200")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    reason = netns_skip_reason()
    if reason is not None:
        print(f"pmtu_netns: {reason}", file=sys.stderr)
        return 2
    base_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLY_VAULT_DATAGRAM_SIZE", "FLY_VAULT_PMTU")
    }
    size = args.mb * 1024 * 1024
    variants: dict[str, dict[str, str]] = {"discovery": {}}
    for fixed in args.fixed.split(","):
        variants[f"fixed-{fixed}"] = {"FLY_VAULT_DATAGRAM_SIZE": fixed}
    results: dict[str, Any] = {"mb": args.mb, "rounds": args.rounds, "paths": {}}
    for hop in (int(h) for h in args.hop_mtu.split(",")):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        with netns_path(hop, icmp=True) as path:
            for _ in range(args.rounds):
                for name, extra in variants.items():
                    runs[name].append(one_run(path, {**base_env, **extra}, size))
        summary = {
            name: {
                "median_mb_per_s": round(statistics.median(r["mb_per_s"] for r in got), 1),
                "all_mb_per_s": [round(r["mb_per_s"], 1) for r in got],
                "client_size": got[-1]["client"]["size"],
                "server_size": got[-1]["server"]["size"],
                "probes": [r["client"]["probes"] + r["server"]["probes"] for r in got],
                "intact": all(r["intact"] for r in got),
            }
            for name, got in runs.items()
        }
        results["paths"][f"hop-mtu-{hop}"] = summary
        print(json.dumps({f"hop-mtu-{hop}": summary}, indent=1), flush=True)
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"pmtu-{day}-{sha}.json"
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
