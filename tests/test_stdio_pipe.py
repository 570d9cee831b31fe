"""``fly-vault forward --stdio`` and ``fly-vault ssh-config`` end to end: the real CLI as a
process against a real init (host mode, QUIC on 127.0.0.1), real TCP targets, and a real
OpenSSH client and sshd (with a throwaway host key, user and client key) through the pipe.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import os
import pwd
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, vault_entry

from flyvault.errors import TargetUnreachable
from flyvault.standins import OidcIssuer

FLY_VAULT = Path(sys.executable).parent / "fly-vault"
SSHD = "/usr/sbin/sshd"
SSH_USER = "fvpipe"
MiB = 1024 * 1024


@pytest.fixture
def vault(init_process: InitProcess, issuer: OidcIssuer) -> str:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="t"))
    return "t"


def fly_vault(*args: str) -> list[str]:
    if not FLY_VAULT.exists():
        pytest.skip(f"{FLY_VAULT} missing: install the project into the environment (./run setup)")
    return [str(FLY_VAULT), *args]


def pipe(target: str, vault: str = "t") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        fly_vault("forward", "--stdio", vault, target),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


class Target:
    """A TCP server on 127.0.0.1 (the vault's side, host mode): one thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handler(conn)
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@contextlib.contextmanager
def target(handler: Callable[[socket.socket], None]) -> Iterator[Target]:
    server = Target(handler)
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, server.errors


def read_to_eof(stream: Any, timeout: float = 30) -> bytes:
    """Everything until end-of-file, failing after ``timeout`` (select: no blind sleeping)."""
    fd, seen = stream.fileno(), bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no end of output within {timeout} s; got {len(seen)} bytes"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return bytes(seen)
            seen += chunk


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# Argument errors: exit 2, nothing sent ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("forward", "--stdio", "t", "8080:localhost:80"), "takes one HOST:PORT"),
        (("forward", "--stdio", "t", "localhost"), "missing ':PORT'"),
        (("forward", "--stdio", "t", "localhost:0"), "out of range"),
        (("forward", "--stdio", "t", "localhost:22", "localhost:23"), "exactly one HOST:PORT"),
        (("forward", "--stdio", "t"), "the following arguments are required"),
        (("ssh-config", "nope"), "vault nope not found"),
        (("ssh-config", "t", "--port", "0"), "--port"),
        (("ssh-config", "t", "--user", "a b"), "invalid --user"),
        (("ssh-config", "t", "--host-alias", "*"), "invalid --host-alias"),
    ],
)
def test_argument_errors_exit_2_before_connecting(
    issuer: OidcIssuer, args: tuple[str, ...], message: str
) -> None:
    from flyvault.config import save_vault

    # The vault's address is a UDP socket of ours: any connection attempt would land here.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as trap:
        trap.bind(("127.0.0.1", 0))
        trap.setblocking(False)
        save_vault(vault_entry(trap.getsockname()[1], issuer, name="t"))
        result = subprocess.run(
            fly_vault(*args), stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr.decode(), result.stderr
        assert result.stdout == b""
        with pytest.raises(BlockingIOError):
            trap.recv(2048)


def test_plain_forward_usage_is_unchanged() -> None:
    result = subprocess.run(fly_vault("forward", "--help"), capture_output=True, timeout=30)
    assert result.returncode == 0
    usage = result.stdout.decode()
    assert "forward VAULT L:HOST:R [L:HOST:R ...]" in usage
    assert "forward --stdio VAULT HOST:PORT" in usage


HEAVY_IMPORTS = """
import sys
from flyvault.cli.main import main
code = main(sys.argv[1:])
print(sorted(m for m in sys.modules if m.split('.')[0] in ('aioquic', 'cryptography', 'jwt')))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args", [("forward", "--stdio", "t", "nohost"), ("ssh-config", "t"), ("ssh-config", "x")]
)
def test_argument_checks_and_ssh_config_import_no_quic_or_crypto(
    issuer: OidcIssuer, args: tuple[str, ...]
) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(9, issuer, name="t"))
    result = subprocess.run(
        [sys.executable, "-c", HEAVY_IMPORTS, *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode in (0, 2), result.stderr
    assert result.stdout.rstrip().endswith("[]"), result.stdout


# The pipe --------------------------------------------------------------------------------


def test_refused_port_names_the_target_and_exits_with_its_code(vault: str) -> None:
    port = free_port()  # nothing listens there now
    proc = pipe(f"127.0.0.1:{port}")
    out, err = proc.communicate(b"hello", timeout=60)
    assert proc.returncode == TargetUnreachable.exit_code, err
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in err.decode()
    assert out == b""


def test_a_target_that_resets_is_named_and_is_not_a_lost_vault(vault: str) -> None:
    """A reset from the target said "peer reset stream 68 (code 1)" and exited 4, the code
    of a lost connection to the vault."""

    def reset(conn: socket.socket) -> None:
        # Our bytes arrived: the vault's connect is complete (a reset before that is a
        # failed connect, "cannot connect to ...", another error).
        assert conn.recv(2) == b"hi"
        conn.sendall(b"some")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with target(reset) as server:
        proc = pipe(f"127.0.0.1:{server.port}")
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(b"hi")
        proc.stdin.flush()
        try:
            assert proc.wait(timeout=60) == 10  # stdin still open: the reset ended it
            err = proc.stderr.read().decode()
        finally:
            proc.stdin.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert f"the connection to 127.0.0.1:{server.port} was reset" in err, err
    assert "peer reset stream" not in err


def test_a_stdout_that_fails_or_a_closed_stdin_is_one_line(vault: str) -> None:
    """/dev/full as stdout ended in a 51-line traceback; a closed stdin let the event
    loop's own descriptor take fd 0."""

    def talk(conn: socket.socket) -> None:
        conn.sendall(b"x" * 100_000)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    with target(talk) as server, open("/dev/full", "wb") as full:
        proc = subprocess.run(
            fly_vault("forward", "--stdio", "t", f"127.0.0.1:{server.port}"),
            stdin=subprocess.PIPE,  # held open by the child until it fails
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 10, err
    assert "forward --stdio: standard output: no space left on device (ENOSPC)" in err
    assert "Traceback" not in err
    closed = subprocess.run(
        fly_vault("forward", "--stdio", "t", "127.0.0.1:1"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        preexec_fn=lambda: os.close(0),
        timeout=60,
    )
    assert closed.returncode == 2
    assert b"standard input is closed" in closed.stderr


def test_stdin_eof_half_closes_and_the_answer_still_arrives(vault: str) -> None:
    def answer_after_eof(conn: socket.socket) -> None:
        hasher, total = hashlib.sha256(), 0
        while chunk := conn.recv(65536):  # until our FIN: the pipe's stdin ended
            hasher.update(chunk)
            total += len(chunk)
        conn.sendall(f"{total} {hasher.hexdigest()}\n".encode())

    payload = os.urandom(3 * MiB)
    with target(answer_after_eof) as server:
        proc = pipe(f"127.0.0.1:{server.port}")
        out, err = proc.communicate(payload, timeout=60)
    assert proc.returncode == 0, err
    assert out == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_remote_close_closes_stdout_then_stdin_eof_exits_0(vault: str) -> None:
    greeted = threading.Event()

    def greet_and_close(conn: socket.socket) -> None:
        conn.sendall(b"\x00\xffbye\r\n")
        greeted.set()

    with target(greet_and_close) as server:
        proc = pipe(f"127.0.0.1:{server.port}")
        assert proc.stdout is not None and proc.stdin is not None
        try:
            # stdin stays open: stdout still ends, as the target's FIN arrived.
            assert read_to_eof(proc.stdout) == b"\x00\xffbye\r\n"
            assert proc.poll() is None
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert greeted.is_set()


def test_sighup_from_ssh_ends_the_target_connection_at_once(vault: str) -> None:
    """ssh ends its ProxyCommand with SIGHUP: the vault must drop the target's connection
    then, not when the QUIC connection times out (15 s on the client, 60 s on the server)."""
    connected, ended = threading.Event(), threading.Event()

    def wait_for_end(conn: socket.socket) -> None:
        connected.set()
        with contextlib.suppress(ConnectionResetError):
            while conn.recv(65536):
                pass
        ended.set()

    with target(wait_for_end) as server:
        proc = pipe(f"127.0.0.1:{server.port}")
        try:
            assert connected.wait(30)
            proc.send_signal(signal.SIGHUP)
            assert proc.wait(timeout=30) == 128 + signal.SIGHUP
            assert ended.wait(10), "the target's connection outlived the pipe"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_large_binary_round_trip_keeps_memory_bounded(vault: str) -> None:
    """48 MiB through an echo target while stdout is read in small pieces: the bytes in
    flight (written to stdin, not yet read back) and the client's RSS stay bounded."""

    def echo(conn: socket.socket) -> None:
        # Small kernel buffers: what the pipeline holds must be held by the programs.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        while chunk := conn.recv(65536):
            conn.sendall(chunk)

    size = 48 * MiB
    block = os.urandom(MiB)
    expected = hashlib.sha256(block * (size // MiB)).hexdigest()
    with target(echo) as server:
        proc = pipe(f"127.0.0.1:{server.port}")
        assert proc.stdin is not None and proc.stdout is not None
        written = 0

        def feed() -> None:
            nonlocal written
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                for _ in range(size // MiB):
                    proc.stdin.write(block)
                    proc.stdin.flush()
                    written += MiB
                proc.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            got, in_flight, rss, hasher = 0, 0, [], hashlib.sha256()
            fd, deadline = proc.stdout.fileno(), time.monotonic() + 120
            while True:
                assert time.monotonic() < deadline, f"round trip stalled at {got} bytes"
                if not select.select([fd], [], [], 5)[0]:
                    continue
                chunk = os.read(fd, 16 * 1024)  # a slower reader than the pipe's writer
                if not chunk:
                    break
                hasher.update(chunk)
                got += len(chunk)
                in_flight = max(in_flight, written - got)
                if got % (4 * MiB) < len(chunk):
                    rss.append(_rss_kib(proc.pid))
            assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        feeder.join(timeout=30)
    print(f"\nstdio pipe: at most {in_flight / MiB:.1f} MiB in flight; RSS KiB {rss}")
    assert got == size
    assert hasher.hexdigest() == expected
    assert in_flight < 16 * MiB, "the pipe buffered instead of holding the writer back"
    samples = [value for value in rss if value]
    assert samples and max(samples) - samples[0] < 24 * 1024, samples


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ssh-config --------------------------------------------------------------------------------


def test_ssh_config_prints_a_host_block(vault: str) -> None:
    result = subprocess.run(
        fly_vault("ssh-config", vault, "--user", "dev", "--port", "2222", "--host-alias", "box"),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.decode().splitlines()]
    assert "Host box" in lines
    assert "User dev" in lines
    assert "Port 2222" in lines
    assert "HostKeyAlias fly-vault.t" in lines
    # The config was found through XDG_CONFIG_HOME (the tests' own): pinned, since an IDE's
    # ssh runs without that variable and would look in ~/.config.
    config = Path(os.environ["XDG_CONFIG_HOME"]).resolve() / "fly-vault" / "config.toml"
    pinned = f"ProxyCommand env FLY_VAULT_CONFIG={config} {FLY_VAULT} forward --stdio t"
    assert f"{pinned} localhost:%p" in lines
    home = Path(os.environ["XDG_CONFIG_HOME"]).parent / "home"
    (home / ".config" / "fly-vault").mkdir(parents=True)
    (home / ".config" / "fly-vault" / "config.toml").write_bytes(config.read_bytes())
    plain_env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    plain = subprocess.run(
        fly_vault("ssh-config", vault),
        capture_output=True,
        timeout=30,
        env=plain_env | {"HOME": str(home)},
    )
    assert plain.returncode == 0, plain.stderr
    assert f"ProxyCommand {FLY_VAULT} forward --stdio t localhost:%p" in plain.stdout.decode()


def test_a_vault_name_that_is_no_host_alias_asks_for_one(issuer: OidcIssuer) -> None:
    """It said "invalid --host-alias '_dev'" of a --host-alias never given."""
    from flyvault.config import save_vault

    save_vault(vault_entry(9, issuer, name="_dev"))
    result = subprocess.run(fly_vault("ssh-config", "_dev"), capture_output=True, timeout=30)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert "vault name '_dev' cannot be an ssh Host alias" in err
    assert "fly-vault ssh-config _dev --host-alias NAME" in err
    named = fly_vault("ssh-config", "_dev", "--host-alias", "dev")
    assert subprocess.run(named, capture_output=True, timeout=30).returncode == 0
    plain = subprocess.run(
        fly_vault("forward", "_dev", "localhost:22"), capture_output=True, timeout=30
    )
    assert plain.returncode == 2 and b"forward --stdio" in plain.stderr


# A real OpenSSH client and sshd through the pipe -------------------------------------------


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """sshd on a free loopback port, a throwaway user with an empty home and a fresh key."""
    if os.geteuid() != 0:
        pytest.skip("needs root: sshd logs a throwaway user in (useradd, privilege separation)")
    for tool in (SSHD, "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install openssh-server openssh-client rsync")
    home = Path(tempfile.mkdtemp(prefix="fvpipe-home-"))  # reachable by the user, not tmp_path
    created = False
    process: subprocess.Popen[bytes] | None = None
    try:
        try:
            pwd.getpwnam(SSH_USER)
            subprocess.run(["usermod", "-d", str(home), "-s", "/bin/sh", SSH_USER], check=True)
        except KeyError:
            subprocess.run(
                ["useradd", "-M", "-d", str(home), "-s", "/bin/sh", SSH_USER], check=True
            )
            created = True
        subprocess.run(["usermod", "-p", "*", SSH_USER], check=True)  # "!" = locked for sshd
        entry = pwd.getpwnam(SSH_USER)
        keys = tmp_path / "keys"
        keys.mkdir()
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        subprocess.run([*keygen, "-f", str(keys / "id")], check=True)
        subprocess.run([*keygen, "-f", str(keys / "host")], check=True)
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text((keys / "id.pub").read_text())
        for path in (home, home / ".ssh", home / ".ssh" / "authorized_keys"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(home, 0o755)
        port = free_port()
        config = tmp_path / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{port}\nHostKey {keys / 'host'}\n"
            f"PidFile {tmp_path / 'sshd.pid'}\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nAuthenticationMethods publickey\n"
            f"AllowUsers {SSH_USER}\nPermitRootLogin no\nPrintMotd no\nUseDNS no\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
        log = tmp_path / "sshd.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        deadline = time.monotonic() + 20
        while not _listening(port):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "sshd did not listen"
            time.sleep(0.02)
        host_key = (keys / "host.pub").read_text().split()
        yield {"port": port, "home": home, "keys": keys, "host_key": host_key, "log": log}
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if created:
            _wait_for_user_processes(SSH_USER)
            subprocess.run(["userdel", SSH_USER], check=False)
        shutil.rmtree(home, ignore_errors=True)


def _wait_for_user_processes(user: str, timeout: float = 15) -> None:
    """sshd's per-connection processes of the last session end on their own shortly after
    it (userdel refuses while they run); zombies left to PID 1 do not count."""
    uid = pwd.getpwnam(user).pw_uid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        _live_owner(entry) == uid for entry in Path("/proc").iterdir() if entry.name.isdigit()
    ):
        time.sleep(0.05)


def _live_owner(proc: Path) -> int | None:
    try:
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        return None if state == "Z" else proc.stat().st_uid
    except (OSError, IndexError):
        return None


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _client_options(sshd: dict[str, Any], tmp_path: Path, host_names: str) -> str:
    known = tmp_path / "known_hosts"
    known.write_text(f"{host_names} {sshd['host_key'][0]} {sshd['host_key'][1]}\n")
    return (
        "Host *\n"
        f"  IdentityFile {sshd['keys'] / 'id'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n"
        "  ControlMaster no\n  ControlPath none\n"
    )


def test_openssh_and_rsync_through_the_pipe(
    vault: str, sshd: dict[str, Any], tmp_path: Path
) -> None:
    # 1. ssh with the ProxyCommand given by hand, as the issue shows it.
    plain = tmp_path / "plain_config"
    plain.write_text(_client_options(sshd, tmp_path, "vault-by-hand"))
    proxy = f"{FLY_VAULT} forward --stdio {vault} 127.0.0.1:{sshd['port']}"
    command = [
        "ssh",
        "-F",
        str(plain),
        "-o",
        f"ProxyCommand={proxy}",
        "-o",
        "HostKeyAlias=vault-by-hand",
        f"{SSH_USER}@vault-by-hand",
        "echo through-the-vault; id -un",
    ]
    result = subprocess.run(command, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stderr, sshd["log"].read_text()[-2000:])
    assert result.stdout == f"through-the-vault\n{SSH_USER}\n".encode()

    # 2. The block ssh-config prints, with only the test's key and known hosts added.
    block = subprocess.run(
        fly_vault(
            "ssh-config",
            vault,
            "--user",
            SSH_USER,
            "--port",
            str(sshd["port"]),
            "--host-alias",
            "devbox",
        ),
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout.decode()
    generated = tmp_path / "ssh_config"
    generated.write_text(block + _client_options(sshd, tmp_path, f"fly-vault.{vault}"))
    result = subprocess.run(
        ["ssh", "-F", str(generated), "devbox", "uname -s"], capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Linux\n"

    # 3. rsync -a of a small tree, there and back, with the generated config.
    source = tmp_path / "tree"
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "empty").mkdir()
    (source / "a.txt").write_text("alpha\n")
    (source / "sub" / "bin.dat").write_bytes(os.urandom(300_000) + bytes(range(256)))
    (source / "sub" / "deeper" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(source / "sub" / "deeper" / "script.sh", 0o755)
    (source / "link").symlink_to("a.txt")
    remote = sshd["home"] / "copy"
    ssh = f"ssh -F {generated}"
    there = subprocess.run(
        ["rsync", "-a", "-e", ssh, f"{source}/", f"devbox:{remote}/"],
        capture_output=True,
        timeout=120,
    )
    assert there.returncode == 0, there.stderr
    back = tmp_path / "back"
    again = subprocess.run(
        ["rsync", "-a", "-e", ssh, f"devbox:{remote}/", f"{back}/"],
        capture_output=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    for copy in (remote, back):
        _assert_same_tree(source, copy)


def _assert_same_tree(left: Path, right: Path) -> None:
    def listing(root: Path) -> dict[str, tuple[int, str | None]]:
        entries = {}
        for path in sorted(root.rglob("*")):
            info = path.lstat()
            target = os.readlink(path) if path.is_symlink() else None
            entries[str(path.relative_to(root))] = (info.st_mode, target)
        return entries

    assert listing(left) == listing(right)
    for name, (_mode, target) in listing(left).items():
        if target is None and (left / name).is_file():
            assert filecmp.cmp(left / name, right / name, shallow=False), name
