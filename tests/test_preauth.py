"""What a stranger may hold before authenticating, and fair handling of wrong tokens.

The admission table is pure logic and is driven with explicit ``now`` values; the end to
end tests flood a real init over real QUIC on loopback addresses (127.0.0.2 plays the
stranger, 127.0.0.3 another host) and then check that honest clients still get in.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, ScriptedAttestor, run_async, vault_entry
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.client.connection import open_vault
from flyvault.errors import AuthError
from flyvault.server.app import ServerOptions, VaultServer
from flyvault.server.auth import AccessToken, WrongTokenBudget, penalty, weak_token_warning
from flyvault.standins import OidcIssuer
from flyvault.transport import TransportSettings, connect
from flyvault.transport.admission import (
    AdmissionLimits,
    AdmissionTable,
    Stage,
    Verdict,
)

STRANGER = "127.0.0.2"
OTHER_HOST = "127.0.0.3"


# The admission table, pure ---------------------------------------------------------------


def small_limits(**overrides: Any) -> AdmissionLimits:
    values: dict[str, Any] = dict(
        max_preauth=8, max_preauth_per_source=4, retry_above=6, stale_after=0.5
    )
    values.update(overrides)
    return AdmissionLimits(**values)


def test_a_source_at_half_its_cap_must_prove_its_address() -> None:
    table = AdmissionTable(small_limits())
    for key in range(2):
        assert table.admit("a", validated=False, now=0).verdict is Verdict.ACCEPT
        table.add(key, "a", 0)
    assert table.admit("a", validated=False, now=0).verdict is Verdict.RETRY
    assert table.admit("a", validated=True, now=0).verdict is Verdict.ACCEPT
    # Another source is not affected by "a".
    assert table.admit("b", validated=False, now=0).verdict is Verdict.ACCEPT


def test_under_pressure_every_unvalidated_initial_gets_a_retry() -> None:
    table = AdmissionTable(small_limits(max_preauth_per_source=8))
    for key in range(6):
        table.add(key, f"s{key}", 0)
    assert table.admit("new", validated=False, now=0).verdict is Verdict.RETRY
    assert table.admit("new", validated=True, now=0).verdict is Verdict.ACCEPT


def test_a_full_source_evicts_only_its_own_stale_connections() -> None:
    table = AdmissionTable(small_limits())
    for key in range(4):
        table.add(("a", key), "a", now=float(key) * 0.1)
    table.add("b0", "b", now=0.0)
    # Nothing is stale yet: the Initial is refused (the client comes back later).
    assert table.admit("a", validated=True, now=0.4).verdict is Verdict.REFUSE
    decision = table.admit("a", validated=True, now=1.0)
    assert decision.verdict is Verdict.ACCEPT
    assert decision.evict == ("a", 0)  # the stalest of its own
    assert table.count("b") == 1


def test_a_connection_being_served_is_never_evicted_and_never_expires() -> None:
    table = AdmissionTable(small_limits())
    for key in range(4):
        table.add(key, "a", 0)
        table.set_stage(key, Stage.WAITING_US, 0)
    assert table.admit("a", validated=True, now=100).verdict is Verdict.REFUSE
    assert table.expired(1000) == []


def test_penalized_connections_go_first() -> None:
    table = AdmissionTable(small_limits())
    for key in range(4):
        table.add(key, "a", 0)
    table.set_stage(3, Stage.PENALIZED, 0.9)
    assert table.admit("a", validated=True, now=1.0).evict == 3


def test_a_full_server_evicts_from_the_busiest_source() -> None:
    table = AdmissionTable(small_limits(max_preauth=6, retry_above=6))
    for key in range(4):
        table.add(("a", key), "a", 0)
    table.add(("b", 0), "b", 0)
    table.add(("c", 0), "c", 0)
    decision = table.admit("d", validated=True, now=1.0)
    assert decision.verdict is Verdict.ACCEPT
    assert decision.evict == ("a", 0)


def test_only_time_waiting_on_the_peer_counts_towards_the_auth_deadline() -> None:
    table = AdmissionTable(small_limits(auth_deadline=10.0, handshake_deadline=5.0))
    table.add("x", "a", 0)
    table.set_stage("x", Stage.WAITING_PEER, 2.0)  # handshake took 2 s
    table.set_stage("x", Stage.WAITING_US, 3.0)  # 1 s more on the peer's side
    table.set_stage("x", Stage.WAITING_PEER, 60.0)  # we were slow: 57 s not counted
    assert table.expired(66.9) == []
    assert table.next_deadline() == pytest.approx(67.0)
    assert table.expired(67.0) == [("x", "not authenticated in time")]
    assert table.preauth == 0


def test_an_unfinished_handshake_has_its_own_deadline() -> None:
    table = AdmissionTable(small_limits(handshake_deadline=5.0))
    table.add("x", "a", 0)
    assert table.expired(4.9) == []
    assert table.expired(5.0) == [("x", "handshake not completed in time")]


def test_under_pressure_waiting_strangers_are_closed_sooner() -> None:
    table = AdmissionTable(small_limits(pressure_deadline=1.0, max_preauth_per_source=8))
    for key in range(7):
        table.add(key, f"s{key}", 0)
        table.set_stage(key, Stage.WAITING_PEER, 0)
    assert table.under_pressure()
    assert len(table.expired(1.0)) == 7


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "stage", "remove", "expire"]),
            st.integers(0, 5),  # source / key selector
            st.sampled_from(list(Stage)),
            st.booleans(),
            st.floats(0, 2),
        ),
        max_size=200,
    )
)
def test_caps_hold_and_served_connections_survive_any_sequence(ops: list[Any]) -> None:
    limits = small_limits()
    table = AdmissionTable(limits)
    now, next_key, live = 0.0, 0, {}  # key -> source
    for op, selector, stage, validated, step in ops:
        now += step
        if op == "admit":
            source = f"s{selector % 3}"
            decision = table.admit(source, validated=validated, now=now)
            if decision.evict is not None:
                assert table.stage(decision.evict) is None
                live.pop(decision.evict)
            if decision.verdict is Verdict.ACCEPT:
                table.add(next_key, source, now)
                live[next_key] = source
                next_key += 1
        elif live:
            key = sorted(live)[selector % len(live)]
            if op == "stage":
                before = table.stage(key)
                table.set_stage(key, stage, now)
                assert table.stage(key) in (stage, before)
            elif op == "remove":
                table.remove(key)
                live.pop(key)
            else:
                served = {k for k in live if table.stage(k) is Stage.WAITING_US}
                for gone, _ in table.expired(now):
                    assert gone not in served
                    live.pop(gone)
        assert table.preauth == len(live) <= limits.max_preauth
        for source in set(live.values()):
            assert table.count(source) <= limits.max_preauth_per_source


# Over real QUIC ---------------------------------------------------------------------------


async def start_server(tmp_path: Path, attestor: Any, **options: Any) -> VaultServer:
    server = VaultServer(
        ServerOptions(
            listen_host="127.0.0.1", listen_port=0, data_dir=tmp_path, host_mode=True, **options
        ),
        AccessToken(TOKEN),
        attestor,
    )
    await server.start()
    return server


def port_of(server: VaultServer) -> int:
    assert server.listener is not None
    return server.listener.address[1]


def never_answered_initials(count: int, port: int, source: str) -> None:
    """``count`` QUIC Initials from ``source`` whose sender never reads an answer."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from flyvault.protocol.constants import ALPN_PROTOCOLS

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for _ in range(count):
            quic = QuicConnection(
                configuration=QuicConfiguration(is_client=True, alpn_protocols=list(ALPN_PROTOCOLS))
            )
            quic.connect(("127.0.0.1", port), now=0.0)
            for datagram, _ in quic.datagrams_to_send(now=0.0):
                sock.sendto(datagram, ("127.0.0.1", port))


async def idle_connections(count: int, port: int, source: str) -> list[Any]:
    """Completed QUIC connections from ``source`` that never open a stream."""
    settings = TransportSettings(local_host=source, handshake_timeout=3.0, keepalive_interval=0)

    async def one() -> Any:
        try:
            return await connect("127.0.0.1", port, settings)
        except Exception:
            return None

    results: list[Any] = []
    for start in range(0, count, 50):  # in waves, as a flooder with one process would
        results += await asyncio.gather(*(one() for _ in range(start, min(count, start + 50))))
    return [channel for channel in results if channel is not None]


async def exec_true(entry: Any, source: str) -> tuple[int, float]:
    from flyvault.client.vault import ExecHooks, ExecSession, Vault, new_session_id
    from flyvault.protocol.console import OpenSession

    started = time.monotonic()
    vault = Vault(entry, settings=TransportSettings(local_host=source))
    try:
        session = ExecSession(
            vault,
            OpenSession(new_session_id(), ("true",)),
            ExecHooks(stdout=lambda d: None, stderr=lambda d: None),
        )
        status = (await session.run()).exit_status
    finally:
        await vault.close()
    return status, time.monotonic() - started


def test_a_flood_from_one_address_keeps_nobody_out(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor, auth_timeout=5.0)
        listener = server.listener
        assert listener is not None
        limits = listener.admission.limits
        port = port_of(server)
        try:
            never_answered_initials(300, port, STRANGER)
            await asyncio.sleep(0)  # let the listener take them in
            assert listener.admission.count(STRANGER) <= limits.max_preauth_per_source // 2
            flood = await idle_connections(300, port, STRANGER)
            assert listener.admission.count(STRANGER) <= limits.max_preauth_per_source
            assert listener.admission.stats.retries_sent > 0
            assert listener.admission.preauth <= limits.max_preauth_per_source

            entry = vault_entry(port, issuer)
            for source in (OTHER_HOST, STRANGER):
                status, elapsed = await exec_true(entry, source)
                assert status == 0
                assert elapsed < 2.0, f"from {source}: {elapsed:.2f} s"
            assert listener.admission.stats.evicted > 0

            # The flood's connections are gone within the handshake and auth deadlines.
            deadline = time.monotonic() + limits.auth_deadline + 5
            while listener.admission.preauth and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert listener.admission.preauth == 0
            assert listener.stats.active == 0  # no state of the flood's left on the server
            assert flood  # the flood did complete handshakes
        finally:
            server.close()

    run_async(scenario(), timeout=120)


def test_an_evicted_honest_client_is_told_busy_and_reconnects(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    """A stale connection evicted under load sees QUIC CONNECTION_REFUSED ("server busy")."""

    async def scenario() -> None:
        limits = AdmissionLimits(
            max_preauth=4, max_preauth_per_source=2, retry_above=4, stale_after=0.2
        )
        server = await start_server(tmp_path, attestor, admission=limits)
        port = port_of(server)
        try:
            first = await connect("127.0.0.1", port, TransportSettings(local_host=STRANGER))
            second = await connect("127.0.0.1", port, TransportSettings(local_host=STRANGER))
            await asyncio.sleep(0.3)  # both stale now
            status, _ = await exec_true(vault_entry(port, issuer), STRANGER)
            assert status == 0
            await asyncio.wait_for(first.wait_closed(), 5)
            assert first.refused_by_peer
            assert "server busy" in (first.close_reason or "")
            assert not second.is_closed or second.refused_by_peer
        finally:
            server.close()

    run_async(scenario())


def test_an_initial_without_room_is_refused_at_once_as_busy(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    """No room and nothing stale: a stateless CONNECTION_REFUSED, not silence."""
    from flyvault.errors import ServerBusy

    async def scenario() -> None:
        limits = AdmissionLimits(
            max_preauth=4, max_preauth_per_source=2, retry_above=4, stale_after=60.0
        )
        server = await start_server(tmp_path, attestor, admission=limits)
        port = port_of(server)
        settings = TransportSettings(local_host=STRANGER, handshake_timeout=10.0)
        try:
            held = [await connect("127.0.0.1", port, settings) for _ in range(2)]
            started = time.monotonic()
            with pytest.raises(ServerBusy, match="server busy: per-source limit"):
                await connect("127.0.0.1", port, settings)
            assert time.monotonic() - started < settings.handshake_timeout / 2
            assert server.listener is not None
            assert server.listener.stats.refused >= 1
            assert server.listener.admission.count(STRANGER) == 2
            # Another host is not affected by the stranger's full quota.
            other = await connect("127.0.0.1", port, TransportSettings(local_host=OTHER_HOST))
            for channel in (*held, other):
                channel.close_now()
        finally:
            server.close()

    run_async(scenario())


# Fair lockout ---------------------------------------------------------------------------


def test_a_correct_token_is_accepted_whatever_others_sent(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        port = port_of(server)
        try:
            wrong = vault_entry(port, issuer, token="wrong-token")
            guesses = [open_vault(wrong) for _ in range(12)]
            results = await asyncio.gather(*guesses, return_exceptions=True)
            assert all(isinstance(result, AuthError) for result in results), results
            # Same source address, right after a dozen wrong tokens: accepted at once.
            started = time.monotonic()
            connection = await open_vault(vault_entry(port, issuer))
            assert time.monotonic() - started < penalty(1)
            connection.close()
            assert server.stats.token_failures == 12
        finally:
            server.close()

    run_async(scenario())


def test_wrong_tokens_are_slowed_and_closed_per_connection(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    """Three wrong tokens on one connection, each answered later than the last; then the
    connection is closed."""
    from test_e2e_connect import read_frames  # the raw control exchange helpers

    from flyvault.protocol.control import ControlClient
    from flyvault.protocol.messages import RootfsNone, SetupRequest

    async def one_guess(channel: Any) -> tuple[float, bytes]:
        from flyvault.protocol.constants import StreamTag

        control = ControlClient()
        stream = channel.open_stream()
        control.request_attestation()
        stream.write(bytes((StreamTag.CONTROL,)) + control.data_to_send())
        # Skip the attestation check: this test is about the token path only.
        while control.next_event() is None:
            control.receive_data(await stream.read())
        control.send_setup(SetupRequest("wrong-token", RootfsNone()))
        started = time.monotonic()
        stream.write(control.data_to_send(), end_stream=True)
        frames = await read_frames(stream)
        return time.monotonic() - started, frames[-1].payload

    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        try:
            channel = await connect("127.0.0.1", port_of(server))
            pauses = []
            for attempt in range(1, 4):
                pause, body = await one_guess(channel)
                assert b"access token verification failed" in body
                assert pause >= penalty(attempt)
                pauses.append(pause)
            assert b"reconnect to try again" in body
            await asyncio.wait_for(channel.wait_closed(), 5)
            assert server.stats.token_closes == 1
        finally:
            server.close()

    run_async(scenario())


def test_a_spent_budget_closes_wrong_guessers_but_never_the_right_token(
    tmp_path: Path, issuer: OidcIssuer, attestor: ScriptedAttestor
) -> None:
    async def scenario() -> None:
        server = await start_server(tmp_path, attestor)
        server.wrong_tokens = WrongTokenBudget(rate=0.0, burst=2)
        port = port_of(server)
        try:
            wrong = vault_entry(port, issuer, token="wrong-token")
            for _ in range(4):
                with pytest.raises(AuthError):
                    await open_vault(wrong)
            assert server.wrong_tokens.exhausted_count == 2
            assert server.stats.token_closes == 2
            connection = await open_vault(vault_entry(port, issuer))
            connection.close()
        finally:
            server.close()

    run_async(scenario())


def test_weak_tokens_are_named_and_ours_are_not() -> None:
    import secrets

    assert weak_token_warning("hunter2") is not None
    assert weak_token_warning("a" * 40) is not None  # long but plain
    assert weak_token_warning(secrets.token_urlsafe(32)) is None
    assert weak_token_warning(TOKEN) is None
    message = weak_token_warning("hunter2") or ""
    assert "hunter2" not in message and "token_urlsafe" in message


def test_init_warns_about_a_weak_token_at_start(tmp_path: Path, fly_api: Any) -> None:
    from conftest import start_init

    init = start_init(tmp_path, fly_api.path, token="hunter2")
    try:
        text = init.log.read_text()
    finally:
        init.stop()
    assert "ACCESS_TOKEN is weak" in text
    assert "hunter2" not in text
