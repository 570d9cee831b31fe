"""Vault tools: vault_status, connect, exec, read_output, send_input, signal,
list_exec, forward.

Argument descriptions are kept to what the name and type do not say: every word is sent in
tools/list on every agent session (budget: tests/test_mcp_tools_list.py). Meanings shared by
several tools (vault, session_id, offsets) are in the server's instructions."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import anyio.to_thread
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult
from pydantic import AfterValidator, Field

from flyvault import localvault
from flyvault.client import (
    ExecRequest,
    new_session_id,
    parse_signal,
    signal_name,
    valid_session_id,
)
from flyvault.errors import UsageError

from .hints import for_agent
from .models import (
    ExecResult,
    ExecResultSchema,
    ForwardList,
    SendInputResult,
    SessionList,
    SignalResult,
    VaultList,
    VaultStatus,
    local_vault_info,
)
from .progress import Reporter
from .registry import ToolRegistry
from .server import State, structured

MAX_WAIT = 600.0
MIN_OUTPUT = 1024
MAX_OUTPUT = 1024 * 1024
MAX_CONTEXT = 4096

VaultName = str
SessionId = str
#: Out-of-range waits and output caps are clamped, not refused (the server's instructions
#: say so): a limit in every schema would cost tools/list more than it tells.
WaitSeconds = Annotated[float, AfterValidator(lambda value: min(max(value, 0.0), MAX_WAIT))]
MaxOutput = Annotated[int, AfterValidator(lambda value: min(max(value, MIN_OUTPUT), MAX_OUTPUT))]
UntilArg = Literal["exit", "output"]
PatternArg = Annotated[str | None, Field(description="regex")]
RawArg = bool

#: The vault tools, in tools/list order; ``server.build_server`` registers them.
vault_tools = ToolRegistry()


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(
            f"pattern {pattern!r} is not a valid regular expression: {exc}",
            hint="fix the pattern (Python re syntax), or leave it out",
        ) from None


def check_port(name: str, port: int, *, lowest: int) -> None:
    if not lowest <= port <= 65535:
        raise UsageError(
            f"{name} must be a port number from {lowest} to 65535, not {port}",
            hint="0 picks any free port" if lowest == 0 else f"give the {name} to use",
        )


def _check_exec(context: str | None, timeout_seconds: float | None) -> None:
    if context is not None and len(context) > MAX_CONTEXT:
        raise UsageError(
            f"context is {len(context)} characters; at most {MAX_CONTEXT} are kept",
            hint="say in a sentence why the command runs",
        )
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise UsageError(
            f"timeout_seconds must be more than 0, not {timeout_seconds:g}",
            hint="leave it out to let the command run until it exits",
        )


def exec_text(result: ExecResult) -> str:
    """What the model reads: one status line, each stream, what to do next."""
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
    if result.omitted_bytes:
        span += f", {result.omitted_bytes} left out (see marker)"
    if result.dropped_bytes:
        span += f", {result.dropped_bytes} no longer kept"
    lines = [f"{where}: {state}; {span}"]
    streams = [("terminal" if result.tty else "stdout", result.stdout), ("stderr", result.stderr)]
    for name, text in streams:
        if text:
            lines += [f"----- {name}", text.rstrip("\n")]
    if result.next_step:
        lines.append(f"next: {result.next_step}")
    return "\n".join(lines)


@vault_tools.tool("Vaults", read_only=True, destructive=False, idempotent=True, open_world=True)
async def vault_status(
    state: State,
    vault: str | None = None,
    fresh: bool = False,
) -> Annotated[CallToolResult, VaultStatus | VaultList]:
    """No vault: the vaults and the local dev vault. A vault: check it."""
    if vault is None:
        vaults = state.pool.list()
        running = await anyio.to_thread.run_sync(localvault.running_state)
        vaults.local_vault = local_vault_info(running)
        return structured(vaults)
    status = await state.pool.status(vault, fresh=fresh)
    for step in status.steps:
        step.hint = for_agent(step.hint, vault) if step.hint else None
    status.hint = for_agent(status.hint, vault) if status.hint else None
    return structured(status)


@vault_tools.tool("Shell", read_only=False, destructive=True, idempotent=False, open_world=True)
async def connect(
    state: State,
    ctx: Context,
    vault: VaultName,
    session_id: str | None = None,
    user: str | None = None,
    wait_seconds: WaitSeconds = 2.0,
) -> Annotated[CallToolResult, ExecResult]:
    """A login shell in a PTY: send_input types, read_output reads plain text."""
    request = ExecRequest(
        session_id=valid_session_id(session_id) if session_id else new_session_id("shell"),
        pty=True,
        shell=True,
        keep=True,
        term="xterm-256color",
        rows=40,
        cols=160,
        user=user,
    )
    execs = state.execs
    record = await execs.start(
        vault, request, stdin=None, stdin_open=True, timeout=None, wait_seconds=wait_seconds
    )
    since = record.cursor
    async with Reporter(ctx) as reporter:
        await execs.wait(
            record,
            since=since,
            wait_seconds=wait_seconds,
            until="output",  # the first output (the prompt), not the shell's exit
            pattern=None,
            reporter=reporter,
        )
    result = execs.result(record, offset=since, length=None, max_bytes=32 * 1024, opened=True)
    return structured(result, exec_text(result))


@vault_tools.tool(
    "Run command",
    read_only=False,
    destructive=True,
    idempotent=False,
    open_world=True,
    name="exec",
    output_schema=True,
)
async def exec_tool(
    state: State,
    ctx: Context,
    vault: VaultName,
    command: str | None = None,
    argv: list[str] | None = None,
    context: str | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    user: str | None = None,
    stdin: str | None = None,
    stdin_open: bool = False,
    session_id: str | None = None,
    wait_seconds: WaitSeconds = 30.0,
    timeout_seconds: float | None = None,
    until: UntilArg = "exit",
    pattern: PatternArg = None,
    max_output_bytes: MaxOutput = 32 * 1024,
    tty: bool = False,
) -> Annotated[CallToolResult, ExecResultSchema]:
    """Run command (sh -c) or argv until exit or wait_seconds; stdout, stderr apart,
    bounded. Cancel stops it."""
    _check_exec(context, timeout_seconds)
    if (command is None) == (argv is None):
        raise UsageError(
            "exec needs exactly one of command (a shell line) or argv (a list)",
            hint='e.g. command="make test", or argv=["ls", "-l"]',
        )
    full_argv = ("sh", "-c", command) if command is not None else tuple(argv or ())
    regex = _compile(pattern)
    request = ExecRequest(
        session_id=valid_session_id(session_id) if session_id else new_session_id("mcp"),
        argv=full_argv,
        pty=tty,
        keep=session_id is not None,
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
    result = execs.result(
        record, offset=since, length=None, max_bytes=max_output_bytes, opened=True
    )
    return structured(result, exec_text(result))


@vault_tools.tool(
    "Read output", read_only=True, destructive=False, idempotent=True, open_world=True
)
async def read_output(
    state: State,
    ctx: Context,
    vault: VaultName,
    session_id: SessionId,
    offset: int | None = None,
    length: Annotated[int | None, Field(ge=1)] = None,
    stream: Literal["stdout", "stderr"] | None = None,
    wait_seconds: WaitSeconds = 30.0,
    until: UntilArg = "exit",
    pattern: PatternArg = None,
    max_output_bytes: MaxOutput = 32 * 1024,
    raw: RawArg = False,
) -> Annotated[CallToolResult, ExecResult]:
    """Follow a session until exit, output or pattern, or read a part a marker left out.
    Read-only: an attached client stays."""
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
    else:  # a range: its bytes (a replay may still be on its way), not the command's end
        await execs.wait_for(record, since + length, wait_seconds)
    result = execs.result(
        record, offset=since, length=length, max_bytes=max_output_bytes, stream=stream, raw=raw
    )
    return structured(result, exec_text(result))


@vault_tools.tool(
    "Send input", read_only=False, destructive=True, idempotent=False, open_world=True
)
async def send_input(
    state: State,
    vault: VaultName,
    session_id: SessionId,
    text: str = "",
    eof: Annotated[bool, Field(description="then close stdin")] = False,
) -> Annotated[CallToolResult, SendInputResult]:
    """Write to a session's stdin (connect, or exec with stdin_open); takes over from an
    attached client."""
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


@vault_tools.tool("Signal", read_only=False, destructive=True, idempotent=False, open_world=True)
async def signal(
    state: State,
    vault: VaultName,
    session_id: SessionId,
    signal: str = "TERM",
) -> Annotated[CallToolResult, SignalResult]:
    """Signal a session: TERM, INT, KILL, HUP... or a number."""
    signo = parse_signal(signal)
    sid = valid_session_id(session_id)
    await state.execs.signal(vault, sid, signo)
    name = signal_name(signo) or str(signo)
    return structured(SignalResult(vault=vault, session_id=sid, signal=signo, signal_name=name))


@vault_tools.tool("Sessions", read_only=True, destructive=False, idempotent=True, open_world=True)
async def list_exec(state: State, vault: VaultName) -> Annotated[CallToolResult, SessionList]:
    """A vault's sessions: command, context, status, bytes."""
    return structured(await state.execs.list_sessions(vault))


@vault_tools.tool("Forwards", read_only=False, destructive=False, idempotent=False, open_world=True)
async def forward(
    state: State,
    action: Literal["start", "stop", "list"],
    vault: str | None = None,
    remote_port: int | None = None,
    host: str = "localhost",
    local_port: int | None = None,
    forward_id: str | None = None,
) -> Annotated[CallToolResult, ForwardList]:
    """start: 127.0.0.1:local_port to host:remote_port seen from the vault; stop; list."""
    if action == "start":
        if vault is None or remote_port is None:
            raise UsageError(
                'forward(action="start") needs vault and remote_port',
                hint='e.g. forward(action="start", vault="local", remote_port=8000)',
            )
        check_port("remote_port", remote_port, lowest=1)
        check_port("local_port", local_port or 0, lowest=0)
        info = await state.forwards.start(vault, host, remote_port, local_port or 0)
        return structured(ForwardList(forwards=[info]))
    if action == "stop":
        if forward_id is None and vault is None and local_port is None:
            raise UsageError(
                'forward(action="stop") needs forward_id, vault or local_port',
                hint='forward(action="list") shows them',
            )
        stopped = await state.forwards.stop(forward_id, vault, local_port)
        return structured(ForwardList(forwards=[], stopped=stopped))
    return structured(state.forwards.listing(vault))


__all__ = ["exec_text", "vault_tools"]
