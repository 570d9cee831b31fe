"""The Machines API's branch of the fly-vault error tree.

Every class is rooted in ``flyvault.errors.VaultError`` and carries its own exit code, so a
script driving ``fly-vault-admin`` can tell "the API refused the token" (6) from "the machine
does not exist" (9) without parsing text. The codes are listed in references/admin.md.

API errors keep the Machines API's own message (``{"error": ...}`` body) because that text is
usually the only thing that says *why* Fly refused; it is scrubbed of known secrets before it
is stored here (see ``flyvault.redact``).
"""

from __future__ import annotations

from flyvault.errors import AuthError, ConnectError, NotFoundError, RemoteError, Timeout


class MachinesApiError(RemoteError):
    """The Machines API answered with an error status (exit 10 unless a subclass says so).

    ``status`` is the HTTP status (0 when there was no answer), ``api_message`` the text from
    the API's error body, ``operation`` e.g. ``POST /machines``.
    """

    exit_code = 10

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        api_message: str = "",
        operation: str = "",
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.api_message = api_message
        self.operation = operation
        self.retry_after = retry_after

    @property
    def refused(self) -> bool:
        """A definite refusal that a retry would meet again (400, 422, other 4xx)."""
        return 400 <= self.status < 500 and self.status not in (404, 408, 409, 412, 429)


class ApiAuthError(MachinesApiError, AuthError):
    """401/403: the API token was refused or lacks permission for this app."""

    exit_code = 6


class ApiNotFound(MachinesApiError, NotFoundError):
    """404: the app, machine or volume does not exist."""

    exit_code = 9


class ApiConflict(MachinesApiError):
    """409/412: a lease is held by someone else, or the machine changed under us."""


class ApiRateLimited(MachinesApiError):
    """429 that outlived every retry."""


class ApiServerError(MachinesApiError):
    """5xx that outlived every retry (or a non-idempotent call that must not be retried)."""


class ApiUnreachable(MachinesApiError, ConnectError):
    """No HTTP answer at all: DNS, refused connection, TLS failure."""

    exit_code = 4


class ApiTimeout(MachinesApiError, Timeout):
    """The API did not answer in time. For a create this means the outcome is unknown."""

    exit_code = 4


class WaitTimeout(MachinesApiError, Timeout):
    """A machine did not reach the awaited state before the deadline."""

    exit_code = 4
