"""Admin-specific branches of the fly-vault error tree.

Every class is rooted in ``flyvault.errors.VaultError`` and carries its own exit code, so a
script driving ``fly-vault-admin`` can tell "the tenant already exists" (13) from "the rollout
stopped" (11) without parsing text. The codes are listed in references/admin.md. The Machines
API's own errors (``MachinesApiError`` and its subclasses) are in ``flyvault.fly.errors``.
"""

from __future__ import annotations

from flyvault.errors import ConfigError, VaultError


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
