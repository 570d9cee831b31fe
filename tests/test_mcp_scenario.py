"""An agent's session, end to end: the Python MCP SDK drives the real ``fly-vault-mcp`` over
stdio against a local dev vault it starts itself (``local_vault``), as a coding agent would.

One scenario, each step checked: split streams, a 40-second job followed by offset with
nothing lost or duplicated, the first bytes of a 6 MB output read back by offset, an
interactive shell answering ``echo $((6*7))`` with a plain ``42``, a forward to a web server
on the vault, a binary file written and read back by SHA-256, a signal, list_exec, and a
reprovision refused without ``confirm``. (The same scenario from the TypeScript SDK:
tests/test_mcp_scenario_ts.py.)
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import sys
import urllib.request
from typing import Any

from conftest import run_async
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_support import Session, repo_root, text

VAULT = "local"


def _server() -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return StdioServerParameters(
        command=sys.executable, args=["-m", "flyvault.mcp_server.main"], env=env, cwd=repo_root()
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _follow(s: Session, session_id: str, *, calls: int = 30, **extra: Any) -> list[Any]:
    """read_output from where the last call ended until the session ends (bounded)."""
    results = []
    for _ in range(calls):
        result = await s.data("read_output", {"vault": VAULT, "session_id": session_id, **extra})
        results.append(result)
        if not result["running"]:
            return results
    raise AssertionError(f"session {session_id} still running after {calls} reads")


async def split_streams(s: Session) -> None:
    result = await s.data("exec", {"vault": VAULT, "command": "echo out; echo err >&2; exit 3"})
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("out\n", "err\n", 3)


async def long_job_followed_by_offset(s: Session) -> None:
    script = "i=0; while [ $i -lt 40 ]; do echo tick $i; i=$((i+1)); sleep 1; done"
    first = await s.data(
        "exec", {"vault": VAULT, "command": script, "session_id": "py-long", "wait_seconds": 2}
    )
    assert first["running"] is True
    rest = await _follow(s, "py-long", wait_seconds=10)
    seen = first["stdout"] + "".join(r["stdout"] for r in rest)
    assert seen == "".join(f"tick {i}\n" for i in range(40)), seen
    assert rest[-1]["exit_code"] == 0 and all(r["dropped_bytes"] == 0 for r in rest)
    offsets = [first["next_offset"], *(r["next_offset"] for r in rest)]
    assert offsets == sorted(offsets) and offsets[-1] == rest[-1]["total_bytes"]


async def head_of_a_large_output(s: Session) -> None:
    command = "echo FIRST-LINE; head -c 6000000 /dev/zero | tr '\\0' x; echo; echo LAST-LINE"
    big = await s.data(
        "exec",
        {"vault": VAULT, "command": command, "max_output_bytes": 4096, "wait_seconds": 120},
    )
    assert big["exit_code"] == 0 and big["total_bytes"] > 6_000_000 and big["omitted_bytes"] > 0
    assert big["stdout"].startswith("FIRST-LINE\n") and big["stdout"].endswith("LAST-LINE\n")
    head = await s.data(
        "read_output",
        {
            "vault": VAULT,
            "session_id": big["session_id"],
            "offset": 0,
            "length": 11,
            "stream": "stdout",
        },
    )
    assert (head["stdout"], head["dropped_bytes"]) == ("FIRST-LINE\n", 0)


async def interactive_shell(s: Session) -> None:
    shell = await s.data("connect", {"vault": VAULT})
    sid = shell["session_id"]
    await s.data("send_input", {"vault": VAULT, "session_id": sid, "text": "echo $((6*7))\n"})
    seen = ""
    for _ in range(20):  # bounded: each read waits for new output
        read = await s.data(
            "read_output",
            {"vault": VAULT, "session_id": sid, "until": "output", "wait_seconds": 5},
        )
        seen += read["stdout"]
        if "42" in seen.splitlines():
            break
    assert "42" in seen.splitlines(), seen
    assert "\x1b" not in seen and "\r" not in seen, repr(seen)
    await s.data("send_input", {"vault": VAULT, "session_id": sid, "text": "exit\n"})
    await _follow(s, sid, wait_seconds=10, calls=5)


async def forward_to_a_web_server(s: Session) -> None:
    port = _free_port()
    web = await s.data(
        "exec",
        {
            "vault": VAULT,
            "command": f"exec python3 -u -m http.server --bind 127.0.0.1 {port}",
            "session_id": "py-web",
            "wait_seconds": 20,
            "pattern": "Serving HTTP",
        },
    )
    assert web["running"] is True, web
    started = await s.data("forward", {"action": "start", "vault": VAULT, "remote_port": port})
    [info] = started["forwards"]
    url = f"http://127.0.0.1:{info['local_port']}/"

    def get() -> int:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)

    import anyio.to_thread

    assert await anyio.to_thread.run_sync(get) == 200
    stopped = await s.data("forward", {"action": "stop", "forward_id": info["forward_id"]})
    assert stopped["stopped"] == [info["forward_id"]]
    await s.data("signal", {"vault": VAULT, "session_id": "py-web", "signal": "TERM"})
    [*_, ended] = await _follow(s, "py-web", wait_seconds=10, calls=5)
    assert ended["signal_name"] == "SIGTERM" and ended["exit_status"] == 143, ended


async def binary_file_round_trip(s: Session) -> None:
    data = os.urandom(100 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    path = f"/tmp/py-scenario-{os.urandom(4).hex()}.bin"
    written = await s.data(
        "write_file",
        {
            "vault": VAULT,
            "path": path,
            "content": base64.b64encode(data).decode(),
            "encoding": "base64",
        },
    )
    assert written["sha256"] == digest and written["size"] == len(data)
    back, offset = bytearray(), 0
    for _ in range(10):  # bounded: each read returns at least one piece
        read = await s.data(
            "read_file",
            {"vault": VAULT, "path": path, "encoding": "base64", "offset": offset},
        )
        back += base64.b64decode(read["content"])
        if not read["truncated"]:
            break
        offset = read["next_offset"]
    assert hashlib.sha256(back).hexdigest() == digest == read["sha256"]
    await s.data("exec", {"vault": VAULT, "argv": ["rm", "-f", path]})


async def sessions_listed(s: Session) -> None:
    listing = await s.data("list_exec", {"vault": VAULT})
    by_id = {item["session_id"]: item for item in listing["sessions"]}
    assert by_id["py-long"]["running"] is False and by_id["py-long"]["exit_code"] == 0
    assert by_id["py-web"]["running"] is False and by_id["py-web"]["signal"] == 15


async def reprovision_needs_confirm(s: Session) -> None:
    """With a rootfs configured (the entry is all reprovision reads before asking), the
    call without confirm changes nothing and says what it would do."""
    from flyvault.config import VaultConfig, load_config, save_vault

    entry = load_config().vaults[VAULT]
    rootfs = repo_root() / "README.md"  # never used: the call is refused first
    save_vault(VaultConfig(**{**entry.to_toml(), "rootfs": str(rootfs)}, name=VAULT))
    refused = await s.call("reprovision", {"vault": VAULT}, ok=False)
    words = text(refused)
    assert "reprovision not started" in words and "confirm=true" in words, words
    assert str(rootfs) in words


def test_an_agent_session_from_the_python_sdk() -> None:
    from flyvault import localvault

    async def main() -> None:
        async with Client(_server()) as client:
            s = Session(client)
            up = await s.data("local_vault", {"action": "up", "name": VAULT})
            assert up["running"] is True and up["vault"] == VAULT
            try:
                for step in (
                    split_streams,
                    long_job_followed_by_offset,
                    head_of_a_large_output,
                    interactive_shell,
                    forward_to_a_web_server,
                    binary_file_round_trip,
                    sessions_listed,
                    reprovision_needs_confirm,
                ):
                    await step(s)
            finally:
                down = await s.data("local_vault", {"action": "down"})
                assert down["running"] is False

    try:
        run_async(main(), timeout=300)
    finally:
        localvault.down()  # whatever happened above: no vault left running
