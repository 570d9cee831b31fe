"""The connection keeper's default start: the first call on a vault connects directly and
starts the keeper beside it (so it pays nothing for the keeper); later calls go through it.
Real CLI processes, a real init on 127.0.0.1, as in ``test_keeper.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, pid_alive, vault_entry
from test_keeper import expected_paths, fv, fv_popen, pid_files, reaper, vault, wait_for

from flyvault.standins import OidcIssuer

pytestmark = pytest.mark.background
__all__ = ["reaper", "vault"]  # fixtures, imported for pytest to find


def polled_status(socket: Path) -> tuple[dict[str, Any], int]:
    """The keeper's status once it holds its connection, and how many status requests
    that took (each counts as a request)."""
    from flyvault.client.mux import KeeperUnavailable, call

    polls = 0

    def connected() -> dict[str, Any] | None:
        nonlocal polls
        try:
            row = call(socket, "status")
        except KeeperUnavailable:
            return None
        polls += 1
        return row if row["connected"] else None

    row = wait_for(connected, "the keeper started in the background did not connect")
    return row, polls


def test_first_call_goes_direct_and_the_next_through_the_keeper(vault: str) -> None:
    paths = expected_paths(vault)
    first = fv("exec", vault, "--", "sh", "-c", "echo one; exit 3")
    assert (first.returncode, first.stdout) == (3, b"one\n"), first.stderr
    row, polls = polled_status(paths.socket)
    # Only the status polls reached it: the first call did not go through it, and the
    # keeper connected on its own (once).
    assert (row["requests"], row["connects"]) == (polls, 1)
    second = fv("exec", vault, "--", "sh", "-c", "echo two >&2; exit 4")
    assert (second.returncode, second.stderr) == (4, b"two\n")
    after, more = polled_status(paths.socket)
    assert after["pid"] == row["pid"]
    assert (after["requests"], after["connects"]) == (polls + 1 + more, 1)


def test_concurrent_first_calls_leave_one_keeper_with_its_log(
    vault: str, reaper: list[Any]
) -> None:
    procs = [fv_popen("exec", vault, "--", "sh", "-c", f"echo {n}") for n in range(6)]
    reaper.extend(procs)
    for n, proc in enumerate(procs):
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (0, f"{n}\n".encode()), err
    paths = expected_paths(vault)
    row, _ = polled_status(paths.socket)
    assert [json.loads(p.read_text())["pid"] for p in pid_files()] == [row["pid"]]
    assert row["connects"] == 1
    # Keepers that lost the race for the socket did not wipe the winner's log.
    assert f"serving (pid {row['pid']})" in paths.log.read_text()


def test_a_keeper_that_cannot_connect_leaves_nothing_behind(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="bad", token="wrong-token-0123456789"))
    paths = expected_paths("bad")
    result = fv("exec", "bad", "--", "true")
    assert result.returncode == 255, result.stderr  # exec's client failure, as ssh's
    assert b"access_token" in result.stderr  # the direct call reports the token
    assert b"wrong-token" not in result.stderr
    wait_for(
        lambda: paths.log.exists() and "could not connect" in paths.log.read_text(),
        "the keeper did not give up",
    )
    wait_for(
        lambda: not paths.socket.exists() and not paths.pid.exists(),
        "the keeper left its socket or pid file",
    )
    assert "wrong-token" not in paths.log.read_text()


def test_mux_false_is_remembered_and_no_keeper_is_started_again(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="nomux", mux=False))
    paths = expected_paths("nomux")
    first = fv("exec", "nomux", "--", "sh", "-c", "echo ok")
    assert (first.returncode, first.stdout) == (0, b"ok\n"), first.stderr
    wait_for(paths.off.exists, "the keeper did not mark mux = false")
    marked = paths.off.stat().st_mtime_ns
    wait_for(lambda: not paths.socket.exists(), "the socket of a keeper that may not run stayed")
    for _ in range(3):
        again = fv("exec", "nomux", "--", "sh", "-c", "echo ok")
        assert (again.returncode, again.stdout) == (0, b"ok\n"), again.stderr
    assert paths.off.stat().st_mtime_ns == marked  # no keeper process touched it again
    assert pid_files() == []
    shown = fv("mux", "status", "nomux")
    assert b"vault nomux: no keeper (mux = false in its entry" in shown.stdout, shown.stdout
    # mux stop clears the mark; the next call's keeper finds mux = false again.
    stopped = fv("mux", "stop", "nomux")
    assert b"cleared the mux = false mark of vault nomux" in stopped.stdout, stopped.stdout
    assert not paths.off.exists()
    assert fv("exec", "nomux", "--", "true").returncode == 0
    wait_for(paths.off.exists, "the keeper did not mark mux = false again")
    # An edited config is another keeper's: the mark does not carry over.
    save_vault(vault_entry(init_process.port, issuer, name="nomux", mux=True))
    assert fv("exec", "nomux", "--", "true").returncode == 0
    wait_for(lambda: len(pid_files()) == 1, "a keeper did not start once mux was on again")


def test_the_keeper_holds_nothing_of_its_caller(vault: str, tmp_path: Path) -> None:
    """Not the caller's pipes (a reader waiting for EOF would wait for the keeper's whole
    life), not its working directory, not its session."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flyvault.cli.main", "exec", vault, "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            pass_fds=(write_end,),
            cwd=tmp_path,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        os.close(write_end)
        write_end = -1
        row, _ = polled_status(expected_paths(vault).socket)
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""  # EOF: no process holds the write end any more
        assert os.readlink(f"/proc/{row['pid']}/cwd") == "/"
        assert os.getsid(row["pid"]) == row["pid"]
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_mux_stop_stops_a_keeper_that_is_still_starting(vault: str, reaper: list[Any]) -> None:
    """The keeper takes its socket and writes its pid file before it waits for its caller:
    ``mux stop`` finds it even then (and wakes it to ask)."""
    proc = fv_popen("exec", vault, "--", "sleep", "20")
    reaper.append(proc)
    [pid_file] = wait_for(pid_files, "the keeper wrote no pid file while its caller ran")
    pid = json.loads(pid_file.read_text())["pid"]
    stopped = fv("mux", "stop", vault)
    assert stopped.returncode == 0, stopped.stderr
    assert f"(pid {pid})".encode() in stopped.stdout, stopped.stdout
    wait_for(lambda: not pid_alive(pid), "the stopped keeper is still running")
    assert proc.poll() is None  # the call it started goes on, direct
    proc.kill()


@pytest.mark.parametrize("mode", ["1", "wait"])
def test_bad_idle_variable_fails_the_call_in_either_mode(vault: str, mode: str) -> None:
    result = fv(
        "exec", vault, "--", "true", env={"FLY_VAULT_MUX": mode, "FLY_VAULT_MUX_IDLE": "soon"}
    )
    assert result.returncode == 2, result.stderr
    assert b"FLY_VAULT_MUX_IDLE" in result.stderr
    assert pid_files() == []


def test_the_keeper_outlives_the_call_that_started_it(vault: str) -> None:
    paths = expected_paths(vault)
    assert fv("exec", vault, "--", "true").returncode == 0
    row, _ = polled_status(paths.socket)
    assert pid_alive(row["pid"])
    with open(f"/proc/{row['pid']}/cmdline", "rb") as cmdline:
        assert b"flyvault.cli.keeperd" in cmdline.read()
