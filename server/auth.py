"""Access-token check and the failed-attempt limiter.

The comparison hashes both sides first so its time depends on neither token's length or
content (the original padded the shorter token, which leaks the expected length through
the loop bound). An empty ``ACCESS_TOKEN`` counts as *not configured*: the original let an
empty token match an empty one (flaw 3).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from dataclasses import dataclass


class AccessToken:
    """The machine's token, kept only as a digest once read."""

    def __init__(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    @classmethod
    def from_environment(cls, variable: str = "ACCESS_TOKEN") -> AccessToken:
        """Read the token and scrub it from our environment, so children never inherit it."""
        token = os.environ.pop(variable, None)
        return cls(token)

    @property
    def configured(self) -> bool:
        return self._digest is not None

    def matches(self, provided: str) -> bool:
        if self._digest is None:
            return False
        return hmac.compare_digest(self._digest, hashlib.sha256(provided.encode()).digest())

    def __repr__(self) -> str:
        return f"AccessToken(configured={self.configured})"


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0


class FailureLimiter:
    """Per-source lockout after repeated failures, with exponential backoff.

    ``free_failures`` wrong tokens are allowed; each one after that locks the source out for
    ``base_delay * 2**n`` seconds (capped). A success clears the record. The table is an LRU
    bounded by ``max_sources`` so a spray of addresses cannot grow it without limit.
    """

    def __init__(
        self,
        free_failures: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        max_sources: int = 4096,
    ) -> None:
        self._free = free_failures
        self._base = base_delay
        self._max_delay = max_delay
        self._max_sources = max_sources
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def retry_after(self, source: str, now: float) -> float:
        """Seconds until ``source`` may try again; 0 when it may try now."""
        record = self._records.get(source)
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - now)

    def failed(self, source: str, now: float) -> None:
        record = self._records.pop(source, None) or _Record()
        record.failures += 1
        excess = record.failures - self._free
        if excess > 0:
            record.locked_until = now + min(self._max_delay, self._base * 2 ** (excess - 1))
        self._records[source] = record
        while len(self._records) > self._max_sources:
            self._records.popitem(last=False)

    def succeeded(self, source: str) -> None:
        self._records.pop(source, None)
