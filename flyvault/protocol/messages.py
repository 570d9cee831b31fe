"""Control-stream messages and the error frame: typed values with strict encoders/decoders.

Decoders take one frame payload and either return a message or raise
``RemoteProtocolError``; they never echo payload bytes in the error text, because a payload
may hold an access token (flaw 4 of the original init server).
"""

from __future__ import annotations

from dataclasses import dataclass

from flyvault.errors import (
    AttestationError,
    AuthError,
    LocalProtocolError,
    NotFoundError,
    ProvisionError,
    RemoteError,
    RemoteProtocolError,
    UsageError,
    VaultError,
    VersionMismatch,
)
from flyvault.protocol.codec import PayloadReader, PayloadWriter
from flyvault.protocol.constants import (
    MAX_JWT_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_URL_LENGTH,
    ErrorCode,
    RootfsKind,
    RuntimeStatus,
    VmState,
)

MAX_BOOT_ID_LENGTH = 128
SHA256_LENGTH = 32


def _enum(reader: PayloadReader, enum_type: type[VmState] | type[RuntimeStatus], field: str) -> int:
    value = reader.u8(field)
    try:
        enum_type(value)
    except ValueError:
        raise RemoteProtocolError(f"invalid {field}: {value}") from None
    return value


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """The error frame: a code (one exception class each) and a human-readable message."""

    code: int
    message: str

    def encode(self) -> bytes:
        return PayloadWriter().u16(self.code).text(self.message[:MAX_MESSAGE_LENGTH]).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> ErrorMessage:
        reader = PayloadReader(payload, "error frame")
        code = reader.u16("code")
        message = reader.text("message", MAX_MESSAGE_LENGTH)
        reader.end()
        return cls(code, message)

    def to_exception(self) -> VaultError:
        """The exception this error stands for on the receiving side."""
        try:
            code = ErrorCode(self.code)
        except ValueError:
            return RemoteError(f"server error (code {self.code}): {self.message}")
        cls = _ERROR_CLASSES.get(code, RemoteError)
        return cls(self.message, hint=_ERROR_HINTS.get(code))


_ERROR_CLASSES: dict[ErrorCode, type[VaultError]] = {
    ErrorCode.PROTOCOL: RemoteProtocolError,
    ErrorCode.VERSION_MISMATCH: VersionMismatch,
    ErrorCode.AUTH_FAILED: AuthError,
    ErrorCode.RATE_LIMITED: AuthError,
    ErrorCode.NOT_AUTHENTICATED: AuthError,
    ErrorCode.PROVISION_FAILED: ProvisionError,
    ErrorCode.ATTESTATION_UNAVAILABLE: AttestationError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.UNSUPPORTED: RemoteError,
    ErrorCode.INTERNAL: RemoteError,
    ErrorCode.BUSY: RemoteError,
    ErrorCode.INVALID_REQUEST: UsageError,
    ErrorCode.CONNECT_FAILED: RemoteError,
    ErrorCode.TAKEN_OVER: RemoteError,
}

_ERROR_HINTS: dict[ErrorCode, str] = {
    ErrorCode.VERSION_MISMATCH: "install the same fly-vault version on the laptop and in the "
    "vault image (fly-vault build), then redeploy",
    ErrorCode.AUTH_FAILED: "check access_token in the vault's config entry; it must equal the "
    "ACCESS_TOKEN the machine was started with",
    ErrorCode.RATE_LIMITED: "too many wrong tokens from this address; wait and fix access_token",
    ErrorCode.ATTESTATION_UNAVAILABLE: "the machine could not mint a Fly OIDC token; is it "
    "running on Fly (the /.fly/api socket)?",
    ErrorCode.BUSY: "the vault is busy (another provisioning, or too many sessions); "
    "retry later or stop sessions with fly-vault kill",
    ErrorCode.NOT_FOUND: "list the vault's sessions with: fly-vault list-exec VAULT",
}


@dataclass(frozen=True, slots=True)
class RequestAttestation:
    """C->S: the protocol versions the client can speak."""

    min_version: int
    max_version: int

    def encode(self) -> bytes:
        return PayloadWriter().u16(self.min_version).u16(self.max_version).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> RequestAttestation:
        if not payload:
            # The Rust original (protocol 1) sends an empty request.
            return cls(1, 1)
        reader = PayloadReader(payload, "attestation request")
        low = reader.u16("minimum version")
        high = reader.u16("maximum version")
        reader.end()
        if low > high:
            raise RemoteProtocolError(f"attestation request: version range {low}..{high} is empty")
        return cls(low, high)


@dataclass(frozen=True, slots=True)
class Attestation:
    """S->C: the chosen version, the VM's state and a JWT bound to this connection."""

    protocol_version: int
    vm_state: VmState
    runtime_status: RuntimeStatus
    boot_id: str
    jwt: str

    def encode(self) -> bytes:
        return (
            PayloadWriter()
            .u16(self.protocol_version)
            .u8(self.vm_state)
            .u8(self.runtime_status)
            .text(self.boot_id)
            .text(self.jwt)
            .getvalue()
        )

    @classmethod
    def decode(cls, payload: bytes) -> Attestation:
        reader = PayloadReader(payload, "attestation")
        version = reader.u16("protocol version")
        state = VmState(_enum(reader, VmState, "vm state"))
        status = RuntimeStatus(_enum(reader, RuntimeStatus, "runtime status"))
        boot_id = reader.text("boot id", MAX_BOOT_ID_LENGTH)
        jwt = reader.text("jwt", MAX_JWT_LENGTH)
        reader.end()
        return cls(version, state, status, boot_id, jwt)


@dataclass(frozen=True, slots=True)
class RootfsNone:
    """Use the rootfs already on the volume."""


@dataclass(frozen=True, slots=True)
class RootfsInline:
    """The archive follows as ROOTFS_CHUNK frames, ``size`` bytes in all, then ROOTFS_END."""

    size: int


@dataclass(frozen=True, slots=True)
class RootfsUrl:
    """The server downloads the archive; ``sha256`` (hex) is checked when given."""

    url: str
    sha256: str | None = None


RootfsSource = RootfsNone | RootfsInline | RootfsUrl


@dataclass(frozen=True, slots=True)
class SetupRequest:
    """C->S: the access token and what to provision. ``repr`` hides the token."""

    access_token: str
    rootfs: RootfsSource

    def __repr__(self) -> str:
        return f"SetupRequest(access_token=<redacted>, rootfs={self.rootfs!r})"

    def encode(self) -> bytes:
        writer = PayloadWriter().text(self.access_token)
        rootfs = self.rootfs
        if isinstance(rootfs, RootfsNone):
            writer.u8(RootfsKind.NONE)
        elif isinstance(rootfs, RootfsInline):
            writer.u8(RootfsKind.INLINE).u64(rootfs.size)
        else:
            writer.u8(RootfsKind.URL).text(rootfs.url).optional_text(rootfs.sha256)
        return writer.getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> SetupRequest:
        reader = PayloadReader(payload, "setup request")
        token = reader.text("access token", MAX_TOKEN_LENGTH)
        kind = reader.u8("rootfs source kind")
        rootfs: RootfsSource
        if kind == RootfsKind.NONE:
            rootfs = RootfsNone()
        elif kind == RootfsKind.INLINE:
            rootfs = RootfsInline(reader.u64("inline rootfs size"))
        elif kind == RootfsKind.URL:
            url = reader.text("rootfs url", MAX_URL_LENGTH)
            digest = reader.optional_text("rootfs sha256", 64)
            if digest is not None and not _is_sha256_hex(digest):
                raise RemoteProtocolError("setup request: rootfs sha256 is not 64 hex digits")
            rootfs = RootfsUrl(url, digest)
        else:
            raise RemoteProtocolError(f"invalid rootfs source kind: {kind}")
        reader.end()
        return cls(token, rootfs)


def _is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True, slots=True)
class SetupComplete:
    """S->C: authenticated; the VM state and runtime after setup."""

    vm_state: VmState
    runtime_status: RuntimeStatus
    boot_id: str

    def encode(self) -> bytes:
        return (
            PayloadWriter().u8(self.vm_state).u8(self.runtime_status).text(self.boot_id).getvalue()
        )

    @classmethod
    def decode(cls, payload: bytes) -> SetupComplete:
        reader = PayloadReader(payload, "setup complete")
        state = VmState(_enum(reader, VmState, "vm state"))
        status = RuntimeStatus(_enum(reader, RuntimeStatus, "runtime status"))
        boot_id = reader.text("boot id", MAX_BOOT_ID_LENGTH)
        reader.end()
        return cls(state, status, boot_id)


@dataclass(frozen=True, slots=True)
class RootfsEnd:
    """C->S: the upload is complete; its SHA-256 lets the server check what it got."""

    sha256: bytes

    def encode(self) -> bytes:
        if len(self.sha256) != SHA256_LENGTH:
            raise LocalProtocolError("rootfs end needs a 32-byte SHA-256 digest")
        return self.sha256

    @classmethod
    def decode(cls, payload: bytes) -> RootfsEnd:
        if len(payload) != SHA256_LENGTH:
            raise RemoteProtocolError(
                f"rootfs end: expected a {SHA256_LENGTH}-byte digest, got {len(payload)} bytes"
            )
        return cls(payload)


@dataclass(frozen=True, slots=True)
class Progress:
    """S->C: provisioning progress, so long setups show life and can be timed."""

    phase: str
    done: int
    total: int

    def encode(self) -> bytes:
        return PayloadWriter().text(self.phase).u64(self.done).u64(self.total).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> Progress:
        reader = PayloadReader(payload, "progress")
        phase = reader.text("phase", 256)
        done = reader.u64("done")
        total = reader.u64("total")
        reader.end()
        return cls(phase, done, total)
