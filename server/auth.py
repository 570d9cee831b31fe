"""Access-token check, and how wrong tokens are slowed without locking anyone out.

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
    args = [sys.executable, "-m", "flyvault.server.main", *argv, "--access-token-fd", str(fd)]
    os.execve(sys.executable, args, env)


class AccessToken:
    """The machine's token, kept only as a digest once read."""

    def __init__(self, token: str | None) -> None:
        self._digest = hashlib.sha256(token.encode()).digest() if token else None
        __import__("flyvault.redact").redact.register(token)  # scrubbed from every log line
        #: Said once at start when the token is too weak to stand up to guessing.
        self.warning = weak_token_warning(token) if token else None

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


#: Wrong tokens one connection may send; then it is closed.
MAX_WRONG_PER_CONNECTION = 3
#: Seconds a connection waits after its n-th wrong token: 0.5, 1, 2.
PENALTY_BASE = 0.5
#: A token with fewer characters than this cannot hold 128 bits even as base64.
MIN_TOKEN_CHARS = 22


def penalty(wrong: int) -> float:
    """The pause after a connection's ``wrong``-th wrong token."""
    return PENALTY_BASE * 2 ** (max(1, wrong) - 1)


def weak_token_warning(token: str) -> str | None:
    """A warning for a token too short or too plain to carry 128 bits, else None."""
    distinct = len(set(token))
    if len(token) >= MIN_TOKEN_CHARS and distinct >= 12:
        return None
    return (
        f"ACCESS_TOKEN is weak ({len(token)} characters, {distinct} distinct): a token "
        "needs at least 128 random bits; make one with "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
    )


class WrongTokenBudget:
    """The server-wide budget of wrong tokens: a token bucket.

    Fair lockout: nothing here is keyed by source address (behind vault-proxy every client
    has the proxy's address), and a correct token is checked and accepted before this
    budget is ever consulted. Wrong tokens cost their own connection a growing pause and,
    after ``MAX_WRONG_PER_CONNECTION``, the connection. While the budget is spent, every
    wrong token also ends its connection at once, so a guesser pays a new handshake and a
    new attestation per guess, and the pre-auth admission caps bound how many it can have.
    """

    def __init__(self, rate: float = 20.0, burst: int = 100) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._level = float(burst)
        self._updated: float | None = None
        self.exhausted_count = 0

    def take(self, now: float) -> bool:
        """Spend one wrong token; False when the budget is spent."""
        if self._updated is not None:
            self._level = min(self._burst, self._level + (now - self._updated) * self._rate)
        self._updated = now
        if self._level >= 1.0:
            self._level -= 1.0
            return True
        self.exhausted_count += 1
        return False
