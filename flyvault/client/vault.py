"""``Vault``: a reconnecting handle on one vault, shared by the CLI and the MCP server.

Reconnect policy. The first connection's failure is returned at once (a typo should not
retry). Once a connection has worked, losing it starts a retry loop: transport failures
(unreachable, lost, timed out) are retried with exponential backoff and jitter until
``reconnect_timeout`` seconds have passed since the loss; anything else (attestation,
token, config) ends it at once, because retrying cannot fix it. Only one reconnect runs
at a time; every caller waits for the same attempt.

Exec sessions resume by offset after a reconnect: the client reattaches (never re-creates:
a command must not run twice) with the number of output bytes it has seen, and the server
replays exactly the rest. Standard input is exact the same way: the client keeps what the
vault has not acknowledged and, on reattach, resends from the vault's ``stdin_offset``.
Those rules live in the ``ExecClient`` machine (``flyvault/protocol/exec_client.py``);
``ExecSession`` is its asyncio glue.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal as signal_module
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flyvault.client.events import DevelopmentIssuer, OnEvent
from flyvault.client.exec_request import new_session_id
from flyvault.config import VaultConfig
from flyvault.defaults import LOCAL_APP, LOCAL_ORG, RECONNECT_TIMEOUT
from flyvault.errors import (
    ConnectError,
    ConnectionLost,
    NoAnswer,
    RemoteError,
    RemoteProtocolError,
    SessionGone,
    SessionTakenOver,
    TransportError,
    Unsupported,
)
from flyvault.protocol.constants import (
    ERROR_FRAME,
    OBSERVE_VERSION,
    PROTOCOL_VERSION,
    RESTART_VERSION,
    StreamTag,
)
from flyvault.protocol.messages import ErrorMessage

if TYPE_CHECKING:
    from flyvault.client.diagnose import Diagnosis, OnStep
    from flyvault.transport import TransportSettings

log = logging.getLogger("flyvault.client")

Notice = Callable[[str], None]


def no_answer_hint(config: VaultConfig) -> str:
    """What to do when nothing answers at the vault's address, naming the vault."""
    if (config.org, config.app) == (LOCAL_ORG, LOCAL_APP):
        return "the local dev vault is not running: start it with fly-vault local up"
    return (
        "is the vault running, and is its address (host:port, UDP) right? "
        f"check with: fly-vault doctor {config.name}"
    )


def _close_reason(connection: Any) -> str | None:
    return getattr(getattr(connection, "channel", None), "close_reason", None)


class Vault:
    def __init__(
        self,
        config: VaultConfig,
        *,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
        settings: TransportSettings | None = None,
        on_notice: Notice | None = None,
        observer: Any = None,
        reprovision: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
        on_event: OnEvent | None = None,
        keeper: Path | None = None,
    ) -> None:
        self.config = config
        #: A connection keeper's socket: streams go through it (``keeper_stream``) while
        #: it answers; without one, or once it is gone, the connection is direct.
        self.keeper = keeper
        self._on_event = on_event
        self._announced = False
        #: Send the configured rootfs on the first connection even when the vault is Ready.
        self._reprovision_first = reprovision
        self._progress = progress
        self.reconnect_timeout = reconnect_timeout
        self.settings = settings
        self._notice = on_notice or (lambda message: None)
        self._observer = observer
        self._current: Any = None  # VaultConnection
        self._connecting: asyncio.Future[Any] | None = None
        self._ever_connected = False
        self._lost_at: float | None = None
        self.connects = 0
        self._bulk: Vault | None = None

    async def can_observe(self) -> bool:
        """Whether the vault's init takes a read-only attach (``ExecRequest.observe``)."""
        connection = await self.connection()
        return getattr(connection, "protocol_version", PROTOCOL_VERSION) >= OBSERVE_VERSION

    async def connection(self) -> Any:
        """The live connection, reconnecting when needed (one attempt at a time)."""
        current = self._current
        if current is not None and not current.is_closed:
            return current
        if current is not None and self._lost_at is None:
            self._lost_at = time.monotonic()
            log.info(
                "connection to vault %s lost: %s",
                self.config.name,
                _close_reason(current) or "closed",
            )
        if self._connecting is None or self._connecting.done():
            self._announce()
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    def _announce(self) -> None:
        """Tell the caller, once, that a development issuer vouches for this vault."""
        if self._announced or not self.config.is_issuer_overridden:
            return
        self._announced = True
        if self._on_event is not None:
            self._on_event(DevelopmentIssuer(self.config.name, self.config.issuer_base_url()))

    async def diagnose(
        self, *, fresh: bool = False, timeout: float | None = None, on_step: OnStep | None = None
    ) -> Diagnosis:
        """Check the vault step by step without provisioning it (``flyvault.client.diagnose``)."""
        from flyvault.client.diagnose import diagnose

        self._announce()
        return await diagnose(self, fresh=fresh, timeout=timeout, on_step=on_step)

    @property
    def current(self) -> Any:
        """The live connection, or None; never connects (status reports use it)."""
        current = self._current
        return current if current is not None and not current.is_closed else None

    def adopt(self, connection: Any) -> None:
        """Make ``connection`` (opened by the caller, e.g. a doctor-style check that must
        not provision) the live one, so the next request reuses it instead of connecting."""
        if self._current is not None and self._current is not connection:
            self._current.close()
        self._current = connection
        self._ever_connected = True
        self._lost_at = None
        self.connects += 1

    def invalidate(self, connection: Any) -> None:
        """A caller saw ``connection`` fail; the next ``connection()`` reconnects."""
        if connection is self._current:
            if self._lost_at is None:
                self._lost_at = time.monotonic()
                log.info(
                    "connection to vault %s given up: %s",
                    self.config.name,
                    _close_reason(connection) or "a stream on it failed",
                )
            connection.close()

    async def _connect(self) -> Any:
        if self.keeper is not None:
            connection = await self._through_keeper(self.keeper)
            if connection is not None:
                return connection
        from flyvault.client.connection import open_vault

        attempt = 0
        while True:
            attempt_timeout = None
            if self._ever_connected and self._lost_at is not None:
                # A reconnect attempt may not outlive the reconnect budget.
                left = self.reconnect_timeout - (time.monotonic() - self._lost_at)
                attempt_timeout = max(0.5, left)
            try:
                connection = await asyncio.wait_for(
                    open_vault(
                        self.config,
                        observer=self._observer,
                        settings=self.settings,
                        reprovision=self._reprovision_first and not self._ever_connected,
                        progress=self._progress,
                    ),
                    attempt_timeout,
                )
            except TimeoutError:
                assert self._lost_at is not None
                raise ConnectionLost(
                    f"vault '{self.config.name}' went away and did not come back within "
                    f"{self.reconnect_timeout:g} s",
                    hint="check the vault with: fly-vault doctor " + self.config.name,
                ) from None
            except (ConnectError, ConnectionLost) as exc:
                if not self._ever_connected:
                    if isinstance(exc, NoAnswer):
                        exc.hint = no_answer_hint(self.config)
                    raise
                assert self._lost_at is not None
                waited = time.monotonic() - self._lost_at
                if waited >= self.reconnect_timeout:
                    raise ConnectionLost(
                        f"vault '{self.config.name}' went away and did not come back within "
                        f"{self.reconnect_timeout:g} s ({exc.message})",
                        hint="check the vault with: fly-vault doctor " + self.config.name,
                    ) from None
                delay = min(5.0, 0.2 * 2**attempt) * (0.5 + random.random())
                delay = min(delay, max(0.05, self.reconnect_timeout - waited))
                attempt += 1
                log.info(
                    "reconnect to vault %s: attempt %d failed after %.1f s lost (%s); "
                    "next in %.2f s",
                    self.config.name,
                    attempt,
                    waited,
                    exc.message,
                    delay,
                )
                self._notice(
                    f"connection to '{self.config.name}' lost; reconnecting ({exc.message})"
                )
                await asyncio.sleep(delay)
                continue
            if self._ever_connected:
                lost_for = time.monotonic() - self._lost_at if self._lost_at else 0.0
                log.info(
                    "reconnected to vault %s after %.1f s (%d failed attempt(s))",
                    self.config.name,
                    lost_for,
                    attempt,
                )
                self._notice(f"reconnected to '{self.config.name}'")
            for note in connection.notes:  # what a provisioning on the way did
                self._notice(note)
            self._ever_connected = True
            self._lost_at = None
            self._current = connection
            self.connects += 1
            return connection

    async def through_keeper(self) -> Any:
        """The keeper's connection made the current one, or None when this vault shares no
        keeper (any more). Never connects directly."""
        if self.keeper is None:
            return None
        return await self._through_keeper(self.keeper)

    async def _through_keeper(self, socket_path: Path) -> Any:
        """The keeper's connection, or None (then never again): connect directly."""
        from flyvault.client.keeper_stream import KeeperConnection
        from flyvault.client.mux import KeeperUnavailable

        try:
            connection = await KeeperConnection.open(socket_path, self._notice)
        except KeeperUnavailable as exc:
            log.info("vault %s: %s; connecting directly", self.config.name, exc)
            self.keeper = None
            return None
        self._ever_connected = True
        self._lost_at = None
        self._current = connection
        self.connects += 1
        return connection

    async def reprovision(
        self,
        progress: Callable[[str, int, int], None] | None = None,
        *,
        on_cold: Callable[[], None] | None = None,
    ) -> ReprovisionResult:
        """Replace the vault's rootfs with the configured one, keeping /root and /home.

        Returns once the new workload is demonstrably up (the server answers then, before
        the end of its settle window) and its boot identity has changed. The server still
        watches the rest of the window and rolls back a workload that dies inside it:
        ``await result.wait_settled()`` learns that outcome (it raises the rollback).
        A cold vault is provisioned instead (``from_cold``; ``on_cold`` is told first).
        """
        from flyvault.client.connection import host_mode_refusal, open_vault
        from flyvault.errors import ColdVault
        from flyvault.protocol.constants import RuntimeStatus

        before = self.current
        if before is None:
            # Not connection(): on a cold vault it would provision, and the reprovision
            # would then upload the same rootfs a second time. Look without provisioning.
            self._announce()
            started = time.monotonic()
            try:
                before = await open_vault(self.config, settings=self.settings, provision=False)
            except ColdVault:
                if on_cold is not None:
                    on_cold()
                after = await open_vault(self.config, settings=self.settings, progress=progress)
                self.adopt(after)
                elapsed = time.monotonic() - started
                return ReprovisionResult(
                    None,
                    after.boot_id,
                    elapsed,
                    after.runtime_status,
                    after.notes,
                    True,
                    getattr(after, "settled", None),
                )
            self.adopt(before)
        if before.runtime_status is RuntimeStatus.HOST_MODE:
            # Refused here, at once: no second connection, no upload.
            raise host_mode_refusal(self.config.name)
        started = time.monotonic()
        after = await open_vault(
            self.config, settings=self.settings, reprovision=True, progress=progress
        )
        elapsed = time.monotonic() - started
        before.close()
        self._current = after
        if after.boot_id == before.boot_id:
            raise RemoteError(
                "the vault reported the same boot identity after reprovisioning; the new "
                "rootfs may not be running",
                hint="check with: fly-vault doctor " + self.config.name,
            )
        return ReprovisionResult(
            before.boot_id,
            after.boot_id,
            elapsed,
            after.runtime_status,
            after.notes,
            settled=getattr(after, "settled", None),
        )

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._current is not None:
            self._current.close()
        await self.end_bulk()

    async def end_bulk(self) -> None:
        """Close the twin ``bulk`` made, if any (the next ``bulk`` makes a new one)."""
        twin, self._bulk = self._bulk, None
        if twin is not None:
            await twin.close()

    def bulk(self) -> Vault:
        """This vault for a large transfer: without a keeper, itself; with one, a twin that
        connects directly (once, when first used; closed with this one). Through a keeper,
        every byte crosses a unix socket and a second process before QUIC: for a file of
        hundreds of MB that costs more than a handshake of its own (measured in
        bench/cp_bench.py on 2 cores: about a fifth of the time). ``end_bulk`` closes it."""
        if self.keeper is None:
            return self
        if self._bulk is None:
            self._bulk = Vault(
                self.config,
                reconnect_timeout=self.reconnect_timeout,
                settings=self.settings,
                on_notice=self._notice,
            )
        return self._bulk

    def files(self, user: str | None = None) -> Any:
        """File operations on this vault (``RemoteFiles``), as root or as ``user``."""
        from flyvault.client.files import RemoteFiles

        return RemoteFiles(self, user)

    # One-shot requests ---------------------------------------------------------------

    async def _request(self, tag: StreamTag, payload: bytes) -> tuple[int, bytes]:
        """Send one frame on a new stream; return the answer frame (errors raised)."""
        from flyvault.protocol.console import FrameChannel

        while True:
            connection = await self.connection()
            stream = connection.open_stream(tag)
            try:
                await stream.send(payload, end_stream=True)
                channel = FrameChannel()
                while (item := channel.next_frame()) is None:
                    if channel.finished:
                        raise RemoteProtocolError("the vault closed the stream without answering")
                    channel.feed(await stream.read())
            except TransportError:
                self.invalidate(connection)
                continue
            if item.type == ERROR_FRAME:
                raise ErrorMessage.decode(item.payload).to_exception()
            return item.type, item.payload

    async def list_sessions(self) -> list[dict[str, Any]]:
        from flyvault.protocol.console import SessionsFrame, decode_json, frame

        kind, payload = await self._request(StreamTag.EXEC_LIST, frame(SessionsFrame.LIST))
        if kind != SessionsFrame.LIST_RESULT:
            raise RemoteProtocolError(f"unexpected answer 0x{kind:02x} to a session list")
        sessions = decode_json(payload, "session list")
        if not isinstance(sessions, list):
            raise RemoteProtocolError("session list is not a JSON array")
        return sessions

    async def restart_workload(self) -> dict[str, Any]:
        """Stop the vault's workload and start it again (same rootfs; every session ends):
        ``{"old_boot_id", "new_boot_id", "runtime"}`` once the new one runs. Sent once,
        never retried on a new connection (a retry could restart it twice)."""
        from flyvault.protocol.console import FrameChannel, SessionsFrame, decode_json, frame

        connection = await self.connection()
        version = getattr(connection, "protocol_version", PROTOCOL_VERSION)
        if version < RESTART_VERSION:
            raise Unsupported(
                f"this vault's init speaks protocol {version}; a workload restart needs "
                f"{RESTART_VERSION}",
                hint="update the vault's image (fly-vault-admin tenant update-image), or "
                "reprovision it",
            )
        stream = connection.open_stream(StreamTag.EXEC_LIST)
        await stream.send(frame(SessionsFrame.RESTART), end_stream=True)
        channel = FrameChannel()
        while (item := channel.next_frame()) is None:
            if channel.finished:
                raise RemoteProtocolError("the vault closed the stream without answering")
            channel.feed(await stream.read())
        if item.type == ERROR_FRAME:
            raise ErrorMessage.decode(item.payload).to_exception()
        if item.type != SessionsFrame.RESTARTED:
            raise RemoteProtocolError(f"unexpected answer 0x{item.type:02x} to a restart")
        answer = decode_json(item.payload, "restart answer")
        if not isinstance(answer, dict) or not isinstance(answer.get("new_boot_id"), str):
            raise RemoteProtocolError("restart answer: not an object with new_boot_id")
        # This connection still carries the old boot id, which sessions compare against
        # after a reconnect: the next call connects afresh and learns the new one.
        self.invalidate(connection)
        return answer

    async def kill(self, session_id: str, signo: int = signal_module.SIGTERM) -> None:
        from flyvault.protocol.console import KillSession, SessionsFrame, frame

        request = KillSession(session_id, signo)
        kind, _ = await self._request(
            StreamTag.EXEC_LIST, frame(SessionsFrame.KILL, request.encode())
        )
        if kind != SessionsFrame.KILLED:
            raise RemoteProtocolError(f"unexpected answer 0x{kind:02x} to a kill")


@dataclass(frozen=True)
class ReprovisionResult:
    #: None when the vault was cold: there was no workload before.
    old_boot_id: str | None
    new_boot_id: str
    seconds: float
    runtime_status: Any
    #: The vault's notes about the provisioning (device nodes created...).
    notes: tuple[str, ...] = ()
    #: The vault was never provisioned: this provisioned it (one upload).
    from_cold: bool = False
    #: Resolves when the server's settle window ended with the workload up; raises the
    #: rollback when it died inside it (None: nothing left to watch).
    settled: Any = None

    async def wait_settled(self) -> None:
        """Wait out the rest of the settle window; the rollback, if any, is raised."""
        if self.settled is not None:
            await asyncio.shield(self.settled)


def __getattr__(name: str) -> Any:
    """``ExecHooks`` and ``ExecSession`` moved to ``flyvault.client.session``; still found
    here, imported on first use (the exec protocol's modules stay out of ``cp``)."""
    if name in ("ExecHooks", "ExecSession"):
        from flyvault.client import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RemoteError",
    "SessionGone",
    "SessionTakenOver",
    "Vault",
    "new_session_id",
]
