"""Path MTU discovery end to end: our QUIC client and server in network namespaces of their
own, with a 1400-byte MTU hop in the middle (tests/netns_path.py), reported by ICMP or
dropped silently. Both ends must find the largest size the path carries (within the
search's granularity) and move data without loss. Root only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_path import NetnsPath, netns_path, netns_skip_reason

from flyvault.protocol.pmtu import BASE_PLPMTU, GRANULARITY

pytestmark = pytest.mark.skipif(netns_skip_reason() is not None, reason=netns_skip_reason() or "")

PEER = str(Path(__file__).with_name("pmtu_peer.py"))
HOP_MTU = 1400
BULK = 4 * 1024 * 1024
#: Our own variables, cleared so that the developer's environment cannot fix the size.
OUR_ENV = ("FLY_VAULT_DATAGRAM_SIZE", "FLY_VAULT_PMTU")


def peer_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OUR_ENV}
    env.update(overrides)
    return env


def run_pair(path: NetnsPath, env: dict[str, str]) -> dict[str, Any]:
    """Start the server in its namespace, run the client in its own; the client's JSON."""
    server = subprocess.Popen(
        path.exec_argv(path.server_ns, sys.executable, PEER, "server", "10.231.2.2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()  # bounded: the peer exits after its lifetime
        assert ready.startswith("READY "), server.stderr.read() if server.stderr else ready
        port = ready.split()[1]
        client = subprocess.run(
            path.exec_argv(
                path.client_ns, sys.executable, PEER, "client", "10.231.2.2", port, str(BULK)
            ),
            capture_output=True, text=True, env=env, timeout=150,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr[-3000:]
        result: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
        result["client_log"] = client.stderr
        return result
    finally:
        server.kill()
        server.wait(timeout=20)


@pytest.fixture(params=[True, False], ids=["icmp", "silent"])
def path(request: pytest.FixtureRequest) -> Iterator[NetnsPath]:
    with netns_path(HOP_MTU, icmp=request.param) as made:
        yield made


def test_both_ends_find_the_path_mtu_and_move_data_intact(path: NetnsPath) -> None:
    result = run_pair(path, peer_env())
    assert result["intact"]
    for end, largest in (
        ("client", path.largest_payload),
        ("server", path.largest_reply_payload),
    ):
        view = result[end]
        assert view["searching"] and view["complete"], (end, view)
        assert largest - GRANULARITY < view["size"] <= largest, (end, view, largest)
        # A burst of congestion loss on a loaded machine can be taken for a black hole (no
        # confirmation probe yet: references/protocol.md); the size is found again each
        # time. Twice was seen in a CI run on a slow day (stop 32); more is a bug.
        assert view["black_holes"] <= 2, (end, view)
        assert view["probes"] <= 40 * (1 + view["black_holes"]), (end, view)
    assert f"-> {result['client']['size']} bytes" in result["client_log"]
    print(json.dumps({k: v for k, v in result.items() if k != "client_log"}))


@pytest.mark.parametrize(
    "env", [{"FLY_VAULT_DATAGRAM_SIZE": "1200"}, {"FLY_VAULT_PMTU": "0"}], ids=["forced", "off"]
)
def test_a_fixed_size_or_the_switch_runs_no_search(env: dict[str, str]) -> None:
    with netns_path(HOP_MTU, icmp=True) as made:
        result = run_pair(made, peer_env(**env))
    assert result["intact"]
    for end in ("client", "server"):
        assert result[end] == {
            "size": BASE_PLPMTU, "searching": False, "complete": False,
            "probes": 0, "black_holes": 0,
        }  # fmt: skip
