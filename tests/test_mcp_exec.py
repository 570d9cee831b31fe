"""The MCP server's exec tools through ``mcp.Client`` in process, against a real init process
(host mode, real QUIC on 127.0.0.1, the Fly stand-ins).

Covers: the tool listing (annotations, output schemas), exit codes and signals, a command
longer than the wait read to its end, output over the cap (head, tail, marker, paging),
cancellation of a foreground call stopping the remote command, timeout_seconds, stdin,
early return on a pattern, list_sessions, connection reuse, errors with the CLI's text, and
the secret scrubber.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import TOKEN, run_async
from mcp import Client
from mcp_support import Session, gate, mcp_server, text, vault, wait_for_path

__all__ = ["mcp_server", "vault"]

DESTRUCTIVE = {
    "exec",
    "write_file",
    "edit_file",
    "copy_files",
    "send_input",
    "signal",
    "reprovision",
    "local_vault_down",
    "tenant_delete",
    "tenant_update_image",
}
READ_ONLY = {
    "list_vaults",
    "vault_status",
    "read_output",
    "read_file",
    "list_dir",
    "list_sessions",
    "forward_list",
    "job_status",
    "local_vault_status",
    "tenant_list",
    "tenant_usage_facts",
}


def run(server: Any, scenario: Any, mode: str = "auto", timeout: float = 90) -> Any:
    async def main() -> Any:
        async with Client(server, mode=mode) as client:
            return await scenario(Session(client))

    return run_async(main(), timeout)


def test_tool_listing_is_typed_annotated_and_compact(mcp_server: Any) -> None:
    async def scenario(s: Session) -> None:
        tools = {tool.name: tool for tool in (await s.client.list_tools()).tools}
        assert set(tools) >= DESTRUCTIVE | READ_ONLY
        for name, tool in tools.items():
            assert tool.description and len(tool.description) > 40, name
            assert tool.output_schema is not None, name
            assert tool.annotations is not None, name
            assert bool(tool.annotations.destructive_hint) == (name in DESTRUCTIVE), name
            assert bool(tool.annotations.read_only_hint) == (name in READ_ONLY), name
            assert '"title"' not in str(tool.input_schema).replace("'", '"'), name
        exec_schema = tools["exec"].input_schema
        assert exec_schema["required"] == ["vault"]
        assert exec_schema["properties"]["wait_seconds"]["default"] == 30.0
        assert "exit_code" in tools["exec"].output_schema["properties"]

    run(mcp_server, scenario)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_exec_exit_codes_signals_argv_stdin_cwd_env(mcp_server: Any, vault: str, mode: str) -> None:
    async def scenario(s: Session) -> None:
        listing = await s.data("list_vaults")
        assert [v["name"] for v in listing["vaults"]] == [vault]
        assert listing["vaults"][0]["access_token_set"] is True

        status = await s.data("vault_status", {"vault": vault})
        assert status["ok"] and status["state"] == "ready" and status["runtime"] == "host mode"
        assert status["claims"]["app_name"] == "test-app"
        assert [step["step"] for step in status["steps"]] == [
            "config",
            "handshake",
            "attestation",
            "authenticate",
        ]

        for code in (0, 1, 44, 255):
            result = await s.data("exec", {"vault": vault, "command": f"exit {code}"})
            assert (result["running"], result["exit_code"], result["exit_status"]) == (
                False,
                code,
                code,
            )
            assert result["signal"] is None and result["timed_out"] is False

        killed = await s.data("exec", {"vault": vault, "argv": ["sh", "-c", "kill -TERM $$"]})
        assert killed["exit_code"] is None and killed["signal"] == 15
        assert killed["signal_name"] == "SIGTERM" and killed["exit_status"] == 143

        args = ["a b", "", "$HOME", "'q'", "é✓"]
        script = "import sys, json; print(json.dumps(sys.argv[1:]))"
        echoed = await s.data(
            "exec", {"vault": vault, "argv": [sys.executable, "-c", script, *args]}
        )
        assert echoed["output"].strip() == __import__("json").dumps(args)

        piped = await s.data(
            "exec",
            {
                "vault": vault,
                "command": "cat; echo; pwd; echo $GREETING; echo oops >&2",
                "stdin": "from stdin",
                "cwd": "/tmp",
                "env": {"GREETING": "hello"},
                "context": "test: stdin, cwd and env",
            },
        )
        assert piped["output"].splitlines() == ["from stdin", "/tmp", "hello", "oops"]
        assert piped["total_bytes"] == len(piped["output"].encode())

        # cat with stdin closed (the default) ends at once instead of hanging.
        cat = await s.data("exec", {"vault": vault, "argv": ["cat"], "wait_seconds": 20})
        assert cat["exit_code"] == 0 and cat["elapsed_seconds"] < 10

    run(mcp_server, scenario, mode)


def test_second_exec_reuses_the_pooled_connection(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        for _ in range(5):
            await s.data("exec", {"vault": vault, "argv": ["true"]})
        assert mcp_server.state.pool._vaults[vault].connects == 1
        listing = await s.data("list_vaults")
        assert listing["vaults"][0]["connected"] is True
        status = await s.data("vault_status", {"vault": vault})
        assert status["reused_connection"] is True

    run(mcp_server, scenario)


def test_long_command_returns_a_handle_then_read_to_its_end(
    mcp_server: Any, vault: str, tmp_path: Path
) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    # The command moves on only when the test says so: no sleep decides what a read sees.
    middle, end = tmp_path / "middle", tmp_path / "end"

    async def scenario(s: Session) -> None:
        command = f"echo start; {gate(middle)}; echo middle; {gate(end)}; echo end; exit 7"
        first = await s.data(
            "exec",
            {
                "vault": vault,
                "command": command,
                "pattern": "start",
                "wait_seconds": 30,
                "context": "long job",
            },
        )
        assert first["running"] is True and first["exit_code"] is None
        assert first["output"] == "start\n" and first["next_offset"] == 6
        assert "read_output" in first["next_step"]
        sid = first["session_id"]

        sessions = await s.data("list_sessions", {"vault": vault})
        mine = [x for x in sessions["sessions"] if x["session_id"] == sid]
        assert mine and mine[0]["running"] and mine[0]["context"] == "long job"
        assert mine[0]["followed_here"] is True and mine[0]["read_offset"] == 6

        # The first read returns at new output (until="output"), the next one at exit.
        middle.touch()
        nxt = await s.data(
            "read_output",
            {"vault": vault, "session_id": sid, "until": "output", "wait_seconds": 30},
        )
        assert nxt["output"] == "middle\n" and nxt["running"] is True and nxt["offset"] == 6
        reading = asyncio.ensure_future(
            s.data(
                "read_output",
                {"vault": vault, "session_id": sid, "wait_seconds": 30},
                progress=on_progress,
            )
        )
        # Heartbeats while it waits (one every 2 s): let two arrive, then let the command end.
        deadline = asyncio.get_running_loop().time() + 30
        while len(progress) < 2:
            assert asyncio.get_running_loop().time() < deadline, progress
            assert not reading.done(), reading.result()
            await asyncio.sleep(0.05)
        end.touch()
        done = await reading
        assert done["running"] is False and done["exit_code"] == 7
        assert done["output"] == "end\n" and done["next_offset"] == done["total_bytes"] == 17

        whole = await s.data(
            "read_output", {"vault": vault, "session_id": sid, "offset": 0, "wait_seconds": 0}
        )
        assert whole["output"] == "start\nmiddle\nend\n"
        tail = await s.data(
            "read_output", {"vault": vault, "session_id": sid, "offset": -4, "wait_seconds": 0}
        )
        assert tail["output"] == "end\n"

    run(mcp_server, scenario)
    # Heartbeats while the last read waited, increasing.
    values = [p[0] for p in progress]
    assert len(values) >= 2 and values == sorted(values)
    assert any(p[2] and "running" in p[2] for p in progress)


def test_output_over_the_cap_keeps_head_and_tail_and_pages(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        result = await s.data(
            "exec",
            {"vault": vault, "command": "seq 1 100000", "max_output_bytes": 8192},
        )
        total = len("".join(f"{i}\n" for i in range(1, 100001)).encode())
        assert result["exit_code"] == 0 and result["total_bytes"] == total
        assert result["truncated"] is True
        assert result["returned_bytes"] <= 8192
        assert result["returned_bytes"] + result["omitted_bytes"] == total
        output = result["output"]
        assert output.startswith("1\n2\n3\n") and output.endswith("99999\n100000\n")
        marker = re.search(
            r"\[\.\.\. (\d+) bytes left out here \(offsets (\d+) to (\d+)\); read them with "
            r'read_output\(vault="t", session_id="([^"]+)", offset=(\d+), length=(\d+)\) \.\.\.\]',
            output,
        )
        assert marker is not None, output[3000:3500]
        omitted, first, last, sid, offset, length = marker.groups()
        assert int(omitted) == result["omitted_bytes"] == int(last) - int(first)
        assert (offset, length) == (first, omitted)
        # Lines are not cut: the head ends and the tail starts at a line boundary.
        head = output[: output.index("\n[... ")]
        assert head.endswith("\n") and head.splitlines()[-1].isdigit()

        # Page through the part that was left out, exactly as the marker says.
        page = await s.data(
            "read_output",
            {"vault": vault, "session_id": sid, "offset": int(first), "length": 4096},
        )
        assert page["offset"] == int(first) and page["next_offset"] == int(first) + 4096
        assert page["truncated"] is False and len(page["output"].encode()) == 4096
        assert page["output"].startswith(str(int(head.splitlines()[-1]) + 1) + "\n")

    run(mcp_server, scenario)


def test_cancelling_a_foreground_exec_stops_the_remote_command(
    mcp_server: Any, vault: str, tmp_path: Path
) -> None:
    running = tmp_path / "running"

    async def scenario(s: Session) -> None:
        async def call() -> None:
            await s.client.call_tool(
                "exec",
                {
                    "vault": vault,
                    "command": f"touch {shlex.quote(str(running))}; sleep 60",
                    "session_id": "cancel-me",
                    "wait_seconds": 50,
                },
            )

        # Cancelled once the command runs (not after a fixed time it may not have started in).
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call)
            await wait_for_path(running)
            tasks.cancel_scope.cancel()
        ended = await s.data(
            "read_output", {"vault": vault, "session_id": "cancel-me", "wait_seconds": 30}
        )
        assert ended["running"] is False and ended["signal"] == 15
        # The vault kept the named session, with how it ended.
        sessions = await s.data("list_sessions", {"vault": vault})
        kept = [x for x in sessions["sessions"] if x["session_id"] == "cancel-me"]
        assert kept and kept[0]["exit_status"] == 143 and kept[0]["on_vault"] is True

    run(mcp_server, scenario)


def test_timeout_signal_stdin_open_and_pattern(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        timed = await s.data(
            "exec",
            {
                "vault": vault,
                "command": "trap '' TERM; sleep 60",
                "timeout_seconds": 1,
                "wait_seconds": 20,
            },
        )
        # TERM is ignored: the grace period ends with KILL.
        assert timed["timed_out"] is True and timed["signal"] == 9 and timed["exit_status"] == 137

        cat = await s.data(
            "exec", {"vault": vault, "argv": ["cat"], "stdin_open": True, "wait_seconds": 0.2}
        )
        sid = cat["session_id"]
        assert cat["running"] is True
        sent = await s.data("send_input", {"vault": vault, "session_id": sid, "text": "ping\n"})
        assert sent["sent_bytes"] == 5 and sent["running"] is True
        echo = await s.data(
            "read_output",
            {"vault": vault, "session_id": sid, "until": "output", "wait_seconds": 10},
        )
        assert echo["output"] == "ping\n"
        await s.data("send_input", {"vault": vault, "session_id": sid, "eof": True})
        end = await s.data("read_output", {"vault": vault, "session_id": sid, "wait_seconds": 10})
        assert end["exit_code"] == 0

        closed = await s.data("exec", {"vault": vault, "argv": ["sleep", "30"], "wait_seconds": 0})
        refused = await s.call(
            "send_input",
            {"vault": vault, "session_id": closed["session_id"], "text": "x"},
            ok=False,
        )
        assert "stdin_open=true" in text(refused)
        sig = await s.data(
            "signal", {"vault": vault, "session_id": closed["session_id"], "signal": "INT"}
        )
        assert sig["signal"] == 2 and sig["signal_name"] == "SIGINT"
        gone = await s.data(
            "read_output", {"vault": vault, "session_id": closed["session_id"], "wait_seconds": 10}
        )
        assert gone["signal"] == 2 and gone["exit_status"] == 130

        server = await s.data(
            "exec",
            {
                "vault": vault,
                "command": "echo booting; sleep 1; echo 'listening on 8080'; sleep 30",
                "pattern": r"listening on \d+",
                "wait_seconds": 20,
            },
        )
        assert server["running"] is True and "listening on 8080" in server["output"]
        assert server["elapsed_seconds"] < 15  # at the match, not after the 20 s wait
        await s.data(
            "signal", {"vault": vault, "session_id": server["session_id"], "signal": "KILL"}
        )

    run(mcp_server, scenario)


def test_errors_are_tool_errors_with_the_cli_text(mcp_server: Any, vault: str, issuer: Any) -> None:
    async def scenario(s: Session) -> None:
        unknown = await s.call("exec", {"vault": "nope", "command": "true"}, ok=False)
        assert "vault nope not found" in text(unknown) and "hint: configured vaults: t" in text(
            unknown
        )

        both = await s.call("exec", {"vault": vault, "command": "true", "argv": ["true"]}, ok=False)
        assert "exactly one of command" in text(both)

        bad_id = await s.call(
            "read_output", {"vault": vault, "session_id": "no such id!"}, ok=False
        )
        assert "invalid session id" in text(bad_id)
        missing = await s.call("read_output", {"vault": vault, "session_id": "never-ran"}, ok=False)
        assert "exec session never-ran not found" in text(missing)
        assert "list_sessions" in text(missing)

        bad_wait = await s.call(
            "exec", {"vault": vault, "command": "true", "wait_seconds": -1}, ok=False
        )
        assert "wait_seconds" in text(bad_wait)

    run(mcp_server, scenario)

    # A wrong token: the connect step's error and hint come back as the tool error; the
    # status tool reports the failed step like doctor.
    from conftest import vault_entry

    from flyvault.config import load_vault, save_vault

    port = load_vault(vault).host_port()[1]
    save_vault(vault_entry(port, issuer, name=vault, token="wrong-token-0123456789"))

    async def wrong(s: Session) -> None:
        failed = await s.call("exec", {"vault": vault, "command": "true"}, ok=False)
        assert "access token verification failed" in text(failed)
        status = await s.data("vault_status", {"vault": vault})
        assert status["ok"] is False and status["exit_code"] == 6
        assert status["steps"][-1]["step"] == "authenticate" and not status["steps"][-1]["ok"]

    from flyvault.mcp_server.server import build_server

    run(build_server(), wrong)


def test_a_token_printed_by_a_command_is_scrubbed(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        from flyvault.paths import config_file

        # Host mode: the vault can read this machine's config file, token included.
        result = await s.data("exec", {"vault": vault, "argv": ["cat", str(config_file())]})
        assert "access_token" in result["output"] and "<redacted>" in result["output"]
        assert TOKEN not in result["output"]

    run(mcp_server, scenario)


def test_reattach_from_another_server_process_replays_by_offset(
    mcp_server: Any, vault: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"

    async def start(s: Session) -> str:
        first = await s.data(
            "exec",
            {
                "vault": vault,
                "command": f"echo one; {gate(go)}; echo two",
                "session_id": "job-x",
                "pattern": "one",
                "wait_seconds": 30,
            },
        )
        assert first["output"] == "one\n" and first["created"] is True
        return str(first["session_id"])

    sid = run(mcp_server, start)
    from flyvault.mcp_server.server import build_server

    async def follow(s: Session) -> None:
        # A new server (say after a restart) reads the same session from offset 4.
        go.touch()
        rest = await s.data(
            "read_output", {"vault": vault, "session_id": sid, "offset": 4, "wait_seconds": 30}
        )
        assert rest["output"] == "two\n" and rest["exit_code"] == 0
        # exec with the same name never runs the command twice.
        again = await s.data(
            "exec", {"vault": vault, "command": "echo NEW", "session_id": sid, "wait_seconds": 5}
        )
        assert again["created"] is False and "NEW" not in again["output"]

    run(build_server(), follow)


def test_many_execs_on_one_connection(
    mcp_server: Any, vault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More execs than the vault's QUIC stream limit (128) over one pooled connection.

    Each exec's console stream must be fully closed by both sides, or the connection runs
    out of streams and exec number ~127 hangs."""
    from flyvault.mcp_server import sessions

    monkeypatch.setattr(sessions, "START_TIMEOUT", 3.0)

    async def scenario(s: Session) -> None:
        for _ in range(150):
            result = await s.data("exec", {"vault": vault, "argv": ["true"], "wait_seconds": 10})
            assert result["exit_code"] == 0

    async def bounded(s: Session) -> None:
        await asyncio.wait_for(scenario(s), 60)

    run(mcp_server, bounded)


def test_a_session_ended_by_the_vault_carries_the_reason(
    mcp_server: Any, vault: str, init_process: Any
) -> None:
    """Init shutting down ends its sessions deliberately: the result says why."""

    async def scenario(s: Session) -> None:
        first = await s.data(
            "exec",
            {
                "vault": vault,
                "command": "echo up; exec sleep 300",
                "pattern": "up",
                "wait_seconds": 30,
            },
        )
        assert first["running"] is True and first["end_reason"] is None
        await anyio.to_thread.run_sync(init_process.process.terminate)
        end = await s.call(
            "read_output", {"vault": vault, "session_id": first["session_id"], "wait_seconds": 30}
        )
        data = end.structured_content
        assert data["running"] is False and data["signal_name"] == "SIGHUP", data
        assert data["end_reason"] == "the vault is shutting down"
        assert "ended by the vault: the vault is shutting down" in text(end)

    run(mcp_server, scenario)


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="switching users needs root")
def test_exec_user_cwd_env_travel_in_the_protocol_not_the_shell(
    mcp_server: Any, vault: str
) -> None:
    async def scenario(s: Session) -> None:
        # argv, no shell: the user, directory and variables can only come from the request.
        ran = await s.data(
            "exec",
            {
                "vault": vault,
                "argv": ["sh", "-c", 'id -un; pwd; printf "%s\\n" "$GREETING"'],
                "user": "nobody",
                "cwd": "/tmp",
                "env": {"GREETING": "it's $not expanded"},
            },
        )
        assert ran["exit_code"] == 0, ran
        assert ran["output"].splitlines() == ["nobody", "/tmp", "it's $not expanded"]
        bad = await s.call("exec", {"vault": vault, "argv": ["true"], "cwd": "tmp"}, ok=False)
        assert "the working directory 'tmp' is not an absolute path" in text(bad)
        unknown = await s.call(
            "exec", {"vault": vault, "argv": ["true"], "user": "no-such-user-zz"}, ok=False
        )
        assert "no such user" in text(unknown)

    run(mcp_server, scenario)
