"""Port forwards owned by the MCP server process.

Each forward is a ``ForwardListener`` on 127.0.0.1 that tunnels every local TCP connection
to ``HOST:PORT`` as seen from the vault, over the pooled connection (so it follows the
pool's reconnects). The listeners live as long as this process or until ``forward(action="stop")``.
"""

from __future__ import annotations

import logging

from flyvault.client.connection import VaultConnection
from flyvault.client.forward import ForwardListener
from flyvault.config import ForwardSpec
from flyvault.errors import ConfigError, NotFoundError, UsageError

from .models import ForwardInfo, ForwardList
from .pool import VaultPool

log = logging.getLogger("mcp_server")

MAX_FORWARDS = 64


class ForwardManager:
    def __init__(self, pool: VaultPool) -> None:
        self.pool = pool
        self._forwards: dict[str, tuple[str, ForwardListener]] = {}

    async def start(
        self, vault_name: str, host: str, remote_port: int, local_port: int
    ) -> ForwardInfo:
        if len(self._forwards) >= MAX_FORWARDS:
            raise UsageError(
                f"{MAX_FORWARDS} forwards are open already",
                hint='stop some with forward(action="stop", ...)',
            )
        try:
            # A spec only holds ports 1-65535; local port 0 (any free port) is passed apart.
            spec = ForwardSpec(local_port or remote_port, host, remote_port)
        except ConfigError as exc:
            raise UsageError(exc.message) from None
        vault = await self.pool.get(vault_name)
        await vault.connection()  # fail here (token, attestation), not at the first TCP connect

        async def provider() -> VaultConnection:
            # Through the pool: a changed config entry (new port, new token) is followed.
            current = await self.pool.get(vault_name)
            connection: VaultConnection = await current.connection()
            return connection

        listener = ForwardListener(
            spec,
            provider,
            on_event=lambda message: log.info("%s", message),
            local_port=local_port,
        )
        await listener.start()
        forward_id = f"{vault_name}:{listener.port}"
        self._forwards[forward_id] = (vault_name, listener)
        log.info("forward %s -> %s on vault %s", listener.port, spec.target, vault_name)
        return self._info(forward_id, vault_name, listener)

    def _info(self, forward_id: str, vault_name: str, listener: ForwardListener) -> ForwardInfo:
        return ForwardInfo(
            forward_id=forward_id,
            vault=vault_name,
            local_address=f"127.0.0.1:{listener.port}",
            local_port=listener.port,
            target=listener.spec.target,
            active_connections=listener.active,
            total_connections=listener.total,
        )

    def listing(self, vault_name: str | None = None) -> ForwardList:
        return ForwardList(
            forwards=[
                self._info(fid, name, listener)
                for fid, (name, listener) in sorted(self._forwards.items())
                if vault_name is None or name == vault_name
            ]
        )

    async def stop(
        self, forward_id: str | None, vault_name: str | None, local_port: int | None
    ) -> list[str]:
        if forward_id is None and vault_name is None and local_port is None:
            raise UsageError(
                "name the forward to stop: forward_id, local_port, or vault (all of its forwards)"
            )
        chosen = [
            fid
            for fid, (name, listener) in self._forwards.items()
            if (forward_id is None or fid == forward_id)
            and (vault_name is None or name == vault_name)
            and (local_port is None or listener.port == local_port)
        ]
        if not chosen:
            raise NotFoundError(
                "no such forward", hint='forward(action="list") shows the forwards this server runs'
            )
        for fid in chosen:
            _, listener = self._forwards.pop(fid)
            await listener.close()
        return chosen

    async def close(self) -> None:
        forwards, self._forwards = list(self._forwards.values()), {}
        for _, listener in forwards:
            await listener.close()
