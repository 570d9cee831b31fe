"""``fly-vault-mcp --share-keeper``: the MCP server reaches a vault through the connection
keeper the CLI uses (started if none runs), so an agent's shell and its tools hold one
attested connection between them. Real init on 127.0.0.1, real keeper and CLI processes,
the MCP server in process through ``mcp.Client``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import APP, InitProcess, vault_entry
from mcp_support import Session, vault
from test_keeper import expected_paths, fv, pid_files, wait_for
from test_keeper_background import polled_status
from test_mcp_exec import run

from flyvault.standins import OidcIssuer

__all__ = ["vault"]  # a fixture, imported for pytest to find


def sharing_server(share: bool = True) -> Any:
    from flyvault.mcp_server.server import build_server, make_state

    return build_server(make_state(share_keeper=share))


async def echo(s: Session, vault_name: str, word: str) -> None:
    result = await s.data("exec", {"vault": vault_name, "argv": ["echo", word]})
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (0, f"{word}\n", ""), result


def test_the_mcp_server_and_the_cli_share_one_keeper_connection(vault: str) -> None:
    paths = expected_paths(vault)

    async def scenario(s: Session) -> dict[str, Any]:
        await echo(s, vault, "from-mcp")
        # The keeper the server started: it holds the one connection, and the server's
        # exec went through it.
        first, _ = polled_status(paths.socket)
        # Active: the server's lease (its held connect request), this status request, and
        # perhaps the exec's stream still ending.
        assert first["connects"] == 1 and first["active"] >= 2, first
        # A CLI call on the same vault goes through the same keeper and connection: the
        # keeper counts its request (and each status poll counts itself).
        before, _ = polled_status(paths.socket)
        cli = fv("exec", vault, "--", "echo", "from-cli")
        assert (cli.returncode, cli.stdout) == (0, b"from-cli\n"), cli.stderr
        after, _ = polled_status(paths.socket)
        assert after["requests"] - before["requests"] == 2, (before, after)
        assert (after["pid"], after["connects"]) == (first["pid"], 1)
        await echo(s, vault, "again")
        status = await s.data("vault_status", {"vault": vault})
        assert status["ok"] and status["reused_connection"], status
        # The attestation the keeper verified, as a direct connection reports it.
        assert status["claims"]["app_name"] == APP, status
        second, _ = polled_status(paths.socket)
        return {"first": first, "second": second}

    rows = run(sharing_server(), scenario)
    assert rows["second"]["pid"] == rows["first"]["pid"]
    assert rows["second"]["connects"] == 1


def test_finished_execs_through_the_keeper_leave_no_session_behind(vault: str) -> None:
    """Each exec acknowledges its exit through the keeper's relay (the stream stops
    reading but still delivers the EXIT_ACK), so the vault forgets the finished session
    at once instead of keeping it for an hour: 256 of them would refuse new execs."""

    async def scenario(s: Session) -> None:
        for n in range(5):
            await echo(s, vault, f"n{n}")

    run(sharing_server(), scenario)

    def none_left() -> bool:
        listed = fv("--no-mux", "list-exec", vault)
        assert listed.returncode == 0, listed.stderr
        return b"no exec sessions" in listed.stdout

    wait_for(none_left, "finished sessions stayed on the vault", timeout=15)


def test_vault_status_first_shares_the_keeper_and_a_fresh_check_keeps_it(vault: str) -> None:
    paths = expected_paths(vault)

    async def scenario(s: Session) -> None:
        status = await s.data("vault_status", {"vault": vault})
        assert status["ok"] and status["claims"]["app_name"] == APP, status
        assert "connection keeper" in status["steps"][1]["detail"], status["steps"]
        fresh = await s.data("vault_status", {"vault": vault, "fresh": True})
        assert fresh["ok"] and not fresh["reused_connection"], fresh
        await echo(s, vault, "still-shared")
        row, _ = polled_status(paths.socket)
        # One connection, the keeper's: the status checks did not replace it.
        assert row["connects"] == 1 and row["active"] >= 2, (
            row
        )  # the lease and this poll (and a stream ending)

    run(sharing_server(), scenario)


def test_a_keeper_is_given_no_secrets_and_is_not_named_after_them(
    vault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = expected_paths(vault)
    secrets = {
        "FLY_VAULT_MCP_TOKEN": "mcp-bearer-token-0123456789",
        "FLY_API_TOKEN": "fly-api-token-0123456789",
        "FLY_VAULT_ACCESS_TOKEN": "tenant-token-0123456789",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    # The server (holding the secrets) and a shell without them share one keeper.
    assert expected_paths(vault) == plain

    async def scenario(s: Session) -> None:
        await echo(s, vault, "one")

    run(sharing_server(), scenario)
    pid = json.loads(plain.pid.read_text())["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    for name, value in secrets.items():
        assert name.encode() not in environ and value.encode() not in environ


def test_without_the_flag_the_server_starts_no_keeper(vault: str) -> None:
    async def scenario(s: Session) -> None:
        await echo(s, vault, "direct")

    run(sharing_server(False), scenario)
    assert pid_files() == []


def test_a_stopped_keeper_leaves_the_server_working_directly(vault: str) -> None:
    paths = expected_paths(vault)

    async def scenario(s: Session) -> None:
        await echo(s, vault, "one")
        wait_for(paths.pid.exists, "no keeper was started")
        pid = json.loads(paths.pid.read_text())["pid"]
        stopped = fv("mux", "stop", vault)
        assert stopped.returncode == 0, stopped.stderr
        wait_for(lambda: not paths.socket.exists(), "the keeper did not stop")
        # The keeper was this process's child (the server runs in it): reaped, no zombie.
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the stopped keeper was not reaped")
        await echo(s, vault, "two")  # reconnects, directly
        assert pid_files() == []

    run(sharing_server(), scenario)


def test_mux_false_and_mux_off_keep_the_server_direct(
    init_process: InitProcess, issuer: OidcIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="nomux", mux=False))
    save_vault(vault_entry(init_process.port, issuer, name="t"))

    async def scenario(s: Session) -> None:
        await echo(s, "nomux", "config-says-no")

    run(sharing_server(), scenario)
    assert expected_paths("nomux").off.exists()  # the keeper read mux = false and left
    assert pid_files() == []

    monkeypatch.setenv("FLY_VAULT_MUX", "0")

    async def switched_off(s: Session) -> None:
        await echo(s, "t", "variable-says-no")

    run(sharing_server(), switched_off)
    assert pid_files() == []


def test_a_bad_mux_variable_is_refused_when_the_server_starts(tmp_path: Path) -> None:
    env = {"FLY_VAULT_MUX": "sometimes", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "flyvault.mcp_server.main", "--share-keeper"],
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert b"FLY_VAULT_MUX='sometimes' is not valid" in result.stderr
    assert b"hint:" in result.stderr


def test_the_flag_is_in_the_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flyvault.mcp_server.main", "--help"],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0 and b"--share-keeper" in result.stdout
