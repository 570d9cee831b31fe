"""The client API: the only way the CLI and the MCP server reach a vault (no printing here).

Light names (requests, events, diagnosis records, signal parsing, the protocol's value types
callers read) import at once; ``Vault``, the exec session and the copy engine, which pull in
asyncio, QUIC and crypto, load on first use, so ``fly-vault --help``, config errors and the
keeper's thin path (``flyvault.client.mux``) stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flyvault.client.exec_request import ExecRequest, new_session_id, valid_session_id
from flyvault.client.signals import parse_signal, signal_name

if TYPE_CHECKING:
    from flyvault.client.connection import VaultConnection
    from flyvault.client.copy_engine import (
        CopyEndpoint,
        CopyProgress,
        CopySummary,
        check_endpoints,
        copy,
        parse_endpoint,
    )
    from flyvault.client.diagnose import Diagnosis, DiagnosisStep
    from flyvault.client.events import ClientEvent, DevelopmentIssuer, OnEvent
    from flyvault.client.files import (
        EXPECT_ABSENT,
        FileInfo,
        FileKind,
        MemberDigest,
        ReadAnswer,
        RemoteFiles,
        TarPiece,
        TreeResult,
        WriteResult,
    )
    from flyvault.client.pipe import ByteSink, ByteSource, pipe_forward
    from flyvault.client.session import ExecHooks, ExecSession
    from flyvault.client.vault import (
        ReprovisionResult,
        SessionGone,
        SessionTakenOver,
        Vault,
    )
    from flyvault.protocol.console import Exited, Started

#: Names served from ``flyvault.client.vault`` on first use (it imports the transport).
_LAZY = {
    "ClientEvent": "flyvault.client.events",
    "DevelopmentIssuer": "flyvault.client.events",
    "OnEvent": "flyvault.client.events",
    "Diagnosis": "flyvault.client.diagnose",
    "DiagnosisStep": "flyvault.client.diagnose",
    "Exited": "flyvault.protocol.console",
    "Started": "flyvault.protocol.console",
    # The copy engine imports asyncio: loaded on first use, so the keeper's thin CLI path
    # (``flyvault.client.mux``), which imports this package, stays free of it.
    "CopyEndpoint": "flyvault.client.copy_engine",
    "CopyProgress": "flyvault.client.copy_engine",
    "CopySummary": "flyvault.client.copy_engine",
    "check_endpoints": "flyvault.client.copy_engine",
    "copy": "flyvault.client.copy_engine",
    "parse_endpoint": "flyvault.client.copy_engine",
    "ExecHooks": "flyvault.client.session",
    "ExecSession": "flyvault.client.session",
    "ReprovisionResult": "flyvault.client.vault",
    "SessionGone": "flyvault.client.vault",
    "SessionTakenOver": "flyvault.client.vault",
    "Vault": "flyvault.client.vault",
    "VaultConnection": "flyvault.client.connection",
    "EXPECT_ABSENT": "flyvault.client.files",
    "FileInfo": "flyvault.client.files",
    "FileKind": "flyvault.client.files",
    "MemberDigest": "flyvault.client.files",
    "ReadAnswer": "flyvault.client.files",
    "RemoteFiles": "flyvault.client.files",
    "TarPiece": "flyvault.client.files",
    "TreeResult": "flyvault.client.files",
    "WriteResult": "flyvault.client.files",
    "ByteSink": "flyvault.client.pipe",
    "ByteSource": "flyvault.client.pipe",
    "pipe_forward": "flyvault.client.pipe",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flyvault.client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "EXPECT_ABSENT",
    "ByteSink",
    "ByteSource",
    "ClientEvent",
    "CopyEndpoint",
    "CopyProgress",
    "CopySummary",
    "DevelopmentIssuer",
    "Diagnosis",
    "DiagnosisStep",
    "ExecHooks",
    "ExecRequest",
    "ExecSession",
    "Exited",
    "FileInfo",
    "FileKind",
    "MemberDigest",
    "OnEvent",
    "ReadAnswer",
    "RemoteFiles",
    "ReprovisionResult",
    "SessionGone",
    "SessionTakenOver",
    "Started",
    "TarPiece",
    "TreeResult",
    "Vault",
    "VaultConnection",
    "WriteResult",
    "check_endpoints",
    "copy",
    "new_session_id",
    "parse_endpoint",
    "parse_signal",
    "pipe_forward",
    "signal_name",
    "valid_session_id",
]
