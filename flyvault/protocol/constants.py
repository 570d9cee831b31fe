"""Wire constants: stream tags, frame types, limits, versions and error codes.

Integers on the wire are big-endian. Every stream starts with one tag byte written by the
client, then carries frames of the form ``u8 type | u32 length | payload``. Frame type
``0xFF`` is the error frame on every stream kind, so a refusal is never a silent close.
"""

from __future__ import annotations

import enum
from typing import Final

#: The error frame's codes are declared with the exception classes that carry them (one
#: declaration for both directions); re-exported here with the other wire constants.
from flyvault.errors import ErrorCode as ErrorCode

#: The protocol this code speaks. Version 1 was the Rust original (ALPN ``h3``); version 2
#: is this implementation: negotiated versions, coded error frames on every stream, bounded
#: frames and a chunked rootfs upload. Version 3 adds the reason to EXITED (why the vault
#: ended a session); a version 2 peer is still served, without it. Version 4 adds the
#: ``user`` of an exec session (console OPEN) and the file stream: a client never sends
#: either to an older server (it refuses the request itself, saying the vault's init needs
#: updating). Version 5 adds the read-only attach (the console OPEN's ``observe`` flag).
#: Version 6 adds the workload restart request (``SessionsFrame.RESTART``). Version 7 lets a
#: write's END carry the SHA-256 of the whole file. A peer outside the range gets a clear
#: refusal.
PROTOCOL_VERSION: Final = 7
MIN_PROTOCOL_VERSION: Final = 2
MAX_PROTOCOL_VERSION: Final = 7
#: The first version whose EXITED frame may carry a reason.
EXIT_REASON_VERSION: Final = 3
#: The first version whose console OPEN may name the user a new session runs as.
EXEC_USER_VERSION: Final = 4
#: The first version with the file stream (``StreamTag.FILES``): an older init would reset the
#: unknown stream, so the client refuses first, saying what to update.
FILES_VERSION: Final = 4
#: The first version whose console OPEN may ask for a read-only attach (``observe``).
OBSERVE_VERSION: Final = 5
#: The first version whose sessions stream takes RESTART (the workload stopped and started
#: again, a new boot id): an older init refuses the unknown frame, so the client asks first.
RESTART_VERSION: Final = 6
#: The first version whose write END may carry the SHA-256 of the whole file, computed while
#: the data went out (the vault checks it before the rename, as a ``sha256`` known up front):
#: a client then reads a file once, not once to hash and again to send.
END_DIGEST_VERSION: Final = 7

#: ALPN labels. The server accepts both: ``h3`` is what the original used as a bare label.
ALPN_PROTOCOLS: Final = ("fly-vault", "h3")

#: Label of the TLS exporter whose output is the attestation JWT's ``aud`` (hex encoded).
CHANNEL_BINDING_LABEL: Final = b"fly-vault-channel-binding"
CHANNEL_BINDING_LENGTH: Final = 32

FRAME_HEADER_SIZE: Final = 5

#: Largest payload accepted before the peer has authenticated. Enough for a setup request
#: (token, URL, checksum) and an attestation (JWT), small enough that an anonymous peer can
#: make us allocate nothing worth speaking of (flaw S4 of the original).
MAX_PREAUTH_PAYLOAD: Final = 64 * 1024

#: Largest payload accepted once the peer is authenticated (rootfs chunks, output chunks).
MAX_PAYLOAD: Final = 1024 * 1024

#: Size of the rootfs chunks the client sends (well under MAX_PAYLOAD).
ROOTFS_CHUNK_SIZE: Final = 256 * 1024

MAX_TOKEN_LENGTH: Final = 4096
MAX_URL_LENGTH: Final = 8192
MAX_JWT_LENGTH: Final = 32 * 1024
MAX_MESSAGE_LENGTH: Final = 16 * 1024

#: How long the server waits for the first bytes of a stream (its tag, then its opening
#: frame) before it drops or refuses the stream: they normally arrive in one packet.
REQUEST_TIMEOUT: Final = 10.0


class StreamTag(enum.IntEnum):
    """First byte of every client-opened bidirectional stream."""

    CONTROL = 0x01
    PORT_FORWARD = 0x02
    CONSOLE = 0x03
    EXEC_LIST = 0x04
    #: One file operation per stream (``flyvault.protocol.files``).
    FILES = 0x05


class ControlFrame(enum.IntEnum):
    REQUEST_ATTESTATION = 0x01
    ATTESTATION = 0x02
    SETUP_REQUEST = 0x03
    SETUP_COMPLETE = 0x04
    ROOTFS_CHUNK = 0x06
    ROOTFS_END = 0x07
    PROGRESS = 0x08
    #: S->C: the token matched, the inline upload may start (only then are the larger
    #: authenticated frames accepted).
    UPLOAD_READY = 0x09


#: The error frame type, the same on every stream kind.
ERROR_FRAME: Final = 0xFF


class VmState(enum.IntEnum):
    COLD = 0x00
    READY = 0x01


class RuntimeStatus(enum.IntEnum):
    NOT_STARTED = 0x00
    SYSTEM_INIT = 0x01
    FALLBACK_INIT = 0x02
    #: No namespaces: commands run directly on the host as the server's user (local dev
    #: vault without root). Reported so that the client can say so.
    HOST_MODE = 0x03


class RootfsKind(enum.IntEnum):
    NONE = 0x00
    INLINE = 0x01
    URL = 0x02
