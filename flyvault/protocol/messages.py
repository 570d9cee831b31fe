"""Control-stream messages and the error frame: typed values with strict encoders/decoders.

Decoders take one frame payload and either return a message or raise
``RemoteProtocolError``; they never echo payload bytes in the error text, because a payload
may hold an access token (flaw 4 of the original init server).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flyvault.errors import (
    LocalProtocolError,
    RemoteProtocolError,
    VaultError,
    exception_for,
    printable,
)
from flyvault.protocol.codec import PayloadReader, PayloadWriter
from flyvault.protocol.constants import (
    MAX_JWT_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_URL_LENGTH,
    RootfsKind,
    RuntimeStatus,
    VmState,
)

MAX_BOOT_ID_LENGTH = 128
SHA256_LENGTH = 32
#: Rootfs option flags (the optional block that ends a SETUP_REQUEST).
OPTION_ALLOW_DEVICES = 0x01
OPTION_MAX_EXPANSION_RATIO = 0x02
_KNOWN_OPTIONS = OPTION_ALLOW_DEVICES | OPTION_MAX_EXPANSION_RATIO
MAX_EXPANSION_RATIO = 0xFFFFFFFF
#: Bounds on the notes that may end a SETUP_COMPLETE.
MAX_SETUP_NOTES = 16
MAX_NOTE_LENGTH = 4096


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
        # printable: a message may name a command or a path whose bytes are not UTF-8.
        message = printable(self.message[:MAX_MESSAGE_LENGTH])
        return PayloadWriter().u16(self.code).text(message).getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> ErrorMessage:
        reader = PayloadReader(payload, "error frame")
        code = reader.u16("code")
        message = reader.text("message", MAX_MESSAGE_LENGTH)
        reader.end()
        return cls(code, message)

    @classmethod
    def from_exception(cls, exc: VaultError) -> ErrorMessage:
        """The error frame that refuses with ``exc``: the code its class declares."""
        return cls(exc.code, exc.message)

    def to_exception(self) -> VaultError:
        """The exception this error stands for on the receiving side (same declarations)."""
        return exception_for(self.code, self.message)


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
class RootfsOptions:
    """How the server may unpack the rootfs it receives; the defaults are the safe choice.

    ``allow_devices``: create character and block device nodes, and only under ``/dev``
    (refused by default). ``max_expansion_ratio``: None for the server's default ceiling,
    0 for none, N to refuse an archive that unpacks to more than N times its compressed
    size.
    """

    allow_devices: bool = False
    max_expansion_ratio: int | None = None

    @property
    def is_default(self) -> bool:
        return not self.allow_devices and self.max_expansion_ratio is None


@dataclass(frozen=True, slots=True)
class SetupRequest:
    """C->S: the access token, what to provision and how. ``repr`` hides the token.

    The rootfs options are an optional block at the end, left out when they are the
    defaults: such a request is byte for byte what clients without options send, and a
    request without the block means the defaults.
    """

    access_token: str
    rootfs: RootfsSource
    options: RootfsOptions = field(default_factory=RootfsOptions)

    def __repr__(self) -> str:
        return (
            f"SetupRequest(access_token=<redacted>, rootfs={self.rootfs!r}, "
            f"options={self.options!r})"
        )

    def encode(self) -> bytes:
        writer = PayloadWriter().text(self.access_token)
        rootfs = self.rootfs
        if isinstance(rootfs, RootfsNone):
            writer.u8(RootfsKind.NONE)
        elif isinstance(rootfs, RootfsInline):
            writer.u8(RootfsKind.INLINE).u64(rootfs.size)
        else:
            writer.u8(RootfsKind.URL).text(rootfs.url).optional_text(rootfs.sha256)
        options = self.options
        if not options.is_default:
            ratio = options.max_expansion_ratio
            flags = OPTION_ALLOW_DEVICES if options.allow_devices else 0
            if ratio is not None:
                if not 0 <= ratio <= MAX_EXPANSION_RATIO:
                    raise LocalProtocolError(
                        f"max expansion ratio {ratio} is outside 0..{MAX_EXPANSION_RATIO}"
                    )
                flags |= OPTION_MAX_EXPANSION_RATIO
            writer.u8(flags)
            if ratio is not None:
                writer.u32(ratio)
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
        options = RootfsOptions()
        if reader.remaining:
            flags = reader.u8("rootfs option flags")
            if flags & ~_KNOWN_OPTIONS:
                raise RemoteProtocolError(
                    f"setup request: unknown rootfs option flags 0x{flags & ~_KNOWN_OPTIONS:02x}"
                )
            ratio = None
            if flags & OPTION_MAX_EXPANSION_RATIO:
                ratio = reader.u32("max expansion ratio")
            options = RootfsOptions(bool(flags & OPTION_ALLOW_DEVICES), ratio)
        reader.end()
        return cls(token, rootfs, options)


def _is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True, slots=True)
class SetupComplete:
    """S->C: authenticated; the VM state and runtime after setup.

    ``notes``: lines about the provisioning the client shows (e.g. the device nodes that
    were created). An optional block at the end, sent only in answer to a request that
    carried rootfs options, so clients that know no options never see it.
    """

    vm_state: VmState
    runtime_status: RuntimeStatus
    boot_id: str
    notes: tuple[str, ...] = ()

    def encode(self) -> bytes:
        writer = PayloadWriter().u8(self.vm_state).u8(self.runtime_status).text(self.boot_id)
        if self.notes:
            notes = self.notes[:MAX_SETUP_NOTES]
            writer.u32(len(notes))
            for note in notes:
                writer.text(_clip(note, MAX_NOTE_LENGTH))
        return writer.getvalue()

    @classmethod
    def decode(cls, payload: bytes) -> SetupComplete:
        reader = PayloadReader(payload, "setup complete")
        state = VmState(_enum(reader, VmState, "vm state"))
        status = RuntimeStatus(_enum(reader, RuntimeStatus, "runtime status"))
        boot_id = reader.text("boot id", MAX_BOOT_ID_LENGTH)
        notes: tuple[str, ...] = ()
        if reader.remaining:
            count = reader.u32("note count")
            if count > MAX_SETUP_NOTES:
                raise RemoteProtocolError(
                    f"setup complete: {count} notes, more than the {MAX_SETUP_NOTES} allowed"
                )
            notes = tuple(reader.text("note", MAX_NOTE_LENGTH) for _ in range(count))
        reader.end()
        return cls(state, status, boot_id, notes)


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, on a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


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
