"""Path MTU discovery for QUIC datagrams (RFC 8899 DPLPMTUD): the search, sans I/O.

Theory of operation. QUIC guarantees that 1200-byte datagrams work (``base``): the
handshake used them. Larger ones may be dropped anywhere on the path, often silently, so
the only proof that a size works is an acknowledged packet of that size. The machine
keeps the *confirmed* size (``size``, what the connection may send) and searches upward:

* ``SEARCHING``: one probe (an ack-eliciting packet padded to the candidate size) is out
  at a time. Acknowledged: the candidate becomes ``size``. Lost (the caller's loss
  detection, or ``probe_timeout`` passing without an answer): counted; after
  ``max_probes`` losses the candidate is known too big. The kernel refusing the send
  (EMSGSIZE: larger than the interface allows) proves it at once.
  Candidates: first the ``ladder`` of common path sizes, then ``ceiling`` (the largest
  the caller can use), then a binary search between the largest confirmed and the smallest
  failed size, until they are ``granularity`` bytes apart.
* ``SEARCH_COMPLETE``: no probes. After ``raise_timeout`` the search runs again from
  ``size`` (a path may have grown).
* Black hole: ``size`` is confirmed once, but the path may shrink later (a route change).
  Ordinary packets report their fate too (``packet_acked`` / ``packet_lost``). When
  ``black_hole_losses`` packets larger than ``base`` are lost and no packet of that size
  sent after them was acknowledged, larger packets are not getting through: ``size``
  falls back to ``base`` and the search starts over. The "sent after" rule keeps
  congestion from looking like a black hole: a queue drop loses some packets, but later
  ones of the same size arrive.

``now`` is passed in, deadlines are data (``next_deadline`` / ``handle_timer``). The
caller reads ``size`` after each call; ``next_probe`` hands out what to send.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: The QUIC minimum datagram size (RFC 9000 §14): always works, never probed.
BASE_PLPMTU = 1200
#: Probes per size before it counts as too big (RFC 8899 §5.1.2 MAX_PROBES).
MAX_PROBES = 3
#: Common UDP payload limits: 1280 (IPv6 minimum MTU), 1350/1400/1420 (tunnels, PPPoE,
#: WireGuard), 1452/1472 (a 1500 MTU under IPv6/IPv4 headers), 8952/8972 (9000 jumbo).
DEFAULT_LADDER = (1280, 1350, 1400, 1420, 1452, 1472, 8952, 8972)
#: Seconds to wait for a probe's answer when the caller's loss detection says nothing.
PROBE_TIMEOUT = 3.0
#: Seconds between the end of one search and the next (RFC 8899 PMTU_RAISE_TIMER).
RAISE_TIMEOUT = 600.0
#: The binary search stops when confirmed and failed sizes are this close.
GRANULARITY = 8
#: Large packets lost, none acknowledged after them, before the path counts as shrunk.
BLACK_HOLE_LOSSES = 4


class PmtuState(enum.Enum):
    SEARCHING = "searching"
    SEARCH_COMPLETE = "search complete"


@dataclass(frozen=True)
class PmtuConfig:
    #: The largest datagram the caller could send (its own limit, the interface's).
    ceiling: int
    base: int = BASE_PLPMTU
    ladder: tuple[int, ...] = DEFAULT_LADDER
    max_probes: int = MAX_PROBES
    probe_timeout: float = PROBE_TIMEOUT
    raise_timeout: float = RAISE_TIMEOUT
    granularity: int = GRANULARITY
    black_hole_losses: int = BLACK_HOLE_LOSSES

    def __post_init__(self) -> None:
        if self.ceiling < self.base:
            raise ValueError(f"ceiling {self.ceiling} is below the base size {self.base}")
        if self.max_probes < 1 or self.granularity < 1 or self.black_hole_losses < 1:
            raise ValueError("max_probes, granularity and black_hole_losses must be >= 1")
        if self.probe_timeout <= 0 or self.raise_timeout <= 0:
            raise ValueError("timeouts must be positive")


@dataclass(frozen=True)
class Probe:
    """Send one ack-eliciting packet of exactly ``size`` bytes and report its fate under
    ``probe_id``."""

    probe_id: int
    size: int


class PmtuSearch:
    def __init__(self, config: PmtuConfig, now: float) -> None:
        self.config = config
        #: The confirmed datagram size: what the connection may send now.
        self.size = config.base
        self.state = PmtuState.SEARCHING
        self._failed = config.ceiling + 1  # the smallest size known too big
        self._candidate: int | None = None
        self._losses = 0  # probes of the candidate lost so far
        self._outstanding: Probe | None = None
        self._probe_deadline: float | None = None
        self._raise_at: float | None = None
        self._next_id = 1
        #: Send times of large packets lost after the last large one acknowledged.
        self._unanswered_losses: list[float] = []
        self._last_large_acked = float("-inf")
        #: Counters for tests and logs.
        self.probes_sent = 0
        self.black_holes = 0
        self._pick_candidate(now)

    # Probing -----------------------------------------------------------------------------

    @property
    def outstanding(self) -> Probe | None:
        """The probe sent and not yet answered, if any."""
        return self._outstanding

    def next_probe(self, now: float) -> Probe | None:
        """The probe to send now, if any (it counts as sent at ``now``)."""
        if self.state is not PmtuState.SEARCHING or self._outstanding is not None:
            return None
        if self._candidate is None:
            return None
        probe = Probe(self._next_id, self._candidate)
        self._next_id += 1
        self._outstanding = probe
        self._probe_deadline = now + self.config.probe_timeout
        self.probes_sent += 1
        return probe

    def probe_acked(self, probe_id: int, now: float) -> None:
        probe = self._take(probe_id)
        if probe is None:
            return
        self.size = max(self.size, probe.size)
        self._losses = 0
        self._pick_candidate(now)

    def probe_lost(self, probe_id: int, now: float) -> None:
        probe = self._take(probe_id)
        if probe is None:
            return
        self._losses += 1
        if self._losses >= self.config.max_probes:
            self._too_big(probe.size, now)
        else:
            self._pick_candidate(now)

    def probe_too_big(self, probe_id: int, now: float) -> None:
        """The sender's kernel refused the probe (EMSGSIZE): no retry can succeed."""
        probe = self._take(probe_id)
        if probe is not None:
            self._too_big(probe.size, now)

    def _take(self, probe_id: int) -> Probe | None:
        # A late answer for a probe already given up on is ignored.
        probe = self._outstanding
        if probe is None or probe.probe_id != probe_id:
            return None
        self._outstanding = None
        self._probe_deadline = None
        return probe

    def _too_big(self, size: int, now: float) -> None:
        self._failed = min(self._failed, size)
        self._losses = 0
        self._pick_candidate(now)

    def _pick_candidate(self, now: float) -> None:
        low, high = self.size, min(self._failed, self.config.ceiling + 1)
        candidate = next((s for s in sorted(self.config.ladder) if low < s < high), None)
        if candidate is None and high == self.config.ceiling + 1 and low < self.config.ceiling:
            candidate = self.config.ceiling
        if candidate is None and high - low > self.config.granularity:
            candidate = (low + high) // 2
        self._candidate = candidate
        if candidate is None:
            self.state = PmtuState.SEARCH_COMPLETE
            self._raise_at = now + self.config.raise_timeout
        else:
            self.state = PmtuState.SEARCHING
            self._raise_at = None

    # Ordinary packets: black-hole detection ------------------------------------------------

    def packet_acked(self, size: int, sent_at: float) -> None:
        # Called for every packet acknowledged: the common case returns at once.
        if size <= self.config.base or sent_at <= self._last_large_acked:
            return
        self._last_large_acked = sent_at
        if self._unanswered_losses:
            self._unanswered_losses = [t for t in self._unanswered_losses if t > sent_at]

    def packet_lost(self, size: int, sent_at: float, now: float) -> None:
        # Packets of a size given up on (sent before a fall back) say nothing new.
        if size <= self.config.base or size > self.size:
            return
        if sent_at <= self._last_large_acked:
            return
        self._unanswered_losses.append(sent_at)
        if len(self._unanswered_losses) >= self.config.black_hole_losses:
            self._black_hole(now)

    def _black_hole(self, now: float) -> None:
        self.black_holes += 1
        self.size = self.config.base
        self._failed = self.config.ceiling + 1
        self._restart(now)

    def _restart(self, now: float) -> None:
        self._unanswered_losses.clear()
        self._last_large_acked = float("-inf")
        self._outstanding = None
        self._probe_deadline = None
        self._losses = 0
        self._pick_candidate(now)

    # Timers -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self._probe_deadline is not None:
            return self._probe_deadline
        return self._raise_at

    def handle_timer(self, now: float) -> None:
        if self._probe_deadline is not None and now >= self._probe_deadline:
            assert self._outstanding is not None
            self.probe_lost(self._outstanding.probe_id, now)
        elif self._raise_at is not None and now >= self._raise_at:
            # The path may carry more now: search again above what is confirmed.
            self._failed = self.config.ceiling + 1
            self._restart(now)


__all__ = [
    "BASE_PLPMTU",
    "BLACK_HOLE_LOSSES",
    "DEFAULT_LADDER",
    "GRANULARITY",
    "MAX_PROBES",
    "PROBE_TIMEOUT",
    "RAISE_TIMEOUT",
    "PmtuConfig",
    "PmtuSearch",
    "PmtuState",
    "Probe",
]
