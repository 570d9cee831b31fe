"""Admission of connections before authentication: how much a stranger may hold.

Theory of operation
-------------------
Every connection the listener creates is tracked here until it authenticates. Until then
it is *pre-auth* and counts against two caps: ``max_preauth`` for the whole server and
``max_preauth_per_source`` per source IP. Authenticated connections leave the table and are
never evicted for anyone.

A pre-auth connection is, at any moment, in one of four stages:

==============  ==========================================================  ===========
stage           meaning                                                     evictable
==============  ==========================================================  ===========
HANDSHAKING     we sent our handshake flight; the peer has not finished it  when stale
WAITING_PEER    handshake done; no control request is being served          when stale
WAITING_US      we are serving its control request (attestation, token)     never
PENALIZED       it sent a wrong token and is being slowed down              always
==============  ==========================================================  ===========

"Stale" means waiting on the peer for at least ``stale_after`` (1) seconds. An honest client
answers within a round trip, so only strangers (or clients that vanished) stay stale; a
client that is merely slow because *we* are slow is in WAITING_US and is never evicted.

A new connection (a QUIC Initial with no connection yet) is decided by ``admit``:

1. Under pressure (the pre-auth table more than half full), or from a source holding
   half its own cap, an Initial without a valid Retry token gets a Retry (answered
   statelessly by the listener): a flood of Initials from spoofed or unanswering sources
   then costs no state at all, and only a source that proves its address can evict.
2. A source at its own cap makes room by evicting its own stalest connection; the server
   at its total cap evicts the stalest connection of the source holding the most. If
   nothing is evictable the Initial is refused (a stateless CONNECTION_CLOSE with QUIC's
   CONNECTION_REFUSED). Refused and evicted clients are told "server busy", and an honest
   client reconnects with backoff: under honest load beyond the caps, clients queue.

Deadlines (``expired``): a handshake must finish within ``handshake_deadline`` seconds, and
the time a connection spends waiting on its peer adds up to at most ``auth_deadline``.
Under pressure, anything that waited on its peer for ``pressure_deadline`` seconds in a
row is closed at once. Time spent waiting on us never counts: 200 honest clients on a busy
two-core machine may take many seconds to be served, and that must not fail them.

Pure logic: ``now`` is passed in and deadlines are data (``next_deadline``); the listener
does the I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field


class Stage(enum.Enum):
    HANDSHAKING = "handshaking"
    WAITING_PEER = "waiting_peer"
    WAITING_US = "waiting_us"
    PENALIZED = "penalized"


class Verdict(enum.Enum):
    ACCEPT = "accept"
    RETRY = "retry"
    REFUSE = "refuse"


@dataclass(frozen=True)
class AdmissionLimits:
    #: Each pre-auth connection costs about 90 KiB in init (bench/p7_conn_memory.py).
    max_preauth: int = 256
    #: Behind vault-proxy or a NAT, many honest clients share one source address.
    max_preauth_per_source: int = 64
    #: Retry is demanded of unvalidated Initials once this many are pre-auth.
    retry_above: int = 128
    handshake_deadline: float = 10.0
    auth_deadline: float = 30.0
    pressure_deadline: float = 3.0
    stale_after: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.max_preauth_per_source <= self.max_preauth:
            raise ValueError("need 0 < max_preauth_per_source <= max_preauth")
        if not 0 <= self.retry_above <= self.max_preauth:
            raise ValueError("need 0 <= retry_above <= max_preauth")


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    #: A connection to close ("server busy") to make room for this one.
    evict: Hashable | None = None
    reason: str = ""


@dataclass
class _Entry:
    source: str
    stage: Stage
    created: float
    #: When the current stage began.
    since: float
    #: Seconds spent waiting on the peer in earlier stages (not the current one).
    peer_time: float = 0.0


@dataclass
class AdmissionStats:
    retries_sent: int = 0
    refused: int = 0
    evicted: int = 0
    expired: int = 0


@dataclass
class AdmissionTable:
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    stats: AdmissionStats = field(default_factory=AdmissionStats)

    def __post_init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._per_source: dict[str, int] = {}

    # Queries ---------------------------------------------------------------------------

    @property
    def preauth(self) -> int:
        return len(self._entries)

    def count(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def under_pressure(self) -> bool:
        return len(self._entries) > self.limits.retry_above

    def stage(self, key: Hashable) -> Stage | None:
        entry = self._entries.get(key)
        return entry.stage if entry else None

    # Decisions -------------------------------------------------------------------------

    def admit(self, source: str, *, validated: bool, now: float) -> Decision:
        """Decide on a new connection from ``source`` (``validated``: a Retry answered)."""
        half_source = self.count(source) >= self.limits.max_preauth_per_source // 2
        if not validated and (len(self._entries) >= self.limits.retry_above or half_source):
            self.stats.retries_sent += 1
            return Decision(Verdict.RETRY, reason="address validation under load")
        if self.count(source) >= self.limits.max_preauth_per_source:
            return self._make_room(self._evictable(now, source=source), "per-source limit")
        if len(self._entries) >= self.limits.max_preauth:
            victim = self._evictable(now, source=self._busiest())
            if victim is None:
                victim = self._evictable(now, source=None)
            return self._make_room(victim, "server full")
        return Decision(Verdict.ACCEPT)

    def _make_room(self, victim: Hashable | None, why: str) -> Decision:
        if victim is None:
            self.stats.refused += 1
            return Decision(Verdict.REFUSE, reason=why)
        self.stats.evicted += 1
        self.remove(victim)
        return Decision(Verdict.ACCEPT, evict=victim, reason=why)

    def _busiest(self) -> str | None:
        if not self._per_source:
            return None
        return max(self._per_source, key=lambda source: self._per_source[source])

    def _evictable(self, now: float, *, source: str | None) -> Hashable | None:
        """The stalest evictable connection (of ``source``, else of anyone)."""
        best: tuple[int, float] | None = None
        victim: Hashable | None = None
        for key, entry in self._entries.items():
            if source is not None and entry.source != source:
                continue
            rank = self._eviction_rank(entry, now)
            if rank is None:
                continue
            if best is None or rank < best:
                best, victim = rank, key
        return victim

    def _eviction_rank(self, entry: _Entry, now: float) -> tuple[int, float] | None:
        """Lower ranks go first: penalized, then unfinished handshakes, then idle ones."""
        if entry.stage is Stage.PENALIZED:
            return (0, entry.since)
        if entry.stage is Stage.WAITING_US or now - entry.since < self.limits.stale_after:
            return None
        return (1 if entry.stage is Stage.HANDSHAKING else 2, entry.since)

    # Bookkeeping -----------------------------------------------------------------------

    def add(self, key: Hashable, source: str, now: float) -> None:
        self._entries[key] = _Entry(source, Stage.HANDSHAKING, created=now, since=now)
        self._per_source[source] = self._per_source.get(source, 0) + 1

    def set_stage(self, key: Hashable, stage: Stage, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.stage is stage:
            return
        if entry.stage in (Stage.HANDSHAKING, Stage.WAITING_PEER):
            entry.peer_time += now - entry.since
        entry.stage = stage
        entry.since = now

    def remove(self, key: Hashable) -> None:
        """The connection authenticated or closed: it no longer counts."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        left = self._per_source[entry.source] - 1
        if left:
            self._per_source[entry.source] = left
        else:
            del self._per_source[entry.source]

    # Deadlines -------------------------------------------------------------------------

    def _deadline(self, entry: _Entry, pressure: bool) -> float | None:
        limits = self.limits
        if entry.stage is Stage.WAITING_US:
            return None
        if entry.stage is Stage.PENALIZED:
            return entry.since + limits.auth_deadline
        remaining = limits.auth_deadline - entry.peer_time
        if entry.stage is Stage.HANDSHAKING:
            remaining = min(remaining, limits.handshake_deadline)
        if pressure:
            remaining = min(remaining, limits.pressure_deadline)
        return entry.since + max(0.0, remaining)

    def next_deadline(self) -> float | None:
        pressure = self.under_pressure()
        deadlines = [
            deadline
            for entry in self._entries.values()
            if (deadline := self._deadline(entry, pressure)) is not None
        ]
        return min(deadlines, default=None)

    def expired(self, now: float) -> list[tuple[Hashable, str]]:
        """Remove and return the connections whose deadline passed, with the reason."""
        pressure = self.under_pressure()
        gone: list[tuple[Hashable, str]] = []
        for key, entry in list(self._entries.items()):
            deadline = self._deadline(entry, pressure)
            if deadline is None or now < deadline:
                continue
            if entry.stage is Stage.HANDSHAKING:
                reason = "handshake not completed in time"
            else:
                reason = "not authenticated in time"
            gone.append((key, reason))
        for key, _ in gone:
            self.remove(key)
        self.stats.expired += len(gone)
        return gone
