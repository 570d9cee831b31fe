"""The path MTU search (flyvault/protocol/pmtu.py), in memory against simulated paths.

A simulated path carries datagrams up to ``path_max`` bytes; the sender's interface
refuses anything above ``iface_max`` (EMSGSIZE); some probes that would fit are lost
anyway (hypothesis picks which). No sockets, no clock: ``now`` is a number the test moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.protocol.pmtu import (
    BASE_PLPMTU,
    DEFAULT_LADDER,
    GRANULARITY,
    MAX_PROBES,
    PROBE_TIMEOUT,
    RAISE_TIMEOUT,
    PmtuConfig,
    PmtuSearch,
    PmtuState,
)

RTT = 0.05
#: The caller's loss detection (QUIC's) declares a lost probe this long after sending it.
LOSS_DELAY = 3 * RTT


def probe_budget(config: PmtuConfig) -> int:
    """Probes one search may send at most: each ladder step, the ceiling, and the binary
    search's steps, ``max_probes`` each."""
    binary = math.ceil(math.log2(max(2, config.ceiling - config.base + 1))) + 1
    return config.max_probes * (len(config.ladder) + 1 + binary)


@dataclass
class Path:
    path_max: int
    iface_max: int
    #: Per probe: True drops it although it fits (consumed in order, then none).
    drops: list[bool] = field(default_factory=list)
    #: Per lost probe: True lets the machine's own timer notice instead of the caller.
    by_timer: list[bool] = field(default_factory=list)


def run_search(machine: PmtuSearch, path: Path, now: float, *, max_steps: int = 500) -> float:
    """Drive ``machine`` until its search completes (bounded); returns the time then.
    Checks the invariants after every step."""
    config = machine.config
    for _ in range(max_steps):
        if machine.state is PmtuState.SEARCH_COMPLETE:
            return now
        probe = machine.next_probe(now)
        assert probe is not None, "a searching machine with no probe out must send one"
        assert config.base < probe.size <= config.ceiling
        deadline = machine.next_deadline()
        assert deadline is not None and deadline >= now
        if probe.size > path.iface_max:
            machine.probe_too_big(probe.probe_id, now)
        elif probe.size <= path.path_max and not (path.drops and path.drops.pop(0)):
            now += RTT
            machine.probe_acked(probe.probe_id, now)
        elif path.by_timer and path.by_timer.pop(0):
            now = deadline
            machine.handle_timer(now)
        else:
            now += LOSS_DELAY
            machine.probe_lost(probe.probe_id, now)
        assert config.base <= machine.size <= config.ceiling
        assert machine.size <= max(config.base, path.path_max), "a size the path drops"
        after = machine.next_deadline()
        assert after is None or after >= now, "a deadline in the past"
    raise AssertionError(f"no convergence in {max_steps} steps")


def expected_limit(config: PmtuConfig, path: Path) -> int:
    return max(config.base, min(path.path_max, path.iface_max, config.ceiling))


sizes = st.integers(min_value=BASE_PLPMTU, max_value=16000)


@settings(max_examples=300, deadline=None)
@given(
    path_max=sizes,
    iface_max=sizes,
    ceiling=sizes,
    drops=st.lists(st.booleans(), max_size=40),
    by_timer=st.lists(st.booleans(), max_size=40),
)
def test_search_converges_to_the_largest_size_the_path_carries(
    path_max: int, iface_max: int, ceiling: int, drops: list[bool], by_timer: list[bool]
) -> None:
    config = PmtuConfig(ceiling=ceiling)
    machine = PmtuSearch(config, now=0.0)
    # A few stray drops may cost a size (MAX_PROBES in a row): keep them scattered.
    scattered = [d and not (i and drops[i - 1]) for i, d in enumerate(drops)]
    path = Path(path_max, iface_max, scattered, by_timer)
    run_search(machine, path, 0.0)
    limit = expected_limit(config, path)
    assert limit - config.granularity < machine.size <= limit
    assert machine.probes_sent <= probe_budget(config) + len(drops)


@settings(max_examples=200, deadline=None)
@given(path_max=sizes, ceiling=sizes, drops=st.lists(st.booleans(), max_size=60))
def test_any_losses_never_raise_above_the_path_or_below_base(
    path_max: int, ceiling: int, drops: list[bool]
) -> None:
    """Even when every probe may be lost, the size stays within [base, path] and the
    probes stay bounded (a size fails after MAX_PROBES losses)."""
    config = PmtuConfig(ceiling=ceiling)
    machine = PmtuSearch(config, now=0.0)
    run_search(machine, Path(path_max, 16000, list(drops)), 0.0)
    assert BASE_PLPMTU <= machine.size <= max(BASE_PLPMTU, min(path_max, ceiling))
    assert machine.probes_sent <= probe_budget(config) + len(drops)


def test_typical_internet_path() -> None:
    config = PmtuConfig(ceiling=16000)
    machine = PmtuSearch(config, now=0.0)
    run_search(machine, Path(path_max=1452, iface_max=1472), 0.0)
    assert machine.size == 1452
    # 1280 1350 1400 1420 1452 by ack, 1472 three times lost, 8952 refused by the kernel,
    # then binary search between 1452 and 1472.
    assert machine.probes_sent <= 5 + MAX_PROBES + 1 + 2 * MAX_PROBES


def test_the_size_stays_put_between_searches_and_rises_after_the_raise_timer() -> None:
    config = PmtuConfig(ceiling=1472)
    machine = PmtuSearch(config, now=0.0)
    now = run_search(machine, Path(path_max=1400, iface_max=16000), 0.0)
    assert machine.size == 1400
    assert machine.next_probe(now) is None
    raise_at = machine.next_deadline()
    assert raise_at == pytest.approx(now + RAISE_TIMEOUT)
    machine.handle_timer(raise_at - 1)
    assert machine.state is PmtuState.SEARCH_COMPLETE
    machine.handle_timer(raise_at)
    assert machine.state is PmtuState.SEARCHING and machine.size == 1400
    run_search(machine, Path(path_max=1472, iface_max=16000), raise_at)
    assert machine.size == 1472


def test_a_probe_lost_to_the_timer_counts_and_a_late_ack_is_ignored() -> None:
    machine = PmtuSearch(PmtuConfig(ceiling=1280), now=0.0)
    probe = machine.next_probe(0.0)
    assert probe is not None and probe.size == 1280
    assert machine.next_deadline() == PROBE_TIMEOUT
    machine.handle_timer(PROBE_TIMEOUT)
    machine.probe_acked(probe.probe_id, PROBE_TIMEOUT + 1)  # too late: already lost
    assert machine.size == BASE_PLPMTU
    again = machine.next_probe(PROBE_TIMEOUT + 1)
    assert again is not None and again.probe_id != probe.probe_id
    machine.probe_acked(again.probe_id, PROBE_TIMEOUT + 2)
    assert machine.size == 1280 and machine.state is PmtuState.SEARCH_COMPLETE


def converged(path_max: int, ceiling: int = 16000) -> tuple[PmtuSearch, float]:
    machine = PmtuSearch(PmtuConfig(ceiling=ceiling), now=0.0)
    now = run_search(machine, Path(path_max=path_max, iface_max=16000), 0.0)
    return machine, now


def test_a_black_hole_falls_back_to_base_and_searches_again() -> None:
    machine, now = converged(1452)
    assert machine.size == 1452
    # The route changes: 1452-byte packets vanish, small ones (ACKs) still arrive.
    for i in range(3):
        machine.packet_lost(1452, now + i * 0.01, now + 1)
        assert machine.size == 1452
    machine.packet_acked(1200, now + 0.05)  # small packets prove nothing
    machine.packet_lost(1452, now + 0.04, now + 1)
    assert machine.size == BASE_PLPMTU and machine.black_holes == 1
    assert machine.state is PmtuState.SEARCHING
    # Stale losses of packets sent at the old size do not count against the new one.
    machine.packet_lost(1452, now + 0.06, now + 1.1)
    assert machine.size == BASE_PLPMTU
    run_search(machine, Path(path_max=1300, iface_max=16000), now + 1.2)
    assert 1300 - GRANULARITY < machine.size <= 1300


@settings(max_examples=200, deadline=None)
@given(pattern=st.lists(st.booleans(), min_size=1, max_size=200))
def test_congestion_is_not_a_black_hole(pattern: list[bool]) -> None:
    """Losses spread among full-size packets that do arrive (the last one always does,
    as in a bulk transfer) never cost the discovered size."""
    machine, now = converged(1452)
    for i, lost in enumerate([*pattern, False]):
        sent = now + i * 0.001
        if lost:
            continue
        # An ACK covers the packets before it: those not acked are lost at that moment,
        # after the later packet's acknowledgement (QUIC's packet-threshold rule).
        machine.packet_acked(1452, sent)
        for j in range(i - 1, -1, -1):
            if not pattern[j]:
                break
            machine.packet_lost(1452, now + j * 0.001, sent + RTT)
    assert machine.size == 1452 and machine.black_holes == 0


def test_ladder_is_sorted_and_above_base() -> None:
    assert list(DEFAULT_LADDER) == sorted(DEFAULT_LADDER)
    assert all(size > BASE_PLPMTU for size in DEFAULT_LADDER)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        PmtuConfig(ceiling=1000)
    with pytest.raises(ValueError):
        PmtuConfig(ceiling=1500, max_probes=0)
    machine = PmtuSearch(PmtuConfig(ceiling=BASE_PLPMTU), now=0.0)
    assert machine.state is PmtuState.SEARCH_COMPLETE and machine.next_probe(0.0) is None
