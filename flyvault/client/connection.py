"""Open an attested, authenticated connection to a vault.

The order is the security property: QUIC handshake, then the attestation JWT is verified
against *this* connection's TLS exporter, the org/app/machine in the config and the issuer's
keys — and only after every check passed is the access token sent. Nothing cached can skip
a check; the caches only save network round trips (JWKS) or record history (fingerprints).

No printing here: progress goes to an optional ``ConnectObserver`` (the CLI's spinner and
``doctor`` use it; the MCP server turns it into progress notifications). Each step, with its
timing, is also logged to ``flyvault.connect`` (``fly-vault -v`` / ``--log-file``); stream
opens are logged there too (closes by the channel). Nothing logged holds a secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flyvault.config import VaultConfig
from flyvault.errors import (
    AttestationError,
    ColdVault,
    ConnectionLost,
    ProvisionError,
    RemoteProtocolError,
    ServerBusy,
    TransportError,
    VaultError,
)
from flyvault.protocol.constants import (
    CHANNEL_BINDING_LABEL,
    CHANNEL_BINDING_LENGTH,
    RuntimeStatus,
    StreamTag,
    VmState,
)
from flyvault.protocol.control import (
    AttestationReceived,
    ControlClient,
    ControlEvent,
    ErrorReceived,
    ProgressReported,
    SetupCompleted,
    StreamEnded,
    UploadReady,
)
from flyvault.protocol.messages import (
    Attestation,
    RootfsInline,
    RootfsNone,
    RootfsOptions,
    RootfsSource,
    RootfsUrl,
    SetupRequest,
)
from flyvault.transport import QuicChannel, QuicStream, TransportSettings, connect

log = logging.getLogger("flyvault.connect")

# Step names, in order; doctor prints them and maps a failure to its exit code.
STEP_RESOLVE = "resolve"
STEP_HANDSHAKE = "handshake"
STEP_ATTEST = "attestation"
STEP_AUTH = "authenticate"
STEP_PROVISION = "provision"

#: ``progress(phase, done, total)``: "upload" while sending the rootfs, then the server's
#: phases ("download", "extract", "activate", ...). ``total`` is 0 when unknown.
Progress = Callable[[str, int, int], None]


class ConnectObserver(Protocol):
    def step_started(self, step: str, detail: str) -> None: ...

    def step_finished(self, step: str, elapsed: float, detail: str) -> None: ...

    def step_failed(self, step: str, elapsed: float, error: VaultError) -> None: ...


class _NullObserver:
    def step_started(self, step: str, detail: str) -> None:
        pass

    def step_finished(self, step: str, elapsed: float, detail: str) -> None:
        pass

    def step_failed(self, step: str, elapsed: float, error: VaultError) -> None:
        pass


@dataclass
class VaultConnection:
    """An authenticated connection. Open streams with ``open_stream``."""

    vault: VaultConfig
    channel: QuicChannel
    attestation: Attestation
    claims: object
    fingerprint: str
    vm_state: VmState
    runtime_status: RuntimeStatus
    boot_id: str
    timings: dict[str, float] = field(default_factory=dict)
    #: What the vault reported about this connection's provisioning (devices created...).
    notes: tuple[str, ...] = ()
    #: After a (re)provision: done when the vault's settle window has ended. It raises the
    #: ProvisionError if the new workload died inside it and the vault rolled back (the
    #: answer came as soon as the workload was up); None when nothing was provisioned.
    settled: asyncio.Future[None] | None = None

    @property
    def protocol_version(self) -> int:
        """The protocol version the vault attested (what it can be asked for)."""
        return int(self.attestation.protocol_version)

    def open_stream(self, tag: StreamTag) -> QuicStream:
        stream = self.channel.open_stream()
        _opened(stream, tag.name.lower(), self.vault.name)
        if tag is StreamTag.FILES:  # a file's bytes: see QuicStream.use_bulk_buffers
            stream.use_bulk_buffers()
        stream.write(bytes((tag,)))
        return stream

    @property
    def is_closed(self) -> bool:
        return self.channel.is_closed

    def close(self) -> None:
        """Close at once (no drain wait): right for one-shot commands."""
        if not self.channel.is_closed:
            log.debug("closing the connection to vault %s", self.vault.name)
        if self.settled is not None:
            self.settled.cancel()
        self.channel.close_now()


def _opened(stream: QuicStream, kind: str, vault_name: str) -> None:
    stream.kind = kind  # the channel names it again when the stream closes
    log.debug("stream %d open: %s (vault %s)", stream.stream_id, kind, vault_name)


class _ProgressLog:
    """Logs provisioning phases (INFO on each new phase, DEBUG every 10 %), then forwards."""

    def __init__(self, forward: Progress | None) -> None:
        self.forward = forward
        self.phase = ""
        self.since = time.perf_counter()
        self.step = -1

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if phase != self.phase:
            if self.phase:
                log.info("provision: %s done in %.1f s", self.phase, now - self.since)
            self.phase, self.since, self.step = phase, now, -1
            size = f" ({total} bytes)" if total and phase in ("upload", "download") else ""
            log.info("provision: %s started%s", phase, size)
        step = done * 10 // total if total else -1
        if step != self.step and total:
            self.step = step
            log.debug("provision: %s %d/%d (%.1f s)", phase, done, total, now - self.since)
        if self.forward is not None:
            self.forward(phase, done, total)

    def finish(self) -> None:
        if self.phase:
            log.info("provision: %s done in %.1f s", self.phase, time.perf_counter() - self.since)
            self.phase = ""


#: How long a client keeps reconnecting to a vault that turns it away as busy (it evicts
#: stale strangers under load and says so with QUIC's CONNECTION_REFUSED).
BUSY_RETRY_SECONDS = 30.0


async def open_vault(
    vault: VaultConfig,
    *,
    observer: ConnectObserver | None = None,
    settings: TransportSettings | None = None,
    reprovision: bool = False,
    progress: Progress | None = None,
    provision: bool = True,
) -> VaultConnection:
    """Connect, verify the attestation, then authenticate. Raises a ``VaultError``.

    A vault under load may turn a connection away before authentication ("server busy");
    that is retried with jittered backoff for up to ``BUSY_RETRY_SECONDS``.
    """
    import asyncio
    import random

    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return await _open_vault_once(
                vault,
                observer=observer,
                settings=settings,
                reprovision=reprovision,
                progress=progress,
                provision=provision,
            )
        except ServerBusy as exc:
            pause = delay * (0.5 + random.random())
            if time.monotonic() + pause > deadline:
                raise
            log.info("reconnect to vault %s in %.2f s: %s", vault.name, pause, exc.message)
            await asyncio.sleep(pause)
            delay = min(delay * 2, 1.0)


async def _open_vault_once(
    vault: VaultConfig,
    *,
    observer: ConnectObserver | None,
    settings: TransportSettings | None,
    reprovision: bool,
    progress: Progress | None,
    provision: bool,
) -> VaultConnection:
    from flyvault.attest import AttestationCache, AttestationVerifier, JwksCache

    obs: ConnectObserver = observer or _NullObserver()
    timings: dict[str, float] = {}
    progress_log = _ProgressLog(progress)
    progress = progress_log

    async def run_step(name: str, detail: str, action):  # type: ignore[no-untyped-def]
        obs.step_started(name, detail)
        log.debug("%s: started (%s)", name, detail)
        started = time.perf_counter()
        try:
            result, done_detail = await action()
        except VaultError as exc:
            elapsed = time.perf_counter() - started
            log.info("%s: failed after %.1f ms (%s): %s", name, elapsed * 1000, detail, exc.message)
            obs.step_failed(name, elapsed, exc)
            raise
        elapsed = time.perf_counter() - started
        timings[name] = elapsed
        log.info("%s: ok in %.1f ms (%s): %s", name, elapsed * 1000, detail, done_detail)
        obs.step_finished(name, elapsed, done_detail)
        return result

    host, port = vault.host_port()
    via = ""
    if vault.proxy and vault.machine_id is not None:
        # Proxy mode: every datagram names the machine. Which machine answered is still
        # only trusted once the attestation's machine_id matches (checked below, before
        # the token is sent), so a misrouting proxy cannot get the token.
        from dataclasses import replace

        from flyvault.transport.endpoint import proxy_wrapper

        settings = replace(
            settings or TransportSettings(), datagram_wrapper=proxy_wrapper(vault.machine_id)
        )
        via = f" via vault-proxy to machine {vault.machine_id}"

    async def do_handshake() -> tuple[QuicChannel, str]:
        channel = await connect(host, port, settings)
        return channel, f"QUIC to {host}:{port}{via} (ALPN {channel.quic.negotiated_alpn})"

    log.info("connecting to vault %s at %s:%d%s", vault.name, host, port, via)
    channel: QuicChannel = await run_step(STEP_HANDSHAKE, f"{host}:{port}{via}", do_handshake)
    peer = channel.peer_address
    log.info("%s: %s -> %s", STEP_RESOLVE, host, peer[0] if isinstance(peer, tuple) else "unknown")
    try:
        certificate = channel.quic.peer_certificate_der()
        if certificate is None:
            raise AttestationError("the server presented no certificate")
        fingerprint = hashlib.sha256(certificate).hexdigest()
        control = ControlClient()
        stream = channel.open_stream()
        _opened(stream, "control", vault.name)
        stream.write(bytes((StreamTag.CONTROL,)))
        cache = AttestationCache()
        verifier = AttestationVerifier(
            vault.org,
            vault.app,
            vault.machine_id,
            issuer_base=vault.issuer_base_url(),
            jwks=JwksCache(cache=cache),
        )

        async def do_attest() -> tuple[tuple[Attestation, object], str]:
            control.request_attestation()
            stream.write(control.data_to_send())
            event = await _next_event(control, stream)
            if isinstance(event, ErrorReceived):
                raise event.error.to_exception()
            if not isinstance(event, AttestationReceived):
                raise RemoteProtocolError(f"expected an attestation, got {type(event).__name__}")
            attestation = event.attestation
            audience = channel.export_keying_material(
                CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LENGTH
            ).hex()
            claims = await verifier.verify(attestation.jwt, audience=audience)
            _record(cache, vault, claims.machine_id, fingerprint)
            log.debug(
                "attestation: verified against issuer %s, server certificate sha256 %s",
                verifier.issuer,
                fingerprint[:16],
            )
            detail = (
                f"app {claims.app_name}, machine {claims.machine_id}"
                f"{' in ' + claims.region if claims.region else ''}; "
                f"{attestation.vm_state.name.lower()}, runtime "
                f"{attestation.runtime_status.name.lower().replace('_', ' ')}"
            )
            return (attestation, claims), detail

        attestation, claims = await run_step(STEP_ATTEST, f"issuer {verifier.issuer}", do_attest)

        if reprovision and attestation.runtime_status is RuntimeStatus.HOST_MODE:
            raise host_mode_refusal(vault.name)
        # Only now, with the attestation verified, does the token leave this machine.
        token = vault.require_access_token()
        source = None
        cold = attestation.vm_state is VmState.COLD
        if (cold and provision) or reprovision:
            source = vault.rootfs_source("reprovision" if reprovision else "cold boot")
        upload = _RootfsUpload(source, progress) if source is not None else None
        settle: list[asyncio.Future[None]] = []

        async def do_auth() -> tuple[SetupCompleted, str]:
            options = rootfs_options(vault) if upload else RootfsOptions()
            control.send_setup(
                SetupRequest(token, upload.request() if upload else RootfsNone(), options)
            )
            stream.write(control.data_to_send())
            early: ControlEvent | None = None
            while True:
                event = early if early is not None else await _next_event(control, stream)
                early = None
                if isinstance(event, ProgressReported):
                    if progress is not None:
                        p = event.progress
                        progress(p.phase, p.done, p.total)
                    continue
                if isinstance(event, UploadReady) and upload is not None:
                    # An answer before the upload ended (the vault refused the archive
                    # while unpacking it) stops the upload and is handled here.
                    early = await upload.send(control, stream)
                    continue
                if isinstance(event, ErrorReceived):
                    error = event.error.to_exception()
                    if cold and not provision and isinstance(error, ProvisionError):
                        # The server checks the token before the cold state: it was right.
                        raise ColdVault(
                            "access token accepted; the vault is cold (never provisioned): "
                            "the next connect or exec provisions it from the configured "
                            "rootfs or rootfs_url"
                        )
                    if isinstance(error, RemoteProtocolError) and not options.is_default:
                        error.hint = (
                            "the vault's init may predate rootfs options "
                            "(--allow-devices, --max-expansion-ratio): update it, or "
                            "provision without them"
                        )
                    raise error
                if isinstance(event, SetupCompleted):
                    stream.write_eof()
                    if upload is not None:
                        settle.append(_watch_settle(control, stream, vault.name))
                    what = "access token accepted"
                    if upload is not None:
                        what += f"; rootfs provisioned ({upload.describe()})"
                    for note in event.complete.notes:
                        what += f"; {note}"
                    return event, what
                raise RemoteProtocolError(f"unexpected {type(event).__name__} during setup")

        step_name = STEP_AUTH if upload is None else STEP_PROVISION
        if upload is not None:
            log.info("provision: sending %s", upload.what())
        completed: SetupCompleted = await run_step(step_name, "access token", do_auth)
        progress_log.finish()
        log.info(
            "authenticated to vault %s: %s, runtime %s, boot %s",
            vault.name,
            completed.complete.vm_state.name.lower(),
            completed.complete.runtime_status.name.lower().replace("_", " "),
            completed.complete.boot_id[:12],
        )
    except ConnectionLost as exc:
        channel.close_now()
        if channel.refused_by_peer:
            raise ServerBusy(f"{host}:{port} is busy: {exc.message}") from None
        raise
    except BaseException:
        channel.close_now()
        raise
    return VaultConnection(
        vault=vault,
        channel=channel,
        attestation=attestation,
        claims=claims,
        fingerprint=fingerprint,
        vm_state=completed.complete.vm_state,
        runtime_status=completed.complete.runtime_status,
        boot_id=completed.complete.boot_id,
        timings=timings,
        notes=completed.complete.notes,
        settled=settle[0] if settle else None,
    )


def host_mode_refusal(name: str) -> ProvisionError:
    """A host-mode vault has no rootfs: refused before anything is sent, with the fix."""
    return ProvisionError(
        f"vault '{name}' runs in host mode (commands run directly on its machine, without a "
        "rootfs): there is no rootfs to reprovision",
        hint="to run a rootfs on the local dev vault: fly-vault local down, then (as root) "
        "fly-vault local up --rootfs IMAGE",
    )


def rootfs_options(vault: VaultConfig) -> RootfsOptions:
    """The entry's rootfs options, sent with its rootfs."""
    return RootfsOptions(vault.rootfs_allow_devices, vault.rootfs_max_expansion_ratio)


#: The fingerprint record is history, not trust: refreshing it at most this often spares
#: every connect a locked, fsynced rewrite of the cache file.
RECORD_REFRESH_SECONDS = 3600.0


def _record(cache: Any, vault: VaultConfig, machine_id: str, fingerprint: str) -> None:
    seen = cache.lookup(vault.org, vault.app, machine_id, fingerprint)
    if seen is None or time.time() - seen.verified_at >= RECORD_REFRESH_SECONDS:
        cache.record_verified(vault.org, vault.app, machine_id, fingerprint)


class _RootfsUpload:
    """Streams a local rootfs archive in chunks; never holds it in memory."""

    def __init__(self, source: object, progress: Progress | None) -> None:
        from flyvault.config import RootfsFile

        self.source = source
        self.progress = progress
        self.sent = 0
        self.started = 0.0
        self.elapsed = 0.0
        if isinstance(source, RootfsFile):
            try:
                self.size = source.path.stat().st_size
            except OSError as exc:
                raise ProvisionError(
                    f"cannot read rootfs {source.path}: {exc.strerror}",
                    hint="check the rootfs path in the vault's config entry",
                ) from None
            if self.size == 0:
                raise ProvisionError(f"rootfs {source.path} is empty")
        else:
            self.size = 0

    def request(self) -> RootfsSource:
        from flyvault.config import RootfsFile

        if isinstance(self.source, RootfsFile):
            return RootfsInline(self.size)
        return RootfsUrl(self.source.url)  # type: ignore[attr-defined]

    async def send(self, control: ControlClient, stream: QuicStream) -> ControlEvent | None:
        """Upload the archive while listening to the vault; returns its answer if that came
        first. The vault unpacks as the archive arrives and may refuse it halfway (device
        node, bomb, full volume): it then stops reading, so a sender that did not listen
        would wait forever on flow control."""
        import asyncio

        sender = asyncio.ensure_future(self._send_chunks(control, stream))
        listener = asyncio.ensure_future(_answer_during_upload(control, stream))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
            if listener.done():
                sender.cancel()
                await asyncio.wait({sender})  # no chunk is written after this
                if not sender.cancelled():
                    sender.exception()  # retrieved: the vault's answer says more
                return listener.result()
            sender.result()
            return None
        finally:
            sender.cancel()
            listener.cancel()  # a read in progress loses nothing

    async def _send_chunks(self, control: ControlClient, stream: QuicStream) -> None:
        import hashlib

        from flyvault.config import RootfsFile
        from flyvault.protocol.constants import ROOTFS_CHUNK_SIZE

        assert isinstance(self.source, RootfsFile)
        digest = hashlib.sha256()
        self.started = time.perf_counter()
        try:
            with open(self.source.path, "rb") as archive:
                while chunk := archive.read(min(ROOTFS_CHUNK_SIZE, self.size - self.sent)):
                    digest.update(chunk)
                    control.send_rootfs_chunk(chunk)
                    await stream.send(control.data_to_send())
                    self.sent += len(chunk)
                    if self.progress is not None:
                        self.progress("upload", self.sent, self.size)
        except OSError as exc:
            raise ProvisionError(f"cannot read rootfs {self.source.path}: {exc.strerror}") from None
        if self.sent != self.size:
            raise ProvisionError(
                f"rootfs {self.source.path} changed size while being sent "
                f"({self.sent} of {self.size} bytes)"
            )
        control.end_rootfs(digest.digest())
        await stream.send(control.data_to_send())
        self.elapsed = time.perf_counter() - self.started

    def what(self) -> str:
        if self.size:
            return f"rootfs {getattr(self.source, 'path', '?')} ({self.size} bytes) inline"
        return "rootfs_url (the vault downloads it)"

    def describe(self) -> str:
        if self.size:
            rate = self.size / self.elapsed / 1e6 if self.elapsed else 0.0
            return f"{self.size / 1e6:.1f} MB uploaded at {rate:.1f} MB/s"
        return "downloaded by the vault"


def _watch_settle(control: ControlClient, stream: QuicStream, name: str) -> asyncio.Future[None]:
    """After a provisioning's SETUP_COMPLETE: the end of the stream says the new workload
    stayed up through the vault's settle window, an error frame that the vault rolled back."""

    async def watch() -> None:
        while True:
            event = await _next_event(control, stream)
            if isinstance(event, StreamEnded):
                return
            if isinstance(event, ErrorReceived):
                raise event.error.to_exception()
            if not isinstance(event, ProgressReported):
                raise RemoteProtocolError(f"unexpected {type(event).__name__} after setup")

    def observed(task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, ProvisionError):
            log.warning("vault %s: %s", name, error)
        elif error is not None:
            log.debug("vault %s: the settle outcome was not received: %s", name, error)

    task = asyncio.ensure_future(watch())
    task.add_done_callback(observed)
    return task


async def _answer_during_upload(control: ControlClient, stream: QuicStream) -> ControlEvent:
    """The first event other than progress (which the upload's own progress line shows)."""
    while True:
        event = await _next_event(control, stream)
        if not isinstance(event, ProgressReported):
            return event


async def _next_event(control: ControlClient, stream: QuicStream) -> ControlEvent:
    while True:
        event = control.next_event()
        if event is not None:
            return event
        try:
            data = await stream.read()
        except ConnectionLost:
            raise
        except TransportError as exc:
            raise ConnectionLost(f"control stream failed: {exc}") from None
        if data:
            control.receive_data(data)
        else:
            control.receive_eof()
