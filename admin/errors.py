"""Admin-specific branches of the fly-vault error tree.

Every class is rooted in ``flyvault.errors.VaultError`` and carries its own exit code, so a
script driving ``fly-vault-admin`` can tell "the tenant already exists" (13) from "the rollout
stopped" (11) without parsing text. The codes are listed in references/admin.md. The Machines
API's own errors (``MachinesApiError`` and its subclasses) are in ``flyvault.fly.errors``; the
admin branches of them (a machine that failed its image, a lease or a read-back) are here.
"""

from __future__ import annotations

from flyvault.errors import ConfigError, VaultError
from flyvault.fly.errors import MachinesApiError

from .hints import IMAGE


class TemplateError(ConfigError):
    """The tenant template is unreadable, invalid, or does not fit the command (exit 3)."""


class TenantExists(VaultError):
    """``tenant create`` for a tenant that already has managed machines."""

    exit_code = 13


class RolloutFailed(VaultError):
    """``update-image`` stopped; the message names every machine's final state."""

    exit_code = 11


class IncompleteCleanup(VaultError):
    """A create rollback or a delete left resources behind, or a lease could not be
    released; the message names each of them (and a lease's expiry)."""

    exit_code = 12


class MachineFailed(VaultError):
    """One machine's update failed; ``cause`` (``admin.hints``) picks the hint."""

    def __init__(self, message: str, *, cause: str, error: BaseException) -> None:
        super().__init__(message)
        self.cause = cause
        self.error = error


class ImageFailed(MachinesApiError):
    """The new image did not start, crashed or failed its checks on a machine."""

    cause = IMAGE


class CordonLeft(VaultError):
    """A machine runs the new image and is healthy, but could not be uncordoned."""

    cause = "cordon"


class LeaseFailed(MachinesApiError):
    """The machine's lease could not be acquired: nothing was changed."""


class MachineStopped(MachinesApiError):
    """A machine stopped (exited) while we waited for it to start: its image failed."""

    cause = IMAGE


class ReadBackFailed(MachinesApiError):
    """The machine could not be read back after a doubtful call: its state is unknown."""
