"""A read-only attach (protocol 5) over real QUIC on 127.0.0.1, against a real init process.

A person's attached client and an onlooker (an agent following the session through
``read_output``) see the same output; the onlooker displaces no one and can send nothing.
Taking over to send input is explicit (``send_input``), and only then is the person's
client detached. The gate files make the command wait for the test instead of both sleeping.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from conftest import InitProcess, run_async, start_init, vault_entry
from mcp import Client
from mcp_support import Session, configure_vault, gate, mcp_server

from flyvault.client import ExecRequest
from flyvault.client.vault import ExecHooks, ExecSession, SessionTakenOver, Vault
from flyvault.errors import LocalProtocolError
from flyvault.standins import OidcIssuer

__all__ = ["mcp_server"]


def _script(flag: Path, lines: int = 5) -> tuple[str, ...]:
    """Print lines, wait for the test's flag (bounded), read one line of input, print more."""
    return (
        "sh",
        "-c",
        f"i=0; while [ $i -lt {lines} ]; do echo line$i; i=$((i+1)); done; {gate(flag)}; "
        "read reply; echo got:$reply; echo done",
    )


def _follower(vault: Vault, request: ExecRequest, out: bytearray) -> ExecSession:
    return ExecSession(vault, request, ExecHooks(stdout=out.extend, stderr=out.extend))


def test_an_onlooker_follows_beside_the_attached_client_and_sends_nothing(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    flag = tmp_path / "go"

    async def scenario() -> None:
        person, onlooker = (Vault(vault_entry(init_process.port, issuer)) for _ in range(2))
        try:
            seen_by_person, seen_by_onlooker = bytearray(), bytearray()
            request = ExecRequest("watched", _script(flag), keep=True)
            attached = _follower(person, request, seen_by_person)
            running = asyncio.ensure_future(attached.run())
            while b"line4" not in seen_by_person:  # bounded by run_async's timeout
                await asyncio.sleep(0.02)
            assert await onlooker.can_observe()
            watching = _follower(
                onlooker, ExecRequest.reattach("watched", 0, observe=True), seen_by_onlooker
            )
            observed = asyncio.ensure_future(watching.run())
            while b"line4" not in seen_by_onlooker:
                await asyncio.sleep(0.02)
            listing = {s["session_id"]: s for s in await person.list_sessions()}
            assert listing["watched"]["attached"] and listing["watched"]["observers"] == 1
            try:
                watching.send_stdin(b"from the onlooker\n")
                raise AssertionError("a read-only attach took input")
            except LocalProtocolError as exc:
                assert "read-only attach cannot send input" in str(exc)
            flag.touch()
            attached.send_stdin(b"from the person\n")
            exited, seen = await asyncio.gather(running, observed)
            assert exited.exit_status == 0 and seen.exit_status == 0
            for output in (seen_by_person, seen_by_onlooker):
                assert bytes(output).endswith(b"line4\ngot:from the person\ndone\n"), output
            assert bytes(seen_by_onlooker).startswith(b"line0\n")
        finally:
            await person.close()
            await onlooker.close()

    run_async(scenario(), timeout=90)


def test_read_output_leaves_a_person_attached_and_send_input_takes_over(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path, mcp_server: Any
) -> None:
    name = configure_vault(init_process, issuer)
    flag = tmp_path / "go"

    async def scenario(s: Session) -> None:
        person = Vault(vault_entry(init_process.port, issuer))
        try:
            seen_by_person = bytearray()
            request = ExecRequest("shared", _script(flag), keep=True)
            attached = _follower(person, request, seen_by_person)
            running = asyncio.ensure_future(attached.run())
            while b"line4" not in seen_by_person:
                await asyncio.sleep(0.02)
            args = {"vault": name, "session_id": "shared"}
            read = await s.data("read_output", {**args, "offset": 0, "pattern": "line4"})
            assert read["stdout"].startswith("line0\n") and read["running"] is True
            # The vault's own account: the person attached, the agent beside as an observer
            # (a takeover would show no observer, and the person's run would end).
            [shared] = [x for x in await person.list_sessions() if x["session_id"] == "shared"]
            assert shared["attached"] is True and shared["observers"] == 1, shared
            assert not running.done(), "read_output displaced the person's client"
            flag.touch()
            await s.data("send_input", {**args, "text": "from the agent\n"})  # takes over
            try:
                await running
                raise AssertionError("the person's client was not detached by the takeover")
            except SessionTakenOver:
                pass
            rest = await s.data("read_output", {**args, "wait_seconds": 30})
            assert "got:from the agent\ndone\n" in rest["stdout"] and rest["exit_code"] == 0
        finally:
            await person.close()

    async def main() -> None:
        async with Client(mcp_server) as client:
            await scenario(Session(client))

    run_async(main(), 90)


def test_an_agent_reads_the_head_of_a_cli_session_back_from_the_vaults_disk_log(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer
) -> None:
    """A named session the CLI ran wrote far past the vault's 128 KiB ring; an MCP server
    that never followed it reads its first line by offset (from the vault's disk log),
    with nothing reported dropped."""
    from flyvault.mcp_server.server import build_server

    init = start_init(tmp_path, fly_api.path, extra_args=("--session-buffer", "131072"))
    try:
        name = configure_vault(init, issuer, name="ringed")

        async def run_it() -> None:
            person = Vault(vault_entry(init.port, issuer, name="ringed"))
            try:
                seen = bytearray()
                script = "echo FIRST-LINE; head -c 1000000 /dev/zero | tr '\\0' y"
                request = ExecRequest("cli-job", ("sh", "-c", script), keep=True)
                assert (await _follower(person, request, seen).run()).exit_status == 0
                assert len(seen) == 11 + 1_000_000
            finally:
                await person.close()

        run_async(run_it(), timeout=60)

        async def read_head() -> None:
            async with Client(build_server()) as client:
                s = Session(client)
                args = {"vault": name, "session_id": "cli-job", "stream": "stdout"}
                head = await s.data("read_output", {**args, "offset": 0, "length": 11})
                assert (head["stdout"], head["dropped_bytes"]) == ("FIRST-LINE\n", 0), head
                end = await s.data("read_output", {**args, "offset": 1_000_000})
                assert end["running"] is False and end["exit_code"] == 0, end
                assert end["stdout"] == "y" * 11 and end["total_bytes"] == 1_000_011

        run_async(read_head(), timeout=60)
    finally:
        init.stop()
