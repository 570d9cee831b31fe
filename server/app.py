"""The init server: QUIC connections, the control exchange, and per-stream dispatch.

Per connection the server keeps one flag, ``authenticated``. The control stream sets it
when a token matches; a later failed control exchange does NOT clear it (the original
de-authenticated a working connection on any failed retry, flaw 13). Control streams run
as their own tasks, never inline in an accept loop (flaw 10), and every refusal is an
error frame on the stream concerned: unknown stream tags, streams opened before
authentication, attestation failures (flaws 11 and 12).

Before authentication a connection holds only small, fixed resources: at most
``MAX_PREAUTH_STREAMS`` streams, and a place in the listener's admission table (Retry under
load, caps per source and in total, deadlines that count only the time spent waiting on the
peer; see ``flyvault.transport.admission``). The server tells the listener whose turn it is:
while it serves a control request the connection is never evicted.

Wrong tokens are slowed per connection and bounded by a server-wide budget, never by source
address, so a correct token is always accepted whatever anyone else sent
(``server.auth.WrongTokenBudget``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from flyvault.errors import (
    AttestationError,
    AuthError,
    Busy,
    NotAuthenticated,
    ProvisionError,
    RemoteError,
    RemoteProtocolError,
    TransportError,
    Unsupported,
    VaultError,
)
from flyvault.protocol.console import refusal
from flyvault.protocol.constants import (
    CHANNEL_BINDING_LABEL,
    CHANNEL_BINDING_LENGTH,
    MAX_PROTOCOL_VERSION,
    MIN_PROTOCOL_VERSION,
    REQUEST_TIMEOUT,
    RuntimeStatus,
    StreamTag,
    VmState,
)
from flyvault.protocol.control import (
    AttestationRequested,
    ControlServer,
    RootfsChunkReceived,
    RootfsUploaded,
    ServerState,
    SetupRequested,
    StreamEnded,
    VersionRejected,
)
from flyvault.protocol.messages import (
    Progress,
    RootfsInline,
    RootfsNone,
    RootfsUrl,
    SetupComplete,
    SetupRequest,
)
from flyvault.transport import QuicChannel, QuicListener, QuicStream, TransportSettings, listen
from flyvault.transport.admission import AdmissionLimits, Stage

from .auth import MAX_WRONG_PER_CONNECTION, AccessToken, WrongTokenBudget, penalty
from .cgroups import Limits
from .defaults import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_BUFFER,
    DEFAULT_SESSION_TTL,
    SETTLE_SECONDS,
    URL_MAX_BYTES,
    URL_READ_TIMEOUT,
)
from .provisioning import Provisioner, ProvisionJob
from .session_disk import DiskLogLimits, clear_stale
from .sessions import SessionRegistry, SpawnPolicy

log = logging.getLogger("flyvault.server")

MAX_PREAUTH_STREAMS = 4
TAG_TIMEOUT = REQUEST_TIMEOUT
#: What the sessions ended by init's shutdown are told, and how long the shutdown waits for
#: attached clients to receive it.
SHUTDOWN_REASON = "the vault is shutting down"
SHUTDOWN_DELIVERY = 2.0


class Attestor(Protocol):
    async def token(self, audience: str) -> str: ...


@dataclass
class ServerOptions:
    listen_host: str = "::"
    listen_port: int = 8443
    data_dir: Path = Path("/data")
    #: No namespaces and no rootfs: commands run on this host as this user (local vault).
    host_mode: bool = False
    #: Seconds a connection may spend waiting on its peer before it authenticates.
    auth_timeout: float = 30.0
    max_connections: int = 512
    #: Pre-auth caps (in total and per source IP) and deadlines; ``auth_timeout`` is
    #: applied on top as the admission's ``auth_deadline``.
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    init_binary: str = "/sbin/init"
    #: rootfs_url downloads: give up after this long without data; refuse beyond this size.
    url_read_timeout: float = URL_READ_TIMEOUT
    url_max_bytes: int = URL_MAX_BYTES
    #: A (re)provisioned workload dying within this long of its start is rolled back.
    settle_seconds: float = SETTLE_SECONDS
    #: Output kept per exec session for replay (bytes).
    session_buffer: int = DEFAULT_SESSION_BUFFER
    #: Named sessions' output on disk, under ``<data_dir>/sessions``: the head kept whole
    #: and a rotating tail (bytes; 0 and 0: none).
    session_log: DiskLogLimits = field(default_factory=DiskLogLimits)
    #: How long a finished named session stays listed.
    session_ttl: float = DEFAULT_SESSION_TTL
    max_sessions: int = DEFAULT_MAX_SESSIONS
    #: VM mode: the workload's hostname (the vault's name), and its optional limits.
    hostname: str | None = None
    memory_max: int | None = None
    cpu_max: float | None = None
    transport: TransportSettings = field(default_factory=TransportSettings.for_server)


class VaultState:
    """Cold/Ready, the runtime's status and its boot identity, as clients are told."""

    def __init__(self, options: ServerOptions, provisioner: Provisioner | None) -> None:
        self.options = options
        self.provisioner = provisioner
        self._host_boot_id = uuid.uuid4().hex

    def vm_state(self) -> VmState:
        if self.provisioner is None:
            return VmState.READY
        return self.provisioner.vm_state()

    def runtime_status(self) -> RuntimeStatus:
        if self.provisioner is None:
            return RuntimeStatus.HOST_MODE
        return self.provisioner.runtime_status()

    @property
    def boot_id(self) -> str:
        """Changes whenever the workload (re)starts; a client waits on it after a
        reprovision instead of sleeping for a fixed time."""
        if self.provisioner is None:
            return self._host_boot_id
        return self.provisioner.boot_id


@dataclass
class ServerStats:
    attestations: int = 0
    attestation_failures: int = 0
    setup_requests: int = 0
    token_failures: int = 0
    #: Connections closed for wrong tokens (per-connection limit, or the budget spent).
    token_closes: int = 0
    authenticated: int = 0
    protocol_errors: int = 0


StreamHandler = Callable[["ServerConnection", QuicStream, bytes], Awaitable[None]]


class VaultServer:
    def __init__(
        self,
        options: ServerOptions,
        token: AccessToken,
        attestor: Attestor,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.token = token
        self.attestor = attestor
        self.provisioner = (
            None
            if options.host_mode
            else Provisioner(
                options.data_dir,
                init_binary=options.init_binary,
                url_read_timeout=options.url_read_timeout,
                url_max_bytes=options.url_max_bytes,
                settle_seconds=options.settle_seconds,
                hostname=options.hostname,
                limits=Limits(options.memory_max, options.cpu_max),
            )
        )
        self.state = VaultState(options, self.provisioner)
        self.wrong_tokens = WrongTokenBudget()
        self.clock = clock
        self.listener: QuicListener | None = None
        self.sessions = SessionRegistry(
            _spawn_policy(options) if self.provisioner is None else self.provisioner.spawn_policy(),
            buffer_size=options.session_buffer,
            max_sessions=options.max_sessions,
            exited_ttl=options.session_ttl,
            disk_root=_session_logs(options),
            disk_limits=options.session_log,
        )
        if self.provisioner is not None:
            # Before every stop of the workload, its sessions end with the reason.
            self.provisioner.runtime.on_stop = self.sessions.end_all
        #: Handlers for authenticated stream kinds.
        self.handlers: dict[StreamTag, StreamHandler] = _stream_handlers(options)
        self.connections: set[ServerConnection] = set()
        self.stats = ServerStats()

    async def start(self) -> QuicListener:
        if self.provisioner is not None:
            await self.provisioner.boot()
        self.listener = await listen(
            self.options.listen_host,
            self.options.listen_port,
            self._on_channel,
            self.options.transport,
            max_connections=self.options.max_connections,
            limits=dataclasses.replace(
                self.options.admission, auth_deadline=self.options.auth_timeout
            ),
        )
        return self.listener

    def close(self) -> None:
        """Close every connection and the listener; stop the sessions' processes."""
        for connection in list(self.connections):
            connection.close()
        self.sessions.close()
        if self.listener is not None:
            self.listener.close()

    async def shutdown(self) -> None:
        """End the sessions with a reason (attached clients are told), ``close``, then stop
        the workload gracefully (SIGTERM, then SIGKILL) and remove its cgroups."""
        await self.sessions.end_all(SHUTDOWN_REASON)
        await self._exits_delivered(SHUTDOWN_DELIVERY)
        self.close()
        if self.provisioner is not None:
            await self.provisioner.stop(SHUTDOWN_REASON)

    async def _exits_delivered(self, timeout: float) -> None:
        """Wait (bounded) until no client is attached to an ended session any more: each
        has read its EXITED and acknowledged it, or gone."""
        deadline = asyncio.get_running_loop().time() + timeout
        while any(
            s.attachment is not None and not s.running for s in self.sessions.sessions.values()
        ):
            if asyncio.get_running_loop().time() >= deadline:
                return
            await asyncio.sleep(0.02)

    def _on_channel(self, channel: QuicChannel) -> None:
        connection = ServerConnection(self, channel)
        self.connections.add(connection)


class ServerConnection:
    def __init__(self, server: VaultServer, channel: QuicChannel) -> None:
        self.server = server
        self.channel = channel
        self.authenticated = False
        self._preauth_streams = 0
        #: Control requests being served now (the connection then waits on us).
        self._serving = 0
        self.wrong_tokens = 0
        #: The protocol version negotiated by this connection's attestation (EXITED
        #: carries a reason from version 3 on).
        self.protocol_version = MIN_PROTOCOL_VERSION
        self._budget_spent = False
        #: One token check at a time per connection, penalty included.
        self._token_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        channel.on_stream = self._on_stream
        previous = channel.on_terminated

        def terminated(ch: QuicChannel) -> None:
            if previous is not None:
                previous(ch)
            self._closed()

        channel.on_terminated = terminated

    @property
    def source(self) -> str:
        address = self.channel.peer_address
        return str(address[0]) if address else "unknown"

    def close(self) -> None:
        self.channel.close_now(reason="server shutting down")

    def _closed(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.server.connections.discard(self)

    def _stage(self, stage: Stage) -> None:
        listener = self.server.listener
        if listener is not None and not self.authenticated:
            listener.set_stage(self.channel, stage)

    def _serving_started(self) -> None:
        self._serving += 1
        self._stage(Stage.WAITING_US)

    def _serving_stopped(self) -> None:
        self._serving -= 1
        if self._serving == 0:
            self._stage(Stage.WAITING_PEER)

    def _on_stream(self, stream: QuicStream) -> None:
        if not self.authenticated:
            self._preauth_streams += 1
            if self._preauth_streams > MAX_PREAUTH_STREAMS:
                stream.abort()
                return
        task = asyncio.get_running_loop().create_task(self._serve_stream(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, stream: QuicStream) -> None:
        try:
            first = await asyncio.wait_for(stream.read(), timeout=TAG_TIMEOUT)
        except (TimeoutError, TransportError):
            stream.abort()
            return
        if not first:
            stream.write_eof()
            return
        tag, rest = first[0], first[1:]
        try:
            if tag == StreamTag.CONTROL:
                await self._control(stream, rest)
                return
            if not self.authenticated:
                await refuse(
                    stream,
                    NotAuthenticated(
                        "this connection is not authenticated: complete the control exchange "
                        "(attestation and access token) first"
                    ),
                )
                return
            handler = self.server.handlers.get(StreamTag(tag)) if tag in _TAGS else None
            if handler is None:
                await refuse(
                    stream,
                    Unsupported(
                        f"unknown stream type 0x{tag:02x}; this server speaks fly-vault "
                        f"protocol {MIN_PROTOCOL_VERSION}..{MAX_PROTOCOL_VERSION}"
                    ),
                )
                return
            await handler(self, stream, rest)
        except TransportError as exc:
            log.debug("stream %d from %s ended: %s", stream.stream_id, self.source, exc)
        except asyncio.CancelledError:
            stream.abort()
            raise
        except VaultError as exc:
            # A refusal a handler left to us: answered with the code its class declares.
            log.info("stream %d from %s refused: %s", stream.stream_id, self.source, exc)
            await refuse(stream, exc)
        except Exception:
            log.exception("stream handler failed for %s", self.source)
            await refuse(stream, RemoteError("internal server error (see init logs)"))

    # Control exchange ------------------------------------------------------------------

    async def _control(self, stream: QuicStream, initial: bytes) -> None:
        self._serving_started()
        try:
            await self._control_exchange(stream, initial)
        finally:
            self._serving_stopped()

    async def _control_exchange(self, stream: QuicStream, initial: bytes) -> None:
        machine = ControlServer()
        machine.receive_data(initial)
        request: SetupRequest | None = None
        while True:
            try:
                event = machine.next_event()
            except RemoteProtocolError as exc:
                self.server.stats.protocol_errors += 1
                log.info("control stream error from %s: %s", self.source, exc)
                await _flush(stream, machine, end=True)
                return
            if event is None:
                await _flush(stream, machine)
                self._serving_stopped()  # its turn
                try:
                    data = await stream.read()
                finally:
                    self._serving_started()
                if data:
                    machine.receive_data(data)
                else:
                    machine.receive_eof()
                continue
            if isinstance(event, VersionRejected):
                log.info(
                    "refused protocol %d..%d from %s",
                    event.client_min,
                    event.client_max,
                    self.source,
                )
                await _flush(stream, machine, end=True)
                return
            if isinstance(event, StreamEnded):
                await _flush(stream, machine, end=True)
                return
            if isinstance(event, AttestationRequested):
                self.protocol_version = event.version
                await self._attest(machine)
                if machine.state is ServerState.FAILED:
                    await _flush(stream, machine, end=True)
                    return
            elif isinstance(event, SetupRequested):
                request = event.request
                async with self._token_lock:
                    accepted = await self._check_token(machine, request)
                if not accepted:
                    await _flush(stream, machine, end=True)
                    if self.wrong_tokens >= MAX_WRONG_PER_CONNECTION or self._budget_spent:
                        self.server.stats.token_closes += 1
                        # The refusal is read before the close, so the client reports it.
                        with contextlib.suppress(TransportError, TimeoutError):
                            await asyncio.wait_for(stream.wait_delivered(), 2.0)
                        self.channel.close_now(reason="too many wrong access tokens")
                    return
                if isinstance(request.rootfs, RootfsNone):
                    await self._finish_setup(machine, request)
                    await _flush(stream, machine, end=True)
                    return
                # A rootfs is coming (inline) or must be fetched (URL).
                await self._provision(machine, stream, request)
                await _flush(stream, machine, end=True)
                return
            else:
                machine.refuse(RemoteProtocolError(f"unexpected {type(event).__name__}"))
                await _flush(stream, machine, end=True)
                return

    async def _attest(self, machine: ControlServer) -> None:
        audience = self.channel.export_keying_material(
            CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LENGTH
        ).hex()
        self.server.stats.attestations += 1
        try:
            jwt = await self.server.attestor.token(audience)
        except VaultError as exc:
            self.server.stats.attestation_failures += 1
            log.warning("attestation for %s failed: %s", self.source, exc)
            machine.refuse(AttestationError(f"server cannot attest: {exc.message}"))
            return
        state = self.server.state
        machine.send_attestation(state.vm_state(), state.runtime_status(), state.boot_id, jwt)

    async def _check_token(self, machine: ControlServer, request: SetupRequest) -> bool:
        """Accept a correct token at once; slow a wrong one down on this connection only."""
        server = self.server
        server.stats.setup_requests += 1
        if not server.token.configured:
            machine.refuse(AuthError("setup failed: no ACCESS_TOKEN configured on this machine"))
            return False
        if server.token.matches(request.access_token):
            machine.accept_token()
            if server.listener is not None:
                # No stranger any more: a long rootfs upload may follow before setup ends.
                server.listener.authenticated(self.channel)
            return True
        self.wrong_tokens += 1
        server.stats.token_failures += 1
        self._budget_spent = not server.wrong_tokens.take(server.clock())
        log.warning(
            "wrong access token from %s (%d on this connection%s)",
            self.source,
            self.wrong_tokens,
            "; server-wide wrong-token budget spent" if self._budget_spent else "",
        )
        self._stage(Stage.PENALIZED)
        await asyncio.sleep(penalty(self.wrong_tokens))
        self._stage(Stage.WAITING_US)
        if self.wrong_tokens >= MAX_WRONG_PER_CONNECTION or self._budget_spent:
            machine.refuse(
                AuthError(
                    "setup failed: access token verification failed; this connection is "
                    "closed, reconnect to try again"
                )
            )
        else:
            machine.refuse(AuthError("setup failed: access token verification failed"))
        return False

    async def _finish_setup(self, machine: ControlServer, request: SetupRequest) -> None:
        state = self.server.state
        if state.vm_state() is VmState.COLD:
            machine.refuse(
                ProvisionError(
                    "setup failed: cold boot requires a rootfs payload (set rootfs or "
                    "rootfs_url in the vault's config entry)"
                )
            )
            return
        self._authenticated()
        machine.send_setup_complete(
            SetupComplete(state.vm_state(), state.runtime_status(), state.boot_id)
        )

    async def _provision(
        self, machine: ControlServer, stream: QuicStream, request: SetupRequest
    ) -> None:
        """Run one (re)provision: stage while the archive arrives, then activate."""
        provisioner = self.server.provisioner
        if provisioner is None:
            machine.refuse(ProvisionError(f"setup failed: {HOST_MODE_REFUSAL}"))
            stream.stop()  # read no upload: the client stops sending at once
            return
        # One only settling (answered, its new workload watched for the rest of the
        # window) is waited for, by one client at a time: it ends within SETTLE_SECONDS.
        if provisioner.lock.locked() and (not provisioner.settling or provisioner.waiting):
            machine.refuse(Busy("setup failed: another client is provisioning this vault"))
            return

        def progress(phase: str, done: int, total: int) -> None:
            with contextlib.suppress(Exception):
                machine.send_progress(Progress(phase, done, total))
                stream.write(machine.data_to_send())

        state = self.server.state

        async def answer() -> None:
            # The new workload is up: the client is answered now, while the rest of the
            # settle window is watched; a death inside it comes as a second message.
            provisioner.settling = True
            self._authenticated()
            # Notes only answer a request with rootfs options: older clients never get them.
            notes = tuple(job.notes) if not request.options.is_default else ()
            machine.send_setup_complete(
                SetupComplete(state.vm_state(), state.runtime_status(), state.boot_id, notes)
            )
            await _flush(stream, machine)

        async with _turn(provisioner):
            job = ProvisionJob(provisioner, progress, request.options)
            try:
                await job.start()
                size: int | None = None
                digest: bytes | None
                if isinstance(request.rootfs, RootfsInline):
                    size = request.rootfs.size
                    digest = await self._receive_upload(machine, stream, job, size)
                else:
                    assert isinstance(request.rootfs, RootfsUrl)
                    await job.download(request.rootfs.url)
                    digest = bytes.fromhex(request.rootfs.sha256) if request.rootfs.sha256 else None
                await _outlive_the_client(
                    self._activate(machine, stream, job, size, digest, answer)
                )
            except ProvisionError as exc:
                await job.abort()
                log.warning("provisioning for %s failed: %s", self.source, exc)
                machine.refuse(ProvisionError(f"setup failed: {exc.message}"))
                if isinstance(request.rootfs, RootfsInline):
                    # Read no more of the upload: STOP_SENDING fails the client's sends at
                    # once (a client that does not read the error would block otherwise).
                    stream.stop()
                return
            except BaseException:
                await job.abort()
                raise

    async def _activate(
        self,
        machine: ControlServer,
        stream: QuicStream,
        job: ProvisionJob,
        size: int | None,
        digest: bytes | None,
        answer: Callable[[], Awaitable[None]],
    ) -> None:
        """Activate, answer once the workload is up, then see the settle window through:
        all of it runs to the end even if the client has gone meanwhile."""
        try:
            timings = await job.complete(size, digest, answer)
        except ProvisionError as exc:
            if machine.state is not ServerState.COMPLETE:
                raise  # not answered yet: refused as any failure
            # Answered already: the workload died inside the settle window and the previous
            # rootfs is back. The client learns it on the same stream.
            await job.abort()
            log.warning("provisioning for %s rolled back: %s", self.source, exc)
            machine.send_rolled_back(ProvisionError(f"setup rolled back: {exc.message}"))
            await _flush(stream, machine, end=True)
            return
        finally:
            job.provisioner.settling = False
        phases = ", ".join(
            f"{name} {seconds:.2f} s" for name, seconds in timings.items() if name != "total"
        )
        log.info("provisioned for %s in %.1f s (%s)", self.source, timings["total"], phases)

    async def _receive_upload(
        self, machine: ControlServer, stream: QuicStream, job: ProvisionJob, size: int
    ) -> bytes:
        """Feed the chunks to the extractor as they arrive; return the client's digest."""
        await _flush(stream, machine)  # UPLOAD_READY
        while True:
            event = machine.next_event()  # a RemoteProtocolError ends the job (aborted)
            if event is None:
                data = await stream.read()
                if data:
                    machine.receive_data(data)
                else:
                    machine.receive_eof()
                continue
            if isinstance(event, RootfsChunkReceived):
                await job.feed(event.data, size)
            elif isinstance(event, RootfsUploaded):
                return event.sha256
            else:
                raise ProvisionError(f"the upload ended early ({type(event).__name__})")

    def _authenticated(self) -> None:
        if not self.authenticated:
            self.authenticated = True
            self.server.stats.authenticated += 1
            if self.server.listener is not None:
                self.server.listener.authenticated(self.channel)
            log.info("connection from %s authenticated", self.source)


@contextlib.asynccontextmanager
async def _turn(provisioner: Provisioner) -> AsyncIterator[None]:
    """The provisioning lock; a client waiting for a settling job is recorded as such."""
    waiting = provisioner.lock.locked()
    provisioner.waiting = provisioner.waiting or waiting
    try:
        await provisioner.lock.acquire()
    finally:
        if waiting:
            provisioner.waiting = False
    try:
        yield
    finally:
        provisioner.lock.release()


async def _outlive_the_client(completion: Coroutine[Any, Any, None]) -> None:
    """Run an activation to its end even when the client goes away meanwhile (it may, once
    answered): its settle window, commit or rollback must not be cut by the connection."""
    task = asyncio.ensure_future(completion)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


_TAGS = {int(tag) for tag in StreamTag}

#: Why a host-mode vault refuses a rootfs, with the fix (the client says the same before
#: it sends anything: ``flyvault.client.connection``).
HOST_MODE_REFUSAL = (
    "this vault runs in host mode and has no rootfs to provision; for the local dev vault: "
    "fly-vault local down, then fly-vault local up --rootfs IMAGE (as root); elsewhere run "
    "fly-vault-init without --host-mode, as root"
)


def _session_logs(options: ServerOptions) -> Path | None:
    """Where named sessions' output logs go: ``<data_dir>/sessions``, emptied at start (no
    session outlives init). None without a data directory (a host-mode init given none)."""
    if not options.session_log.enabled or not options.data_dir.is_dir():
        return None
    root = options.data_dir / "sessions"
    clear_stale(root)
    return root


def _spawn_policy(options: ServerOptions) -> SpawnPolicy:
    """Host mode: commands run here, as this user, from the home directory."""
    env = dict(os.environ)
    return SpawnPolicy(default_cwd=env.get("HOME") or os.getcwd(), base_env=env)


def _stream_handlers(options: ServerOptions) -> dict[StreamTag, StreamHandler]:
    from .console import handle_console, handle_sessions
    from .files import handle_files
    from .forward import handle_forward

    return {
        StreamTag.PORT_FORWARD: handle_forward,
        StreamTag.EXEC_LIST: handle_sessions,
        StreamTag.CONSOLE: handle_console,
        StreamTag.FILES: handle_files,
    }


async def _flush(stream: QuicStream, machine: ControlServer, *, end: bool = False) -> None:
    data = machine.data_to_send()
    try:
        if data or end:
            await stream.send(data, end_stream=end)
    except TransportError:
        pass


async def refuse(stream: QuicStream, exc: VaultError) -> None:
    """Answer a stream with the error frame ``exc``'s class declares, and finish it."""
    with contextlib.suppress(TransportError):
        await stream.send(refusal(exc), end_stream=True)
