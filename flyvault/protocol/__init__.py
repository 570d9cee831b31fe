"""The sans-I/O protocol core: bytes in, events out; no asyncio, sockets or clock reads."""

from flyvault.protocol.codec import Frame, FrameDecoder, PayloadReader, PayloadWriter, encode_frame
from flyvault.protocol.constants import (
    ALPN_PROTOCOLS,
    CHANNEL_BINDING_LABEL,
    CHANNEL_BINDING_LENGTH,
    ERROR_FRAME,
    MAX_PAYLOAD,
    MAX_PREAUTH_PAYLOAD,
    PROTOCOL_VERSION,
    ErrorCode,
    RootfsKind,
    RuntimeStatus,
    StreamTag,
    VmState,
)

__all__ = [
    "ALPN_PROTOCOLS",
    "CHANNEL_BINDING_LABEL",
    "CHANNEL_BINDING_LENGTH",
    "ERROR_FRAME",
    "MAX_PAYLOAD",
    "MAX_PREAUTH_PAYLOAD",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "PayloadReader",
    "PayloadWriter",
    "RootfsKind",
    "RuntimeStatus",
    "StreamTag",
    "VmState",
    "encode_frame",
]
