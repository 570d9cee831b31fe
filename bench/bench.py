#!/usr/bin/env python3
"""fly-vault against OpenSSH on one machine, loopback only. See bench/README.md.

    .venv/bin/python bench/bench.py [--quick] [--only B1,B2,B3,B4,BE] [--pin] [--out FILE]

One run sets up everything it measures and tears it down again:

- a temporary XDG home (config, data, cache, state) and an empty ``HOME``, with
  ``fly-vault local up`` there (host mode on 127.0.0.1) and ``local down`` at the end;
- ``openssh-server`` from apt-get when ``/usr/sbin/sshd`` is missing (services are not
  started: Debian's policy-rc.d is honoured), a dedicated user ``fvbench`` (shell /bin/sh,
  empty home, empty rc files, a key made for this run) and our own ``sshd`` on
  ``127.0.0.1:<free port>`` with a temporary config and host key;
- small TCP helpers (a byte source/sink and a plain Python relay) run as ``bench.py --peer``.

Every helper is started here, recorded by PID and killed by that PID in a ``finally``;
every loop is bounded in count and in time. Results go to
``bench/results/<UTC date>-<git short sha>.json`` and a summary table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
VENV_BIN = REPO / ".venv" / "bin"
FLY_VAULT = str(VENV_BIN / "fly-vault")
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
BENCH_USER = "fvbench"
VAULT = "local"
ALL_IDS = ("B1", "B2", "B3", "B4", "BE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
#: "RSS flat" for B4: growth of the forward client's RSS over its at-rest value while a slow
#: reader lags behind a fast source. Without backpressure it would grow by the whole backlog.
RSS_FLAT_LIMIT_KB = 16 * 1024


class BenchError(Exception):
    """A benchmark could not run as intended; recorded in the JSON, the others go on."""


# Statistics ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(values: list[float], unit: str, scale: float = 1.0) -> dict[str, Any]:
    """n, p50, p90, p99, mean, min, max, stdev of ``values * scale``, rounded for JSON."""
    scaled = [v * scale for v in values]

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "unit": unit,
        "n": len(scaled),
        "p50": r(percentile(scaled, 0.50)),
        "p90": r(percentile(scaled, 0.90)),
        "p99": r(percentile(scaled, 0.99)),
        "mean": r(statistics.fmean(scaled)) if scaled else None,
        "min": r(min(scaled)) if scaled else None,
        "max": r(max(scaled)) if scaled else None,
        "stdev": r(statistics.stdev(scaled)) if len(scaled) > 1 else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


# Processes -------------------------------------------------------------------------------


class Procs:
    """Every long-lived helper, by PID; ``stop_all`` kills them (newest first) by that PID."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[subprocess.Popen[Any], str]] = {}

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(argv, **kwargs)
        self.live[process.pid] = (process, name)
        return process

    def stop(self, process: subprocess.Popen[Any], timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL; Popen signals by PID and never a reaped one."""
        self.live.pop(process.pid, None)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)

    def stop_all(self) -> None:
        for pid in reversed(list(self.live)):
            process, name = self.live[pid]
            try:
                self.stop(process)
            except Exception as exc:  # keep killing the others
                print(f"bench: could not stop {name} (pid {pid}): {exc}", file=sys.stderr)


def proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces or parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def tree_cpu(root: int) -> float:
    """CPU seconds (user + sys) of ``root`` and all its live descendants, including what
    they already collected from reaped children (cutime/cstime)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(int(entry))
        if fields is None:
            continue
        # fields[0] is state, [1] ppid, [11..14] utime stime cutime cstime
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(x) for x in fields[11:15])
    if root not in ticks:
        return 0.0
    members = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                changed = True
    return sum(ticks[pid] for pid in members) / CLK_TCK


class CpuGroup:
    """Exact CPU time of a process and of everything it starts afterwards, exited or not.

    sshd's per-connection processes are not always reaped by their parents, so their CPU
    never reaches the listener's cutime: /proc arithmetic undercounts the server side. A
    cgroup charges every task in it, so the server's share is exact. cgroup v2 (``cpu.stat``
    usage_usec) is preferred, else v1 ``cpuacct``; without either, ``tree_cpu`` is used and
    the results say so.
    """

    CANDIDATES = (
        (Path("/sys/fs/cgroup/unified"), "cpu.stat"),
        (Path("/sys/fs/cgroup"), "cpu.stat"),
        (Path("/sys/fs/cgroup/cpuacct"), "cpuacct.usage"),
    )

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        self.root: Path | None = None
        self.file = ""
        for root, usage_file in self.CANDIDATES:
            if not (root / usage_file).exists() or not (root / "cgroup.procs").exists():
                continue
            path = root / f"fvbench-{os.getpid()}-{name}"
            try:
                path.mkdir()
            except OSError:
                continue
            if not (path / usage_file).exists():
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            self.path, self.root, self.file = path, root, usage_file
            break

    @property
    def method(self) -> str:
        return f"cgroup {self.path / self.file}" if self.path else "proc tree (approximate)"

    def add(self, pid: int) -> bool:
        if self.path is None:
            return False
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
            return True
        except OSError:
            return False

    def seconds(self) -> float | None:
        if self.path is None:
            return None
        text = (self.path / self.file).read_text()
        if self.file == "cpu.stat":
            for line in text.splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            return None
        return int(text) / 1e9

    def remove(self) -> None:
        """Called after our processes were stopped; moves any straggler out, then rmdir."""
        if self.path is None or self.root is None:
            return
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.procs").write_text(pid)
        deadline = time.monotonic() + 5
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    print(f"bench: could not remove {self.path}", file=sys.stderr)
                    return
                time.sleep(0.1)


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(
    argv: list[str], env: dict[str, str], timeout: float
) -> tuple[float, float, int, str]:
    """Run a command to completion: (wall s, its CPU s, exit code, stderr)."""
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:g} s: {' '.join(argv)}") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    wall = time.perf_counter() - t0
    return wall, children_cpu() - cpu0, process.returncode, err.decode("utf-8", "replace")


def check_output(argv: list[str], timeout: float = 60.0, **kwargs: Any) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {result.returncode}: {(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    what: str, predicate: Callable[[], bool], timeout: float, step: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready within {timeout:g} s")
        time.sleep(step)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# The TCP helper process (bench.py --peer ...) -------------------------------------------------


def peer_main(argv: list[str]) -> int:
    """``serve``: "GET n\\n" -> n bytes then close; "PUT\\n" + data + EOF -> 8-byte count.
    ``relay PORT``: a plain threaded socket pump to 127.0.0.1:PORT (the "Python for scale")."""
    mode = argv[0]
    lifetime = float(os.environ.get("BENCH_PEER_LIFETIME", "3600"))
    timer = threading.Timer(lifetime, lambda: os._exit(3))
    timer.daemon = True
    timer.start()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    print(server.getsockname()[1], flush=True)
    if mode == "serve":
        handler: Callable[..., None] = _peer_serve
        args: tuple[Any, ...] = ()
    elif mode == "relay":
        handler = _peer_relay
        args = (int(argv[1]),)
    else:
        raise SystemExit(f"unknown peer mode {mode}")
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handler, args=(conn, *args), daemon=True).start()


def _peer_serve(conn: socket.socket) -> None:
    conn.settimeout(120)
    try:
        request = b""
        while b"\n" not in request and len(request) < 64:
            chunk = conn.recv(64 - len(request))
            if not chunk:
                return  # a readiness probe
            request += chunk
        line, _, rest = request.partition(b"\n")
        if line.startswith(b"GET "):
            total = int(line[4:])
            block = memoryview(bytes(1 << 20))
            sent = 0
            while sent < total:
                size = min(len(block), total - sent)
                conn.sendall(block[:size])
                sent += size
            conn.shutdown(socket.SHUT_WR)
            # Wait for the reader's close: closing with unread input would send a RST.
            while conn.recv(65536):
                pass
        elif line == b"PUT":
            count = len(rest)
            buffer = bytearray(1 << 20)
            while n := conn.recv_into(buffer):
                count += n
            conn.sendall(struct.pack(">Q", count))
            conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def _peer_relay(conn: socket.socket, target: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", target), timeout=10)
    except OSError:
        conn.close()
        return
    upstream.settimeout(None)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        try:
            while n := src.recv_into(buffer):
                dst.sendall(view[:n])
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    other = threading.Thread(target=pump, args=(conn, upstream), daemon=True)
    other.start()
    pump(upstream, conn)
    other.join(600)
    conn.close()
    upstream.close()


def tcp_download(port: int, nbytes: int, timeout: float) -> float:
    """Seconds to receive ``nbytes`` from the source behind ``port`` (connect included)."""
    buffer = bytearray(1 << 20)
    t0 = time.perf_counter()
    deadline = t0 + timeout
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET %d\n" % nbytes)
        while n := sock.recv_into(buffer):
            got += n
            if time.perf_counter() > deadline:
                raise BenchError(f"download through port {port} exceeded {timeout:g} s")
    elapsed = time.perf_counter() - t0
    if got != nbytes:
        raise BenchError(f"download through port {port}: got {got} of {nbytes} bytes")
    return elapsed


def tcp_upload(port: int, nbytes: int, timeout: float) -> float:
    """Seconds to send ``nbytes`` and get the sink's count back (connect included)."""
    block = memoryview(bytes(1 << 20))
    t0 = time.perf_counter()
    deadline = t0 + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"PUT\n")
        sent = 0
        while sent < nbytes:
            size = min(len(block), nbytes - sent)
            sock.sendall(block[:size])
            sent += size
            if time.perf_counter() > deadline:
                raise BenchError(f"upload through port {port} exceeded {timeout:g} s")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 8:
            chunk = sock.recv(8 - len(answer))
            if not chunk:
                break
            answer += chunk
    elapsed = time.perf_counter() - t0
    if len(answer) != 8 or struct.unpack(">Q", answer)[0] != nbytes:
        raise BenchError(f"upload through port {port}: the sink did not confirm {nbytes} bytes")
    return elapsed


# The harness -----------------------------------------------------------------------------


class Bench:
    #: Prepended to the default results file name (``bench/cp_bench.py`` uses ``cp-``).
    results_prefix = ""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.procs = Procs()
        self.tmp = Path(tempfile.mkdtemp(prefix="fvbench-"))
        self.env: dict[str, str] = {}
        self.vault_pid: int | None = None
        self.vault_log: Path | None = None
        self.vault_up = False
        self.sshd: subprocess.Popen[Any] | None = None
        self.ssh_port = 0
        self.ssh_config = self.tmp / "ssh_config"
        self.user_created = False
        self.peer: subprocess.Popen[Any] | None = None
        self.peer_port = 0
        self.runner: asyncio.Runner | None = None
        self.results: dict[str, Any] = {"benchmarks": {}}
        self.groups: dict[str, CpuGroup] = {}
        self.notes: list[str] = []

    # Set-up ------------------------------------------------------------------------------

    def server_prefix(self) -> list[str]:
        return ["taskset", "-c", "1"] if self.args.pin else []

    def setup_environment(self) -> None:
        os.chmod(self.tmp, 0o711)  # fvbench must reach its home inside
        home = self.tmp / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(self.tmp / "config"),
            XDG_DATA_HOME=str(self.tmp / "data"),
            XDG_CACHE_HOME=str(self.tmp / "cache"),
            XDG_STATE_HOME=str(self.tmp / "state"),
            # The connection keepers' sockets (kept apart from the user's own keepers).
            XDG_RUNTIME_DIR=str(self.tmp / "run"),
            # Byte-compile once into our own tree (not the repo's __pycache__) so that every
            # cold CLI run after the warm-up loads cached bytecode, whatever the caller's
            # PYTHONDONTWRITEBYTECODE says.
            PYTHONPYCACHEPREFIX=str(self.tmp / "pycache"),
        )
        env.pop("FLY_VAULT_CONFIG", None)
        env.pop("FLY_VAULT_LOG_FILE", None)
        env.pop("FLY_VAULT_MUX", None)
        (self.tmp / "run").mkdir(mode=0o700)
        self.env = env
        # The in-process client (B2, B3) reads the same config and cache.
        for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
            os.environ[key] = env[key]
        os.environ.pop("FLY_VAULT_CONFIG", None)

    def start_vault(self) -> None:
        out = check_output(
            [*self.server_prefix(), FLY_VAULT, "local", "up"], timeout=60, env=self.env
        )
        self.vault_up = True
        status = json.loads(
            check_output([FLY_VAULT, "local", "status", "--json"], timeout=30, env=self.env)
        )
        self.vault_pid = int(status["pid"])
        self.vault_log = Path(status["log_file"])
        self.track_cpu("vault", self.vault_pid)
        # init was forked before the supervisor joined the cgroup: add it too, so that its
        # CPU and that of the processes it starts later (exec sessions, file workers) counts.
        if "vault" in self.groups and status.get("init_pid"):
            self.groups["vault"].add(int(status["init_pid"]))
        self.results["setup"]["vault"] = {
            "address": f"{status['host']}:{status['port']}",
            "mode": status["mode"],
            "pid": self.vault_pid,
            "up_output": out.strip().splitlines()[:1],
        }
        if status["host"] != "127.0.0.1":
            raise BenchError(f"the local vault listens on {status['host']}, not 127.0.0.1")

    def stop_vault(self) -> None:
        if not self.vault_up:
            return
        keeper = self.keeper_pid()
        try:  # the connection keepers first (by their pid files, then by PID if still up)
            check_output([FLY_VAULT, "mux", "stop"], timeout=30, env=self.env)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            print(f"bench: mux stop failed: {exc}", file=sys.stderr)
        if keeper is not None:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{keeper}/cmdline").read_bytes()
                if b"fly-vault" in cmdline or b"flyvault" in cmdline:
                    os.kill(keeper, signal.SIGKILL)
        try:
            check_output([FLY_VAULT, "local", "down"], timeout=30, env=self.env)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            print(f"bench: local down failed: {exc}", file=sys.stderr)
        pid = self.vault_pid
        if pid is not None:
            with contextlib.suppress(OSError):
                if b"flyvault.localvault" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.killpg(pid, signal.SIGKILL)  # the supervisor and init, its child

    def ensure_sshd(self) -> None:
        if os.path.exists(SSHD):
            return
        print("bench: /usr/sbin/sshd missing: apt-get install openssh-server", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(
            ["apt-get", "update"], check=True, timeout=600, env=env, stdout=subprocess.DEVNULL
        )
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"],
            check=True,
            timeout=900,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        self.notes.append("installed openssh-server with apt-get")
        if not os.path.exists(SSHD):
            raise BenchError("openssh-server installed but /usr/sbin/sshd is still missing")

    def ensure_user(self) -> Path:
        home = self.tmp / "fvhome"
        home.mkdir()
        try:
            pwd.getpwnam(BENCH_USER)
            check_output(["usermod", "-d", str(home), "-s", "/bin/sh", BENCH_USER])
        except KeyError:
            check_output(["useradd", "-M", "-d", str(home), "-s", "/bin/sh", BENCH_USER])
            self.user_created = True
        # A "!" password means "locked" to sshd without PAM, even for keys; "*" does not.
        check_output(["usermod", "-p", "*", BENCH_USER])
        entry = pwd.getpwnam(BENCH_USER)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        for name in (".profile", ".bashrc", ".shrc"):
            (home / name).write_text("")
        key = self.tmp / "id_ed25519"
        check_output(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fvbench", "-f", str(key)]
        )
        (ssh_dir / "authorized_keys").write_text((self.tmp / "id_ed25519.pub").read_text())
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        for path in (
            home,
            ssh_dir,
            ssh_dir / "authorized_keys",
            *(home / n for n in (".profile", ".bashrc", ".shrc")),
        ):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(home, 0o755)
        return home

    def start_sshd(self) -> None:
        self.ensure_sshd()
        self.ensure_user()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        hostkey = self.tmp / "ssh_host_ed25519_key"
        check_output(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)])
        self.ssh_port = free_port()
        config = self.tmp / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress 127.0.0.1:{self.ssh_port}",
                    f"HostKey {hostkey}",
                    f"PidFile {self.tmp / 'sshd.pid'}",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "AuthenticationMethods publickey",
                    "AuthorizedKeysFile .ssh/authorized_keys",
                    f"AllowUsers {BENCH_USER}",
                    "PermitRootLogin no",
                    "PermitUserRC no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "UseDNS no",
                    "X11Forwarding no",
                    "AllowTcpForwarding local",
                    "MaxSessions 64",
                    "MaxStartups 64:30:128",
                    "LogLevel INFO",
                    # scp uses the SFTP protocol since OpenSSH 9.0 (bench/cp_bench.py).
                    f"Subsystem sftp {SFTP_SERVER if os.path.exists(SFTP_SERVER) else 'internal-sftp'}",
                    "",
                ]
            )
        )
        check_output([SSHD, "-t", "-f", str(config)])
        self.sshd = self.procs.start(
            "sshd",
            [*self.server_prefix(), SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "sshd.log", "ab"),  # noqa: SIM115 - closed with the process
        )
        self.track_cpu("sshd", self.sshd.pid)
        public = (Path(str(hostkey) + ".pub")).read_text().split()
        (self.tmp / "known_hosts").write_text(
            f"[127.0.0.1]:{self.ssh_port} {public[0]} {public[1]}\n"
        )
        self.ssh_config.write_text(
            "\n".join(
                [
                    "Host *",
                    f"  IdentityFile {self.tmp / 'id_ed25519'}",
                    "  IdentitiesOnly yes",
                    f"  UserKnownHostsFile {self.tmp / 'known_hosts'}",
                    "  GlobalKnownHostsFile /dev/null",
                    "  StrictHostKeyChecking yes",
                    "  UpdateHostKeys no",
                    "  BatchMode yes",
                    "  LogLevel ERROR",
                    "  AddressFamily inet",
                    "  ControlMaster no",
                    "  ControlPath none",
                    "",
                ]
            )
        )
        wait_until("sshd", lambda: self.sshd.poll() is not None or port_open(self.ssh_port), 15)
        if self.sshd.poll() is not None:
            raise BenchError(f"sshd exited: {(self.tmp / 'sshd.log').read_text()[-2000:]}")
        _, _, code, err = run_timed(self.ssh("true"), self.env, 30)
        if code != 0:
            log = (self.tmp / "sshd.log").read_text()[-2000:]
            raise BenchError(
                f"ssh {BENCH_USER}@127.0.0.1 true failed ({code}): {err.strip()}\n{log}"
            )
        self.results["setup"]["sshd"] = {
            "port": self.ssh_port,
            "pid": self.sshd.pid,
            "user": BENCH_USER,
        }

    def ssh(self, *command: str, options: tuple[str, ...] = ()) -> list[str]:
        return [
            "ssh",
            "-F",
            str(self.ssh_config),
            "-p",
            str(self.ssh_port),
            *options,
            f"{BENCH_USER}@127.0.0.1",
            *command,
        ]

    def start_peer(self, mode: str, *args: str) -> tuple[subprocess.Popen[Any], int]:
        process = self.procs.start(
            f"peer {mode}",
            [*self.server_prefix(), PYTHON, str(Path(__file__).resolve()), "--peer", mode, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(self.env, BENCH_PEER_LIFETIME="3600"),
        )
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 20)
        if not ready:
            raise BenchError(f"peer {mode} did not start")
        line = process.stdout.readline().strip()
        if not line.isdigit():
            raise BenchError(f"peer {mode} printed {line!r} instead of its port")
        return process, int(line)

    def in_process(self) -> asyncio.Runner:
        if self.runner is None:
            self.runner = asyncio.Runner()
        return self.runner

    def track_cpu(self, name: str, pid: int) -> None:
        group = CpuGroup(name)
        if group.add(pid):
            self.groups[name] = group
        else:
            group.remove()
        self.results["setup"].setdefault("server_cpu_accounting", {})[name] = (
            self.groups[name].method if name in self.groups else "proc tree (approximate)"
        )

    def server_cpu(self, name: str, pid: int | None) -> float:
        group = self.groups.get(name)
        if group is not None:
            value = group.seconds()
            if value is not None:
                return value
        return tree_cpu(pid) if pid else 0.0

    def keeper_pid(self) -> int | None:
        """The PID of the vault's connection keeper (from its pid file), if one runs."""
        for pid_file in (self.tmp / "run" / "fly-vault").glob("*.pid"):
            try:
                return int(json.loads(pid_file.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue
        return None

    def wait_for_keeper(self, timeout: float = 15.0) -> None:
        """Until the vault's keeper (started in the background) holds its connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = check_output([FLY_VAULT, "mux", "status", "--json"], timeout=30, env=self.env)
            if any(row.get("connected") for row in json.loads(out)):
                return
            time.sleep(0.05)
        raise BenchError(f"the connection keeper was not connected within {timeout:g} s")

    def keeper_rss_kib(self) -> int | None:
        pid = self.keeper_pid()
        try:
            status = Path(f"/proc/{pid}/status").read_text() if pid else ""
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) if match else None

    def vault_cpu(self) -> float:
        return self.server_cpu("vault", self.vault_pid)

    def sshd_cpu(self) -> float:
        return self.server_cpu("sshd", self.sshd.pid if self.sshd else None)

    def vault_log_lines(self, needle: str, limit: int = 20) -> list[str]:
        try:
            lines = (
                self.vault_log.read_text(errors="replace").splitlines() if self.vault_log else []
            )
        except OSError:
            return []
        return [line for line in lines if needle in line][-limit:]

    def record(self, bench_id: str, data: dict[str, Any]) -> None:
        self.results["benchmarks"][bench_id] = data

    def budget(self, seconds_quick: float, seconds_full: float) -> float:
        return time.monotonic() + (seconds_quick if self.quick else seconds_full)

    # B1: cold CLI exec vs ssh ----------------------------------------------------------

    def bench_b1(self) -> dict[str, Any]:
        n = 10 if self.quick else 30
        variants = {
            # Through the vault's connection keeper, started by the warm-up runs.
            "fly_vault_exec_true": [FLY_VAULT, "exec", VAULT, "--", "true"],
            # The first call on a vault: no keeper yet (each sample stops it first, untimed).
            # It goes direct and starts the keeper beside it, whose start is waited out
            # afterwards (untimed) so it overlaps no other sample.
            "fly_vault_exec_true_keeper_cold": [FLY_VAULT, "exec", VAULT, "--", "true"],
            # No keeper at all: a fresh handshake and attestation in every process.
            "fly_vault_exec_true_direct": [FLY_VAULT, "--no-mux", "exec", VAULT, "--", "true"],
            "ssh_true_default_kex": self.ssh("true"),
            "ssh_true_curve25519": self.ssh(
                "true", options=("-o", "KexAlgorithms=curve25519-sha256")
            ),
        }
        server_of = {name: self.vault_cpu for name in variants if name.startswith("fly_vault")}
        keeper_cpu = 0.0
        samples: dict[str, list[float]] = {name: [] for name in variants}
        client_cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
        server_cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
        # Warm-up: byte-compiles into our pycache, fills the JWKS cache, warms sshd.
        for argv in variants.values():
            for _ in range(2):
                _, _, code, err = run_timed(argv, self.env, 60)
                if code != 0:
                    raise BenchError(f"{' '.join(argv)} exited {code}: {err.strip()}")
        self.wait_for_keeper()
        names = list(variants)
        deadline = self.budget(180, 600)
        truncated = False
        for i in range(n):
            if time.monotonic() > deadline:
                truncated = True
                break
            order = names[i % len(names) :] + names[: i % len(names)]  # rotate: cancel drift
            for name in order:
                if name == "fly_vault_exec_true_keeper_cold":
                    check_output([FLY_VAULT, "mux", "stop"], timeout=30, env=self.env)
                server = server_of.get(name, self.sshd_cpu)
                before = server()
                keeper = self.keeper_pid() if name == "fly_vault_exec_true" else None
                keeper_before = tree_cpu(keeper) if keeper else 0.0
                wall, cpu, code, err = run_timed(variants[name], self.env, 60)
                if code != 0:
                    raise BenchError(f"{name} exited {code}: {err.strip()}")
                if keeper:
                    keeper_cpu += tree_cpu(keeper) - keeper_before
                samples[name].append(wall)
                client_cpu[name] += cpu
                # The server's share, read before the next command starts (children reaped
                # by then are in cutime; live ones are summed), and before a keeper started
                # in the background connects (its handshake is not this call's).
                server_cpu[name] += server() - before
                if name == "fly_vault_exec_true_keeper_cold":
                    self.wait_for_keeper()
        metrics = {}
        for name, values in samples.items():
            metrics[name] = {
                "command": " ".join(variants[name]),
                "wall": summarize(values, "ms", 1000),
                "client_cpu_ms_per_op": round(client_cpu[name] / max(1, len(values)) * 1000, 2),
                "server_cpu_ms_per_op": round(server_cpu[name] / max(1, len(values)) * 1000, 2),
            }
        # The keeper's own CPU is the client side's too (it does what the CLI process did).
        warm = metrics["fly_vault_exec_true"]
        warm["keeper_cpu_ms_per_op"] = round(
            keeper_cpu / max(1, len(samples["fly_vault_exec_true"])) * 1000, 2
        )
        warm["keeper_rss_kib"] = self.keeper_rss_kib()
        phases = metrics["phases"] = self.b1_phases()
        ours = metrics["fly_vault_exec_true"]["wall"]["p50"]
        direct_p50 = metrics["fly_vault_exec_true_direct"]["wall"]["p50"]
        imports = phases["import_exec_path"]["p50"]
        connect = sum(step["p50"] for step in phases["doctor_steps_cold_process"].values())
        if direct_p50 is not None and imports is not None:
            phases["estimate_of_direct_exec_p50_ms"] = {
                "interpreter_and_imports": imports,
                "connect_steps_cold_process": round(connect, 2),
                "rest_exec_round_trip_exit_and_cli": round(direct_p50 - imports - connect, 2),
            }
        thin = phases["import_thin_exec_path"]["p50"]
        if ours is not None and thin is not None:
            phases["estimate_of_keeper_exec_p50_ms"] = {
                "interpreter_and_imports": thin,
                "keeper_round_trip_exec_exit_and_cli": round(ours - thin, 2),
            }
        ssh_default = metrics["ssh_true_default_kex"]["wall"]["p50"]
        ssh_curve = metrics["ssh_true_curve25519"]["wall"]["p50"]
        first = metrics["fly_vault_exec_true_keeper_cold"]["wall"]["p50"]
        direct = metrics["fly_vault_exec_true_direct"]["wall"]["p50"]
        return {
            "what": "cold `fly-vault exec local -- true` (whole CLI process, wall) vs `ssh true`: "
            "through a warm keeper, as the first call (keeper started by it), and direct",
            "interleaved": True,
            "truncated_by_time_budget": truncated,
            "metrics": metrics,
            "ratios": {
                "fly_vault_p50_over_ssh_default_p50": ratio(ours, ssh_default),
                "fly_vault_p50_over_ssh_curve25519_p50": ratio(ours, ssh_curve),
                "keeper_cold_p50_over_direct_p50": ratio(first, direct),
                "direct_p50_over_ssh_curve25519_p50": ratio(direct, ssh_curve),
            },
            "targets": [
                target(
                    "warm keeper p50 <= 0.5x ssh (curve25519) p50 (issue 17, B1)",
                    ours,
                    "<=",
                    None if ssh_curve is None else ssh_curve * 0.5,
                    "ms",
                ),
                target("first call (keeper cold) p50 <= direct p50", first, "<=", direct, "ms"),
                target("p50 <= ssh (default KEX) p50", ours, "<=", ssh_default, "ms"),
                target("p50 <= ssh (curve25519) p50", ours, "<=", ssh_curve, "ms"),
                target("p50 <= 150 ms (reference budget)", ours, "<=", 150.0, "ms"),
            ],
        }

    def b1_phases(self) -> dict[str, Any]:
        """Where a cold CLI's time goes: interpreter, imports, connect steps (cold process)."""
        n = 3 if self.quick else 7
        probes = {
            "python_startup": [PYTHON, "-c", "pass"],
            "import_cli_main": [PYTHON, "-c", "import flyvault.cli.main"],
            "import_client_connection": [PYTHON, "-c", "import flyvault.client.connection"],
            "import_exec_path": [
                PYTHON,
                "-c",
                "import flyvault.cli.main, flyvault.cli.remote, flyvault.client.vault, "
                "flyvault.client.connection, flyvault.config",
            ],
            # What `exec` through a warm keeper imports (no asyncio, QUIC or crypto).
            "import_thin_exec_path": [
                PYTHON,
                "-c",
                "import flyvault.cli.main, flyvault.cli.remote, flyvault.cli.mux, "
                "flyvault.cli.progress",
            ],
        }
        walls: dict[str, list[float]] = {name: [] for name in probes}
        for argv in probes.values():  # warm the pycache
            run_timed(argv, self.env, 60)
        for _ in range(n):
            for name, argv in probes.items():
                wall, _, code, err = run_timed(argv, self.env, 60)
                if code != 0:
                    raise BenchError(f"{name}: {err.strip()}")
                walls[name].append(wall)
        phases: dict[str, Any] = {
            name: summarize(values, "ms", 1000) for name, values in walls.items()
        }
        # -X importtime once: the total and the biggest top-level imports.
        result = subprocess.run(
            [PYTHON, "-X", "importtime", "-c", probes["import_exec_path"][2]],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        total_us = 0
        top: list[tuple[int, str]] = []
        every: list[tuple[int, str]] = []
        for line in result.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if not m:
                continue
            total_us += int(m.group(1))
            every.append((int(m.group(2)), m.group(4)))
            if len(m.group(3)) <= 1:  # top level: one space after the bar
                top.append((int(m.group(2)), m.group(4)))
        top.sort(reverse=True)
        every.sort(reverse=True)
        phases["importtime"] = {
            "total_self_ms": round(total_us / 1000, 1),
            "top_level_cumulative_ms": {name: round(us / 1000, 1) for us, name in top[:8]},
            # Nested: a package's time includes the modules listed under it.
            "largest_cumulative_ms": {name: round(us / 1000, 1) for us, name in every[:15]},
        }
        # Connect steps in a cold process, as `doctor` reports them.
        steps: dict[str, list[float]] = {}
        for _ in range(n):
            result = subprocess.run(
                [FLY_VAULT, "doctor", VAULT, "--json"],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=60,
                check=False,
            )
            try:
                report = json.loads(result.stdout)
            except ValueError:
                raise BenchError(
                    f"doctor --json printed no JSON: {result.stderr.strip()}"
                ) from None
            for step in report.get("steps", []):
                steps.setdefault(step["step"], []).append(step["elapsed_ms"] / 1000)
        phases["doctor_steps_cold_process"] = {
            name: summarize(values, "ms", 1000) for name, values in steps.items()
        }
        return phases

    # B2: warm exec round trip ---------------------------------------------------------------

    def bench_b2(self) -> dict[str, Any]:
        from flyvault.client.vault import Vault
        from flyvault.config import load_vault

        n_ours, n_ssh = (100, 20) if self.quick else (300, 50)
        rounds = 5 if self.quick else 10
        runner = self.in_process()
        config = load_vault(VAULT)
        vault = Vault(config, reconnect_timeout=5)
        control = self.tmp / "cm"
        master = None
        try:
            first = runner.run(self._connect(vault))
            connect_timings = {k: round(v * 1000, 3) for k, v in first.timings.items()}
            warm_connects = runner.run(self._warm_connects(config, 5 if self.quick else 20))
            master = self.procs.start(
                "ssh ControlMaster",
                [
                    *self.ssh(
                        options=(
                            "-M",
                            "-S",
                            str(control),
                            "-N",
                            "-o",
                            "ControlMaster=yes",
                            "-o",
                            "ControlPersist=no",
                        )
                    )
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            check = self.ssh(options=("-S", str(control), "-O", "check"))
            wait_until(
                "ssh ControlMaster",
                lambda: subprocess.run(check, capture_output=True, timeout=10).returncode == 0,
                15,
                0.1,
            )
            warm_ssh = self.ssh("true", options=("-S", str(control), "-o", "ControlMaster=no"))
            # Warm-up both.
            runner.run(self._exec_loop(vault, 10))
            for _ in range(3):
                run_timed(warm_ssh, self.env, 30)
            ours: list[float] = []
            theirs: list[float] = []
            cpu = {"ours_client": 0.0, "ours_server": 0.0, "ssh_client": 0.0, "ssh_server": 0.0}
            deadline = self.budget(120, 600)
            truncated = False
            for r in range(rounds):
                if time.monotonic() > deadline:
                    truncated = True
                    break
                k = n_ours // rounds + (1 if r < n_ours % rounds else 0)
                c0, s0 = self_cpu(), self.vault_cpu()
                ours += runner.run(self._exec_loop(vault, k))
                cpu["ours_client"] += self_cpu() - c0
                cpu["ours_server"] += self.vault_cpu() - s0
                k = n_ssh // rounds + (1 if r < n_ssh % rounds else 0)
                for _ in range(k):
                    s0 = self.sshd_cpu()
                    wall, ccpu, code, err = run_timed(warm_ssh, self.env, 30)
                    if code != 0:
                        raise BenchError(f"ssh via ControlMaster exited {code}: {err.strip()}")
                    theirs.append(wall)
                    cpu["ssh_client"] += ccpu
                    cpu["ssh_server"] += self.sshd_cpu() - s0
        finally:
            if master is not None:
                self.procs.stop(master)
            runner.run(vault.close())
        ours_s = summarize(ours, "ms", 1000)
        ssh_s = summarize(theirs, "ms", 1000)
        per = lambda total, count: round(total / max(1, count) * 1000, 3)  # noqa: E731
        return {
            "what": "warm exec of `true` on an established connection: in-process Vault + "
            "ExecSession vs `ssh -S <ControlMaster socket> true`",
            "interleaved": f"{rounds} rounds",
            "truncated_by_time_budget": truncated,
            "metrics": {
                "fly_vault_execsession_true": {
                    "wall": ours_s,
                    "client_cpu_ms_per_op": per(cpu["ours_client"], len(ours)),
                    "server_cpu_ms_per_op": per(cpu["ours_server"], len(ours)),
                },
                "ssh_controlmaster_true": {
                    "wall": ssh_s,
                    "client_cpu_ms_per_op": per(cpu["ssh_client"], len(theirs)),
                    "server_cpu_ms_per_op": per(cpu["ssh_server"], len(theirs)),
                    "note": "a whole ssh client process per command (mux client)",
                },
                "first_connect_steps_ms": connect_timings,
                "warm_process_connect": warm_connects,
            },
            "ratios": {
                "fly_vault_p50_over_ssh_controlmaster_p50": ratio(ours_s["p50"], ssh_s["p50"])
            },
            "targets": [
                target("p50 <= 3 ms", ours_s["p50"], "<=", 3.0, "ms"),
                target("p99 <= 10 ms", ours_s["p99"], "<=", 10.0, "ms"),
            ],
        }

    @staticmethod
    async def _connect(vault: Any) -> Any:
        async with asyncio.timeout(30):
            return await vault.connection()

    @staticmethod
    async def _warm_connects(config: Any, n: int) -> dict[str, Any]:
        """New Vault + connection in this (warm) process: handshake + attestation + auth."""
        from flyvault.client.vault import Vault

        totals: list[float] = []
        steps: dict[str, list[float]] = {}
        for _ in range(n):
            vault = Vault(config, reconnect_timeout=5)
            t0 = time.perf_counter()
            async with asyncio.timeout(30):
                connection = await vault.connection()
            totals.append(time.perf_counter() - t0)
            for name, value in connection.timings.items():
                steps.setdefault(name, []).append(value)
            await vault.close()
        return {
            "total": summarize(totals, "ms", 1000),
            **{name: summarize(values, "ms", 1000) for name, values in steps.items()},
        }

    @staticmethod
    async def _exec_loop(vault: Any, n: int) -> list[float]:
        from flyvault.client.vault import ExecHooks, ExecSession, new_session_id
        from flyvault.protocol.console import OpenSession

        def sink(data: bytes) -> None:
            return None

        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            request = OpenSession(session_id=new_session_id("bench"), argv=("true",))
            session = ExecSession(vault, request, ExecHooks(stdout=sink, stderr=sink))
            session.close_stdin()  # as the CLI does with </dev/null
            async with asyncio.timeout(15):
                exited = await session.run()
            samples.append(time.perf_counter() - t0)
            if exited.exit_status != 0:
                raise BenchError(f"exec true exited {exited.exit_status}")
        return samples

    # B3: interactive echo ---------------------------------------------------------------

    def bench_b3(self) -> dict[str, Any]:
        from flyvault.client.vault import Vault
        from flyvault.config import load_vault

        n = 300 if self.quick else 1000
        rounds = 3 if self.quick else 10
        runner = self.in_process()
        vault = Vault(load_vault(VAULT), reconnect_timeout=5)
        samples: dict[str, list[float]] = {
            "fly_vault_pty_cat_echo": [],
            "ssh_T_cat_line": [],
            "local_pty_cat_echo": [],
            "local_pipe_cat_line": [],
        }
        cpu = dict.fromkeys(samples, 0.0)
        server_cpu = dict.fromkeys(samples, 0.0)
        ssh_cat = local_cat = pty_cat = None
        master_fd = -1
        session_ctl: dict[str, Any] = {}
        try:
            runner.run(self._connect(vault))
            runner.run(self._pty_open(vault, session_ctl))
            ssh_cat = self.procs.start(
                "ssh cat",
                self.ssh("cat", options=("-T",)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                bufsize=0,
            )
            local_cat = self.procs.start(
                "cat (pipe)", ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
            )
            master_fd, slave_fd = os.openpty()
            pty_cat = self.procs.start(
                "cat (pty)",
                ["cat"],
                stdin=slave_fd,
                stdout=slave_fd,
                stderr=slave_fd,
                start_new_session=True,
            )
            os.close(slave_fd)
            # Warm-up each path.
            runner.run(self._pty_echo(session_ctl, 20))
            line_rtt(ssh_cat, 20)
            line_rtt(local_cat, 20)
            pty_echo_sync(master_fd, 20)
            deadline = self.budget(120, 600)
            truncated = False
            for r in range(rounds):
                if time.monotonic() > deadline:
                    truncated = True
                    break
                k = n // rounds + (1 if r < n % rounds else 0)
                steps: dict[str, Callable[[int], list[float]]] = {
                    "fly_vault_pty_cat_echo": lambda k: runner.run(self._pty_echo(session_ctl, k)),
                    "ssh_T_cat_line": lambda k: line_rtt(ssh_cat, k),
                    "local_pty_cat_echo": lambda k: pty_echo_sync(master_fd, k),
                    "local_pipe_cat_line": lambda k: line_rtt(local_cat, k),
                }
                for name, step in steps.items():
                    server = {
                        "fly_vault_pty_cat_echo": self.vault_cpu,
                        "ssh_T_cat_line": self.sshd_cpu,
                    }.get(name, lambda: 0.0)
                    proc = ssh_cat if name == "ssh_T_cat_line" else None
                    c0 = self_cpu() + (tree_cpu(proc.pid) if proc else 0.0)
                    s0 = server()
                    samples[name] += step(k)
                    cpu[name] += self_cpu() + (tree_cpu(proc.pid) if proc else 0.0) - c0
                    server_cpu[name] += server() - s0
            exit_status = runner.run(self._pty_close(vault, session_ctl))
        finally:
            if "task" in session_ctl and not session_ctl["task"].done():
                runner.run(self._pty_abort(vault, session_ctl))
            for process in (ssh_cat, local_cat, pty_cat):
                if process is not None:
                    self.procs.stop(process)
            if master_fd >= 0:
                os.close(master_fd)
            runner.run(vault.close())
        metrics = {}
        for name, values in samples.items():
            metrics[name] = {
                "rtt": summarize(values, "ms", 1000),
                "client_cpu_us_per_op": round(cpu[name] / max(1, len(values)) * 1e6, 1),
                "server_cpu_us_per_op": round(server_cpu[name] / max(1, len(values)) * 1e6, 1),
            }
        metrics["fly_vault_pty_cat_echo"]["cat_exit_status"] = exit_status
        if exit_status != 0:
            # ^D at the start of a line should end `cat` with 0: keep the server's view.
            metrics["fly_vault_pty_cat_echo"]["server_log"] = self.vault_log_lines(
                session_ctl["session"].session_id
            )
        metrics["ssh_T_cat_line"]["note"] = "write 'x\\n' to ssh's stdin pipe, read the line back"
        metrics["local_pty_cat_echo"]["note"] = "floor: 1 byte into a local PTY, its echo back"
        metrics["local_pipe_cat_line"]["note"] = "floor: a line through a local `cat` pipe"
        ours = metrics["fly_vault_pty_cat_echo"]["rtt"]
        ssh_line = metrics["ssh_T_cat_line"]["rtt"]
        return {
            "what": "interactive echo: 1 byte into an ExecSession(pty=True) running `cat`, "
            "wait for the line discipline's echo; vs a line round trip through `ssh -T cat`",
            "interleaved": f"{rounds} rounds",
            "truncated_by_time_budget": truncated,
            "metrics": metrics,
            "ratios": {
                "fly_vault_p50_over_ssh_p50": ratio(ours["p50"], ssh_line["p50"]),
                "fly_vault_p50_over_local_pty_p50": ratio(
                    ours["p50"], metrics["local_pty_cat_echo"]["rtt"]["p50"]
                ),
            },
            "targets": [
                target("p50 <= 0.5 ms", ours["p50"], "<=", 0.5, "ms"),
                target("p99 <= 1 ms", ours["p99"], "<=", 1.0, "ms"),
            ],
        }

    @staticmethod
    async def _pty_open(vault: Any, ctl: dict[str, Any]) -> None:
        from flyvault.client.vault import ExecHooks, ExecSession, new_session_id
        from flyvault.protocol.console import OpenSession

        buffer = bytearray()
        event = asyncio.Event()
        started = asyncio.Event()

        def output(data: bytes) -> None:
            buffer.extend(data)
            event.set()

        request = OpenSession(
            session_id=new_session_id("bench-pty"),
            argv=("cat",),
            pty=True,
            term="xterm",
            rows=24,
            cols=80,
        )
        hooks = ExecHooks(stdout=output, stderr=output, started=lambda s: started.set())
        session = ExecSession(vault, request, hooks)
        task = asyncio.ensure_future(session.run())
        ctl.update(session=session, task=task, buffer=buffer, event=event)
        async with asyncio.timeout(15):
            waiter = asyncio.ensure_future(started.wait())
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                waiter.cancel()
                raise BenchError(f"the pty session ended at once: {task.result()}")

    @staticmethod
    async def _pty_echo(ctl: dict[str, Any], n: int) -> list[float]:
        """n timed bytes; a newline (untimed) every LINE bytes keeps the line buffer short."""
        line = 50
        session, buffer, event, task = ctl["session"], ctl["buffer"], ctl["event"], ctl["task"]

        async def wait_for(length: int) -> None:
            async with asyncio.timeout(5):
                while len(buffer) < length:
                    event.clear()
                    if task.done():
                        raise BenchError("the pty session ended during the echo test")
                    await event.wait()

        samples: list[float] = []
        while len(samples) < n:
            buffer.clear()
            k = min(line, n - len(samples))
            for j in range(k):
                t0 = time.perf_counter()
                session.send_stdin(b"x")
                await session.drain()
                await wait_for(j + 1)
                samples.append(time.perf_counter() - t0)
            session.send_stdin(b"\n")
            expected = b"x" * k + b"\r\n" + b"x" * k + b"\r\n"
            await wait_for(len(expected))
            if bytes(buffer) != expected:
                raise BenchError(f"unexpected pty output {bytes(buffer[:80])!r}")
        return samples

    @staticmethod
    async def _pty_close(vault: Any, ctl: dict[str, Any]) -> int:
        ctl["session"].send_stdin(b"\x04")  # ^D at the start of a line: cat sees EOF
        async with asyncio.timeout(10):
            exited = await ctl["task"]
        return int(exited.exit_status)

    @staticmethod
    async def _pty_abort(vault: Any, ctl: dict[str, Any]) -> None:
        ctl["task"].cancel()
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(5):
                await vault.kill(ctl["session"].session_id, signal.SIGKILL)

    # B4: forward throughput and memory ----------------------------------------------------

    def bench_b4(self) -> dict[str, Any]:
        size = (50 if self.quick else self.args.forward_mb) * MB
        fast_size = (200 if self.quick else 1000) * MB  # fast paths: long enough to time
        rounds = 1 if self.quick else 3
        peer, source_port = self.start_peer("serve")
        self.peer = peer
        relay, relay_port = self.start_peer("relay", str(source_port))
        fwd_port, ssh_port, ssh_gcm_port = free_port(), free_port(), free_port()
        direct_port = free_port()
        forward = direct = ssh_l = ssh_gcm = None
        try:
            # Both routes: through the vault's connection keeper (the default once one
            # runs: started here by an exec, as B1's warm-up does) and direct (--no-mux).
            check_output([FLY_VAULT, "exec", VAULT, "--", "true"], timeout=60, env=self.env)
            self.wait_for_keeper()
            spec = f"127.0.0.1:{source_port}"
            forward = self.start_forward("keeper", [], f"{fwd_port}:{spec}")
            self.check_forward_holds_keeper()
            direct = self.start_forward("direct", ["--no-mux"], f"{direct_port}:{spec}")
            rss_fresh = rss_kb(forward.pid)
            ssh_common = ("-N", "-o", "ExitOnForwardFailure=yes")
            ssh_l = self.procs.start(
                "ssh -L",
                self.ssh(
                    options=(*ssh_common, "-L", f"127.0.0.1:{ssh_port}:127.0.0.1:{source_port}")
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ssh_gcm = self.procs.start(
                "ssh -L aes128-gcm",
                self.ssh(
                    options=(
                        *ssh_common,
                        "-c",
                        "aes128-gcm@openssh.com",
                        "-L",
                        f"127.0.0.1:{ssh_gcm_port}:127.0.0.1:{source_port}",
                    )
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for process, port in ((ssh_l, ssh_port), (ssh_gcm, ssh_gcm_port)):
                wait_until(
                    "ssh -L", lambda p=process, q=port: p.poll() is not None or port_open(q), 20
                )
                if process.poll() is not None:
                    raise BenchError("ssh -L exited")
            paths = {
                # name: (port, client-side tunnel pid, server-side CPU probe, bytes)
                "fly_vault_forward": (fwd_port, forward.pid, self.vault_cpu, size),
                "fly_vault_forward_direct": (direct_port, direct.pid, self.vault_cpu, size),
                "ssh_L_default_cipher": (ssh_port, ssh_l.pid, self.sshd_cpu, fast_size),
                "ssh_L_aes128_gcm": (ssh_gcm_port, ssh_gcm.pid, self.sshd_cpu, fast_size),
                "python_socket_relay": (relay_port, relay.pid, None, fast_size),
                "direct_loopback": (source_port, None, None, fast_size),
            }
            # Warm-up: one small transfer each way per path.
            for port, _, _, _ in paths.values():
                tcp_download(port, 4 * MB, 60)
                tcp_upload(port, 4 * MB, 60)
            rates: dict[str, dict[str, list[float]]] = {
                name: {"download": [], "upload": []} for name in paths
            }
            cpu_pct: dict[str, dict[str, dict[str, list[float]]]] = {
                name: {"download": {}, "upload": {}} for name in paths
            }
            deadline = self.budget(300, 1200)
            truncated = False
            for r in range(rounds):
                names = list(paths)
                names = names[r % len(names) :] + names[: r % len(names)]
                for name in names:
                    port, middle, server, nbytes = paths[name]
                    for direction, move in (("download", tcp_download), ("upload", tcp_upload)):
                        if time.monotonic() > deadline:
                            truncated = True
                            break
                        timeout = max(120.0, nbytes / (1 * MB))
                        keeper = self.keeper_pid() if name == "fly_vault_forward" else None
                        c = {
                            "keeper": tree_cpu(keeper) if keeper else None,
                            "client_tunnel": tree_cpu(middle) if middle else None,
                            "server_tunnel": server() if server else None,
                            "bench_endpoint": self_cpu(),
                            "peer_endpoint": tree_cpu(peer.pid),
                        }
                        elapsed = move(port, nbytes, timeout)
                        after = {
                            "keeper": tree_cpu(keeper) if keeper else None,
                            "client_tunnel": tree_cpu(middle) if middle else None,
                            "server_tunnel": server() if server else None,
                            "bench_endpoint": self_cpu(),
                            "peer_endpoint": tree_cpu(peer.pid),
                        }
                        rates[name][direction].append(nbytes / elapsed / MB)
                        for key, v0 in c.items():
                            if v0 is not None:
                                pct = (after[key] - v0) / elapsed * 100
                                cpu_pct[name][direction].setdefault(key, []).append(pct)
            keeper_rest = self.keeper_rss_kib()
            slow = self.slow_reader(forward.pid, fwd_port, self.vault_pid)
            slow["rss_fresh_kb"] = rss_fresh
            # The keeper relays the forward's bytes: its RSS must stay flat too.
            slow["keeper_rss_before_kb"] = keeper_rest
            slow["keeper_rss_after_kb"] = self.keeper_rss_kib()
            slow_ssh = None
            if not self.quick:
                slow_ssh = self.slow_reader(ssh_l.pid, ssh_port, None)
        finally:
            for process in (ssh_gcm, ssh_l, direct, forward):
                if process is not None:
                    self.procs.stop(process)
            self.procs.stop(relay)
            self.procs.stop(peer)
            self.peer = None
        metrics: dict[str, Any] = {}
        for name, (_, _, _, nbytes) in paths.items():
            metrics[name] = {"bytes_per_transfer": nbytes}
            for direction in ("download", "upload"):
                metrics[name][direction] = {
                    "rate": summarize(rates[name][direction], "MB/s"),
                    "cpu_percent_p50": {
                        key: round(percentile(values, 0.5) or 0.0, 1)
                        for key, values in cpu_pct[name][direction].items()
                    },
                }
        metrics["fly_vault_forward_slow_reader_memory"] = slow
        if slow_ssh is not None:
            metrics["ssh_L_slow_reader_memory"] = slow_ssh
        ours_down = metrics["fly_vault_forward"]["download"]["rate"]["p50"]
        ours_up = metrics["fly_vault_forward"]["upload"]["rate"]["p50"]
        ratios = {
            f"keeper_over_direct_{direction}": ratio(
                metrics["fly_vault_forward"][direction]["rate"]["p50"],
                metrics["fly_vault_forward_direct"][direction]["rate"]["p50"],
            )
            for direction in ("download", "upload")
        }
        for base in (
            "ssh_L_default_cipher",
            "ssh_L_aes128_gcm",
            "python_socket_relay",
            "direct_loopback",
        ):
            for direction, ours in (("download", ours_down), ("upload", ours_up)):
                ratios[f"fly_vault_over_{base}_{direction}"] = ratio(
                    ours, metrics[base][direction]["rate"]["p50"]
                )
        return {
            "what": "MB/s of one TCP flow through `fly-vault forward` (CLI subprocess, through "
            "the vault's connection keeper, and direct with --no-mux; the keeper's CPU is "
            "counted as `keeper`) vs "
            "`ssh -L` vs a Python socket relay vs direct loopback; download = vault side -> "
            "local reader, upload = local writer -> vault side; plus the forward client's RSS "
            "under a 1 MB/s reader",
            "interleaved": f"{rounds} rounds, rotated",
            "truncated_by_time_budget": truncated,
            "metrics": metrics,
            "ratios": ratios,
            "targets": [
                target(">= 20 MB/s download (single flow)", ours_down, ">=", 20.0, "MB/s"),
                target(">= 20 MB/s upload (single flow)", ours_up, ">=", 20.0, "MB/s"),
                target(
                    f"RSS flat under a slow reader (growth <= {RSS_FLAT_LIMIT_KB // 1024} MiB)",
                    slow["client_growth_kb"],
                    "<=",
                    RSS_FLAT_LIMIT_KB,
                    "kB",
                ),
            ],
        }

    def check_forward_holds_keeper(self) -> None:
        """The default forward goes through the keeper: it holds a lease (an active
        request) there, else the keeper/direct comparison would compare direct with direct.
        (The status request counts itself as active: a lease makes it two.)"""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = check_output([FLY_VAULT, "mux", "status", "--json"], timeout=30, env=self.env)
            if any(row.get("active", 0) >= 2 for row in json.loads(out)):
                return
            time.sleep(0.05)
        raise BenchError("the forward did not go through the connection keeper")

    def start_forward(self, label: str, options: list[str], spec: str) -> subprocess.Popen[bytes]:
        """A ``fly-vault forward`` subprocess, once it listens (its stderr in a log)."""
        log = self.tmp / f"forward-{label}.log"
        with open(log, "wb") as log_file:
            forward = self.procs.start(
                f"fly-vault forward ({label})",
                [FLY_VAULT, *options, "forward", VAULT, spec],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env=self.env,
            )
        wait_until(
            "fly-vault forward",
            lambda: forward.poll() is not None or b"forwarding 127.0.0.1:" in log.read_bytes(),
            30,
        )
        if forward.poll() is not None:
            raise BenchError(f"fly-vault forward exited: {log.read_text()[-2000:]}")
        return forward

    def slow_reader(self, client_pid: int, port: int, server_pid: int | None) -> dict[str, Any]:
        """A reader at ~1 MB/s for 10 s against a source that could go 100x faster.
        ``server_pid``: the far end of the tunnel, whose RSS is sampled too (or None)."""
        seconds = 10.0
        rate = 1 * MB
        time.sleep(1.0)
        rest_client = rss_kb(client_pid)
        rest_server = rss_kb(server_pid) if server_pid else None
        samples: list[tuple[float, int | None, int | None]] = []
        got = 0
        chunk = 64 * 1024
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET %d\n" % (2000 * MB))
            next_sample = t0
            while (now := time.perf_counter()) - t0 < seconds:
                if got < (now - t0) * rate:
                    data = sock.recv(chunk)
                    if not data:
                        raise BenchError("the source ended during the slow read")
                    got += len(data)
                else:
                    time.sleep(0.01)
                if now >= next_sample:
                    server_rss = rss_kb(server_pid) if server_pid else None
                    samples.append((round(now - t0, 3), rss_kb(client_pid), server_rss))
                    next_sample += 0.25
            # Abort: the tunnel must cope with a reset while its buffers are full.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(2.0)
        after_client = rss_kb(client_pid)
        client_values = [c for _, c, _ in samples if c is not None]
        server_values = [s for _, _, s in samples if s is not None]
        peak = max(client_values) if client_values else None
        slope = None
        if len(client_values) >= 2:
            xs = [t for t, c, _ in samples if c is not None]
            mx, my = statistics.fmean(xs), statistics.fmean(client_values)
            den = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, client_values, strict=True)) / den
        return {
            "reader_rate_mb_s": rate / MB,
            "seconds": seconds,
            "bytes_read": got,
            "client_pid_rss_at_rest_kb": rest_client,
            "client_peak_kb": peak,
            "client_growth_kb": None if peak is None or rest_client is None else peak - rest_client,
            "client_rss_slope_kb_per_s": None if slope is None else round(slope, 1),
            "client_after_close_kb": after_client,
            "server_rss_at_rest_kb": rest_server,
            "server_peak_kb": max(server_values) if server_values else None,
            "samples_t_client_server_kb": samples,
        }

    # BE: bulk exec output -----------------------------------------------------------------

    def bench_be(self) -> dict[str, Any]:
        size = 100_000_000
        rounds = 1 if self.quick else 3
        command = ["head", "-c", str(size), "/dev/zero"]
        variants = {
            "fly_vault_exec_head": ([FLY_VAULT, "exec", VAULT, "--", *command], self.vault_cpu),
            "ssh_head": (self.ssh(*command), self.sshd_cpu),
            "local_head_pipe": (command, lambda: 0.0),
        }
        results: dict[str, dict[str, list[float]]] = {
            name: {
                "wall_rate": [],
                "stream_rate": [],
                "first_byte_ms": [],
                "client_cpu_pct": [],
                "server_cpu_pct": [],
            }
            for name in variants
        }
        deadline = self.budget(120, 600)
        truncated = False
        for r in range(rounds):
            names = list(variants)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                if time.monotonic() > deadline:
                    truncated = True
                    break
                argv, server = variants[name]
                s0 = server()
                wall, first, last, cpu = pipe_read(argv, self.env, size, self.tmp / "be.err", 300)
                stream = last - first
                entry = results[name]
                entry["wall_rate"].append(size / wall / MB)
                entry["stream_rate"].append(size / stream / MB if stream > 0 else float("nan"))
                entry["first_byte_ms"].append(first * 1000)
                entry["client_cpu_pct"].append(cpu / wall * 100)
                entry["server_cpu_pct"].append((server() - s0) / wall * 100)
        metrics = {}
        for name, entry in results.items():
            metrics[name] = {
                "command": " ".join(variants[name][0]),
                "rate_whole_command": summarize(entry["wall_rate"], "MB/s"),
                "rate_first_byte_to_eof": summarize(entry["stream_rate"], "MB/s"),
                "first_byte": summarize(entry["first_byte_ms"], "ms"),
                "client_cpu_percent_p50": round(percentile(entry["client_cpu_pct"], 0.5) or 0, 1),
                "server_cpu_percent_p50": round(percentile(entry["server_cpu_pct"], 0.5) or 0, 1),
            }
        ours = metrics["fly_vault_exec_head"]["rate_whole_command"]["p50"]
        theirs = metrics["ssh_head"]["rate_whole_command"]["p50"]
        return {
            "what": f"bulk exec output: `head -c {size} /dev/zero` on the vault into a pipe here",
            "interleaved": f"{rounds} rounds, rotated",
            "truncated_by_time_budget": truncated,
            "metrics": metrics,
            "ratios": {
                "fly_vault_over_ssh_whole_command": ratio(ours, theirs),
                "fly_vault_over_ssh_streaming": ratio(
                    metrics["fly_vault_exec_head"]["rate_first_byte_to_eof"]["p50"],
                    metrics["ssh_head"]["rate_first_byte_to_eof"]["p50"],
                ),
            },
            "targets": [],
        }

    # Driver ------------------------------------------------------------------------------

    def run(self, only: list[str]) -> int:
        failures = 0
        self.results.update(
            started_at=utc_now(),
            note=self.args.note,
            args={
                "quick": self.quick,
                "only": only,
                "pin": self.args.pin,
                "forward_mb": 50 if self.quick else self.args.forward_mb,
            },
            git=git_info(),
            machine=machine_info(),
            setup={"tmp": str(self.tmp), "pycache_prefix": self.env.get("PYTHONPYCACHEPREFIX")},
        )
        self.results["machine"]["loadavg_start"] = os.getloadavg()
        try:
            self.start_vault()
            self.start_sshd()
            # After set-up: installing openssh-server may upgrade the ssh client too.
            self.results["versions"] = versions()
            if self.args.pin:
                os.sched_setaffinity(0, {0})
            benches = {
                "B1": self.bench_b1,
                "B2": self.bench_b2,
                "B3": self.bench_b3,
                "B4": self.bench_b4,
                "BE": self.bench_be,
            }
            for bench_id in only:
                print(f"bench: {bench_id} ...", flush=True)
                t0 = time.monotonic()
                load0 = os.getloadavg()
                try:
                    data = benches[bench_id]()
                except KeyboardInterrupt as exc:
                    self.record(bench_id, {"error": f"interrupted ({exc})"})
                    raise
                except (Exception, asyncio.CancelledError) as exc:
                    failures += 1
                    data = {
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                    }
                    print(f"bench: {bench_id} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                data["elapsed_s"] = round(time.monotonic() - t0, 1)
                data["loadavg_start"] = load0
                data["loadavg_end"] = os.getloadavg()
                self.record(bench_id, data)
        except (KeyboardInterrupt, Exception) as exc:
            failures += 1
            self.stopped_early(exc, "bench")
        finally:
            self.cleanup()
        return self.finish(failures, print_summary)

    def stopped_early(self, exc: BaseException, prog: str) -> None:
        """Record why the run stopped before its end: interrupted, or the set-up failed."""
        if isinstance(exc, KeyboardInterrupt):
            self.results["interrupted"] = str(exc) or "KeyboardInterrupt"
            print(f"{prog}: interrupted ({exc}); cleaning up", file=sys.stderr)
            return
        self.results["setup_error"] = f"{type(exc).__name__}: {exc}"
        self.results["setup_traceback"] = traceback.format_exc()
        print(f"{prog}: set-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def finish(self, failures: int, *summaries: Callable[[dict[str, Any]], None]) -> int:
        """Complete the results, write them, print the summaries; the exit code."""
        if "versions" not in self.results:
            self.results["versions"] = versions()
        self.results["machine"]["loadavg_end"] = os.getloadavg()
        self.results["finished_at"] = utc_now()
        self.results["notes"] = self.notes
        out = self.write_results()
        for summary in summaries:
            summary(self.results)
        print(f"\nresults: {out}")
        return 1 if failures else 0

    def cleanup(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                self.runner.close()
        self.procs.stop_all()
        self.stop_vault()
        for group in self.groups.values():
            group.remove()
        if self.user_created:
            with contextlib.suppress(Exception):
                check_output(["userdel", BENCH_USER])
        if not self.args.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_results(self) -> Path:
        if self.args.out:
            path = Path(self.args.out)
        else:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
            sha = self.results["git"].get("sha") or "nogit"
            base = BENCH_DIR / "results" / f"{self.results_prefix}{stamp}-{sha}"
            path = base.with_suffix(".json")
            counter = 2
            while path.exists():
                path = Path(f"{base}-{counter}.json")
                counter += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        return path


# Sync measurement helpers ----------------------------------------------------------------


def target(
    name: str, value: float | None, op: str, limit: float | None, unit: str
) -> dict[str, Any]:
    met = None
    if value is not None and limit is not None:
        met = value <= limit if op == "<=" else value >= limit
    return {"target": name, "value": value, "limit": limit, "op": op, "unit": unit, "met": met}


def _read_until(fd: int, want: int, buffer: bytearray, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(buffer) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"no echo within {timeout:g} s (have {bytes(buffer[-40:])!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                raise BenchError("the echo stream ended")
            buffer += data


def line_rtt(process: subprocess.Popen[Any], n: int) -> list[float]:
    """Round trips of one short line through a process's stdin -> stdout (cat)."""
    assert process.stdin is not None and process.stdout is not None
    fd_in, fd_out = process.stdin.fileno(), process.stdout.fileno()
    samples = []
    for _ in range(n):
        buffer = bytearray()
        t0 = time.perf_counter()
        os.write(fd_in, b"x\n")
        _read_until(fd_out, 2, buffer)
        samples.append(time.perf_counter() - t0)
        if bytes(buffer) != b"x\n":
            raise BenchError(f"unexpected line {bytes(buffer)!r}")
    return samples


def pty_echo_sync(master_fd: int, n: int) -> list[float]:
    """The same protocol as the fly-vault PTY test, on a local PTY (the floor)."""
    line = 50
    samples: list[float] = []
    while len(samples) < n:
        buffer = bytearray()
        k = min(line, n - len(samples))
        for j in range(k):
            t0 = time.perf_counter()
            os.write(master_fd, b"x")
            _read_until(master_fd, j + 1, buffer)
            samples.append(time.perf_counter() - t0)
        os.write(master_fd, b"\n")
        expected = b"x" * k + b"\r\n" + b"x" * k + b"\r\n"
        _read_until(master_fd, len(expected), buffer)
        if bytes(buffer) != expected:
            raise BenchError(f"unexpected local pty output {bytes(buffer[:80])!r}")
    return samples


def pipe_read(
    argv: list[str], env: dict[str, str], size: int, err_path: Path, timeout: float
) -> tuple[float, float, float, float]:
    """Run ``argv`` with stdout into a pipe read here: (wall, first byte, EOF, CPU), seconds
    from the start."""
    cpu0 = children_cpu()
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env
        )
    try:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        got = 0
        first = None
        deadline = t0 + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise BenchError(f"{' '.join(argv)}: no EOF within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                break
            if first is None:
                first = time.perf_counter() - t0
            got += len(data)
        last = time.perf_counter() - t0
        code = process.wait(max(1.0, deadline - time.perf_counter()))
        wall = time.perf_counter() - t0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    if code != 0 or got != size:
        raise BenchError(
            f"{' '.join(argv)}: exit {code}, {got} of {size} bytes: "
            f"{err_path.read_text(errors='replace')[-500:]}"
        )
    return wall, first or last, last, children_cpu() - cpu0


# Environment facts ---------------------------------------------------------------------


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()

    status = git("status", "--porcelain")
    return {
        "sha": git("rev-parse", "--short", "HEAD") or None,
        "dirty_files": len(status.splitlines()) if status else 0,
    }


def versions() -> dict[str, Any]:
    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        ssh = subprocess.run(
            ["ssh", "-V"], capture_output=True, text=True, timeout=10
        ).stderr.strip()
    except OSError:
        ssh = None
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "fly_vault": dist("fly-vault"),
        "aioquic": dist("aioquic"),
        "cryptography": dist("cryptography"),
        "openssh": ssh,
        "kernel": platform.release(),
        "kernel_version": platform.version(),
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0))}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_kb"] = int(line.split()[1])
    return info


# Summary ---------------------------------------------------------------------------------


def print_summary(results: dict[str, Any]) -> None:
    machine = results.get("machine", {})
    v = results.get("versions", {})
    print(
        f"\nfly-vault bench  {results.get('started_at')}  git {results.get('git', {}).get('sha')}"
        f"  nproc {machine.get('nproc')}  load {fmt_load(machine.get('loadavg_start'))}"
        f" -> {fmt_load(machine.get('loadavg_end'))}"
    )
    print(
        f"Python {v.get('python')}  aioquic {v.get('aioquic')}  cryptography "
        f"{v.get('cryptography')}  {v.get('openssh')}  kernel {v.get('kernel')}"
    )
    if "setup_error" in results:
        print(f"SET-UP FAILED: {results['setup_error']}")
    if "interrupted" in results:
        print(f"INTERRUPTED: {results['interrupted']}")
    rows = [("id", "metric", "n", "p50", "p90", "p99", "unit")]
    for bench_id, data in results.get("benchmarks", {}).items():
        if "error" in data:
            rows.append((bench_id, "ERROR: " + data["error"][:90], "", "", "", "", ""))
            continue
        for name, summary in iter_summaries(data.get("metrics", {})):
            rows.append(
                (
                    bench_id,
                    name,
                    str(summary["n"]),
                    fmt(summary["p50"]),
                    fmt(summary["p90"]),
                    fmt(summary["p99"]),
                    summary["unit"],
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print()
    for bench_id, data in results.get("benchmarks", {}).items():
        for key, value in (data.get("ratios") or {}).items():
            print(f"{bench_id}  {key} = {value}")
        for t in data.get("targets") or []:
            mark = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
            print(f"{bench_id}  target {t['target']}: {fmt(t['value'])} {t['unit']} -> {mark}")
        if data.get("loadavg_start"):
            print(
                f"{bench_id}  load {fmt_load(data['loadavg_start'])} -> {fmt_load(data['loadavg_end'])}"
                f", {data.get('elapsed_s')} s"
            )
        phases = (data.get("metrics") or {}).get("phases") or {}
        for key, label in (
            ("estimate_of_direct_exec_p50_ms", "direct exec"),
            ("estimate_of_keeper_exec_p50_ms", "exec through the keeper"),
        ):
            if phases.get(key):
                print(
                    f"{bench_id}  {label} p50 split (ms): "
                    + ", ".join(f"{k} {fmt(v)}" for k, v in phases[key].items())
                )
        pty = (data.get("metrics") or {}).get("fly_vault_pty_cat_echo") or {}
        if pty.get("cat_exit_status") not in (None, 0):
            print(
                f"{bench_id}  note: `cat` in the PTY session ended with status "
                f"{pty['cat_exit_status']} after ^D, not 0 (server log lines kept in the JSON)"
            )
        slow = (data.get("metrics") or {}).get("fly_vault_forward_slow_reader_memory")
        if slow:
            print(
                f"{bench_id}  forward client RSS: at rest {slow['client_pid_rss_at_rest_kb']} kB, "
                f"peak under a 1 MB/s reader {slow['client_peak_kb']} kB "
                f"(+{slow['client_growth_kb']} kB, slope {slow['client_rss_slope_kb_per_s']} kB/s)"
            )


def iter_summaries(
    metrics: dict[str, Any], prefix: str = ""
) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, value in metrics.items():
        if not isinstance(value, dict):
            continue
        if "p50" in value and "n" in value:
            yield prefix + name, value
        else:
            yield from iter_summaries(value, f"{prefix}{name}.")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def fmt_load(load: Any) -> str:
    return "/".join(f"{x:.2f}" for x in load) if load else "-"


# Main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer"]:
        return peer_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, smaller transfers")
    parser.add_argument(
        "--only", default=",".join(ALL_IDS), help=f"comma list of {','.join(ALL_IDS)}"
    )
    parser.add_argument("--pin", action="store_true", help="pin clients to CPU 0, servers to CPU 1")
    parser.add_argument("--forward-mb", type=int, default=200, help="B4 fly-vault transfer size")
    parser.add_argument("--out", help="results file (default bench/results/<date>-<sha>.json)")
    parser.add_argument("--note", help="free text stored in the results (e.g. 'machine busy')")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    only = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in ALL_IDS]
    if unknown:
        parser.error(f"unknown benchmark(s) {','.join(unknown)}; choose from {','.join(ALL_IDS)}")
    if os.geteuid() != 0:
        parser.error("run as root: it creates a user and runs its own sshd")
    if not os.path.exists(FLY_VAULT):
        parser.error(f"{FLY_VAULT} not found (create the venv first)")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs 2 CPUs")

    def terminate(signo: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signo}")

    signal.signal(signal.SIGTERM, terminate)
    bench = Bench(args)
    bench.setup_environment()
    return bench.run(only)


if __name__ == "__main__":
    raise SystemExit(main())
