"""Monotonic time and sleeping for fly-vault-admin, in one injectable object.

Every deadline (``--wait-timeout-secs``, ``--start-timeout-secs``, ``--health-timeout-secs``,
a wait's own timeout) is computed from ``Clock.now()``, and every retry backoff sleeps through
``Clock.sleep()``, so retries count against the same deadline as the work they retry.

Tests inject a clock whose ``sleep`` returns at once and moves its ``now`` forward instead:
a 429 with ``Retry-After: 30`` is then accounted for without waiting 30 s, and a time bound
can be asserted exactly. Polling loops (health checks, soak) sleep on the event loop itself,
because the machines they watch change in real time.
"""

from __future__ import annotations

import asyncio
import time


class Clock:
    """The system clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def remaining(self, deadline: float) -> float:
        return max(0.0, deadline - self.now())


SYSTEM_CLOCK = Clock()
