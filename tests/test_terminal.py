"""The interactive terminal, driven through real tmux panes: ``connect`` and ``exec -t``.

Covers the user complaints C1 (the client hangs when the VM dies), C2 (the terminal is left
in raw mode) and C10 (resize) of the anchors file. Each test runs a local ``sh`` in a tmux
pane on a private tmux server, starts the real CLI in it against a real init process, and
after the client has gone checks with ``stty -a`` (written to a file, so nothing depends on
how the pane wraps it) that the pane is back in cooked mode. The escape detector is also
tested on its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import InitProcess, start_init, vault_entry

from flyvault.cli.terminal import EscapeDetector
from flyvault.standins import FlyApiSocket, OidcIssuer
from flyvault.transport import TransportSettings

TMUX = shutil.which("tmux")
REPO = Path(__file__).resolve().parents[1]
LOCAL_PROMPT = "local$ "
REMOTE_PROMPT = "vault$ "
TERM = "screen-256color"  # what tmux emulates; the remote must see the same value
ROWS, COLS = 30, 100
IDLE_TIMEOUT = TransportSettings().idle_timeout  # the client's: how long until a dead peer

needs_tmux = pytest.mark.skipif(
    TMUX is None, reason="tmux is not installed: the terminal tests drive a real terminal"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_child(parent: int, name: str, timeout: float = 10.0) -> int:
    """The PID of ``parent``'s child called ``name``, once it exists."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == name:
                    return int(child)
        assert time.monotonic() < deadline, f"no {name} under process {parent}"
        time.sleep(0.05)


def _kill(pid: int | None) -> None:
    if pid is not None and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Pane:
    """One tmux pane on a private server, running a local ``sh`` with a known prompt."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        assert TMUX is not None
        self.socket = f"fvtest-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.tmp_path = tmp_path
        self.socket_path: Path | None = None
        self.server_pid: int | None = None
        self.shell_pid: int | None = None
        self.client_pids: list[int] = []
        self._started_at: dict[int, int] = {}  # client PID -> pane text offset at its start
        self._checks = 0
        command = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "/bin/sh"]
        self.tmux(
            "new-session",
            "-d",
            "-s",
            "main",
            "-x",
            str(COLS),
            "-y",
            str(ROWS),
            "-c",
            str(REPO),
            shlex.join(command),
        )
        try:
            self.socket_path = Path(self.tmux("display-message", "-p", "#{socket_path}"))
            self.server_pid = int(self.tmux("display-message", "-p", "-t", "main", "#{pid}"))
            self.shell_pid = int(self.tmux("display-message", "-p", "-t", "main", "#{pane_pid}"))
            self.wait_for(re.escape(LOCAL_PROMPT.rstrip()))
        except BaseException:
            self.close()
            raise

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        result = subprocess.run(
            [TMUX, "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=15,
        )
        if result.returncode != 0:
            raise AssertionError(f"tmux {args[0]} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def close(self) -> None:
        for pid in self.client_pids:
            _kill(pid)
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.tmux("kill-server")
        _kill(self.shell_pid)
        deadline = time.monotonic() + 5
        while self.server_pid is not None and _alive(self.server_pid):
            if time.monotonic() > deadline:
                _kill(self.server_pid)
                break
            time.sleep(0.05)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)  # tmux leaves it behind

    # Input and output ------------------------------------------------------------------

    def type(self, text: str, enter: bool = True) -> None:
        """Type ``text`` literally (then Return, which a terminal sends as CR)."""
        if text:
            self.tmux("send-keys", "-t", "main", "-l", text)
        if enter:
            self.tmux("send-keys", "-t", "main", "Enter")

    def keys(self, *names: str) -> None:
        self.tmux("send-keys", "-t", "main", *names)

    def screen(self) -> str:
        # -J joins wrapped lines; -S reaches into the scrollback.
        return self.tmux("capture-pane", "-p", "-J", "-t", "main", "-S", "-1000")

    def wait_for(self, pattern: str, timeout: float = 20.0, after: int = 0) -> re.Match[str]:
        """Poll the pane until ``pattern`` matches (in the text after offset ``after``)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            match = re.search(pattern, text[after:], re.MULTILINE)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen within {timeout} s; pane:\n{text}")
            time.sleep(0.05)

    def mark(self) -> int:
        """An offset into the pane's text: wait_for(after=mark) ignores what came before."""
        return len(self.screen())

    def size(self) -> tuple[int, int]:
        rows, cols = self.tmux(
            "display-message", "-p", "-t", "main", "#{pane_height} #{pane_width}"
        ).split()
        return int(rows), int(cols)

    def alternate_screen(self) -> bool:
        return self.tmux("display-message", "-p", "-t", "main", "#{alternate_on}") == "1"

    def wait_normal_screen(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while self.alternate_screen():
            assert time.monotonic() < deadline, "the pane stayed in the alternate screen"
            time.sleep(0.05)

    # The local shell -------------------------------------------------------------------

    def start_client(self, *args: str) -> int:
        """Run the CLI in the pane through ``sh -c 'exec ...'`` so its PID is known; the
        local shell prints ``RC=<status>`` when it ends. Returns the client's PID."""
        inner = shlex.join([sys.executable, "-m", "flyvault.cli.main", *args])
        start = self.mark()
        self.type(f"sh -c {shlex.quote(f'echo PID=$$; exec {inner}')}; echo RC=$?")
        pid = int(self.wait_for(r"^PID=(\d+)", after=start).group(1))
        self.client_pids.append(pid)
        self._started_at[pid] = start
        return pid

    def wait_exit(self, pid: int, timeout: float = 30.0) -> int:
        """The client's exit status as the local shell saw it (``$?``)."""
        after = self._started_at.get(pid, 0)
        code = int(self.wait_for(r"^RC=(\d+)", timeout=timeout, after=after).group(1))
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the client's process is still there after the shell saw it exit"
        return code

    def local_modes(self) -> set[str]:
        """``stty -a`` of the pane, run by the local shell: typed after the client ended, so
        it only runs at all when the terminal turns a Return into a newline again."""
        self._checks += 1
        out = self.tmp_path / f"stty-{self._checks}.txt"
        start = self.mark()
        self.type(f"stty -a > {shlex.quote(str(out))}; echo STTY{self._checks}-D''ONE")
        self.wait_for(rf"^STTY{self._checks}-DONE", after=start)
        return set(re.split(r"[\s;]+", out.read_text()))

    def assert_cooked(self) -> None:
        modes = self.local_modes()
        for flag in ("icanon", "echo", "isig", "icrnl", "opost", "onlcr"):
            assert flag in modes, f"the terminal was left with -{flag}: {sorted(modes)}"
        # Echo is on for real: what is typed now shows up in the pane.
        start = self.mark()
        self.type("echo typed-back", enter=False)
        self.wait_for(r"echo typed-back", after=start, timeout=10)
        self.type("")
        self.wait_for(r"^typed-back$", after=start, timeout=10)
        assert not self.alternate_screen(), "the pane was left in the alternate screen"


# Fixtures --------------------------------------------------------------------------------


@pytest.fixture
def remote_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The host-mode vault's HOME: a login bash there gets a known prompt, no history."""
    home = tmp_path / "remote-home"
    home.mkdir()
    (home / ".bash_profile").write_text(f"PS1='{REMOTE_PROMPT}'\nPROMPT_COMMAND=\nunset HISTFILE\n")
    (home / ".profile").write_text(f"PS1='{REMOTE_PROMPT}'\n")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def init(tmp_path: Path, fly_api: FlyApiSocket, remote_home: Path) -> Iterator[InitProcess]:
    running = start_init(tmp_path, fly_api.path)  # inherits HOME=remote_home
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def vault(init: InitProcess, issuer: OidcIssuer) -> str:
    from flyvault.config import save_vault

    save_vault(vault_entry(init.port, issuer, name="t"))
    return "t"


@pytest.fixture
def pane(tmp_path: Path, vault: str) -> Iterator[Pane]:
    local_home = tmp_path / "local-home"
    local_home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(local_home),
        "TERM": TERM,
        "PS1": LOCAL_PROMPT,
        "LANG": "C.UTF-8",
    }
    # XDG_RUNTIME_DIR: exec's connection keeper lives in the test's own directory and is
    # stopped at teardown, not left in the shared /tmp/fly-vault-<uid>.
    names = ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")
    for name in (*names, "XDG_RUNTIME_DIR"):
        env[name] = os.environ[name]
    opened = Pane(tmp_path, env)
    try:
        yield opened
    finally:
        opened.close()


def connect(pane: Pane, *extra: str) -> int:
    pid = pane.start_client("connect", "t", *extra)
    try:
        pane.wait_for(rf"^{re.escape(REMOTE_PROMPT.rstrip())}", timeout=30)
    except AssertionError as exc:
        log = (pane.tmp_path / "init.log").read_text()[-3000:]
        raise AssertionError(f"{exc}\ninit log (tail):\n{log}") from None
    return pid


def remote(pane: Pane, command: str, expect: str, timeout: float = 20.0) -> re.Match[str]:
    """Type a command into the remote shell and wait for ``expect`` in what follows."""
    start = pane.mark()
    pane.type(command)
    return pane.wait_for(expect, after=start, timeout=timeout)


# connect ---------------------------------------------------------------------------------


@needs_tmux
def test_connect_shows_prompt_passes_term_and_exit_status(pane: Pane) -> None:
    pid = connect(pane)
    remote(pane, "echo TERM=$TERM; tty", rf"^TERM={re.escape(TERM)}\n/dev/pts/\d+$")
    remote(pane, "echo ONE''TWO", r"^ONETWO$")  # input and output both flow
    pane.type("exit 3")
    assert pane.wait_exit(pid) == 3
    pane.assert_cooked()


@needs_tmux
def test_stty_size_matches_pane_and_follows_resize(pane: Pane) -> None:
    pid = connect(pane)
    assert pane.size() == (ROWS, COLS)
    remote(pane, "stty size", rf"^{ROWS} {COLS}$")
    for rows, cols in ((40, 120), (20, 70)):
        pane.tmux("resize-window", "-t", "main", "-x", str(cols), "-y", str(rows))
        assert pane.size() == (rows, cols)
        # SIGWINCH reaches the client asynchronously: ask until the remote agrees.
        deadline = time.monotonic() + 15
        while True:
            start = pane.mark()
            pane.type("echo SIZE=$(stty size)")
            seen = pane.wait_for(r"^SIZE=(\d+ \d+)$", after=start).group(1)
            if seen == f"{rows} {cols}":
                break
            assert time.monotonic() < deadline, f"remote size stuck at {seen}, want {rows} {cols}"
            time.sleep(0.2)
    pane.type("exit")
    assert pane.wait_exit(pid) == 0
    pane.assert_cooked()


@needs_tmux
def test_resize_while_connecting_is_not_lost(pane: Pane, init: InitProcess) -> None:
    """The size is read before connecting; a resize before the SIGWINCH handler exists
    must still reach the shell. The vault is held (SIGSTOP) to widen that window."""
    os.kill(init.process.pid, signal.SIGSTOP)
    try:
        pid = pane.start_client("connect", "t")
        pane.wait_for(r"attested by the development issuer")  # printed, then size read
        pane.tmux("resize-window", "-t", "main", "-x", "90", "-y", "25")
    finally:
        os.kill(init.process.pid, signal.SIGCONT)
    pane.wait_for(rf"^{re.escape(REMOTE_PROMPT.rstrip())}", timeout=30)
    remote(pane, "echo SIZE=$(stty size)", r"^SIZE=25 90$")
    pane.type("exit")
    assert pane.wait_exit(pid) == 0
    pane.assert_cooked()


@needs_tmux
def test_escape_help_then_disconnect_exits_255(pane: Pane) -> None:
    pid = connect(pane)
    pane.type("")  # the escapes count only at the start of a line
    start = pane.mark()
    pane.type("~?", enter=False)
    pane.wait_for(r"~\.\s+disconnect", after=start)
    pane.type("")
    pane.type("~.", enter=False)
    assert pane.wait_exit(pid, timeout=15) == 255
    pane.wait_for(r"fly-vault: disconnected; the shell waits for you")
    pane.assert_cooked()
    # The notice names the command that comes back to the same shell.
    pane.wait_for(r"fly-vault exec t --session shell-[0-9a-f]+")
    session = re.findall(r"fly-vault exec t --session (shell-[0-9a-f]+)", pane.screen())[-1]
    start = pane.mark()
    pid = pane.start_client("exec", "t", "--session", session)
    # Attached once the shell's replayed output shows; type only then.
    pane.wait_for(rf"^{re.escape(REMOTE_PROMPT.rstrip())}", after=start)
    remote(pane, "echo BACK=$((6*7))", r"^BACK=42$")
    pane.type("exit")
    assert pane.wait_exit(pid, timeout=15) == 0


@needs_tmux
def test_ctrl_c_storm_reaches_the_remote_and_the_client_survives(pane: Pane) -> None:
    pid = connect(pane)
    # Every Ctrl-C arrives as a byte: count them with the remote terminal in raw mode.
    remote(
        pane,
        "stty raw -echo; echo RE''ADY; X=$(head -c 50 | tr -d '\\003' | wc -c); "
        "stty sane; echo LEFT=$X",
        r"READY",
    )
    pane.keys(*["C-c"] * 50)
    remote_left = pane.wait_for(r"LEFT=(\d+)").group(1)
    assert remote_left == "0", "bytes other than Ctrl-C reached the remote"
    # And as signals: a storm against a foreground command interrupts it, nothing more.
    # (Host mode: the remote shell is a process on this machine, so it can be watched.)
    shell = int(remote(pane, "echo SHELL=$$", r"^SHELL=(\d+)$").group(1))
    pane.type("sleep 300; echo NOT-INTER''RUPTED")
    sleeper = _wait_child(shell, "sleep")
    pane.keys(*["C-c"] * 50)
    deadline = time.monotonic() + 10
    while _alive(sleeper):
        assert time.monotonic() < deadline, "the remote sleep survived 50 Ctrl-C"
        time.sleep(0.05)
    assert _alive(pid)
    remote(pane, "echo SUR''VIVED", r"^SURVIVED$")
    assert "NOT-INTERRUPTED" not in pane.screen()
    pane.type("exit")
    assert pane.wait_exit(pid) == 0
    pane.assert_cooked()


@needs_tmux
def test_remote_shell_killed_exits_with_its_status(pane: Pane) -> None:
    pid = connect(pane)
    pane.type("kill -KILL $$")
    assert pane.wait_exit(pid) == 128 + signal.SIGKILL
    pane.assert_cooked()


@needs_tmux
def test_sigterm_to_the_client_restores_the_terminal(pane: Pane) -> None:
    pid = connect(pane)
    # The alternate screen starts empty: look at the whole pane, not past a mark.
    pane.type("printf '\\033[?1049h'; echo IN-A''LT")
    pane.wait_for(r"^IN-ALT")  # a full-screen program
    assert pane.alternate_screen()
    os.kill(pid, signal.SIGTERM)
    pane.wait_normal_screen(timeout=15)
    assert pane.wait_exit(pid, timeout=15) == 128 + signal.SIGTERM
    pane.wait_for(r"fly-vault: terminated by signal 15")
    pane.assert_cooked()


@needs_tmux
def test_closing_the_terminal_ends_the_client(pane: Pane, tmp_path: Path) -> None:
    """SIGHUP: the pane goes away under the client; it must exit at once, cleanly (the
    terminal it would report to is gone, so a failed write must not become a crash)."""
    rc_file = tmp_path / "hangup-rc"
    inner = shlex.join([sys.executable, "-m", "flyvault.cli.main", "connect", "t"])
    # A wrapper that survives the hang-up records the client's status.
    script = f"trap '' HUP; echo WRAP=$$; {inner}; echo $? > {shlex.quote(str(rc_file))}"
    pane.type(f"sh -c {shlex.quote(script)}")
    wrapper = int(pane.wait_for(r"^WRAP=(\d+)").group(1))
    pane.client_pids.append(wrapper)
    pane.wait_for(rf"^{re.escape(REMOTE_PROMPT.rstrip())}", timeout=30)
    children = Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split()
    assert len(children) == 1, children
    pid = int(children[0])
    pane.client_pids.append(pid)
    pane.tmux("new-window", "-d", "-t", "main")  # keeps the tmux server up
    pane.tmux("kill-pane", "-t", "main:0.0")
    deadline = time.monotonic() + 10
    while _alive(pid) or not (rc_file.exists() and rc_file.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the client outlived its terminal"
        time.sleep(0.05)
    # 129: the SIGHUP handler; 0: the shell saw the end of input first. Never a traceback.
    assert rc_file.read_text().strip() in ("129", "0")


@needs_tmux
def test_vault_dies_client_exits_255_within_bound(pane: Pane, init: InitProcess) -> None:
    """C1 and C2: kill init mid-session (left in the alternate screen); the client gives up
    within the idle timeout plus --reconnect-timeout, says why, and resets the terminal."""
    pid = connect(pane, "--reconnect-timeout", "3")
    # The alternate screen starts empty: look at the whole pane, not past a mark.
    pane.type("printf '\\033[?1049h'; echo IN-A''LT")
    pane.wait_for(r"^IN-ALT")
    assert pane.alternate_screen()
    init.process.kill()
    init.process.wait(timeout=10)
    started = time.monotonic()
    pane.wait_normal_screen(timeout=40)
    assert pane.wait_exit(pid, timeout=10) == 255
    elapsed = time.monotonic() - started
    pane.wait_for(r"fly-vault: error: vault 't' went away and did not come back within 3 s")
    pane.assert_cooked()  # includes: the reset left the alternate screen
    # Bound: the loss is noticed within the idle timeout (sooner here: the kernel's
    # "port unreachable" plus a 1.5 s grace), then 3 s of reconnecting, plus slack.
    assert elapsed < IDLE_TIMEOUT + 3 + 4, f"the client took {elapsed:.1f} s to give up"


# exec ------------------------------------------------------------------------------------


@needs_tmux
def test_exec_tty_uses_a_pty_of_the_pane_size(pane: Pane) -> None:
    pid = pane.start_client("exec", "-t", "t", "--", "sh", "-c", "stty size; tty; exit 7")
    pane.wait_for(rf"^{ROWS} {COLS}\n/dev/pts/\d+$")
    assert pane.wait_exit(pid) == 7
    pane.assert_cooked()


@needs_tmux
def test_exec_pty_follows_stdin_and_no_tty_gives_pipes(pane: Pane) -> None:
    pid = pane.start_client("exec", "t", "--", "sh", "-c", "[ -t 0 ] && echo STDIN-IS-A-PTY")
    pane.wait_for(r"^STDIN-IS-A-PTY")
    assert pane.wait_exit(pid) == 0
    pane.assert_cooked()
    start = pane.mark()
    pid = pane.start_client("exec", "-T", "t", "--", "sh", "-c", "[ -t 0 ] || echo PIPES")
    pane.wait_for(r"^PIPES", after=start)
    assert pane.wait_exit(pid) == 0
    pane.assert_cooked()


# EscapeDetector --------------------------------------------------------------------------


def feed_all(chunks: list[bytes]) -> tuple[bytes, list[str]]:
    detector = EscapeDetector()
    sent = bytearray()
    actions: list[str] = []
    for chunk in chunks:
        data, action = detector.feed(chunk)
        sent += data
        if action is not None:
            actions.append(action)
    return bytes(sent), actions


def test_escape_disconnect_at_start_of_input_and_after_newline() -> None:
    assert EscapeDetector().feed(b"~.") == (b"", "disconnect")
    assert EscapeDetector().feed(b"ls\r~.rest") == (b"ls\r", "disconnect")
    assert EscapeDetector().feed(b"ls\n~.") == (b"ls\n", "disconnect")


def test_escape_mid_line_passes_through() -> None:
    assert feed_all([b"echo a~.b\r"]) == (b"echo a~.b\r", [])
    assert feed_all([b"cd ~\r", b"x~~y"]) == (b"cd ~\rx~~y", [])


def test_escape_double_tilde_sends_one() -> None:
    assert feed_all([b"~~"]) == (b"~", [])
    assert feed_all([b"\r~~.x"]) == (b"\r~.x", [])  # and the line is no longer at its start


def test_escape_help() -> None:
    assert feed_all([b"~?"]) == (b"", ["help"])
    # After the help, a "~." on the same line is plain text.
    assert feed_all([b"~?", b"~."]) == (b"~.", ["help"])


def test_escape_other_character_sends_the_tilde_too() -> None:
    assert feed_all([b"~x"]) == (b"~x", [])
    assert feed_all([b"~\r~."]) == (b"~\r", ["disconnect"])


@pytest.mark.parametrize(
    "chunks, expected",
    [
        ([b"\r~", b"."], (b"\r", ["disconnect"])),
        ([b"\r", b"~", b"."], (b"\r", ["disconnect"])),
        ([b"~", b"~"], (b"~", [])),
        ([b"~", b"?"], (b"", ["help"])),
        ([b"~", b"a"], (b"~a", [])),
        ([b"ab~", b"."], (b"ab~.", [])),
    ],
)
def test_escape_split_across_feeds(chunks: list[bytes], expected: tuple[bytes, list[str]]) -> None:
    assert feed_all(chunks) == expected


def test_output_sink_flush_returns_after_everything_before_it_is_written() -> None:
    """After ``~.`` the queued session output is flushed before the disconnect notice is
    printed on stderr, so the notice is the last thing on the screen (a CI run once saw the
    remote prompt printed after it)."""
    import asyncio

    from flyvault.cli.terminal import OutputSink

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    sink = OutputSink(write_fd, capacity=4)

    async def scenario() -> bytes:
        # Fill the queue faster than the thread drains it, then flush.
        for index in range(50):
            await sink.write(b"chunk-%02d;" % index)
        await sink.flush()
        # Everything is in the pipe now: nothing arrives later.
        return os.read(read_fd, 65536)

    try:
        data = asyncio.run(scenario())
        assert data == b"".join(b"chunk-%02d;" % index for index in range(50))
        sink.close()
        with pytest.raises(BlockingIOError):
            os.read(read_fd, 65536)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_output_sink_flush_gives_up_on_a_terminal_that_stopped_reading() -> None:
    """``~.`` must still exit when the terminal no longer reads (the writer thread blocked
    and the queue full): flush waits a bounded time, not forever."""
    import asyncio

    from flyvault.cli.terminal import OutputSink

    read_fd, write_fd = os.pipe()
    sink = OutputSink(write_fd, capacity=2)

    async def scenario() -> float:
        block = b"x" * 65536
        for _ in range(6):  # fills the pipe (64 KiB), blocks the thread, fills the queue
            try:
                await asyncio.wait_for(sink.write(block), 0.5)
            except TimeoutError:
                break
        started = time.monotonic()
        await sink.flush(timeout=0.3)
        elapsed = time.monotonic() - started
        # Unblock the writer (EPIPE) so the executor thread stuck in a put can finish.
        os.close(read_fd)
        return elapsed

    try:
        assert asyncio.run(scenario()) < 5.0
    finally:
        sink.close()
        os.close(write_fd)
