"""MCP forwards, reprovision, and the local vault tool, against real init processes.

The reprovision test runs a VM-mode init (root, busybox, namespaces) like
test_provision_e2e.py: a cold vault is provisioned through the tool with upload progress,
then reprovisioned with another rootfs while /root survives.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, run_async
from mcp import Client
from mcp_support import SECRETS, Session, configure_vault, mcp_server, text, vault

from flyvault.standins import OidcIssuer

__all__ = ["mcp_server", "vault"]

BUSYBOX = Path("/bin/busybox")


def run(server: Any, scenario: Any, timeout: float = 120) -> Any:
    async def main() -> Any:
        async with Client(server) as client:
            return await scenario(Session(client))

    return run_async(main(), timeout)


def test_forward_start_use_list_stop(mcp_server: Any, vault: str) -> None:
    async def scenario(s: Session) -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data.upper())
                await writer.drain()
            writer.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = target.sockets[0].getsockname()[1]
        try:
            started = await s.data(
                "forward", {"action": "start", "vault": vault, "remote_port": port}
            )
            [info] = started["forwards"]
            assert started["stopped"] == []
            assert info["local_address"].startswith("127.0.0.1:") and info["local_port"] > 0
            assert info["target"] == f"localhost:{port}"
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", info["local_port"])
                writer.write(b"through the vault")
                writer.write_eof()
                assert await reader.read() == b"THROUGH THE VAULT"
                writer.close()
            listing = await s.data("forward", {"action": "list"})
            [entry] = listing["forwards"]
            assert entry["forward_id"] == info["forward_id"] and entry["total_connections"] == 2

            refused = await s.call(
                "forward",
                {
                    "action": "start",
                    "vault": vault,
                    "remote_port": port,
                    "local_port": info["local_port"],
                },
                ok=False,
            )
            assert "already in use" in text(refused)

            by_vault = await s.data("forward", {"action": "list", "vault": vault})
            assert [f["forward_id"] for f in by_vault["forwards"]] == [info["forward_id"]]
            stopped = await s.data("forward", {"action": "stop", "forward_id": info["forward_id"]})
            assert stopped["stopped"] == [info["forward_id"]] and stopped["forwards"] == []
            assert (await s.data("forward", {"action": "list"}))["forwards"] == []
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", info["local_port"])
            missing = await s.call("forward", {"action": "stop", "forward_id": "t:1"}, ok=False)
            assert "no such forward" in text(missing)
            bare = await s.call("forward", {"action": "stop"}, ok=False)
            assert "needs forward_id, vault or local_port" in text(bare)
            no_port = await s.call("forward", {"action": "start", "vault": vault}, ok=False)
            assert "needs vault and remote_port" in text(no_port)
            bad_port = await s.call(
                "forward", {"action": "start", "vault": vault, "remote_port": 70000}, ok=False
            )
            assert "remote_port must be a port number from 1 to 65535" in text(bad_port)
        finally:
            target.close()
            await target.wait_closed()

    run(mcp_server, scenario)


def test_reprovision_needs_a_rootfs_and_confirmation(
    mcp_server: Any, init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    configure_vault(init_process, issuer)

    async def without_rootfs(s: Session) -> None:
        result = await s.call("reprovision", {"vault": "t", "confirm": True}, ok=False)
        assert "either rootfs path or rootfs_url is required for reprovision" in text(result)

    run(mcp_server, without_rootfs)
    image = tmp_path / "image.tar.gz"
    with tarfile.open(image, "w:gz"):
        pass
    configure_vault(init_process, issuer, rootfs=str(image))

    async def unconfirmed(s: Session) -> None:
        result = await s.call("reprovision", {"vault": "t"}, ok=False)
        message = text(result)
        assert "reprovision not started" in message and str(image) in message
        assert "confirm=true" in message and "/root and /home are kept" in message

    run(mcp_server, unconfirmed)


def _rootfs(path: Path, version: str) -> Path:
    tree = path.with_suffix(".tree")
    for sub in ("bin", "etc", "root", "tmp", "proc", "dev"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    for applet in ("sh", "cat", "echo", "sleep"):
        link = tree / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (tree / "etc/version").write_text(version + "\n")
    os.chmod(tree / "tmp", 0o1777)
    # Padding so the upload is big enough to report progress in several steps.
    (tree / "etc/padding").write_bytes(os.urandom(3 * 1024 * 1024))
    with tarfile.open(path, "w:gz") as archive:
        archive.add(tree, arcname=".")
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and pivot_root need root")
@pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_provision_cold_vault_then_reprovision_through_jobs(
    mcp_server: Any, vm_init: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    configure_vault(vm_init, issuer, name="vm", rootfs=str(_rootfs(tmp_path / "a.tar.gz", "A")))
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def cold(s: Session) -> None:
        status = await s.data("vault_status", {"vault": "vm"})
        assert status["ok"] is True and status["state"] == "cold"
        job = await s.data(
            "reprovision",
            {"vault": "vm", "confirm": True, "wait_seconds": 120},
            progress=on_progress,
        )
        assert job["ok"] is True and job["running"] is False, job
        assert job["result"]["provisioned_from_cold"] is True
        version = await s.data("exec", {"vault": "vm", "command": "cat /etc/version"})
        assert version["stdout"] == "A\n"
        await s.data("exec", {"vault": "vm", "command": "echo kept > /root/keep"})

    run(mcp_server, cold)
    assert any(m and "upload" in m for _, _, m in progress), progress
    configure_vault(vm_init, issuer, name="vm", rootfs=str(_rootfs(tmp_path / "b.tar.gz", "B")))

    async def again(s: Session) -> None:
        job = await s.data("reprovision", {"vault": "vm", "confirm": True, "wait_seconds": 0})
        assert job["running"] is True and "job_status" in job["next_step"]
        done = await s.data("job_status", {"job_id": job["job_id"], "wait_seconds": 120})
        assert done["ok"] is True, done
        result = done["result"]
        assert result["provisioned_from_cold"] is False
        assert result["old_boot_id"] != result["new_boot_id"]
        after = await s.data("exec", {"vault": "vm", "command": "cat /etc/version /root/keep"})
        assert after["stdout"].split() == ["B", "kept"]
        unknown = await s.call("job_status", {"job_id": "job-nope"}, ok=False)
        assert "job job-nope not found" in text(unknown)

    run(mcp_server, again)


def test_local_vault_tools_provision_a_vault_an_agent_can_use(mcp_server: Any) -> None:
    from flyvault import localvault

    async def scenario(s: Session) -> None:
        assert (await s.data("vault_status"))["local_vault"]["running"] is False
        up = await s.data("local_vault", {"action": "up", "name": "dev"})
        assert up["running"] and up["started_now"] and up["mode"] == "host"
        assert up["vault"] == "dev" and up["address"].startswith("127.0.0.1:")
        # The fresh token is in the config now: the scan covers it from here on.
        from flyvault.config import load_vault

        SECRETS.append(load_vault("dev").require_access_token())
        again = await s.data("local_vault", {"action": "up", "name": "dev"})
        assert again["started_now"] is False and again["pid"] == up["pid"]
        listing = await s.data("vault_status")
        assert [v["name"] for v in listing["vaults"]] == ["dev"]
        local = listing["local_vault"]
        assert local["running"] is True and local["pid"] == up["pid"]
        assert (local["address"], local["mode"]) == (up["address"], "host")
        status = await s.data("vault_status", {"vault": "dev"})
        assert status["ok"] and status["dev_issuer"] is True
        result = await s.data("exec", {"vault": "dev", "command": "echo hello from dev"})
        assert result["stdout"] == "hello from dev\n"
        down = await s.data("local_vault", {"action": "down"})
        assert down["running"] is False and down["pid"] == up["pid"]
        assert (await s.data("vault_status"))["local_vault"]["running"] is False
        gone = await s.call(
            "exec", {"vault": "dev", "command": "true", "wait_seconds": 5}, ok=False
        )
        # The hint is the tool call that starts it again, not the CLI command.
        assert (
            'hint: the local dev vault is not running: start it with local_vault(action="up")'
            in text(gone)
        )

    try:
        run(mcp_server, scenario)
    finally:
        localvault.down()
        SECRETS[:] = SECRETS[:1]


def test_forward_hints_name_the_forward_tool(mcp_server: Any) -> None:
    """A hint names a call the agent can make: forward(action=...), not a retired tool."""

    async def scenario(s: Session) -> None:
        missing = await s.call("forward", {"action": "stop", "forward_id": "t:1"}, ok=False)
        assert "no such forward" in text(missing)
        assert 'forward(action="list")' in text(missing), text(missing)

    run(mcp_server, scenario)
