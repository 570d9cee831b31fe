"""The sans-I/O protocol core: bytes in, events out; no asyncio, sockets or clock reads.

The names below load on first use: importing a light submodule (``limits``, ``mux``) must
not pull in the codec and its dataclasses, because the keeper's thin CLI path uses them.
"""

from __future__ import annotations

import importlib
from typing import Any

_CODEC = ("Frame", "FrameDecoder", "PayloadReader", "PayloadWriter", "encode_frame")
_CONSTANTS = (
    "ALPN_PROTOCOLS",
    "CHANNEL_BINDING_LABEL",
    "CHANNEL_BINDING_LENGTH",
    "ERROR_FRAME",
    "MAX_PAYLOAD",
    "MAX_PREAUTH_PAYLOAD",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "RootfsKind",
    "RuntimeStatus",
    "StreamTag",
    "VmState",
)


def __getattr__(name: str) -> Any:
    if name in _CODEC:
        return getattr(importlib.import_module("flyvault.protocol.codec"), name)
    if name in _CONSTANTS:
        return getattr(importlib.import_module("flyvault.protocol.constants"), name)
    raise AttributeError(f"module 'flyvault.protocol' has no attribute {name!r}")


__all__ = sorted((*_CODEC, *_CONSTANTS))
