"""Vault tools: list_vaults, vault_status, exec, read_output, send_input, signal,
list_sessions, forward_start, forward_stop, forward_list."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ToolAnnotations
from pydantic import Field

from flyvault.client import (
    ExecRequest,
    new_session_id,
    parse_signal,
    signal_name,
    valid_session_id,
)
from flyvault.errors import UsageError

from .models import (
    ExecResult,
    ForwardInfo,
    ForwardList,
    ForwardStopped,
    SendInputResult,
    SessionList,
    SignalResult,
    VaultList,
    VaultStatus,
)
from .progress import Reporter
from .registry import ToolRegistry
from .server import State, structured

MAX_WAIT = 600.0
MIN_OUTPUT = 1024
MAX_OUTPUT = 1024 * 1024

VaultName = Annotated[str, Field(description="vault name from list_vaults")]
SessionId = Annotated[str, Field(description="session id from exec or list_sessions")]
WaitSeconds = Annotated[
    float,
    Field(
        ge=0,
        le=MAX_WAIT,
        description="wait at most this long, then return (still running: running=true)",
    ),
]
MaxOutput = Annotated[
    int,
    Field(
        ge=MIN_OUTPUT,
        le=MAX_OUTPUT,
        description="cap on output bytes in this result; head and tail are kept",
    ),
]
UntilArg = Annotated[
    Literal["exit", "output"],
    Field(description='"exit": return at exit; "output": return as soon as new output arrives'),
]
PatternArg = Annotated[
    str | None, Field(description="also return once new output matches this regex")
]

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
#: Reads a vault (open world) without changing anything.
READS_VAULT = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=True)
#: Runs or changes something on a vault.
ACTS_ON_VAULT = ToolAnnotations(destructive_hint=True, open_world_hint=True)

#: The vault tools, in tools/list order; ``server.build_server`` registers them.
vault_tools = ToolRegistry()


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid pattern {pattern!r}: {exc}") from None


def exec_text(result: ExecResult) -> str:
    """What the model reads: one status line, the output, what to do next."""
    where = f"session {result.session_id} on vault {result.vault}"
    if result.running:
        state = f"still running after {result.elapsed_seconds:g} s"
    elif result.signal is not None:
        state = f"killed by {result.signal_name} (exit status {result.exit_status})"
    else:
        state = f"exited {result.exit_code}"
    if result.end_reason:
        state += f", ended by the vault: {result.end_reason}"
    if result.timed_out:
        state += ", stopped by timeout_seconds"
    span = f"output bytes {result.offset}-{result.next_offset} of {result.total_bytes}"
    if result.truncated:
        span += f", {result.omitted_bytes} left out (see marker)"
    if result.dropped_bytes:
        span += f", {result.dropped_bytes} no longer buffered"
    lines = [f"{where}: {state}; {span}"]
    if result.output:
        lines += ["-----", result.output.rstrip("\n"), "-----"]
    if result.next_step:
        lines.append(f"next: {result.next_step}")
    return "\n".join(lines)


@vault_tools.tool(READ_ONLY)
async def list_vaults(state: State) -> Annotated[CallToolResult, VaultList]:
    """List the vaults configured for this user (name, address, org/app, whether a token
    and a rootfs are set, whether a connection is open). Never shows a secret. Start
    here to find the vault name the other tools take."""
    return structured(state.pool.list())


@vault_tools.tool(READS_VAULT)
async def vault_status(
    state: State,
    vault: VaultName,
    fresh: Annotated[
        bool, Field(description="check with a new connection even if one is open")
    ] = False,
) -> Annotated[CallToolResult, VaultStatus]:
    """Check a vault step by step like `fly-vault doctor`: QUIC handshake, attestation
    (the attested app, machine, region, image), access token, then the state: "ready",
    or "cold" (never provisioned; the first exec or reprovision provisions it). Never
    provisions. On failure ok=false and the failing step says what to fix. Use it when
    a vault tool fails, or before the first exec on an unknown vault."""
    return structured(await state.pool.status(vault, fresh=fresh))


@vault_tools.tool(ACTS_ON_VAULT, name="exec")
async def exec_tool(
    state: State,
    ctx: Context,
    vault: VaultName,
    command: Annotated[str | None, Field(description="shell command line, run with sh -c")] = None,
    argv: Annotated[
        list[str] | None, Field(description="exact argv, no shell (instead of command)")
    ] = None,
    context: Annotated[
        str | None,
        Field(max_length=4096, description="why this runs (stored with the session)"),
    ] = None,
    cwd: Annotated[
        str | None,
        Field(description="working directory on the vault (absolute; default: the user's home)"),
    ] = None,
    env: Annotated[
        dict[str, str] | None,
        Field(description="environment variables set over the login's (NAME: value)"),
    ] = None,
    user: Annotated[
        str | None,
        Field(description="run as this account of the vault's /etc/passwd (default root)"),
    ] = None,
    stdin: Annotated[str | None, Field(description="text for standard input")] = None,
    stdin_open: Annotated[
        bool, Field(description="keep stdin open for send_input (default: closed)")
    ] = False,
    session_id: Annotated[
        str | None,
        Field(
            description="name the session (kept after exit; an existing session of "
            "that name is followed, never run twice)"
        ),
    ] = None,
    wait_seconds: WaitSeconds = 30.0,
    timeout_seconds: Annotated[
        float | None,
        Field(gt=0, description="stop the command (TERM, then KILL) after this long"),
    ] = None,
    until: UntilArg = "exit",
    pattern: PatternArg = None,
    max_output_bytes: MaxOutput = 32 * 1024,
    tty: Annotated[bool, Field(description="run in a PTY (merged output)")] = False,
) -> Annotated[CallToolResult, ExecResult]:
    """Run a command on a vault. Waits until it exits or wait_seconds (default 30)
    pass, then returns exit_code/signal/exit_status, the output (stdout and stderr
    merged, bounded: head and tail around a marker) and byte offsets. If it is still
    running, running=true: continue with read_output(session_id), stop it with signal.
    Long jobs: pass session_id and a small wait_seconds, then read_output. Servers: use
    pattern (e.g. "listening") to return once they are up. Cancelling this call stops
    the command. For shell syntax use command; for exact arguments use argv."""
    if (command is None) == (argv is None):
        raise UsageError("give exactly one of command (a shell line) or argv (a list)")
    full_argv = ("sh", "-c", command) if command is not None else tuple(argv or ())
    regex = _compile(pattern)
    named = session_id is not None
    request = ExecRequest(
        session_id=session_id if session_id else new_session_id("mcp"),
        argv=full_argv,
        pty=tty,
        keep=named,
        context=context,
        term="xterm-256color" if tty else "",
        rows=24 if tty else 0,
        cols=120 if tty else 0,
        cwd=cwd,
        env=tuple((env or {}).items()),
        user=user,
    )
    execs = state.execs
    async with Reporter(ctx) as reporter:
        record = await execs.start(
            vault,
            request,
            stdin=stdin.encode() if stdin else None,
            stdin_open=stdin_open,
            timeout=timeout_seconds,
            wait_seconds=wait_seconds,
        )
        since = record.cursor
        finished = False
        try:
            await execs.wait(
                record,
                since=since,
                wait_seconds=wait_seconds,
                until=until,
                pattern=regex,
                reporter=reporter,
            )
            finished = True
        finally:
            if not finished:
                execs.stop_in_background(record)
    result = execs.result(record, offset=since, length=None, max_bytes=max_output_bytes)
    return structured(result, exec_text(result))


@vault_tools.tool(READS_VAULT)
async def read_output(
    state: State,
    ctx: Context,
    vault: VaultName,
    session_id: SessionId,
    offset: Annotated[
        int | None,
        Field(
            description="absolute byte offset to read from (default: where the last "
            "result ended; negative: that many bytes before the end)"
        ),
    ] = None,
    length: Annotated[
        int | None, Field(ge=1, description="read at most this many bytes from offset")
    ] = None,
    wait_seconds: WaitSeconds = 30.0,
    until: UntilArg = "exit",
    pattern: PatternArg = None,
    max_output_bytes: MaxOutput = 32 * 1024,
) -> Annotated[CallToolResult, ExecResult]:
    """Read a session's output from an offset, waiting up to wait_seconds for the
    command to exit (until="output": for any new output; pattern: for a match). Use
    it to follow a command exec returned with running=true, to page through output a
    marker left out (offset + length), or to reattach to any session of the vault
    (also one started by the CLI or an earlier MCP server). Never stops the command."""
    regex = _compile(pattern)
    session_id = valid_session_id(session_id)
    execs = state.execs
    record = execs.get(vault, session_id)
    start = 0 if offset is None or offset < 0 else offset
    if record is None or (not record.following and record.exited is None):
        resume = record.buffer.end if record is not None else start
        record = await execs.attach(vault, session_id, resume)
    if offset is None:
        since = record.cursor
    elif offset < 0:
        since = max(0, record.buffer.end + offset)
    else:
        since = offset
    if length is None:
        async with Reporter(ctx) as reporter:
            await execs.wait(
                record,
                since=since,
                wait_seconds=wait_seconds,
                until=until,
                pattern=regex,
                reporter=reporter,
            )
    result = execs.result(record, offset=since, length=length, max_bytes=max_output_bytes)
    return structured(result, exec_text(result))


@vault_tools.tool(ACTS_ON_VAULT)
async def send_input(
    state: State,
    vault: VaultName,
    session_id: SessionId,
    text: Annotated[str, Field(description="text to write to stdin (add \\n for Enter)")] = "",
    eof: Annotated[bool, Field(description="then close stdin (end of input)")] = False,
) -> Annotated[CallToolResult, SendInputResult]:
    """Write text to the standard input of a running session (started with
    stdin_open=true; add tty=true for programs that want a terminal), optionally
    closing it. Read the reaction with read_output(until="output")."""
    record = await state.execs.send_input(vault, valid_session_id(session_id), text.encode(), eof)
    return structured(
        SendInputResult(
            vault=vault,
            session_id=record.session_id,
            sent_bytes=len(text.encode()),
            eof=eof,
            running=record.exited is None,
        )
    )


@vault_tools.tool(ACTS_ON_VAULT)
async def signal(
    state: State,
    vault: VaultName,
    session_id: SessionId,
    signal: Annotated[
        str, Field(description="TERM (default), INT, KILL, HUP, ... or a number 1-64")
    ] = "TERM",
) -> Annotated[CallToolResult, SignalResult]:
    """Send a signal to a session's process group (like `fly-vault kill`). Use it to
    stop a command; read_output then reports how it ended (128+N for signal N)."""
    signo = parse_signal(signal)
    sid = valid_session_id(session_id)
    await state.execs.signal(vault, sid, signo)
    name = signal_name(signo) or str(signo)
    return structured(SignalResult(vault=vault, session_id=sid, signal=signo, signal_name=name))


@vault_tools.tool(READS_VAULT)
async def list_sessions(state: State, vault: VaultName) -> Annotated[CallToolResult, SessionList]:
    """List a vault's exec sessions: running or exited (status, signal), command,
    context, output bytes, whether a client is attached, and the offset this server
    read up to. Includes finished sessions this server followed that the vault dropped."""
    return structured(await state.execs.list_sessions(vault))


@vault_tools.tool(ToolAnnotations(open_world_hint=True))
async def forward_start(
    state: State,
    vault: VaultName,
    remote_port: Annotated[int, Field(ge=1, le=65535, description="port on the vault side")],
    host: Annotated[
        str, Field(description="host as seen from the vault (localhost: the vault)")
    ] = "localhost",
    local_port: Annotated[
        int, Field(ge=0, le=65535, description="port on 127.0.0.1 here (0: any free)")
    ] = 0,
) -> Annotated[CallToolResult, ForwardInfo]:
    """Forward 127.0.0.1:local_port on this machine to host:remote_port as seen from
    the vault (a dev server, a database). The listener belongs to this MCP server and
    runs until forward_stop or the server exits; connect to local_address."""
    info = await state.forwards.start(vault, host, remote_port, local_port)
    return structured(info)


@vault_tools.tool(ToolAnnotations(idempotent_hint=True, open_world_hint=False))
async def forward_stop(
    state: State,
    forward_id: Annotated[str | None, Field(description="from forward_start")] = None,
    vault: Annotated[str | None, Field(description="stop all of this vault's")] = None,
    local_port: Annotated[int | None, Field(description="the local port")] = None,
) -> Annotated[CallToolResult, ForwardStopped]:
    """Stop forwards (their live connections are reset)."""
    stopped = await state.forwards.stop(forward_id, vault, local_port)
    return structured(ForwardStopped(stopped=stopped))


@vault_tools.tool(READ_ONLY)
async def forward_list(
    state: State,
    vault: Annotated[str | None, Field(description="only this vault's")] = None,
) -> Annotated[CallToolResult, ForwardList]:
    """List the forwards this MCP server runs, with live and total connection counts."""
    return structured(state.forwards.listing(vault))


__all__ = ["exec_text", "vault_tools"]
