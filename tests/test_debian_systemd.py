"""A real distribution as the workload: Debian minbase with systemd, end to end (root only).

The image is built at set-up with debootstrap from this machine's apt sources and cached
between runs (``tests/debian_rootfs.py``); without root, debootstrap or a reachable mirror
the tests are skipped with the reason. Real init processes in vm mode, the real CLI:

* ``local up --rootfs``: provision, systemd reaches ``running`` (or ``degraded``), commands
  start as a login would; a named session and an attached shell, then a reprovision: both
  end within the grace with the reason, nothing is left stopped, /root and /home are kept;
  after ``local down`` the host's cgroup tree and hostname are as before ``local up``;
* init SIGKILLed while a session runs, then restarted: nothing of the old generation stays.

The provision and reprovision times are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, start_init, vault_entry

from flyvault.server import cgroups
from flyvault.server.sessions import END_GRACE, END_KILL_WAIT
from flyvault.standins import OidcIssuer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, cgroups and debootstrap need root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

#: The vault's name: the config entry, and the workload's hostname.
VAULT = "debvault"
REASON = "the vault is being reprovisioned"


CLI = (sys.executable, "-m", "flyvault.cli.main")
#: Longer than an init restart takes: the client must be there to see the new vault.
RECONNECT = ("--reconnect-timeout", "120")


def fv(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def fv_ok(*args: str, timeout: float = 180) -> str:
    result = fv(*args, timeout=timeout)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout.decode()


def configure(port: int, issuer: OidcIssuer, **rootfs: Any) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(port, issuer, name=VAULT, **rootfs))


def wait_booted() -> str:
    """``systemctl is-system-running --wait``: once systemd has finished booting."""
    state = fv("exec", VAULT, "--", "systemctl", "is-system-running", "--wait", timeout=180)
    return state.stdout.decode().strip()


def stop_init(init: InitProcess) -> None:
    """SIGTERM and wait: init ends the sessions, stops the workload, removes its cgroups."""
    if init.process.poll() is None:
        init.process.terminate()
        try:
            init.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            init.process.kill()
            init.process.wait()
            raise AssertionError("init did not stop within 60 s") from None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def host_snapshot() -> tuple[set[str], str, str]:
    tree = set()
    for hierarchy in cgroups.discover():
        for current, _dirs, _files in os.walk(hierarchy.mount):
            tree.add(current)
            if hierarchy.version == 2:  # what a leaking workload would also change
                control = Path(current, "cgroup.subtree_control")
                tree.add(f"{current} subtree_control={control.read_text().strip()}")
    return tree, Path("/proc/sys/kernel/hostname").read_text(), os.uname().nodename


def assert_host_unchanged(before: tuple[set[str], str, str], data_dir: Path) -> None:
    after = host_snapshot()
    assert after[1:] == before[1:], "the host's hostname changed"
    # Other processes on this machine make and remove cgroups of their own meanwhile: only a
    # change in our subtree or at a hierarchy's top (where a workload's systemd would put
    # system.slice and init.scope) counts.
    # Another fly-vault init on this machine (a second test run) makes its own fly-vault-<tag>
    # subtree at the top: not ours, and not what a leaking workload would make.
    tag = cgroups.subtree_name(data_dir)
    tops = {str(h.mount) for h in cgroups.discover()}

    def counts(entry: str) -> bool:
        path = Path(entry.split(" ")[0])
        if tag in entry:
            return True
        if path.name.startswith("fly-vault-"):
            return False
        return str(path.parent) in tops or entry in tops

    changed = [entry for entry in before[0] ^ after[0] if counts(entry)]
    assert not changed, changed


def stopped_processes() -> set[tuple[int, str]]:
    """(pid, command) of every process in state T or t on this machine."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2 :][:1] in ("T", "t"):
            found.add((int(entry), stat[stat.index("(") + 1 : stat.rindex(")")]))
    return found


def log_records(log: Path) -> list[dict[str, Any]]:
    """Init's log lines as ``{"ts", "msg"}``: JSON lines (fly-vault-init) or the local dev
    vault's text lines (``2026-12-05 12:38:38,059 INFO logger: message``)."""
    records = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
            continue
        match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+: (.*)", line)
        if match:
            stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            records.append({"ts": stamp + int(match.group(2)) / 1000, "msg": match.group(3)})
    return records


def phases(log: Path) -> list[dict[str, float]]:
    """The phases of every provisioning init logged, in order."""
    found = []
    for record in log_records(log):
        match = re.match(r"provisioned for \S+ in ([\d.]+) s \((.*)\)", record["msg"])
        if match:
            timing = {"total": float(match.group(1))}
            for name, seconds in re.findall(r"(\w+) ([\d.]+) s", match.group(2)):
                timing[name] = float(seconds)
            found.append(timing)
    return found


class AttachedShell:
    """``fly-vault connect vm`` in a terminal of its own, its output collected."""

    def __init__(self) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.process = subprocess.Popen(
            [*CLI, "connect", VAULT],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""
        self.ended_at: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            readable, _, _ = select.select([self.master], [], [], 0.2)
            if readable:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the client has gone
                    data = b""
                if not data:
                    break
                self.output += data
            elif self.process.poll() is not None:
                break
        self.ended_at = time.monotonic()

    def wait_for(self, text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, (text, self.output[-2000:])
            assert self.process.poll() is None, self.output[-2000:]
            time.sleep(0.05)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        os.close(self.master)


def sessions() -> dict[str, dict[str, Any]]:
    return {s["session_id"]: s for s in json.loads(fv_ok("list-exec", VAULT, "--json"))}


def members(namespaces: set[tuple[str, tuple[int, ...]]]) -> set[int]:
    """The pids of the processes in any of ``namespaces`` ((kind, (dev, inode)))."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for kind, ns in namespaces:
            with contextlib.suppress(OSError):
                info = os.stat(f"/proc/{entry}/ns/{kind}")
                if (info.st_dev, info.st_ino) == ns:
                    found.add(int(entry))
    return found


def start_time(pid: int) -> int | None:
    """A live process's start time (its identity with the pid); None once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_systemd_boots_sessions_end_with_the_reason_and_the_host_is_untouched(
    isolated_dirs: Path, debian_image: Path
) -> None:
    """The local dev vault in vm mode, from ``local up`` to ``local down``."""
    before = host_snapshot()
    stopped_before = stopped_processes()
    local = isolated_dirs / "data" / "fly-vault" / "local"
    log, data_dir = local / "init.log", local / "data"
    named: subprocess.Popen[bytes] | None = None
    shell: AttachedShell | None = None
    timings: dict[str, float] = {}
    fv_ok("local", "up", "--rootfs", str(debian_image), "--name", VAULT)
    try:
        began = time.monotonic()
        fv_ok("exec", VAULT, "--", "true")  # provisions the cold vault
        timings["provision"] = time.monotonic() - began
        assert wait_booted() in ("running", "degraded")

        # Where and as whom a command starts: the login of root, as sshd would.
        login = fv_ok(
            "exec",
            VAULT,
            "--",
            "sh",
            "-c",
            'pwd; echo "$HOME $USER $LOGNAME $SHELL"; echo "$PATH"; hostname; '
            "tail -n1 /proc/1/cgroup; cat /proc/sys/kernel/hostname",
        ).splitlines()
        assert login == [
            "/root",
            "/root root root /bin/bash",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            VAULT,
            "0::/init.scope",  # systemd manages its own cgroup namespace only
            VAULT,
        ]
        assert fv_ok("exec", VAULT, "--cwd", "/tmp", "--", "pwd").strip() == "/tmp"
        fv_ok("exec", VAULT, "--", "sh", "-c", "echo kept > /root/keep.txt; echo mine > /home/f")

        began = time.monotonic()
        assert b"reprovisioned in" in fv_ok("reprovision", VAULT, "--yes").encode()
        timings["reprovision"] = time.monotonic() - began
        assert wait_booted() in ("running", "degraded")

        # A named session and an attached shell, then a reprovision.
        named = subprocess.Popen(
            [*CLI, "exec", VAULT, "--session", "s2", "-T", "--", "sleep", "300"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        shell = AttachedShell()
        shell.wait_for(f"root@{VAULT}:~#".encode())
        shell.send(b"echo in-$((6*7))\n")
        shell.wait_for(b"in-42")
        until(
            lambda: sum(s["running"] and s["attached"] for s in sessions().values()) == 2,
            60,
            "both sessions attached",
        )
        began = time.monotonic()
        fv_ok("reprovision", VAULT, "--yes")
        timings["reprovision_with_sessions"] = time.monotonic() - began
        assert wait_booted() in ("running", "degraded")

        out, err = named.communicate(timeout=60)
        assert named.returncode == 128 + signal.SIGHUP, (out, err)
        assert f"session s2 was ended by the vault: {REASON} (exit status 129)".encode() in err, err
        assert shell.wait(timeout=60) == 128 + signal.SIGHUP
        assert f"the shell was ended by the vault: {REASON} (exit status 129)".encode() in (
            shell.output
        ), shell.output[-2000:]
        # Within the grace: from "ending" to each exit, as init logged them.
        records = log_records(log)
        ending = next(r["ts"] for r in records if r["msg"].startswith("ending 2 session(s)"))
        exits = [
            r["ts"] for r in records if re.match(r"session \S+ exited: .*reprovisioned", r["msg"])
        ]
        assert len(exits) == 2 and max(exits) - ending <= END_GRACE + END_KILL_WAIT, records[-20:]
        assert sessions()["s2"]["end_reason"] == REASON
        # Ending them costs the reprovision no more than the grace (stop_old: sessions and
        # the old workload's stop; the rest of the phases does not depend on sessions).
        plain, loaded = phases(log)[-2:]
        assert loaded["stop_old"] <= plain["stop_old"] + END_GRACE + 1.0, (plain, loaded)

        # Nothing left stopped (systemd's shutdown SIGSTOPs what it sees), homes kept.
        assert stopped_processes() - stopped_before == set()
        kept = fv_ok("exec", VAULT, "--", "cat", "/root/keep.txt", "/home/f").split()
        assert kept == ["kept", "mine"]
    finally:
        if named is not None and named.poll() is None:
            named.kill()
            named.wait()
        if shell is not None:
            shell.close()
        down = fv("local", "down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert cgroups.existing(cgroups.subtree_name(data_dir)) == []
    assert_host_unchanged(before, data_dir)
    print(
        f"\nDebian {debian_image.name}: provision {timings['provision']:.1f} s; reprovision "
        f"{timings['reprovision']:.1f} s without sessions, "
        f"{timings['reprovision_with_sessions']:.1f} s with a named session and a shell "
        f"attached; init's phases: {phases(log)}"
    )


def test_init_sigkilled_with_a_session_running_leaves_nothing_after_the_restart(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer, debian_image: Path
) -> None:
    port = free_udp_port()
    listen = ("--listen", f"127.0.0.1:{port}", "--hostname", VAULT)
    stopped_before = stopped_processes()
    init = start_init(tmp_path, fly_api.path, host_mode=False, extra_args=listen)
    named: subprocess.Popen[bytes] | None = None
    again: InitProcess | None = None
    try:
        configure(init.port, issuer, rootfs=str(debian_image))
        fv_ok("exec", VAULT, "--", "true")
        assert wait_booted() in ("running", "degraded")
        named = subprocess.Popen(
            [*CLI, "exec", VAULT, "--session", "s3", "-T", *RECONNECT, "--", "sleep", "300"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        until(lambda: "s3" in sessions(), 60, "the session")
        old = json.loads((init.data_dir / "workload.json").read_text())
        old_namespaces = {(kind, tuple(ns)) for kind, ns in old["namespaces"].items()}
        # The old generation, taken while it runs: every process in its namespaces (their
        # numbers are reused by the next generation's once they are freed).
        old_generation = {
            (pid, started) for pid in members(old_namespaces) if (started := start_time(pid))
        }
        assert old["init"]["pid"] in {pid for pid, _ in old_generation}
        assert len(old_generation) >= 3  # systemd, journald, ..., the session's sleep

        init.process.kill()
        init.process.wait(timeout=10)
        again = start_init(tmp_path, fly_api.path, host_mode=False, extra_args=listen)
        assert wait_booted() in ("running", "degraded")

        # Nothing of the old generation: each of its processes gone (a zombie of this
        # machine's PID 1 is reaped by it), nothing left stopped.
        until(
            lambda: all(start_time(pid) != started for pid, started in old_generation),
            30,
            "the old generation's processes to go",
        )
        assert stopped_processes() - stopped_before == set()
        assert "s3" not in sessions()
        # The client that was attached says what happened instead of "not found".
        _, err = named.communicate(timeout=150)
        assert named.returncode != 0
        assert b"session s3 ended: the vault restarted" in err, err
        workload = json.loads((again.data_dir / "workload.json").read_text())
        assert workload["init"]["pid"] != old["init"]["pid"]
    finally:
        if named is not None and named.poll() is None:
            named.kill()
            named.wait()
        if init.process.poll() is None:
            init.process.kill()
            init.process.wait()
        if again is not None:
            stop_init(again)
    assert cgroups.existing(cgroups.subtree_name(init.data_dir)) == []


@pytest.fixture(autouse=True)
def _no_stray_vault(tmp_path: Path, isolated_dirs: Path) -> Iterator[None]:
    yield
    # Whatever a failed test left: the local vault is stopped and the cgroups go, so later
    # tests see the host's tree.
    fv("local", "down", timeout=120)
    for data in (tmp_path / "init-data", isolated_dirs / "data/fly-vault/local/data"):
        leftover = cgroups.existing(cgroups.subtree_name(data))
        if leftover:
            cgroups.kill_and_remove(leftover, 10)
