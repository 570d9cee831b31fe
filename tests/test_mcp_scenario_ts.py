"""An agent's session with the real ``fly-vault-mcp``, driven by another MCP implementation:
the official TypeScript SDK (``@modelcontextprotocol/sdk``, pinned in
``tests/mcp_ts/package.json``) over stdio, from ``tests/mcp_ts/scenario.mjs``.

The scenario brings the local dev vault up with ``local_vault(action="up")``, runs commands
(both streams, exit codes), follows a 40-second job by offset, reads back the head of 6 MB
of output, types into a shell, reaches a web server on the vault through a forward, writes
and reads back a binary file by SHA-256, lists the sessions, is refused a reprovision
without ``confirm``, and brings the vault down. Each step checks what it expects; the script
exits non-zero on the first failed expectation, naming the step and the tool result.

Needs ``node`` (skipped without it) and the SDK in ``tests/mcp_ts/node_modules``: ``./run
test`` installs it with ``npm ci``; this test does the same when it is missing, and fails
(not skips) when that does not work, since node is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIENT_DIR = REPO / "tests" / "mcp_ts"
SCENARIO = CLIENT_DIR / "scenario.mjs"
SDK = CLIENT_DIR / "node_modules" / "@modelcontextprotocol" / "sdk"
NPM_CI = ["npm", "ci", "--prefix", str(CLIENT_DIR), "--no-audit", "--no-fund", "--silent"]
SCENARIO_TIMEOUT = 240
NPM_TIMEOUT = 300


def install_sdk() -> None:
    """``npm ci`` the pinned SDK into tests/mcp_ts when it is missing; a failure fails."""
    if SDK.is_dir():
        return
    if shutil.which("npm") is None:
        pytest.fail(
            f"node is installed but npm is not, and {SDK.relative_to(REPO)} is missing: "
            "install npm (./run test then installs the TypeScript SDK)"
        )
    try:
        done = subprocess.run(NPM_CI, cwd=REPO, capture_output=True, text=True, timeout=NPM_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(NPM_CI)} did not finish within {NPM_TIMEOUT} s: {exc.output}")
    if done.returncode != 0 or not SDK.is_dir():
        pytest.fail(
            f"{' '.join(NPM_CI)} failed (exit {done.returncode}); the TypeScript SDK scenario "
            f"cannot run:\n----- stdout\n{done.stdout}\n----- stderr\n{done.stderr}"
        )
    (CLIENT_DIR / "node_modules" / ".installed").touch()


def stop_local_vault() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", "local", "down"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )


@pytest.mark.timeout(NPM_TIMEOUT + SCENARIO_TIMEOUT + 120)
def test_typescript_sdk_agent_scenario_over_stdio() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node and npm are needed for the TypeScript SDK scenario (CI installs them)")
    install_sdk()
    started = time.monotonic()
    # A session of its own: on a timeout the whole group goes, the server with node.
    process = subprocess.Popen(
        [node, str(SCENARIO), sys.executable],
        cwd=REPO,
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            stdout, stderr = process.communicate(timeout=SCENARIO_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(
                f"the scenario did not finish within {SCENARIO_TIMEOUT} s\n"
                f"----- stdout (steps passed)\n{stdout}\n----- stderr\n{stderr}"
            )
        seconds = time.monotonic() - started
        assert process.returncode == 0, (
            f"the scenario failed (exit {process.returncode}) after {seconds:.1f} s\n"
            f"----- stdout (steps passed)\n{stdout}\n----- stderr\n{stderr}"
        )
        steps = [json.loads(line)["step"] for line in stdout.splitlines() if line.strip()]
        assert steps == list("abcdefghij"), f"steps a to j, got:\n{stdout}\n{stderr}"
    finally:
        stop_local_vault()
