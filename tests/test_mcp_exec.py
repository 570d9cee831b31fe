"""The MCP server's exec tools through ``mcp.Client`` in process, against a real init process
(host mode, real QUIC on 127.0.0.1, the Fly stand-ins).

Covers: exit codes and signals, stdout and stderr apart, a command
longer than the wait read to its end, output over the cap (head, tail, marker, paging), the
head of an output larger than the memory buffer read back by offset, cancellation of a
foreground call stopping the remote command, timeout_seconds, stdin, early return on a
pattern, list_exec, a named session reused (same command: followed; another: refused), an
interactive shell (connect) read as plain text, connection reuse, errors with the CLI's
text (hints as tool calls), and the secret scrubber.
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


def run(server: Any, scenario: Any, mode: str = "auto", timeout: float = 90) -> Any:
    async def main() -> Any:
        async with Client(server, mode=mode) as client:
            return await scenario(Session(client))

    return run_async(main(), timeout)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_exec_exit_codes_signals_argv_stdin_cwd_env(mcp_server: Any, vault: str, mode: str) -> None:
    async def scenario(s: Session) -> None:
        listing = await s.data("vault_status")
        assert [v["name"] for v in listing["vaults"]] == [vault]
        assert listing["vaults"][0]["access_token_set"] is True
        assert listing["local_vault"]["running"] is False

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
        assert echoed["stdout"].strip() == __import__("json").dumps(args)
        assert echoed["stderr"] == ""

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
        assert piped["stdout"].splitlines() == ["from stdin", "/tmp", "hello"]
        assert piped["stderr"] == "oops\n"
        assert piped["stdout_bytes"] == len(piped["stdout"].encode())
        assert piped["stderr_bytes"] == len(piped["stderr"].encode())
        assert piped["total_bytes"] == piped["stdout_bytes"] + piped["stderr_bytes"]

        # cat with stdin closed (the default) ends at once instead of hanging.
        cat = await s.data("exec", {"vault": vault, "argv": ["cat"], "wait_seconds": 20})
        assert cat["exit_code"] == 0 and cat["elapsed_seconds"] < 10

    run(mcp_server, scenario, mode)


def test_stdout_and_stderr_come_back_apart(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        result = await s.call("exec", {"vault": vault, "command": "echo out; echo err >&2; exit 3"})
        data = result.structured_content
        assert (data["stdout"], data["stderr"], data["exit_code"]) == ("out\n", "err\n", 3)
        assert (data["stdout_bytes"], data["stderr_bytes"]) == (4, 4)
        assert data["tty"] is False and data["omitted_bytes"] == 0
        assert "output" not in data and "truncated" not in data and "returned_bytes" not in data
        # What the model reads: each stream under its own header.
        words = text(result)
        assert "----- stdout\nout" in words and "----- stderr\nerr" in words

    run(mcp_server, scenario)


def test_second_exec_reuses_the_pooled_connection(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        for _ in range(5):
            await s.data("exec", {"vault": vault, "argv": ["true"]})
        assert mcp_server.state.pool._vaults[vault].connects == 1
        listing = await s.data("vault_status")
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
        assert first["stdout"] == "start\n" and first["next_offset"] == 6
        assert first["stderr"] == "" and first["stdout_bytes"] == 6
        assert "read_output" in first["next_step"]
        sid = first["session_id"]

        sessions = await s.data("list_exec", {"vault": vault})
        mine = [x for x in sessions["sessions"] if x["session_id"] == sid]
        assert mine and mine[0]["running"] and mine[0]["context"] == "long job"
        assert mine[0]["followed_here"] is True and mine[0]["read_offset"] == 6

        # The first read returns at new output (until="output"), the next one at exit.
        middle.touch()
        nxt = await s.data(
            "read_output",
            {"vault": vault, "session_id": sid, "until": "output", "wait_seconds": 30},
        )
        assert nxt["stdout"] == "middle\n" and nxt["running"] is True and nxt["offset"] == 6
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
        assert done["stdout"] == "end\n" and done["next_offset"] == done["total_bytes"] == 17

        whole = await s.data(
            "read_output", {"vault": vault, "session_id": sid, "offset": 0, "wait_seconds": 0}
        )
        assert whole["stdout"] == "start\nmiddle\nend\n"
        tail = await s.data(
            "read_output", {"vault": vault, "session_id": sid, "offset": -4, "wait_seconds": 0}
        )
        assert tail["stdout"] == "end\n"

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
        assert result["omitted_bytes"] > 0 and result["dropped_bytes"] == 0
        assert result["stdout_bytes"] == total and result["stderr"] == ""
        output = result["stdout"]
        assert output.startswith("1\n2\n3\n") and output.endswith("99999\n100000\n")
        marker = re.search(
            r"\n\[\.\.\. (\d+) bytes left out here \(offsets (\d+) to (\d+)\); read them with "
            r'read_output\(vault="t", session_id="([^"]+)", offset=(\d+), length=(\d+), '
            r'stream="stdout"\) \.\.\.\]\n',
            output,
        )
        assert marker is not None, output[3000:3500]
        omitted, first, last, sid, offset, length = marker.groups()
        # One stream: the span of session offsets is exactly the bytes left out.
        assert int(omitted) == result["omitted_bytes"] == int(last) - int(first)
        assert (offset, length) == (first, omitted)
        returned = len(output.encode()) - len(marker.group(0).encode())
        assert returned <= 8192
        assert returned + result["omitted_bytes"] == total
        # Lines are not cut: the head ends and the tail starts at a line boundary.
        head = output[: output.index("\n[... ")]
        assert head.endswith("\n") and head.splitlines()[-1].isdigit()

        # Page through the part that was left out, exactly as the marker says.
        page = await s.data(
            "read_output",
            {
                "vault": vault,
                "session_id": sid,
                "offset": int(first),
                "length": 4096,
                "stream": "stdout",
            },
        )
        assert page["offset"] == int(first) and page["next_offset"] == int(first) + 4096
        assert page["omitted_bytes"] == 0 and len(page["stdout"].encode()) == 4096
        assert page["stdout_bytes"] == 4096
        assert page["stdout"].startswith(str(int(head.splitlines()[-1]) + 1) + "\n")

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
        sessions = await s.data("list_exec", {"vault": vault})
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
        assert echo["stdout"] == "ping\n"
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
        assert server["running"] is True and "listening on 8080" in server["stdout"]
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
        assert 'list_exec(vault="t")' in text(missing)

        # Out-of-range waits and output caps are clamped, not refused.
        clamped = await s.data(
            "exec",
            {"vault": vault, "command": "true", "wait_seconds": -1, "max_output_bytes": 1},
        )
        assert clamped["session_id"] and clamped["elapsed_seconds"] < 10
        bad_timeout = await s.call(
            "exec", {"vault": vault, "command": "true", "timeout_seconds": 0}, ok=False
        )
        assert "timeout_seconds must be more than 0" in text(bad_timeout)
        long_context = await s.call(
            "exec", {"vault": vault, "command": "true", "context": "x" * 5000}, ok=False
        )
        assert "at most 4096" in text(long_context)

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
        assert "fly-vault doctor" not in text(failed)  # hints are tool calls, not commands
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
        assert "access_token" in result["stdout"] and "<redacted>" in result["stdout"]
        assert TOKEN not in result["stdout"]

    run(mcp_server, scenario)


def test_reattach_from_another_server_process_replays_by_offset(
    mcp_server: Any, vault: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"

    command = f"echo one; {gate(go)}; echo two"

    async def start(s: Session) -> str:
        first = await s.data(
            "exec",
            {
                "vault": vault,
                "command": command,
                "session_id": "job-x",
                "pattern": "one",
                "wait_seconds": 30,
            },
        )
        assert first["stdout"] == "one\n" and first["created"] is True
        return str(first["session_id"])

    sid = run(mcp_server, start)
    from flyvault.mcp_server.server import build_server

    async def follow(s: Session) -> None:
        # A new server (say after a restart) reads the same session from offset 4.
        go.touch()
        rest = await s.data(
            "read_output", {"vault": vault, "session_id": sid, "offset": 4, "wait_seconds": 30}
        )
        assert rest["stdout"] == "two\n" and rest["exit_code"] == 0
        # exec with the same name and command never runs the command twice.
        again = await s.data(
            "exec", {"vault": vault, "command": command, "session_id": sid, "wait_seconds": 5}
        )
        assert again["created"] is False and again["exit_code"] == 0
        assert "one" not in again["stdout"] and "two" not in again["stdout"]

    run(build_server(), follow)

    async def other_command(s: Session) -> None:
        # A third server knows the session only from the vault: another command under its
        # name is refused, not silently answered with the old command's output.
        refused = await s.call(
            "exec", {"vault": vault, "command": "echo NEW", "session_id": sid}, ok=False
        )
        words = text(refused)
        assert f"session {sid} already exists" in words and "echo NEW" in words, words
        assert f'read_output(vault="{vault}", session_id="{sid}")' in words, words

    run(build_server(), other_command)


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
        assert ran["stdout"].splitlines() == ["nobody", "/tmp", "it's $not expanded"]
        bad = await s.call("exec", {"vault": vault, "argv": ["true"], "cwd": "tmp"}, ok=False)
        assert "the working directory 'tmp' is not an absolute path" in text(bad)
        unknown = await s.call(
            "exec", {"vault": vault, "argv": ["true"], "user": "no-such-user-zz"}, ok=False
        )
        assert "no such user" in text(unknown)

    run(mcp_server, scenario)


def test_a_named_session_runs_once_and_refuses_another_command(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        sleeper = {"vault": vault, "command": "sleep 30", "session_id": "reuse-1"}
        first = await s.data("exec", {**sleeper, "wait_seconds": 0})
        assert first["created"] is True and first["running"] is True

        refused = await s.call(
            "exec",
            {"vault": vault, "command": "echo other", "session_id": "reuse-1"},
            ok=False,
        )
        words = text(refused)
        assert "session reuse-1 already exists on vault 't'" in words, words
        assert "sleep 30" in words and "echo other" in words, words
        assert 'read_output(vault="t", session_id="reuse-1")' in words, words

        sig = await s.data("signal", {"vault": vault, "session_id": "reuse-1", "signal": "TERM"})
        assert sig["signal"] == 15

        # The same command under the same name follows the session (now ended by the
        # signal); it does not start a second sleep.
        again = await s.data("exec", {**sleeper, "wait_seconds": 20})
        assert again["created"] is False and again["session_id"] == "reuse-1"
        assert again["running"] is False and again["signal"] == 15, again
        sessions = await s.data("list_exec", {"vault": vault})
        assert [x["session_id"] for x in sessions["sessions"]].count("reuse-1") == 1

    run(mcp_server, scenario)


def test_the_head_of_an_output_larger_than_the_memory_buffer_is_read_back(vault: str) -> None:
    """Memory keeps the newest 256 KiB of a session; the 6 MB before them go to a spill
    file, so offset 0 still reads the first line, and nothing counts as dropped."""
    from flyvault.mcp_server.server import build_server, make_state

    size = 6_000_000
    server = build_server(make_state(buffer_bytes=256 * 1024))

    async def scenario(s: Session) -> None:
        big = await s.data(
            "exec",
            {
                "vault": vault,
                "command": f"echo FIRST-LINE; head -c {size} /dev/zero | tr '\\0' 'x'",
                "wait_seconds": 60,
            },
        )
        assert big["running"] is False and big["exit_code"] == 0, big
        assert big["total_bytes"] == len("FIRST-LINE\n") + size
        assert big["omitted_bytes"] > 0 and big["dropped_bytes"] == 0
        assert big["stdout"].startswith("FIRST-LINE\nxxx") and big["stdout"].endswith("xxx")
        head = await s.data(
            "read_output",
            {
                "vault": vault,
                "session_id": big["session_id"],
                "offset": 0,
                "length": 20,
                "stream": "stdout",
            },
        )
        assert head["stdout"].startswith("FIRST-LINE"), head
        assert head["stdout"] == "FIRST-LINE\n" + "x" * 9
        assert head["dropped_bytes"] == 0 and (head["offset"], head["next_offset"]) == (0, 20)
        middle = await s.data(
            "read_output",
            {"vault": vault, "session_id": big["session_id"], "offset": 3_000_000, "length": 8},
        )
        assert middle["stdout"] == "x" * 8 and middle["dropped_bytes"] == 0

    run(server, scenario)


def test_connect_opens_a_shell_read_as_plain_text(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        shell = await s.data("connect", {"vault": vault})
        sid = shell["session_id"]
        assert sid.startswith("shell-") and shell["tty"] is True and shell["running"] is True
        seen = [shell]
        sent = await s.data(
            "send_input", {"vault": vault, "session_id": sid, "text": "echo $((6*7))\n"}
        )
        assert sent["running"] is True
        stdout = ""
        deadline = asyncio.get_running_loop().time() + 30
        while "42" not in stdout.splitlines():
            assert asyncio.get_running_loop().time() < deadline, stdout
            read = await s.data(
                "read_output",
                {"vault": vault, "session_id": sid, "pattern": "42", "wait_seconds": 10},
            )
            seen.append(read)
            stdout += read["stdout"]
            assert read["running"] is True, read
        await s.data("send_input", {"vault": vault, "session_id": sid, "text": "exit\n"})
        ended = shell
        while ended["running"]:
            assert asyncio.get_running_loop().time() < deadline + 30, ended
            ended = await s.data(
                "read_output", {"vault": vault, "session_id": sid, "wait_seconds": 10}
            )
            seen.append(ended)
        assert ended["exit_code"] == 0, ended
        for result in seen:
            # One stream (a PTY), as plain text: no control sequences, no carriage returns.
            assert result["tty"] is True and result["stderr"] == "", result
            assert "\x1b" not in result["stdout"] and "\r" not in result["stdout"], result

    run(mcp_server, scenario)


def test_the_instructions_name_only_real_tools_and_arguments() -> None:
    """Every snake_case name in the server's instructions is a tool, an argument (or an
    action value) of one, or a field of the exec result: an agent follows them literally."""
    from flyvault.mcp_server.server import build_server

    def enums(node: Any) -> set[str]:
        found: set[str] = set()
        if isinstance(node, dict):
            found |= {v for v in node.get("enum", ()) if isinstance(v, str)}
            for value in node.values():
                found |= enums(value)
        elif isinstance(node, list):
            for item in node:
                found |= enums(item)
        return found

    async def main() -> tuple[set[str], str]:
        async with Client(build_server(tenant_tool=True)) as client:
            known: set[str] = set()
            for tool in (await client.list_tools()).tools:
                known |= {tool.name, *tool.input_schema.get("properties", {})}
                known |= set((tool.output_schema or {}).get("properties", {}))
                known |= enums(tool.input_schema)
            return known, client.instructions or ""

    known, instructions = run_async(main(), 60)
    named = set(re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", instructions))
    assert named and not named - known, f"not tools or arguments: {sorted(named - known)}"
