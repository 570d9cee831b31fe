"""Open an attested, authenticated connection to a vault.

The order is the security property: QUIC handshake, then the attestation JWT is verified
against *this* connection's TLS exporter, the org/app/machine in the config and the issuer's
keys — and only after every check passed is the access token sent. Nothing cached can skip
a check; the caches only save network round trips (JWKS) or record history (fingerprints).

No printing here: progress goes to an optional ``ConnectObserver`` (the CLI's spinner and
``doctor`` use it; the MCP server turns it into progress notifications).
"""

from __future__ import annotations

import hashlib
import sys
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
    UploadReady,
)
from flyvault.protocol.messages import (
    Attestation,
    RootfsInline,
    RootfsNone,
    RootfsSource,
    RootfsUrl,
    SetupRequest,
)
from flyvault.transport import QuicChannel, QuicStream, TransportSettings, connect

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

    def open_stream(self, tag: StreamTag) -> QuicStream:
        stream = self.channel.open_stream()
        stream.write(bytes((tag,)))
        return stream

    @property
    def is_closed(self) -> bool:
        return self.channel.is_closed

    def close(self) -> None:
        """Close at once (no drain wait): right for one-shot commands."""
        self.channel.close_now()


def announce_issuer_override(vault: VaultConfig, stream: object = None) -> None:
    """The dev-only issuer override is always announced on stderr."""
    if vault.is_issuer_overridden:
        out = stream if stream is not None else sys.stderr
        print(
            f"fly-vault: note: '{vault.name}' is attested by the development issuer "
            f"{vault.issuer_base_url()}, not by Fly",
            file=out,  # type: ignore[arg-type]
        )


async def open_vault(
    vault: VaultConfig,
    *,
    observer: ConnectObserver | None = None,
    settings: TransportSettings | None = None,
    reprovision: bool = False,
    progress: Progress | None = None,
    provision: bool = True,
) -> VaultConnection:
    """Connect, verify the attestation, then authenticate. Raises a ``VaultError``."""
    from flyvault.attest import AttestationCache, AttestationVerifier, JwksCache

    obs: ConnectObserver = observer or _NullObserver()
    timings: dict[str, float] = {}

    async def run_step(name: str, detail: str, action):  # type: ignore[no-untyped-def]
        obs.step_started(name, detail)
        started = time.perf_counter()
        try:
            result, done_detail = await action()
        except VaultError as exc:
            obs.step_failed(name, time.perf_counter() - started, exc)
            raise
        elapsed = time.perf_counter() - started
        timings[name] = elapsed
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

    channel: QuicChannel = await run_step(STEP_HANDSHAKE, f"{host}:{port}{via}", do_handshake)
    try:
        certificate = channel.quic.peer_certificate_der()
        if certificate is None:
            raise AttestationError("the server presented no certificate")
        fingerprint = hashlib.sha256(certificate).hexdigest()
        control = ControlClient()
        stream = channel.open_stream()
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
            detail = (
                f"app {claims.app_name}, machine {claims.machine_id}"
                f"{' in ' + claims.region if claims.region else ''}; "
                f"{attestation.vm_state.name.lower()}, runtime "
                f"{attestation.runtime_status.name.lower().replace('_', ' ')}"
            )
            return (attestation, claims), detail

        attestation, claims = await run_step(STEP_ATTEST, vault.issuer_base_url(), do_attest)

        # Only now, with the attestation verified, does the token leave this machine.
        token = vault.require_access_token()
        source = None
        cold = attestation.vm_state is VmState.COLD
        if (cold and provision) or reprovision:
            source = vault.rootfs_source("reprovision" if reprovision else "cold boot")
        upload = _RootfsUpload(source, progress) if source is not None else None

        async def do_auth() -> tuple[SetupCompleted, str]:
            control.send_setup(SetupRequest(token, upload.request() if upload else RootfsNone()))
            stream.write(control.data_to_send())
            while True:
                event = await _next_event(control, stream)
                if isinstance(event, ProgressReported):
                    if progress is not None:
                        p = event.progress
                        progress(p.phase, p.done, p.total)
                    continue
                if isinstance(event, UploadReady) and upload is not None:
                    await upload.send(control, stream)
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
                    raise error
                if isinstance(event, SetupCompleted):
                    stream.write_eof()
                    what = "access token accepted"
                    if upload is not None:
                        what += f"; rootfs provisioned ({upload.describe()})"
                    return event, what
                raise RemoteProtocolError(f"unexpected {type(event).__name__} during setup")

        step_name = STEP_AUTH if upload is None else STEP_PROVISION
        completed: SetupCompleted = await run_step(step_name, "access token", do_auth)
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
    )


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

    async def send(self, control: ControlClient, stream: QuicStream) -> None:
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

    def describe(self) -> str:
        if self.size:
            rate = self.size / self.elapsed / 1e6 if self.elapsed else 0.0
            return f"{self.size / 1e6:.1f} MB uploaded at {rate:.1f} MB/s"
        return "downloaded by the vault"


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
