"""``exec --user/--cwd/--env`` (protocol 4): the real CLI against a real init over QUIC.

Host mode runs as the host's ``nobody`` (init must be root to switch: skipped otherwise);
VM mode as an account of a busybox rootfs's own /etc/passwd and /etc/group. Bad values are
refused with exit 2 before any datagram leaves (a UDP socket of the test's stands in for the
vault and must receive nothing). The wire rules are checked on the codec and the machine.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import InitProcess, start_init, vault_entry
from rootfs_fixtures import BUSYBOX, directory, regular, symlink, write_archive

from flyvault.client import ExecRequest
from flyvault.errors import RemoteProtocolError, Unsupported, UsageError
from flyvault.protocol.codec import encode_frame
from flyvault.protocol.console import ConsoleFrame, OpenSession
from flyvault.protocol.constants import EXEC_USER_VERSION, PROTOCOL_VERSION
from flyvault.protocol.exec_client import ClientState, ExecClient
from flyvault.standins import OidcIssuer

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="switching users needs init to run as root")


def fv(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def vault(init_process: InitProcess, issuer: OidcIssuer, exec_route: str) -> str:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="t"))
    return "t"


# Host mode ------------------------------------------------------------------------------


@needs_root
def test_user_cwd_and_env_each_and_together(vault: str, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    who = fv("exec", vault, "--user", "nobody", "--", "sh", "-c", "id -un; id -u; id -G")
    assert who.returncode == 0, who.stderr
    assert who.stdout.split() == ["nobody", str(nobody.pw_uid), str(nobody.pw_gid)]

    login = fv("exec", vault, "-u", "nobody", "--", "sh", "-c", "echo $HOME $USER $LOGNAME; pwd")
    assert login.returncode == 0, login.stderr
    # nobody's home (/nonexistent) is missing: a login starts in / then, as sshd does.
    assert login.stdout.split() == [nobody.pw_dir, "nobody", "nobody", "/"]

    where = fv("exec", vault, "--cwd", str(tmp_path), "--", "pwd")
    assert (where.returncode, where.stdout) == (0, f"{tmp_path}\n"), where.stderr

    env = fv(
        "exec", vault, "--env", "FOO=bar", "--env", "EQ=a=b", "--", "sh", "-c", "echo $FOO $EQ"
    )
    assert (env.returncode, env.stdout) == (0, "bar a=b\n"), env.stderr

    together = fv(
        "exec",
        vault,
        "--user",
        "nobody",
        "--cwd",
        "/tmp",
        "--env",
        "FOO=over",
        "--env",
        "HOME=/elsewhere",  # the request's variables go over the login's
        "--",
        "sh",
        "-c",
        "id -un; pwd; echo $FOO $HOME",
    )
    assert together.returncode == 0, together.stderr
    assert together.stdout.splitlines() == ["nobody", "/tmp", "over /elsewhere"]


@needs_root
def test_user_in_a_pty(vault: str) -> None:
    result = fv("exec", vault, "-t", "--user", "nobody", "--", "sh", "-c", "id -un; tty")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[0] == "nobody" and lines[1].startswith("/dev/pts/")


def test_unknown_user_and_missing_cwd_are_refused(vault: str) -> None:
    # Refused by the vault: exec's own failures are 255; a command that cannot start is
    # 127 (or 126), as ssh's remote shell gives.
    unknown = fv("exec", vault, "--user", "no-such-user-zz", "--", "true")
    assert unknown.returncode == 255
    assert "cannot run as user 'no-such-user-zz': no such user in this host's /etc/passwd" in (
        unknown.stderr
    )
    missing = fv("exec", vault, "--cwd", "/no/such/dir", "--", "true")
    assert missing.returncode == 127
    assert "cannot change directory to '/no/such/dir'" in missing.stderr
    assert "no exec sessions" in fv("list-exec", vault).stdout  # nothing was left behind


def test_bytes_that_are_not_utf8_reach_the_command_as_they_are(vault: str, tmp_path: Path) -> None:
    """A Latin-1 file name in an argument, --cwd or an --env value crashed the client (or
    the keeper) with a UnicodeEncodeError: the bytes now travel as they are, as ssh's do."""
    odd = tmp_path / os.fsdecode(b"caf\xe9")
    odd.mkdir()
    script = b'printf "%s|%s|%s" "$1" "$ODD" "$(pwd)"'
    options = [b"--cwd", os.fsencode(odd), b"--env", b"ODD=\xff\xfe"]
    command = ["sh", "-c", script, "sh", b"caf\xe9"]
    run = subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", "exec", *options, vault, "--", *command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == b"caf\xe9|\xff\xfe|" + os.fsencode(odd)
    missing = subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", "exec", vault, "--", b"/no/caf\xe9"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert missing.returncode == 127, missing.stderr
    assert b"cannot run '/no/caf\\xe9': No such file or directory" in missing.stderr
    assert b"Traceback" not in missing.stderr


def test_pwd_names_the_start_directory_and_env_term_wins_over_the_terminals(
    vault: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host mode handed a command init's own PWD and OLDPWD (python saw PWD=<init's
    directory> in --cwd /tmp), and a PTY's TERM overrode --env TERM=..."""
    show = "import os; print(os.getcwd(), os.environ.get('PWD'), os.environ.get('OLDPWD'))"
    moved = fv("exec", vault, "--cwd", str(tmp_path), "--", sys.executable, "-c", show)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.split() == [str(tmp_path), str(tmp_path), "None"]
    home = fv("exec", vault, "--", sys.executable, "-c", show)
    where = home.stdout.split()
    assert where[0] == where[1] and where[2] == "None", home.stdout
    chosen = fv("exec", vault, "--env", "PWD=/x", "--", sys.executable, "-c", show)
    assert chosen.stdout.split()[1] == "/x"
    monkeypatch.setenv("TERM", "xterm-256color")  # the terminal's own, whatever CI has
    term = fv("exec", vault, "-t", "--env", "TERM=dumb", "--", "printenv", "TERM")
    assert term.returncode == 0, term.stderr
    assert term.stdout.strip() == "dumb"
    plain = fv("exec", vault, "-t", "--", "printenv", "TERM")
    assert plain.stdout.strip() == "xterm-256color"


def test_a_lone_surrogate_is_no_byte_and_is_refused_before_connecting() -> None:
    for fields in ({"argv": ("echo", "\ud800")}, {"argv": ("true",), "cwd": "/\udfff"}):
        with pytest.raises(UsageError, match="lone surrogate"):
            ExecRequest(session_id="s", **fields)  # type: ignore[arg-type]
    # A byte that is not UTF-8 (surrogateescape) is a byte, and counts as one.
    ExecRequest(session_id="s", argv=("echo", "caf\udce9"), env=(("X", "\udcff"),))
    # A context is a label, not a command line's bytes: text only (it crashed the client).
    with pytest.raises(UsageError, match="context is not UTF-8 text"):
        ExecRequest(session_id="s", argv=("true",), context="c\udce9")


@needs_root
def test_reattach_keeps_the_sessions_own_user(vault: str) -> None:
    first = fv("exec", vault, "--session", "as-nobody", "--user", "nobody", "--", "id", "-un")
    assert (first.returncode, first.stdout) == (0, "nobody\n"), first.stderr
    # The session exists: it is followed, not run again, whatever user the request names
    # (--from-start: its whole output, not only what this machine has not shown).
    again = fv(
        "exec", vault, "--session", "as-nobody", "--from-start", "--user", "root", "--", "id", "-un"
    )
    assert (again.returncode, again.stdout) == (0, "nobody\n"), again.stderr
    plain = fv("exec", vault, "--session", "as-nobody", "--from-start")
    assert (plain.returncode, plain.stdout) == (0, "nobody\n"), plain.stderr
    shown = fv("exec", vault, "--session", "as-nobody")  # all of it was shown here already
    assert (shown.returncode, shown.stdout) == (0, ""), shown.stderr
    listing = json.loads(fv("list-exec", vault, "--json").stdout)
    assert [(s["session_id"], s["user"]) for s in listing] == [("as-nobody", "nobody")]


# Refused before connecting ----------------------------------------------------------------


@pytest.fixture
def silent_vault(issuer: OidcIssuer) -> Iterator[socket.socket]:
    """A vault entry whose address is a UDP socket of ours: any datagram would show."""
    from flyvault.config import save_vault

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    save_vault(vault_entry(sock.getsockname()[1], issuer, name="quiet"))
    yield sock
    sock.close()


BAD = [
    (["--env", "NOEQUALS"], "--env 'NOEQUALS': expected NAME=VALUE"),
    (["--env", "=value"], "--env '=value': expected NAME=VALUE"),
    (["--env", "1ST=x"], "invalid environment variable name '1ST'"),
    (["--env", "A-B=x"], "invalid environment variable name 'A-B'"),
    (["--cwd", "relative/dir"], "the working directory 'relative/dir' is not an absolute path"),
    (["--user", "bad:name"], "invalid user name 'bad:name'"),
    (["--user", ""], "invalid user name ''"),
    ([arg for i in range(1025) for arg in ("--env", f"V{i}=1")], "1025 environment variables"),
    (
        [arg for i in range(3) for arg in ("--env", f"BIG{i}={'x' * 100_000}")],
        "add up to 300012 bytes, more than 262144",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_values_exit_2_before_connecting(
    silent_vault: socket.socket, args: list[str], message: str
) -> None:
    result = fv("exec", "quiet", *args, "--", "true", timeout=30)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    with pytest.raises(BlockingIOError):
        silent_vault.recv(65536)  # not one datagram was sent


def test_connect_checks_its_user_before_connecting(silent_vault: socket.socket) -> None:
    result = fv("connect", "quiet", "--user", "no/slash", timeout=30)
    assert result.returncode == 2
    assert "invalid user name 'no/slash'" in result.stderr
    with pytest.raises(BlockingIOError):
        silent_vault.recv(65536)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"env": (("A", "x\0y"),)}, "environment variable A contains a NUL byte"),
        ({"env": (("A\0B", "x"),)}, "invalid environment variable name"),
        ({"cwd": "/tmp\0x"}, "cwd contains a NUL byte"),
        ({"cwd": "tmp"}, "not an absolute path"),
        ({"user": "x" * 40}, "invalid user name"),
        ({"user": "-rf"}, "invalid user name '-rf'"),
    ],
)
def test_exec_request_checks(fields: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        ExecRequest(session_id="s", argv=("true",), **fields)  # type: ignore[arg-type]


# The wire -------------------------------------------------------------------------------


def test_open_without_user_is_the_protocol_3_frame_and_with_user_round_trips() -> None:
    plain = OpenSession("s", ("id",), cwd="/tmp", env=(("A", "b"),))
    named = OpenSession("s", ("id",), cwd="/tmp", env=(("A", "b"),), user="alice")
    # Without a user nothing is appended: what every older server decodes.
    assert named.encode() == plain.encode() + b"\x00\x00\x00\x05alice"
    assert OpenSession.decode(plain.encode()) == plain
    assert OpenSession.decode(named.encode()) == named
    bad = OpenSession("s", ("id",), user="x:0:0")
    with pytest.raises(RemoteProtocolError, match="invalid user name"):
        OpenSession.decode(bad.encode())


def test_client_never_sends_a_user_to_an_older_server() -> None:
    assert EXEC_USER_VERSION == 4 <= PROTOCOL_VERSION
    machine = ExecClient(OpenSession("s", ("id",), user="alice"))
    with pytest.raises(Unsupported, match="speaks protocol 3, which cannot run a command as"):
        machine.open_stream(3)
    assert machine.state is ClientState.IDLE and machine.data_to_send() == b""
    opened = machine.open_stream(4)
    assert opened == encode_frame(ConsoleFrame.OPEN, machine.request.encode())
    # Reattaches carry no user (the session keeps its own), so any version takes them.
    machine.stream_lost()
    assert machine.open_stream(3)
    assert machine.request.user is None
    # Without a user a protocol 3 server is served as before.
    assert ExecClient(OpenSession("t", ("id",))).open_stream(3)


# VM mode --------------------------------------------------------------------------------

APPLETS = ("sh", "id", "echo", "cat", "ls", "true", "env")


def _rootfs(path: Path) -> Path:
    return write_archive(
        path,
        [
            directory("./"),
            directory("bin"),
            regular("bin/busybox", BUSYBOX.read_bytes(), 0o755),
            *(symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
            directory("sbin"),
            symlink("sbin/init", "../bin/busybox"),
            directory("etc"),
            regular(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000::/home/dev:/bin/sh\n"
                b"gone:x:1001:1001::/home/gone:/bin/sh\n",
            ),
            regular(
                "etc/group", b"root:x:0:\ndev:x:1000:\nwheel:x:10:root,dev\ndocker:x:999:dev\n"
            ),
            directory("root", 0o700),
            directory("home"),
            directory("home/dev", 0o750, uid=1000, gid=1000),
            directory("srv"),
            directory("tmp", 0o1777),
            directory("proc"),
            directory("dev"),
        ],
        "gz",
    )


@pytest.fixture
def vm_vault(tmp_path: Path, fly_api: object, issuer: OidcIssuer, exec_route: str) -> Iterator[str]:
    from flyvault.config import save_vault

    init = start_init(tmp_path, fly_api.path, host_mode=False)  # type: ignore[attr-defined]
    save_vault(vault_entry(init.port, issuer, name="vm", rootfs=str(_rootfs(tmp_path / "r.tgz"))))
    yield "vm"
    init.stop()


@needs_root
@pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_vm_mode_runs_as_an_account_of_the_images_passwd(vm_vault: str) -> None:
    script = "id -un; id -u; id -G; pwd; echo $HOME $USER $SHELL $PATH $FOO"
    dev = fv("exec", vm_vault, "--user", "dev", "--env", "FOO=bar", "--", "sh", "-c", script)
    assert dev.returncode == 0, dev.stderr
    assert dev.stdout.splitlines() == [
        "dev",
        "1000",
        "1000 10 999",  # primary group, then its /etc/group memberships
        "/home/dev",
        "/home/dev dev /bin/sh /usr/local/bin:/usr/bin:/bin bar",
    ]
    elsewhere = fv("exec", vm_vault, "--user", "dev", "--cwd", "/srv", "--", "sh", "-c", "pwd")
    assert (elsewhere.returncode, elsewhere.stdout) == (0, "/srv\n"), elsewhere.stderr
    root = fv("exec", vm_vault, "--", "sh", "-c", "id -un; pwd")
    assert (root.returncode, root.stdout.split()) == (0, ["root", "/root"]), root.stderr
    # A home that is missing: the command starts in /, and PWD says so (env: no shell to
    # correct it). It said the missing home.
    gone = fv("exec", vm_vault, "--user", "gone", "--", "env")
    assert gone.returncode == 0, gone.stderr
    assert "PWD=/" in gone.stdout.splitlines(), gone.stdout
    assert "OLDPWD" not in gone.stdout

    unknown = fv("exec", vm_vault, "--user", "ghost", "--", "true")
    assert unknown.returncode == 255
    assert "no such user in the vault's /etc/passwd" in unknown.stderr
    missing = fv("exec", vm_vault, "--user", "dev", "--cwd", "/nope", "--", "true")
    assert missing.returncode == 127 and "cannot change directory to '/nope'" in missing.stderr
    # The directory is entered as the user: root's 0700 home is not theirs to enter.
    denied = fv("exec", vm_vault, "--user", "dev", "--cwd", "/root", "--", "true")
    assert denied.returncode == 126 and "Permission denied" in denied.stderr
