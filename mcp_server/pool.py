"""One long-lived ``Vault`` per configured vault, and tool errors.

The pool is why a second exec costs a round trip and not a handshake: the QUIC connection,
its attestation and its authentication stay up between tool calls (``Vault`` reconnects on
its own when the connection drops). The config file is re-read only when it changed on
disk (``local_vault(action="up")`` rewrites it with a fresh token and port); a vault whose entry
changed gets a new ``Vault`` and its old connection is closed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mcp.server.mcpserver.exceptions import ToolError

from flyvault.client import Vault
from flyvault.config import Config, VaultConfig, load_config
from flyvault.errors import VaultError

from .models import Claims, StatusStep, VaultEntry, VaultList, VaultStatus

log = logging.getLogger("mcp_server")

#: How long ``vault_status`` waits for a connection before it reports a timeout.
STATUS_TIMEOUT = 60.0

#: Where a connect's provisioning progress goes: set by the tool call that caused it.
PROGRESS: contextvars.ContextVar[Callable[[str, int, int], None] | None] = contextvars.ContextVar(
    "fly_vault_mcp_progress", default=None
)


def _route_progress(phase: str, done: int, total: int) -> None:
    callback = PROGRESS.get()
    if callback is not None:
        callback(phase, done, total)


def error_text(exc: VaultError) -> str:
    """The CLI's wording: the message, then what to do about it."""
    text = exc.message
    if exc.hint:
        text += f"\nhint: {exc.hint}"
    return text


def tool_error(exc: VaultError) -> ToolError:
    return ToolError(error_text(exc))


def _claims(claims: Any) -> Claims | None:
    if claims is None:
        return None
    return Claims(
        app_name=claims.app_name,
        machine_id=claims.machine_id,
        org_name=claims.org_name,
        machine_name=claims.machine_name,
        region=claims.region,
        image=claims.image,
        image_digest=claims.image_digest,
    )


class VaultPool:
    def __init__(
        self,
        *,
        config_path: Path | None = None,
        reconnect_timeout: float = 20.0,
        share_keeper: bool = False,
    ) -> None:
        self.config_path = config_path
        self.reconnect_timeout = reconnect_timeout
        #: ``--share-keeper``: connect through the vault's connection keeper (the one the
        #: CLI's calls use; started if none runs), so the agent's shell and its tools hold
        #: one attested connection between them instead of two.
        self.share_keeper = share_keeper
        self._vaults: dict[str, Vault] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._config: Config | None = None
        self._stamp: tuple[int, int, int] | None = None

    # Config ----------------------------------------------------------------------------

    def config(self) -> Config:
        """The config, re-read only when the file changed (one stat per call otherwise)."""
        from flyvault.paths import config_file

        path = self.config_path or config_file()
        try:
            info = os.stat(path)
            stamp: tuple[int, int, int] | None = (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            stamp = None
        if self._config is None or stamp != self._stamp or self._config.path != path:
            # Loading registers every access token with flyvault.redact (scrubbed from
            # every result by VaultMCP.call_tool).
            config = load_config(path, missing_ok=True)
            self._config, self._stamp = config, stamp
        return self._config

    def entry(self, name: str) -> VaultConfig:
        return self.config().get(name)

    def list(self) -> VaultList:
        config = self.config()
        vaults = [
            VaultEntry(
                name=entry.name,
                address=entry.address,
                org=entry.org,
                app=entry.app,
                machine_id=entry.machine_id,
                access_token_set=entry.access_token is not None
                and bool(entry.access_token.get_secret_value()),
                rootfs=entry.rootfs,
                # A presigned URL carries a credential: say only whether one is set.
                rootfs_url_set=entry.rootfs_url is not None,
                forwards=list(entry.forward),
                via_proxy=bool(getattr(entry, "proxy", False)),
                dev_issuer=entry.is_issuer_overridden,
                connected=self.connected(entry.name),
            )
            for entry in sorted(config.vaults.values(), key=lambda e: e.name)
        ]
        return VaultList(config_file=str(config.path), vaults=vaults)

    # Vaults ----------------------------------------------------------------------------

    async def get(self, name: str) -> Vault:
        # One at a time per vault: finding the keeper to share may wait (off the loop), and
        # two calls must not both build a Vault (the loser's connection would be orphaned).
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await self._get(name)

    async def _get(self, name: str) -> Vault:
        entry = self.entry(name)
        vault = self._vaults.get(name)
        if vault is not None and vault.config == entry:
            return vault
        if vault is not None:
            log.info("vault %s: config entry changed; reconnecting", name)
            await vault.close()
        vault = Vault(
            entry,
            keeper=await self._keeper(name),
            reconnect_timeout=self.reconnect_timeout,
            on_notice=lambda message: log.info("%s", message),
            # Results say it as data (dev_issuer); the log says it too.
            on_event=lambda event: log.info("%s: %s", name, event.message),
            progress=_route_progress,
        )
        self._vaults[name] = vault
        return vault

    async def _keeper(self, name: str) -> Path | None:
        """The keeper's socket to go through, or None: connect directly."""
        if not self.share_keeper:
            return None
        from flyvault.client.keeper_start import shared_keeper
        from flyvault.paths import config_file

        if self.config_path is not None and self.config_path != config_file():
            # A keeper reads the config the CLI reads; this pool reads another one.
            log.info("vault %s: not sharing a keeper: the config is not the CLI's", name)
            return None
        try:
            return await asyncio.to_thread(shared_keeper, name)
        except VaultError as exc:  # the direct connection reports it as a tool error
            log.info("vault %s: no connection keeper: %s", name, exc.message)
            return None

    def connected(self, name: str) -> bool:
        vault = self._vaults.get(name)
        return vault is not None and vault.current is not None

    async def forget(self, address: str) -> None:
        """Close pooled vaults at ``address`` (the local vault went down)."""
        for name, vault in list(self._vaults.items()):
            if vault.config.address == address:
                await vault.close()
                del self._vaults[name]

    async def close(self) -> None:
        vaults, self._vaults = list(self._vaults.values()), {}
        for vault in vaults:
            await vault.close()

    # Status ----------------------------------------------------------------------------

    async def status(self, name: str, *, fresh: bool = False) -> VaultStatus:
        """Doctor-style: reuse the live connection, else connect without provisioning."""
        started = time.perf_counter()
        try:
            entry = self.entry(name)
        except VaultError as exc:
            step = StatusStep(
                step="config",
                ok=False,
                elapsed_ms=(time.perf_counter() - started) * 1000,
                detail=exc.message,
                hint=exc.hint,
            )
            return _failed(name, False, [step], exc)
        steps = [
            StatusStep(
                step="config",
                ok=True,
                elapsed_ms=(time.perf_counter() - started) * 1000,
                detail=f"[vault.{name}] -> {entry.address}, org {entry.org}, app {entry.app}"
                + (f", machine {entry.machine_id}" if entry.machine_id else ", machine not pinned"),
            )
        ]
        vault = await self.get(name)
        diagnosis = await vault.diagnose(fresh=fresh, timeout=STATUS_TIMEOUT)
        steps += [StatusStep(**asdict(step)) for step in diagnosis.steps]
        dev = entry.is_issuer_overridden
        if diagnosis.error is not None:
            unobserved = diagnosis.unobserved_failure()
            if unobserved is not None:
                steps.append(StatusStep(**asdict(unobserved)))
            return _failed(name, dev, steps, diagnosis.error)
        connection = diagnosis.connection
        return VaultStatus(
            vault=name,
            ok=True,
            state=diagnosis.state,
            runtime=diagnosis.runtime,
            boot_id=connection.boot_id if connection is not None else None,
            claims=_claims(connection.claims) if connection is not None else None,
            dev_issuer=dev,
            reused_connection=diagnosis.reused,
            steps=steps,
            error=None,
            hint=diagnosis.cold,
            exit_code=0,
        )


def _failed(name: str, dev: bool, steps: list[StatusStep], exc: VaultError) -> VaultStatus:
    return VaultStatus(
        vault=name,
        ok=False,
        state="unavailable",
        runtime=None,
        boot_id=None,
        claims=None,
        dev_issuer=dev,
        reused_connection=False,
        steps=steps,
        error=exc.message,
        hint=exc.hint,
        exit_code=exc.exit_code,
    )
