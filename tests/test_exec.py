"""Exec sessions end to end: the real CLI against a real init process over QUIC on 127.0.0.1.

Covers the user complaints C4 (stdin EOF), C5 (exit codes), C8 (replay after detach) and
C13 (bounded output memory) of the anchors file, plus session naming, reattach, list, kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, InitProcess, read_until, run_async, start_init, vault_entry

from flyvault.standins import OidcIssuer


@pytest.fixture
def vault(init_process: InitProcess, issuer: OidcIssuer, exec_route: str) -> str:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="t"))
    return "t"


def fv(
    *args: str, stdin: Any = subprocess.DEVNULL, timeout: float = 60, input_: bytes | None = None
):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=None if input_ is not None else stdin,
        input=input_,
        capture_output=True,
        timeout=timeout,
    )


def fv_popen(*args: str) -> subprocess.Popen[bytes]:
    """The CLI running in the background, stdout and stderr piped, no stdin."""
    return subprocess.Popen(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def _sessions(vault: str) -> dict[str, Any]:
    return {i["session_id"]: i for i in json.loads(fv("list-exec", vault, "--json").stdout)}


def _gate(go: Path) -> str:
    """Shell: wait (bounded, 60 s) until the test creates ``go``."""
    flag = shlex.quote(str(go))
    return f"i=0; while [ ! -e {flag} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"


def test_argv_boundaries_are_kept_exactly(vault: str) -> None:
    args = ["a b", "", "  ", "*", "$HOME", "'q'", '"d"', "--flag", "-", "é✓", "x\ty"]
    result = fv(
        "exec",
        vault,
        "--",
        sys.executable,
        "-c",
        "import sys, json; print(json.dumps(sys.argv[1:]))",
        *args,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == args


@pytest.mark.parametrize("code", [0, 1, 4, 44, 255])
def test_exit_codes_pass_through(vault: str, code: int) -> None:
    result = fv("exec", vault, "--", "sh", "-c", f"exit {code}")
    assert result.returncode == code


def test_a_command_that_cannot_start_exits_127_or_126_as_a_shell_would(
    vault: str, tmp_path: Path
) -> None:
    missing = fv("exec", vault, "--", "no-such-program-zz", "arg")
    assert missing.returncode == 127, missing.stderr
    assert b"cannot run 'no-such-program-zz': No such file or directory" in missing.stderr
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    denied = fv("exec", vault, "--", str(script))
    assert denied.returncode == 126, denied.stderr
    assert b"Permission denied" in denied.stderr and denied.stdout == b""


def test_death_by_signal_gives_128_plus_n(vault: str) -> None:
    assert fv("exec", vault, "--", "sh", "-c", "kill -TERM $$").returncode == 143
    assert fv("exec", vault, "--", "sh", "-c", "kill -KILL $$").returncode == 137


def test_stdout_and_stderr_kept_apart_and_binary_safe(vault: str) -> None:
    script = "import sys; sys.stdout.buffer.write(bytes(range(256))); sys.stderr.write('problem')"
    result = fv("exec", vault, "--", sys.executable, "-c", script)
    assert result.returncode == 0
    assert result.stdout == bytes(range(256))
    assert result.stderr.endswith(b"problem")


def test_stdin_eof_ends_cat_at_once(vault: str) -> None:
    started = time.monotonic()
    result = fv("exec", vault, "--", "cat", timeout=20)
    assert result.returncode == 0
    assert result.stdout == b""
    assert time.monotonic() - started < 15  # a hang would hit the subprocess timeout


def _reader_leaves(vault: str, *args: str, first: bytes) -> tuple[int, bytes]:
    """Run ``fly-vault exec VAULT ARGS`` with its stdout on a pipe, read ``first`` from it
    and close the pipe, as ``| head -c N`` does; its exit status and stderr (bounded)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flyvault.cli.main", "exec", vault, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(len(first)) == first
        proc.stdout.close()
        code = proc.wait(timeout=30)
        return code, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_reader_that_leaves_ends_the_command_as_over_ssh(vault: str) -> None:
    """``fly-vault exec VAULT -- yes | head -c 10``: once the reader of our output has
    gone, the remote command gets the SIGPIPE a local one would, and we exit with its
    status (128 + 13), both directly and through the keeper. It used to run forever."""
    code, err = _reader_leaves(vault, "--", "yes", first=b"y\n" * 5)
    assert code == 128 + signal.SIGPIPE, err
    err = err.lower()  # quiet, as `yes | head` (the dev-issuer note aside)
    assert b"error" not in err and b"traceback" not in err and b"broken" not in err, err
    assert not any(info["running"] for info in _sessions(vault).values())


def test_a_command_that_ignores_sigpipe_gets_sigterm_when_the_reader_leaves(vault: str) -> None:
    """A command that ignores SIGPIPE (as Python programs do) never sees the EPIPE a local
    pipeline would give it (the vault's pipe stays open): SIGTERM follows after a grace."""
    script = 'trap "" PIPE; while :; do echo y; done'
    code, err = _reader_leaves(vault, "--", "sh", "-c", script, first=b"y\ny\n")
    assert code == 128 + signal.SIGTERM, err


def test_a_kept_session_whose_reader_leaves_keeps_running(vault: str) -> None:
    """``exec --session NAME ... | head``: a kept session outlives its clients, so a reader
    that leaves only stops this client following it (exit 141, and how to reattach)."""
    script = "while :; do echo y; sleep 0.01; done"
    code, err = _reader_leaves(
        vault, "--session", "piped", "--", "sh", "-c", script, first=b"y\ny\n"
    )
    assert code == 141, err
    assert b"session piped keeps running" in err and b"--session piped" in err, err
    assert _sessions(vault)["piped"]["running"] is True
    killed = fv("kill", vault, "piped", "--signal", "KILL")
    assert killed.returncode == 0, killed.stderr


def test_kill_waits_and_says_whether_the_session_ended(vault: str) -> None:
    for name, script in (("ends", "exec sleep 600"), ("stubborn", "trap '' TERM; sleep 600")):
        proc = fv_popen("exec", vault, "--session", name, "--", "sh", "-c", f"echo up; {script}")
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"up\n"
        finally:
            proc.kill()
            proc.wait()
    ended = fv("kill", vault, "ends")
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.strip() == b"sent SIGTERM: session ends ended (killed by SIGTERM)"
    stubborn = fv("kill", vault, "stubborn", "--wait", "0.5")
    assert stubborn.returncode == 0, stubborn.stderr
    assert b"session stubborn is still running after 0.5 s" in stubborn.stdout
    assert b"--signal KILL" in stubborn.stdout
    assert _sessions(vault)["stubborn"]["running"] is True
    at_once = fv("kill", vault, "stubborn", "--signal", "KILL", "--wait", "0")
    assert at_once.stdout.strip() == b"sent SIGKILL to session stubborn"
    _wait_for(lambda: not _sessions(vault)["stubborn"]["running"], "the KILL")


def test_ctrl_c_interrupts_the_remote_command_and_a_second_one_detaches(vault: str) -> None:
    """As ``ssh -t``: the first Ctrl-C (SIGINT to this client) reaches the command; the
    second leaves it running and says how to come back to it or stop it."""
    trapped = fv_popen(
        "exec",
        vault,
        "--",
        "sh",
        "-c",
        "trap 'echo got-INT; exit 7' INT; echo up; while :; do sleep 0.1; done",
    )
    read_until(trapped, b"up\n")
    trapped.send_signal(signal.SIGINT)
    out, err = trapped.communicate(timeout=30)
    assert trapped.returncode == 7, err
    assert out == b"got-INT\n"

    script = "trap 'echo got-INT' INT; echo up; while :; do sleep 0.1; done"
    stubborn = fv_popen("exec", vault, "--", "sh", "-c", script)  # it survives Ctrl-C
    read_until(stubborn, b"up\n")
    stubborn.send_signal(signal.SIGINT)
    read_until(stubborn, b"got-INT\n")  # the first Ctrl-C arrived; the client still follows
    assert stubborn.poll() is None
    stubborn.send_signal(signal.SIGINT)
    _, err = stubborn.communicate(timeout=30)
    assert stubborn.returncode == 130, err
    notice = err.decode().strip().splitlines()[-1]
    assert notice.startswith("fly-vault: detached; session ") and "keeps running" in notice
    session = notice.split("session ", 1)[1].split()[0]
    assert f"fly-vault exec {vault} --session {session}" in notice
    assert f"fly-vault kill {vault} {session}" in notice
    assert _sessions(vault)[session]["running"] is True
    assert fv("kill", vault, session, "--signal", "KILL").returncode == 0

    # Following a named session, Ctrl-C only stops following (remote-task relies on it).
    named = fv_popen(
        "exec", vault, "--session", "follow-me", "--", "sh", "-c", "echo up; exec sleep 600"
    )
    read_until(named, b"up\n")
    named.send_signal(signal.SIGINT)
    _, err = named.communicate(timeout=30)
    assert named.returncode != 0
    assert b"Traceback" not in err, err
    assert _sessions(vault)["follow-me"]["running"] is True  # no SIGINT reached it
    assert fv("kill", vault, "follow-me", "--signal", "KILL").returncode == 0


def test_stdin_forwarded_in_full(vault: str) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    result = fv("exec", vault, "--", "sha256sum", input_=payload)
    import hashlib

    assert result.returncode == 0
    assert result.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_named_session_reattach_and_list_and_kill(vault: str) -> None:
    # It keeps running after the client is killed: emulate a dropped laptop.
    script = "echo one; sleep 1; echo two; sleep 30"
    proc = fv_popen(
        "exec", vault, "--session", "job-2", "--context", "why: testing", "--", "sh", "-c", script
    )
    read_until(proc, b"one\ntwo\n")  # both lines made it through the vault
    proc.kill()
    proc.wait()
    listing = json.loads(fv("list-exec", vault, "--json").stdout)
    by_id = {item["session_id"]: item for item in listing}
    assert by_id["job-2"]["running"] is True
    assert by_id["job-2"]["argv"][0] == "sh"
    assert by_id["job-2"]["context"] == "why: testing"
    assert by_id["job-2"]["bytes"] == len(b"one\ntwo\n")
    killed = fv("kill", vault, "job-2", "--signal", "KILL")
    assert killed.returncode == 0, killed.stderr
    # Reattach from the start: the whole output, then the exit (killed). (Without
    # --from-start, what this machine showed may be left out: test_reattach_shows_...)
    again = fv("exec", vault, "--session", "job-2", "--from-start")
    assert again.stdout == b"one\ntwo\n"
    assert again.returncode == 137


def test_reattach_shows_only_what_this_machine_has_not_shown(vault: str, tmp_path: Path) -> None:
    """A named session followed, left with Ctrl-C, and reattached later shows only the
    output that came since (the cursor in the state directory); --from-start shows it all.
    Through the keeper the keeper records the cursor when the CLI leaves: the test waits
    for the record instead of guessing."""
    from flyvault.client import cursors

    flag = tmp_path / "go"
    script = f"echo one; {_gate(flag)}; echo two"
    proc = fv_popen("exec", vault, "--session", "seen", "--", "sh", "-c", script)
    read_until(proc, b"one\n")
    proc.send_signal(signal.SIGINT)  # a named session: stop following it
    proc.communicate(timeout=30)
    _wait_for(lambda: cursors.shown(vault, "seen") is not None, "the cursor to be recorded")
    assert cursors.shown(vault, "seen").offset == len(b"one\n")
    flag.touch()
    _wait_for(lambda: _sessions(vault)["seen"]["running"] is False, "the session to end")
    rest = fv("exec", vault, "--session", "seen")
    assert (rest.stdout, rest.returncode) == (b"two\n", 0), rest.stderr
    again = fv("exec", vault, "--session", "seen")
    assert again.stdout == b"", "output shown twice"
    everything = fv("exec", vault, "--session", "seen", "--from-start")
    assert everything.stdout == b"one\ntwo\n" and everything.returncode == 0
    misuse = fv("exec", vault, "--from-start", "--", "true")
    assert misuse.returncode == 2 and b"--from-start needs --session" in misuse.stderr


def test_unknown_session_is_a_clear_error(vault: str) -> None:
    result = fv("exec", vault, "--session", "no-such")
    assert result.returncode == 255
    assert b"exec session no-such not found" in result.stderr
    assert b"list-exec" in result.stderr


@pytest.mark.parametrize("bad", ["-dash", "with space", "a/b", "x" * 200, "é"])
def test_odd_session_ids_refused(vault: str, bad: str) -> None:
    result = fv("exec", vault, f"--session={bad}", "--", "true")
    assert result.returncode == 2
    assert b"invalid session id" in result.stderr


def test_exec_without_command_is_a_usage_error(vault: str) -> None:
    result = fv("exec", vault)
    assert result.returncode == 2
    assert b"exec requires a command" in result.stderr


def test_kill_unknown_session_and_bad_signal(vault: str) -> None:
    assert fv("kill", vault, "ghost").returncode == 9
    bad = fv("kill", vault, "ghost", "--signal", "NOPE")
    assert bad.returncode == 2 and b"unknown signal" in bad.stderr


def test_output_while_detached_replays_all_of_it_exactly(vault: str, tmp_path: Path) -> None:
    """C8: 10 MB while nobody is attached: far past the 1 MiB ring, but a named session's
    output is also on disk (1 MiB head, 64 MiB tail), so the reattach gets every byte, in
    order, and nothing is reported dropped."""
    started, go = tmp_path / "started", tmp_path / "go"
    # The command starts its output only once the test has detached (host mode: same files).
    gate = (
        f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\n"
        f"for _ in range(6000):\n    if pathlib.Path({str(go)!r}).exists(): break\n"
        "    time.sleep(0.01)\n"
    )
    script = (
        "import sys\n"
        "for i in range(10 * 1024):\n"
        "    sys.stdout.write(f'{i:09d}' + 'x' * 1014 + '\\n')\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flyvault.cli.main",
            "exec",
            vault,
            "--session",
            "flood",
            "--",
            sys.executable,
            "-c",
            f"{gate}{script}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for(started.exists, "the command did not start")
    proc.kill()  # detach before any output
    proc.wait()
    _wait_for(lambda: not _sessions(vault)["flood"]["attached"], "the vault kept the client")
    go.touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = {i["session_id"]: i for i in json.loads(fv("list-exec", vault, "--json").stdout)}
        if not info["flood"]["running"]:
            break
        time.sleep(0.5)
    total = 10 * 1024 * 1024
    assert info["flood"]["bytes"] == total
    again = fv("exec", vault, "--session", "flood")
    assert again.returncode == 0
    expected = b"".join(f"{i:09d}".encode() + b"x" * 1014 + b"\n" for i in range(10 * 1024))
    assert again.stdout == expected
    assert b"dropped" not in again.stderr


def _script_session(vault: Any, name: str, script: str, out: bytearray) -> Any:
    """A kept exec session running ``python -c script``, its output collected in ``out``."""
    from flyvault.client.vault import ExecHooks, ExecSession
    from flyvault.protocol.console import OpenSession

    return ExecSession(
        vault,
        OpenSession(name, (sys.executable, "-c", script), keep=True),
        ExecHooks(stdout=out.extend, stderr=out.extend),
    )


async def _cut_connections(vault: Any, times: int, every: float) -> None:
    for _ in range(times):  # bounded by ``times``
        await asyncio.sleep(every)
        connection = await vault.connection()
        connection.close()


def test_reattach_after_drop_has_no_loss_and_no_duplicates(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    """Kill the connection at several points while output streams; the union is exact."""
    from flyvault.client.vault import Vault

    entry = vault_entry(init_process.port, issuer)
    lines = 20000
    script = (
        f"import sys,time\nfor i in range({lines}):\n    print(i, flush=(i % 500 == 0))\n    "
        "time.sleep(0.0001 if i % 1000 else 0.05)\n"
    )

    async def scenario() -> bytes:
        vault = Vault(entry, reconnect_timeout=20)
        out = bytearray()
        session = _script_session(vault, "drop-test", script, out)
        runner = asyncio.ensure_future(session.run())
        await _cut_connections(vault, times=6, every=0.4)
        exited = await asyncio.wait_for(runner, 60)
        assert exited.exit_status == 0
        assert vault.connects >= 4
        await vault.close()
        return bytes(out)

    out = run_async(scenario(), timeout=90)
    assert out == "".join(f"{i}\n" for i in range(lines)).encode()


def test_stdin_is_exact_across_dropped_connections(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    """Cut the connection while standard input streams in: the command still gets every
    byte once, in order (input in flight is resent from the vault's acknowledged offset)."""
    import hashlib

    from flyvault.client.vault import Vault

    entry = vault_entry(init_process.port, issuer)
    payload = os.urandom(6 * 1024 * 1024)
    script = (
        "import sys, hashlib; data = sys.stdin.buffer.read(); "
        "print(len(data), hashlib.sha256(data).hexdigest())"
    )

    async def scenario() -> bytes:
        vault = Vault(entry, reconnect_timeout=20)
        out = bytearray()
        session = _script_session(vault, "stdin-drop", script, out)
        runner = asyncio.ensure_future(session.run())

        async def feed() -> None:
            for start in range(0, len(payload), 64 * 1024):  # bounded by the payload
                session.send_stdin(payload[start : start + 64 * 1024])
                await session.drain()
                await asyncio.sleep(0.01)
            session.close_stdin()

        feeder = asyncio.ensure_future(feed())
        await _cut_connections(vault, times=5, every=0.25)  # while input flows
        await asyncio.wait_for(feeder, 60)
        exited = await asyncio.wait_for(runner, 60)
        assert exited.exit_status == 0
        assert vault.connects >= 4
        await vault.close()
        return bytes(out)

    out = run_async(scenario(), timeout=90)
    assert out.split() == [str(len(payload)).encode(), hashlib.sha256(payload).hexdigest().encode()]


def test_takeover_tells_the_first_client_and_it_does_not_fight(vault: str, tmp_path: Path) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flyvault.cli.main",
            "exec",
            vault,
            "--session",
            "shared",
            "--",
            "sh",
            "-c",
            f"touch {shlex.quote(str(started))}; {_gate(go)}; echo end",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(started.exists, "the command did not start")
    second = subprocess.Popen(
        [sys.executable, "-m", "flyvault.cli.main", "exec", vault, "--session", "shared"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The first client is told and leaves while the command still runs...
        _, err = first.communicate(timeout=60)
        assert first.returncode == 255
        assert b"another client attached" in err
        go.touch()
        # ...and the second one gets the rest.
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert out == b"end\n"
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_client_memory_flat_under_large_output(vault: str) -> None:
    """C13: 200 MB through exec into a pipe; the client's peak RSS stays small."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, subprocess, sys\n"
            "p = subprocess.run([sys.executable, '-m', 'flyvault.cli.main', 'exec', "
            f"'{vault}', '--', 'head', '-c', '200000000', '/dev/zero'], "
            "stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)\n"
            "print(len(p.stdout), p.returncode)\n",
        ],
        capture_output=True,
        timeout=300,
    )
    assert result.stdout.split() == [b"200000000", b"0"]


def test_vault_gone_ends_client_with_documented_code(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer
) -> None:
    """C1: kill init while a command runs; the client gives up within its bound, code 255."""
    from flyvault.config import save_vault

    running = tmp_path / "running"
    init = start_init(tmp_path, fly_api.path)
    try:
        save_vault(vault_entry(init.port, issuer, name="gone"))
        client = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flyvault.cli.main",
                "exec",
                "gone",
                "--reconnect-timeout",
                "3",
                "--",
                "sh",
                "-c",
                f"touch {shlex.quote(str(running))}; exec sleep 60",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _wait_for(running.exists, "the command did not start")
        init.process.kill()
        started = time.monotonic()
        _, err = client.communicate(timeout=40)
        elapsed = time.monotonic() - started
        assert client.returncode == 255
        assert b"went away" in err or b"cannot connect" in err
        assert b"fly-vault exec gone --session" in err  # how to pick it up later
        assert elapsed < 15  # C1: "within about 15 s, not a hang"
    finally:
        init.stop()


def _token_never_printed(result: Any) -> None:
    assert TOKEN.encode() not in result.stdout + result.stderr


@pytest.mark.usefixtures("exec_route")
def test_session_buffer_is_configurable(tmp_path: Path, fly_api: Any, issuer: OidcIssuer) -> None:
    from flyvault.config import save_vault

    no_disk_log = ("--session-log-head", "0", "--session-log-tail", "0")
    init = start_init(
        tmp_path, fly_api.path, extra_args=("--session-buffer", "131072", *no_disk_log)
    )
    try:
        save_vault(vault_entry(init.port, issuer, name="small"))
        assert (
            fv(
                "exec", "small", "--session", "big", "--", "head", "-c", "1000000", "/dev/zero"
            ).returncode
            == 0
        )
        again = fv("exec", "small", "--session", "big", "--from-start")
        assert len(again.stdout) == 131072
        assert b"868928 bytes of output were dropped" in again.stderr
    finally:
        init.stop()


@pytest.mark.usefixtures("exec_route")
def test_a_named_sessions_head_and_tail_are_read_back_from_disk(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer
) -> None:
    """Past the memory ring (128 KiB here), a named session's output is on disk: its first
    64 KiB whole and a 256 KiB tail (four 64 KiB segments, the newest filling). A replay
    from the start gets the head, says what was dropped between, then the tail."""
    import hashlib

    from flyvault.config import save_vault

    limits = ("--session-log-head", "65536", "--session-log-tail", "262144")
    init = start_init(tmp_path, fly_api.path, extra_args=("--session-buffer", "131072", *limits))
    # 1,500,000 bytes of numbered lines: every byte's place can be checked.
    script = "seq -w 1 125000 | sed 's/$/ line/'"  # 125,000 lines of 12 bytes
    produced = "".join(f"{i:06d} line\n" for i in range(1, 125001)).encode()
    try:
        save_vault(vault_entry(init.port, issuer, name="disk"))
        first = fv("exec", "disk", "--session", "long", "--", "sh", "-c", script)
        assert hashlib.sha256(first.stdout).digest() == hashlib.sha256(produced).digest()
        logs = list((init.data_dir / "sessions").iterdir())
        assert len(logs) == 1 and (logs[0] / "head").stat().st_size == 65536
        again = fv("exec", "disk", "--session", "long", "--from-start")
        assert again.returncode == 0, again.stderr
        head, rest = again.stdout[:65536], again.stdout[65536:]
        assert head == produced[:65536]  # the real start, long after the ring moved on
        assert produced.endswith(rest) and len(rest) >= 3 * 65536 > 131072  # more than the ring
        dropped = len(produced) - len(again.stdout)
        assert f"{dropped} bytes of output were dropped".encode() in again.stderr
        fv("kill", "disk", "long")  # an exited session: nothing to signal
    finally:
        init.stop()


def test_init_refuses_tiny_session_buffer(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flyvault.server.main",
            "--listen",
            "127.0.0.1:0",
            "--host-mode",
            "--data-dir",
            str(tmp_path),
            "--session-buffer",
            "10",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"--session-buffer must be at least" in result.stderr


def test_malformed_forward_spec_is_a_usage_error(vault: str) -> None:
    result = fv("forward", vault, "80:localhost")
    assert result.returncode == 2
    assert b"invalid forward spec" in result.stderr


def test_hundreds_of_execs_on_one_connection_release_their_streams(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    """Each finished exec gives its stream back: a pooled connection never runs dry (QUIC
    allows ~128 open streams at once)."""
    from flyvault.client.vault import ExecHooks, ExecSession, Vault, new_session_id
    from flyvault.protocol.console import OpenSession

    async def scenario() -> tuple[int, int]:
        vault = Vault(vault_entry(init_process.port, issuer))
        try:
            for _ in range(300):  # bounded
                session = ExecSession(
                    vault,
                    OpenSession(new_session_id(), ("true",)),
                    ExecHooks(stdout=lambda d: None, stderr=lambda d: None),
                )
                assert (await session.run()).exit_status == 0
            connection = await vault.connection()
            return vault.connects, connection.channel.open_streams
        finally:
            await vault.close()

    connects, open_streams = run_async(scenario(), timeout=180)
    assert connects == 1
    assert open_streams <= 2


@pytest.mark.usefixtures("exec_route")
def test_remote_sized_datagrams_carry_stdin_and_output_intact(
    tmp_path: Path, issuer: OidcIssuer, fly_api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On loopback the transport uses 16,000-byte datagrams; a vault across the internet
    gets 1200. Force 1200 on both ends (init inherits the environment) so that path stays
    covered end to end: stdin up, output down, exit status."""
    import hashlib

    from flyvault.config import save_vault

    monkeypatch.setenv("FLY_VAULT_DATAGRAM_SIZE", "1200")
    init = start_init(tmp_path, fly_api.path)
    try:
        save_vault(vault_entry(init.port, issuer, name="small"))
        payload = os.urandom(2 * 1024 * 1024)
        script = (
            "import sys, hashlib; data = sys.stdin.buffer.read(); "
            "sys.stdout.buffer.write(data[::-1]); sys.exit(7)"
        )
        result = fv("exec", "small", "--", sys.executable, "-c", script, input_=payload)
        assert result.returncode == 7, result.stderr
        assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(payload[::-1]).digest()
    finally:
        init.stop()


def test_exit_while_input_still_flows_is_acknowledged_and_the_session_goes(vault: str) -> None:
    """The command exits while stdin is still arriving: the server has sent EXITED (its side
    is closed) when it would acknowledge input; the exit acknowledgement must still be read,
    so the unnamed session is removed."""
    for _ in range(3):  # bounded: the race between exit and the last input acknowledgement
        result = fv("exec", vault, "--", "head", "-c", "1", input_=os.urandom(4 * 1024 * 1024))
        assert result.returncode == 0, result.stderr
        assert len(result.stdout) == 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = json.loads(fv("list-exec", vault, "--json").stdout)
        if listing == []:
            break
        time.sleep(0.1)
    assert listing == []
