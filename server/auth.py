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
import sys
from collections import OrderedDict
from dataclasses import dataclass


def token_pipe(token: str) -> int:
    """A pipe's read end holding ``token``; the caller passes it to a child process."""
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode("utf-8"))  # far below the pipe buffer size
    os.close(write_end)
    return read_end


def reexec_without_token(argv: list[str], variable: str = "ACCESS_TOKEN") -> None:
    """Re-execute this server with the token moved from the environment to a pipe.

    ``unsetenv`` alone leaves the value in ``/proc/<pid>/environ`` (the original's scrubbing
    was cosmetic); after ``execve`` with a clean environment it is gone from there too.
    Returns only when there is nothing to do.
    """
    token = os.environ.get(variable)
    if token is None or "--access-token-fd" in argv:
        return
    fd = token_pipe(token)
    os.set_inheritable(fd, True)
    env = {key: value for key, value in os.environ.items() if key != variable}
    args = [sys.executable, "-m", "server.main", *argv, "--access-token-fd", str(fd)]
    os.execve(sys.executable, args, env)


class AccessToken:
    """The machine's token, kept only as a digest once read."""

    def __init__(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    @classmethod
    def from_environment(cls, variable: str = "ACCESS_TOKEN") -> AccessToken:
        """Read the token and scrub it from our environment, so children never inherit it."""
        token = os.environ.pop(variable, None)
        return cls(token)

    @classmethod
    def from_fd(cls, fd: int) -> AccessToken:
        """Read the token from a pipe (how a scrubbed re-exec or the local vault passes it)."""
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
        os.close(fd)
        return cls(b"".join(chunks).decode("utf-8").strip("\n") or None)

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
