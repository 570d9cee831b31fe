"""Short versions of the reliability suites in bench/ (R4, R5, R8, P7), a few seconds each.

The benches hold the logic; these runs use the same code with small counts against a real
init on 127.0.0.1 (the conftest fixtures). The full runs and their figures:
bench/README.md, "Reliability suites".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import InitProcess, run_async, vault_entry

from flyvault.errors import LocalProtocolError, RemoteProtocolError
from flyvault.standins import OidcIssuer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import p7_conn_memory
import r4_drops
import r5_fuzz
import r8_concurrency

# R4 -----------------------------------------------------------------------------------


def test_r4_output_exact_across_ten_forced_drops(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    """1.5 MB from a seeded generator, the connection cut 10 times at random offsets (both
    kinds of cut): every byte arrives once, in order, and the SHA-256 is exact. Unpaced: the
    vault holds output at what the client acknowledged, and for a while after a lost
    connection, so even a generator at full speed loses nothing."""
    size = 1_500_000
    result = run_async(
        r4_drops.run_session(
            vault_entry(init_process.port, issuer),
            "r4-test",
            seed=11,
            size=size,
            drops=10,
            cut="mixed",
            rate=0,
            timeout=60,
        ),
        timeout=90,
    )
    assert result.error is None
    assert result.exit_status == 0
    assert result.drops == 10
    assert result.drops_by_kind["close"] > 0 and result.drops_by_kind["silent"] > 0
    assert result.connects == 11  # one reconnect per drop: the cuts really happened
    assert len(result.outages) == 10
    assert result.reported_dropped == 0
    assert result.first_mismatch is None
    assert result.received == size
    assert result.sha256 == result.expected_sha256 == r4_drops.expected_sha256(11, size)
    assert result.hash_ok


def test_r4_silent_cuts_at_full_speed_lose_nothing(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    """Silent cuts (the network just vanishes) while an unpaced generator runs: bytes the
    vault sent but the client never acknowledged are still in the vault's buffer when the
    client resumes. The vault may only have dropped what the client's QUIC stack had
    acknowledged but the client had not read when its connection died (they die with it),
    and then it says so: nothing is lost silently, and every other byte arrives once, in
    order. (Before the vault held output at the acknowledged offset, megabytes were lost
    here.) How much the client had not read depends on scheduling, so the bound is measured
    at each cut rather than assumed to be zero."""
    size = 3_000_000
    result = run_async(
        r4_drops.run_session(
            vault_entry(init_process.port, issuer),
            "r4-fast",
            seed=12,
            size=size,
            drops=6,
            cut="silent",
            rate=0,
            timeout=60,
        ),
        timeout=90,
    )
    assert result.error is None and result.exit_status == 0
    assert result.drops >= 1 and result.connects == result.drops + 1
    assert result.first_mismatch is None
    assert result.reported_dropped <= result.unread_at_cuts
    assert result.received + result.reported_dropped == size
    assert result.hash_ok or result.reported_dropped > 0


# R5 -----------------------------------------------------------------------------------


def test_r5_decoders_raise_only_documented_errors_on_20k_inputs() -> None:
    report = r5_fuzz.fuzz(per_target=2800, hypothesis_examples=60, seed=7, traced=500)
    assert report["total_unexpected"] == 0, [
        failure for target in report["targets"].values() for failure in target["failures"]
    ]
    assert report["total_inputs"] >= 20_000
    assert set(report["targets"]) == set(r5_fuzz.TARGETS)
    for name, target in report["targets"].items():
        # Both paths ran: inputs were taken as valid, and inputs were refused.
        assert target["accepted"] > 0 and target["rejected_with_documented_error"] > 0, name
        assert target["hypothesis_examples"] > 0, name
        assert target["tracemalloc_peak"] < 64 * 1024 * 1024, name
    # The machines were driven all the way through, not only refused at the first frame.
    assert report["targets"]["control_server"]["final_states"].get("complete", 0) > 0
    assert report["targets"]["control_client"]["final_states"].get("complete", 0) > 0


def test_r5_mutator_is_reproducible() -> None:
    import random

    seeds = r5_fuzz.SEEDS["codec"]

    def mutants(seed: int) -> list[bytes]:
        rng = random.Random(seed)
        return [r5_fuzz.mutate(seeds[0], rng, list(seeds), 1) for _ in range(200)]

    assert mutants(3) == mutants(3)  # a reported input can be found again
    assert mutants(3) != mutants(4)
    assert len(set(mutants(3))) > 100  # and they differ from each other


def test_r5_regression_frame_after_setup_complete_is_the_peers_error() -> None:
    """Found by R5: a frame after SETUP_COMPLETE made ControlServer raise
    LocalProtocolError (it tried to send an error frame after the result)."""
    data = bytes.fromhex(  # as R5 reported it: mode 0, the client's frames, one more
        "00010000000400020002030000001d00000018746f6b2d787878787878787878787878787878"
        "7878787878000100000000"
    )
    assert r5_fuzz.run_control_server(data) == "rejected"

    from flyvault.protocol.constants import (
        MAX_PROTOCOL_VERSION,
        ControlFrame,
        RuntimeStatus,
        VmState,
    )
    from flyvault.protocol.control import ControlServer, ServerState
    from flyvault.protocol.messages import (
        RequestAttestation,
        RootfsNone,
        SetupComplete,
        SetupRequest,
    )

    server = ControlServer()
    server.receive_data(
        r5_fuzz._frames(
            (ControlFrame.REQUEST_ATTESTATION, RequestAttestation(2, MAX_PROTOCOL_VERSION).encode())
        )
    )
    server.next_event()
    server.send_attestation(VmState.READY, RuntimeStatus.HOST_MODE, "b", "j")
    server.receive_data(
        r5_fuzz._frames((ControlFrame.SETUP_REQUEST, SetupRequest("t", RootfsNone()).encode()))
    )
    server.next_event()
    server.accept_token()
    server.send_setup_complete(SetupComplete(VmState.READY, RuntimeStatus.HOST_MODE, "b"))
    sent = server.data_to_send()
    server.receive_data(r5_fuzz._frames((ControlFrame.PROGRESS, b"")))
    with pytest.raises(RemoteProtocolError) as caught:
        server.next_event()
    assert not isinstance(caught.value, LocalProtocolError)
    assert server.state is ServerState.FAILED
    assert server.data_to_send() == b""  # nothing may follow the setup result
    assert sent  # the result itself went out


def test_r5_regression_deeply_nested_json_is_a_protocol_error() -> None:
    """Found by R5: a session list nested 1000 deep raised RecursionError in the client."""
    from flyvault.protocol.console import decode_json

    with pytest.raises(RemoteProtocolError, match="nested too deeply"):
        decode_json(b"[" * 100_000, "session list")
    assert decode_json(b"[" * 50 + b"]" * 50, "session list") is not None


# R8 -----------------------------------------------------------------------------------


def test_r8_twenty_concurrent_clients_five_execs_each(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    result = run_async(
        r8_concurrency.run_clients(
            vault_entry(init_process.port, issuer), clients=20, execs=5, budget=90
        ),
        timeout=120,
    )
    assert result["failures"] == 0, result["failure_examples"]
    assert result["execs_ok"] == 100
    assert result["exec_latency_ms"]["n"] == 100
    assert result["connect_latency_ms"]["n"] == 20
    assert 0 < result["exec_latency_ms"]["p50"] <= result["exec_latency_ms"]["p99"]
    assert init_process.process.poll() is None


# P7 -----------------------------------------------------------------------------------


def test_p7_idle_authenticated_connection_costs_under_2_mb(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    result = run_async(
        p7_conn_memory.measure(
            vault_entry(init_process.port, issuer),
            init_process.process.pid,
            connections=20,
            settle=1.0,
        ),
        timeout=120,
    )
    assert result["connections_alive_at_reading"] == 20
    assert result["init_rss_n"] > 0 and result["init_rss_1"] > 0
    # Catches a leak (megabytes per connection), not allocator noise.
    assert result["per_connection_bytes"] < 2 * 1024 * 1024, result
