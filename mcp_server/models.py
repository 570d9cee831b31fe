"""Structured results of the MCP tools (their output schemas).

Field descriptions are kept short on purpose: every one of them is sent in ``tools/list``,
which an agent pays for in context. The full meaning is in references/mcp-tools.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from flyvault.localvault import LocalState


class VaultEntry(BaseModel):
    name: str
    address: str
    org: str
    app: str
    machine_id: str | None
    access_token_set: bool
    rootfs: str | None
    rootfs_url_set: bool
    forwards: list[str]
    via_proxy: bool
    dev_issuer: bool
    connected: bool


class VaultList(BaseModel):
    config_file: str
    vaults: list[VaultEntry]
    local_vault: LocalVault | None = None


class StatusStep(BaseModel):
    step: str
    ok: bool
    elapsed_ms: float
    detail: str
    hint: str | None = None


class Claims(BaseModel):
    app_name: str
    machine_id: str
    org_name: str | None
    machine_name: str | None
    region: str | None
    image: str | None
    image_digest: str | None


class VaultStatus(BaseModel):
    vault: str
    ok: bool
    state: str
    runtime: str | None
    boot_id: str | None
    claims: Claims | None
    dev_issuer: bool
    reused_connection: bool
    steps: list[StatusStep]
    error: str | None
    hint: str | None
    exit_code: int


class ExecResult(BaseModel):
    vault: str
    session_id: str
    created: bool | None
    running: bool
    exit_code: int | None
    signal: int | None
    signal_name: str | None
    exit_status: int | None
    #: Why the vault ended the session (it stopped, restarted or was reprovisioned).
    end_reason: str | None = None
    timed_out: bool
    #: Ran in a PTY: one stream, in stdout.
    tty: bool
    stdout: str
    stderr: str
    offset: int
    next_offset: int
    total_bytes: int
    stdout_bytes: int
    stderr_bytes: int
    omitted_bytes: int
    dropped_bytes: int
    elapsed_seconds: float
    next_step: str | None


# The fields of ``ExecResult`` published as exec's output schema: what agents branch on.
# The others (byte counts, offsets, timing) are in every result all the same (the schema
# does not forbid extra keys) and described in references/mcp-tools.md; listing them would
# cost every session's tools/list more than their types tell. (A comment, not a docstring:
# a docstring would be sent as the schema's description.)
class ExecResultSchema(BaseModel):
    vault: str
    session_id: str
    running: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    tty: bool
    stdout: str
    stderr: str
    next_offset: int
    dropped_bytes: int
    next_step: str | None


class SendInputResult(BaseModel):
    vault: str
    session_id: str
    sent_bytes: int
    eof: bool
    running: bool


class SignalResult(BaseModel):
    vault: str
    session_id: str
    signal: int
    signal_name: str


class SessionInfo(BaseModel):
    session_id: str
    kind: str
    argv: list[str] | None
    context: str | None
    running: bool
    exit_code: int | None
    signal: int | None
    exit_status: int | None
    end_reason: str | None = None
    started_at: float | None
    bytes: int
    attached: bool
    followed_here: bool
    read_offset: int | None
    on_vault: bool


class SessionList(BaseModel):
    vault: str
    sessions: list[SessionInfo]


class ForwardInfo(BaseModel):
    forward_id: str
    vault: str
    local_address: str
    local_port: int
    target: str
    active_connections: int
    total_connections: int


class ForwardList(BaseModel):
    forwards: list[ForwardInfo]
    #: forward(action="stop"): the ids stopped.
    stopped: list[str] = []


class Progress(BaseModel):
    phase: str
    done: int
    total: int


class JobResult(BaseModel):
    job_id: str
    kind: str
    target: str
    running: bool
    ok: bool | None
    elapsed_seconds: float
    progress: Progress | None
    result: dict[str, Any] | None
    error: str | None
    hint: str | None
    log: list[str]
    next_step: str | None


class LocalVault(BaseModel):
    running: bool
    started_now: bool | None = None
    vault: str | None = None
    pid: int | None = None
    address: str | None = None
    mode: str | None = None
    issuer_base_url: str | None = None
    data_dir: str | None = None
    log_file: str | None = None
    started_at: float | None = None
    next_step: str | None = None


class TenantMachine(BaseModel):
    id: str
    name: str | None
    state: str | None
    region: str | None
    image: str | None
    volumes: list[str]


class TenantSummary(BaseModel):
    tenant_id: str
    total: int
    started: int
    stopped: int
    other: int
    regions: list[str]
    image: str
    last_updated_at: str | None
    machines: list[TenantMachine]


class TenantList(BaseModel):
    app: str
    tenants: list[TenantSummary]


class UsageFacts(BaseModel):
    app: str
    facts: list[dict[str, Any]]


class FileRead(BaseModel):
    vault: str
    path: str
    size: int
    sha256: str
    binary: bool
    #: null when the file is binary and was not asked for as base64 (content is empty).
    encoding: str | None
    content: str
    #: text: the 1-based number of the first line returned (null when unknown).
    first_line: int | None
    lines: int
    #: null when the file was not read to its end.
    total_lines: int | None
    #: base64: the byte offset of the first byte returned.
    byte_offset: int | None
    returned_bytes: int
    truncated: bool
    next_offset: int | None
    next_step: str | None


class FileWritten(BaseModel):
    vault: str
    path: str
    size: int
    sha256: str
    replaced: bool


class FileEdited(BaseModel):
    vault: str
    path: str
    replacements: int
    size: int
    sha256: str
    diff: str


class DirEntry(BaseModel):
    name: str
    kind: str
    size: int
    mode: str
    mtime: str
    target: str | None


class DirListing(BaseModel):
    vault: str
    path: str
    entries: list[DirEntry]
    total: int
    truncated: bool


class CopyResult(BaseModel):
    vault: str
    direction: str
    source: str
    destination: str
    files: int
    dirs: int
    symlinks: int
    bytes: int
    seconds: float
    resumed_bytes: int
    verified: bool
    #: Local entries not sent (sockets, FIFOs, devices, symlink loops), with why.
    skipped: list[str]


def local_vault_info(state: LocalState | None, **extra: Any) -> LocalVault:
    """The local dev vault's state file as a result (not running: ``running=false``)."""
    if state is None:
        return LocalVault(running=False, **extra)
    return LocalVault(
        running=True,
        pid=state.pid,
        address=f"{state.host}:{state.port}",
        mode=state.mode,
        issuer_base_url=state.issuer_base_url,
        data_dir=state.data_dir,
        log_file=state.log_file,
        started_at=state.started_at,
        **extra,
    )


VaultList.model_rebuild()
