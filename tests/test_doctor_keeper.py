"""``fly-vault doctor`` and the vault's connection keeper: real CLI processes, a real init
process on 127.0.0.1 over real QUIC, real keepers on real unix sockets. Nothing of ours is
mocked.

Doctor keeps testing the path a new connection takes; its ``keeper`` step comes after and
asks a keeper that listens for its status and a PING over its live connection. It never
starts a keeper, and the step never changes the exit code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, InitProcess, pid_alive, vault_entry

from flyvault.standins import OidcIssuer

FRESH_STEPS = ["config", "handshake", "attestation", "authenticate"]


@pytest.fixture(autouse=True)
def first_call_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's first exec goes through the keeper it starts (``FLY_VAULT_MUX=wait``), so
    the keeper's request counts are known."""
    monkeypatch.setenv("FLY_VAULT_MUX", "wait")


@pytest.fixture
def vault(init_process: InitProcess, issuer: OidcIssuer) -> str:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="t"))
    return "t"


def fv(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def keeper_dir() -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "fly-vault"


def pid_files() -> list[Path]:
    return sorted(keeper_dir().glob("*.pid")) if keeper_dir().exists() else []


def the_keeper_pid() -> int:
    files = pid_files()
    assert len(files) == 1, f"expected one keeper pid file, found {files}"
    return int(json.loads(files[0].read_text())["pid"])


def expected_paths(vault: str) -> Any:
    from flyvault.client.mux import keeper_key, keeper_paths, runtime_dir
    from flyvault.paths import config_file

    path = config_file()
    return keeper_paths(runtime_dir(), vault, keeper_key(vault, path, path.read_bytes()))


def keeper_line(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.split()[1:2] == ["keeper"]]
    return line


def doctor_json(vault: str, *flags: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = fv(*flags, "doctor", vault, "--json", env=env)
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    assert report["exit_code"] == result.returncode
    assert TOKEN not in result.stdout + result.stderr
    return report


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    """The access token is in the config the keeper and doctor read: never in the output."""
    assert TOKEN not in result.stdout + result.stderr


def warm_keeper(vault: str) -> int:
    """A keeper started the way users start one: an exec through it."""
    result = fv("exec", vault, "--", "true")
    assert result.returncode == 0, result.stderr
    return the_keeper_pid()


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """Processes a test SIGSTOPped: continued (and so able to exit) afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_no_keeper_running(vault: str) -> None:
    result = fv("doctor", vault)
    assert result.returncode == 0, result.stdout + result.stderr
    line = keeper_line(result.stdout)
    assert line.split()[0] == "ok"
    assert "none running; the next exec" in line and "starts one" in line
    assert_clean(result)
    assert pid_files() == []  # doctor started none

    report = doctor_json(vault)
    assert report["ok"] is True and report["exit_code"] == 0
    assert [s["step"] for s in report["steps"]] == [*FRESH_STEPS, "keeper"]
    assert report["steps"][-1]["ok"] is True
    assert report["keeper"]["state"] == "none"
    assert pid_files() == []


def test_warm_keeper_answers_with_its_status_and_round_trip(vault: str) -> None:
    pid = warm_keeper(vault)
    result = fv("doctor", vault)
    assert result.returncode == 0, result.stdout + result.stderr
    line = keeper_line(result.stdout)
    assert line.split()[:3] == ["ok", "keeper", "pid"], line
    assert f"pid {pid}, up " in line
    assert "2 requests" in line  # the exec and this check
    assert "1 connect," in line
    assert "connection answered in " in line and " ms" in line
    assert_clean(result)
    # Doctor still made a fresh connection of its own: the keeper's count did not move.
    report = doctor_json(vault)
    assert report["ok"] is True
    assert [s["step"] for s in report["steps"]] == [*FRESH_STEPS, "keeper"]
    keeper = report["keeper"]
    assert keeper["state"] == "running" and keeper["pid"] == pid
    assert keeper["connected"] is True and keeper["answered"] is True
    assert keeper["connects"] == 1 and keeper["requests"] == 3
    assert 0 <= keeper["rtt_ms"] < 1500
    assert keeper["age_seconds"] >= 0
    assert report["steps"][-1]["ok"] is True and report["steps"][-1]["hint"] is None
    assert the_keeper_pid() == pid  # the same keeper, still running
    assert pid_alive(pid)
    # The keeper's connection still serves exec after the PINGs.
    again = fv("exec", vault, "--", "sh", "-c", "echo still")
    assert (again.returncode, again.stdout) == (0, "still\n"), again.stderr


def test_stale_socket_is_a_warning_not_a_failure(vault: str) -> None:
    paths = expected_paths(vault)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(paths.socket))
    sock.close()  # the file stays; nothing listens
    started = time.monotonic()
    result = fv("doctor", vault)
    assert time.monotonic() - started < 30
    assert result.returncode == 0, result.stdout + result.stderr
    line = keeper_line(result.stdout)
    assert line.split()[:2] == ["WARN", "keeper"], result.stdout
    assert "no keeper answers" in line and "not counted in the exit code" in line
    assert f"fix: fly-vault mux stop {vault}" in result.stdout
    assert "its connection keeper needs a look" in result.stdout
    assert "FAIL" not in result.stdout
    assert_clean(result)
    assert pid_files() == []  # doctor replaced nothing and started nothing
    assert paths.socket.exists()

    report = doctor_json(vault)
    assert report["ok"] is True and report["exit_code"] == 0
    step = report["steps"][-1]
    assert step["step"] == "keeper" and step["ok"] is False
    assert step["hint"].startswith(f"fly-vault mux stop {vault}")
    assert report["keeper"]["state"] == "stale"
    # As promised: the next call replaces it.
    assert fv("exec", vault, "--", "true").returncode == 0
    assert keeper_line(fv("doctor", vault).stdout).split()[0] == "ok"


def _age_pid_file(seconds: float) -> None:
    """Make the one keeper's pid file say it started ``seconds`` ago."""
    [pid_file] = pid_files()
    info = json.loads(pid_file.read_text())
    info["started_at"] = time.time() - seconds
    pid_file.write_text(json.dumps(info))


def test_a_stopped_young_keeper_gets_longer_to_answer(vault: str, stopped: list[int]) -> None:
    """A keeper that started seconds ago may still be importing: 15 s, not 3."""
    pid = warm_keeper(vault)
    os.kill(pid, signal.SIGSTOP)
    stopped.append(pid)
    result = fv("doctor", vault, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "did not answer within 15 s" in keeper_line(result.stdout)


def test_stopped_keeper_is_reported_within_bounds(vault: str, stopped: list[int]) -> None:
    pid = warm_keeper(vault)
    _age_pid_file(60)  # no longer starting: the short wait applies
    os.kill(pid, signal.SIGSTOP)
    stopped.append(pid)
    started = time.monotonic()
    result = fv("doctor", vault, timeout=30)
    assert time.monotonic() - started < 20  # not the 30 s a call through it would wait
    assert result.returncode == 0, result.stdout + result.stderr
    line = keeper_line(result.stdout)
    assert line.split()[:2] == ["WARN", "keeper"], result.stdout
    assert "did not answer within 3 s" in line and "not counted in the exit code" in line
    assert f"fix: fly-vault mux stop {vault}" in result.stdout
    assert_clean(result)
    report = doctor_json(vault)
    assert report["exit_code"] == 0 and report["keeper"]["state"] == "not answering"
    assert report["steps"][-1]["ok"] is False


def test_keeper_whose_vault_does_not_answer(
    vault: str, init_process: InitProcess, stopped: list[int]
) -> None:
    pid = warm_keeper(vault)
    os.kill(init_process.process.pid, signal.SIGSTOP)
    stopped.append(init_process.process.pid)
    result = fv("doctor", vault, timeout=60)
    # The fresh path fails (the vault is unreachable) and sets the code; the keeper's
    # connection is reported as not answering its PING.
    assert result.returncode == 4, result.stdout + result.stderr
    assert "FAIL  handshake" in result.stdout
    line = keeper_line(result.stdout)
    assert line.split()[:2] == ["WARN", "keeper"], result.stdout
    assert f"pid {pid}" in line and "did not answer a PING within 1.5 s" in line
    assert f"fix: fly-vault mux stop {vault}" in result.stdout
    assert_clean(result)


@pytest.mark.parametrize(
    ("flags", "env", "reason"),
    [
        (("--no-mux",), None, "--no-mux"),
        (("doctor-flag",), None, "--no-mux"),
        ((), {"FLY_VAULT_MUX": "0"}, "FLY_VAULT_MUX=0"),
    ],
    ids=["global --no-mux", "doctor --no-mux", "FLY_VAULT_MUX=0"],
)
def test_keepers_off(vault: str, flags: tuple[str, ...], env: Any, reason: str) -> None:
    warm_keeper(vault)  # one runs, but this call may not use it
    if flags == ("doctor-flag",):
        result = fv("doctor", vault, "--no-mux", env=env)
        report = json.loads(fv("doctor", vault, "--json", "--no-mux", env=env).stdout)
    else:
        result = fv(*flags, "doctor", vault, env=env)
        report = doctor_json(vault, *flags, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    line = keeper_line(result.stdout)
    assert line.split()[:2] == ["ok", "keeper"]
    assert f"keepers off ({reason})" in line
    assert_clean(result)
    assert report["keeper"] == {"state": "off", "reason": reason}
    assert report["steps"][-1]["ok"] is True


def test_a_bad_mux_variable_is_a_warning(vault: str) -> None:
    result = fv("doctor", vault, env={"FLY_VAULT_MUX": "bogus"})
    assert result.returncode == 0, result.stdout + result.stderr
    line = keeper_line(result.stdout)
    assert line.split()[:2] == ["WARN", "keeper"]
    assert "FLY_VAULT_MUX='bogus' is not valid" in line
    assert "not counted in the exit code" in line
    assert_clean(result)


def test_config_mux_false_is_off(init_process: InitProcess, issuer: OidcIssuer) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="nomux", mux=False))
    result = fv("doctor", "nomux")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "keepers off (mux = false in [vault.nomux])" in keeper_line(result.stdout)
    assert pid_files() == []


def test_a_failed_fresh_path_still_reports_the_keeper(issuer: OidcIssuer) -> None:
    from flyvault.config import save_vault

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    save_vault(vault_entry(port, issuer, name="gone"))
    result = fv("doctor", "gone")
    assert result.returncode == 4
    assert "ok    keeper" in result.stdout and "none running" in result.stdout
    assert pid_files() == []
